"""The capture: a sampled, size-bounded record of the statements clients ran, for `pgfront replay`.

Each worker process writes its own file, `{path}.{worker_id}`, of JSON lines (see FORMAT below). The
relay's side costs little: `sample()` is a countdown (one random() per *sampled* statement, not per
statement), and `offer()` only encodes a line into an in-memory buffer; a background task hands the
buffer to a thread every FLUSH_INTERVAL seconds (or sooner once it passes FLUSH_BYTES), so the event
loop never waits on the disk. Nothing here raises into the relay or blocks it: past `max_size`, or
when the disk falls behind by MAX_BACKLOG bytes, statements are dropped and counted.

FORMAT (version 1), one JSON object per line, each with a "type":
  header      first line of every run of a worker: format, version, pgfront, started, worker, pid,
              share, max_size. A restarted worker appends a new header to its file; session ids are
              only unique between two headers of one file.
  fingerprint the first statement of a fingerprint in this run is preceded by its normalized text:
              fingerprint, normalized (statements do not repeat it)
  session     a client connection became ready: session, started, database, user, application_name,
              settings (optional: startup parameters that shape how values print, e.g. TimeZone)
  statement   session, started (wall clock), seconds, sql, fingerprint, kind, write, in_transaction,
              database, user, application_name, rows, sqlstate, digest, params, param_formats,
              param_types, result_formats, settings (optional, as the relay gives them on Observed).
              params is null for a simple Query, else one entry per Bind
              value: null (NULL), a string (a text-format value that is valid UTF-8: readable), or
              {"b64": "..."} (a binary-format value, or text that is not UTF-8)
  end         a client connection went away: session, ended
  full        max_size was reached at `at`: no statement after it was written (a reader knows the
              capture is truncated even if the worker never shut down cleanly)
  footer      written on a clean close: ended, statements, dropped, skipped, backlog_dropped, errors
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import math
import os
import random
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import orjson

from proxy import __version__
from proxy.shadow.observe import Observed

FORMAT = "pgfront-capture"
VERSION = 1
FLUSH_INTERVAL = 0.2  # seconds between writes of the buffer
FLUSH_BYTES = 256 * 1024  # write sooner once this much is buffered
MAX_BACKLOG = 16 * 1024 * 1024  # buffered but not yet on disk: more is dropped (the disk cannot keep up)
_RESERVE = 1024  # kept back from max_size for the `full` and `footer` lines


def encode_params(params: list[bytes | None] | None, formats: list[int]) -> list[Any] | None:
    """Bind values as JSON values; `decode_params` gives the same bytes back."""
    if params is None:
        return None
    out: list[Any] = []
    for i, value in enumerate(params):
        if value is None:
            out.append(None)
            continue
        # formats: none = all text, one = that format for all, else one per value (the Bind message's rule)
        binary = (formats[i] if len(formats) > 1 else formats[0]) == 1 if formats else False
        if not binary:
            try:
                out.append(value.decode())
                continue
            except UnicodeDecodeError:  # the client's encoding is not UTF-8: keep the bytes exactly
                pass
        out.append({"b64": base64.b64encode(value).decode("ascii")})
    return out


def decode_params(values: list[Any] | None) -> list[bytes | None] | None:
    if values is None:
        return None
    out: list[bytes | None] = []
    for v in values:
        if v is None:
            out.append(None)
        elif isinstance(v, str):
            out.append(v.encode())
        elif isinstance(v, dict) and isinstance(v.get("b64"), str):
            out.append(base64.b64decode(v["b64"], validate=True))
        else:
            raise ValueError(f"not a captured parameter value: {v!r}")
    return out


def capture_paths(path: str | os.PathLike[str]) -> list[Path]:
    """The per-worker files `{path}.{worker_id}` that exist, in worker order."""
    base = Path(path)
    if not base.parent.is_dir():
        return []
    prefix = base.name + "."
    found = [(int(p.name[len(prefix):]), p) for p in base.parent.iterdir()
             if p.name.startswith(prefix) and p.name[len(prefix):].isdigit()]
    return [p for _, p in sorted(found)]


class CaptureWriter:
    """One worker's capture file. Create with `from_config`, then `start(worker_id)` in the event loop;
    the relay asks `sample()` per statement and `offer()`s the sampled ones; `close()` on shutdown."""

    def __init__(self, path: str | os.PathLike[str], share: float = 1.0, max_size: int = 100 * 1024 * 1024,
                 *, rng: Callable[[], float] = random.random) -> None:
        self.base = Path(path)
        self.share = min(1.0, max(0.0, float(share)))
        self.max_size = int(max_size)
        self._random = rng
        self.path: Path | None = None  # this worker's file, once started
        self.worker_id = -1
        # counters (also in stats())
        self.statements = 0  # statement lines accepted
        self.dropped = 0  # sampled statements not written: max_size was reached
        self.backlog_dropped = 0  # sampled statements not written: the disk fell behind
        self.errors = 0  # statements that could not be encoded (a bug, never the relay's problem)
        self.skipped = 0  # statements the sampling passed over
        self.full = False
        self.failed: str | None = None  # why writing stopped for good (the file could not be opened/written)
        self.written_bytes = 0  # on disk, this run
        self._room = 0  # bytes that may still be buffered before max_size
        self._buf: list[bytes] = []
        self._buffered = 0
        self._kick: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._file: Any = None
        self._seen: set[str] = set()  # fingerprints whose normalized text is in this run already
        self._countdown = self.gap()

    @classmethod
    def from_config(cls, section: Any) -> CaptureWriter | None:
        """From the [capture] section (attributes path, share, max_size in bytes); None when off."""
        path = getattr(section, "path", "") or ""
        share = float(getattr(section, "share", 1.0))
        if not path or share <= 0.0:
            return None
        return cls(path, share, int(getattr(section, "max_size", 100 * 1024 * 1024)))

    # ---- life cycle -------------------------------------------------------------------------------

    def start(self, worker_id: int, workers: int = 1) -> None:
        """Open `{path}.{worker_id}` (appending: a restarted worker keeps what it wrote before) and start
        the flush task; call it from the worker's running event loop. `workers` splits max_size between
        the worker files so the whole capture stays within it. A file that cannot be opened turns the
        capture off for this worker (logged), rather than failing the worker."""
        self.worker_id = worker_id
        self.path = Path(f"{self.base}.{worker_id}")
        budget = self.max_size // max(1, workers)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115 - closed in close()
            existing = self._file.tell()
        except OSError as e:
            self._fail(f"cannot open {self.path}: {e}")
            return
        self._room = budget - existing - _RESERVE
        self._kick = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._flush_loop(), name="capture-flush")
        header = {"type": "header", "format": FORMAT, "version": VERSION, "pgfront": __version__,
                  "started": time.time(), "worker": worker_id, "pid": os.getpid(), "share": self.share,
                  "max_size": budget}
        if not self._put(header):
            self.full = True  # full in an earlier run, which said so: nothing more, not even a header

    async def close(self) -> None:
        """Write what is buffered and a footer, and close the file."""
        if self._task is not None:
            # not cancelled: a write already handed to a thread must finish before the last one starts
            self._closing = True
            assert self._kick is not None
            self._kick.set()
            await self._task
            self._task = None
        if self._file is None:
            return
        self._append({"type": "footer", "ended": time.time(), "statements": self.statements,
                      "dropped": self.dropped, "skipped": self.skipped, "backlog_dropped": self.backlog_dropped,
                      "errors": self.errors})
        await self._flush()
        if self._file is not None:  # (a failed write closed it)
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    def stats(self) -> dict[str, Any]:
        return {"path": str(self.path) if self.path else str(self.base), "share": self.share,
                "statements": self.statements, "dropped": self.dropped, "skipped": self.skipped,
                "backlog_dropped": self.backlog_dropped, "errors": self.errors, "full": self.full,
                "failed": self.failed, "bytes": self.written_bytes}

    # ---- hot path ---------------------------------------------------------------------------------

    def gap(self) -> int:
        """Statements until the next one `share` picks, counting that one: a geometric draw has the same
        odds as a draw per statement but costs one random() per sampled statement. A relay counting down
        itself (in C) can call this instead of `sample()`."""
        if self.share >= 1.0:
            return 1
        if self.share <= 0.0:
            return sys.maxsize
        n = int(math.log(1.0 - self._random()) / math.log(1.0 - self.share)) + 1
        self.skipped += n - 1
        return n

    def sample(self) -> bool:
        """Whether to capture this statement (build an Observed with capture=True and offer it)."""
        self._countdown -= 1
        if self._countdown > 0:
            return False
        self._countdown = self.gap()
        if self.full or self.failed is not None:
            if self.full:
                self.dropped += 1
            return False
        return True

    def offer(self, obs: Observed) -> None:
        """Buffer one statement line. Never blocks, never raises."""
        if self.full or self.failed is not None or self._file is None:
            if self.full:
                self.dropped += 1
            return
        if not obs.unpack():
            self.errors += 1  # a Bind that cannot be read: nothing to replay it with
            return
        try:
            if obs.fingerprint not in self._seen:
                # the normalized text once per fingerprint and run, not on every statement
                if not self._put({"type": "fingerprint", "fingerprint": obs.fingerprint,
                                  "normalized": obs.normalized}):
                    self._mark_full()
                    self.dropped += 1
                    return
                self._seen.add(obs.fingerprint)
            record = {
                "type": "statement", "session": obs.session, "started": obs.started, "seconds": obs.seconds,
                "sql": obs.sql, "fingerprint": obs.fingerprint, "kind": obs.kind, "write": obs.write,
                "in_transaction": obs.in_transaction, "database": obs.database, "user": obs.user,
                "application_name": obs.application_name, "rows": obs.rows, "sqlstate": obs.sqlstate,
                "digest": obs.digest, "params": encode_params(obs.params, obs.param_formats),
                "param_formats": obs.param_formats, "param_types": obs.param_types,
                "result_formats": obs.result_formats,
            }
            settings = getattr(obs, "settings", None)  # result-shaping settings, if the relay records them
            if settings:
                record["settings"] = dict(settings)
            line = orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
        except Exception:  # noqa: BLE001 - an odd value must not reach the relay
            self.errors += 1
            return
        if self._buffered + len(line) > MAX_BACKLOG:
            self.backlog_dropped += 1
            return
        if not self._push(line):
            self._mark_full()
            self.dropped += 1
            return
        self.statements += 1

    def session_started(self, session_id: int, database: str, user: str, application_name: str,
                        started: float, settings: Mapping[str, str] | None = None) -> None:
        """A client connection became ready. `settings`: its startup parameters that shape how values
        print (TimeZone, DateStyle, extra_float_digits, ...): replay sets them so the digests compare."""
        if self._file is None or self.full:
            return
        record: dict[str, Any] = {"type": "session", "session": session_id, "started": started,
                                  "database": database, "user": user, "application_name": application_name}
        if settings:
            record["settings"] = dict(settings)
        if not self._put(record):
            self._mark_full()

    def session_ended(self, session_id: int, ended: float) -> None:
        if self._file is None or self.full:
            return
        if not self._put({"type": "end", "session": session_id, "ended": ended}):
            self._mark_full()

    # ---- buffer and disk --------------------------------------------------------------------------

    def _put(self, record: dict[str, Any]) -> bool:
        """Buffer a record within max_size; False when it does not fit."""
        try:
            line = orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
        except Exception:  # noqa: BLE001
            self.errors += 1
            return True
        return self._push(line)

    def _push(self, line: bytes) -> bool:
        if len(line) > self._room:
            return False
        self._room -= len(line)
        self._append_line(line)
        return True

    def _append(self, record: dict[str, Any]) -> None:
        """Buffer a record outside the budget (the `full` and `footer` lines, which _RESERVE pays for)."""
        self._append_line(orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))

    def _append_line(self, line: bytes) -> None:
        self._buf.append(line)
        self._buffered += len(line)
        if self._buffered >= FLUSH_BYTES and self._kick is not None:
            self._kick.set()

    def _mark_full(self) -> None:
        if not self.full:
            self.full = True
            self._append({"type": "full", "at": time.time(), "statements": self.statements})

    def _fail(self, why: str) -> None:
        from proxy.log import log

        self.failed = why
        self._buf.clear()
        self._buffered = 0
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        log.error("capture off", extra={"reason": why, "worker": self.worker_id})

    async def _flush_loop(self) -> None:
        assert self._kick is not None
        while True:
            try:
                await asyncio.wait_for(self._kick.wait(), FLUSH_INTERVAL)
            except TimeoutError:
                pass
            self._kick.clear()
            await self._flush()
            if self._closing:
                return

    async def _flush(self) -> None:
        if not self._buf or self._file is None or self.failed is not None:
            return
        data = b"".join(self._buf)
        self._buf = []
        self._buffered = 0
        try:
            # in a thread: a slow disk delays this task, never the relay's event loop
            await asyncio.get_running_loop().run_in_executor(None, self._write, data)
        except OSError as e:
            self._fail(f"cannot write {self.path}: {e}")
            return
        self.written_bytes += len(data)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = self._file.write(view)
            view = view[n:]
