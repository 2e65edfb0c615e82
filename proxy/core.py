"""Which relay core runs: the compiled one (Cython extension modules built from the same .py files)
or the interpreted one. `PGFRONT_PURE_PYTHON=1` forces the interpreted core even where the compiled
modules are installed: it must be set before `proxy` is imported (the CLI, the workers and the tests
inherit it from the environment)."""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path

# the modules setup.py compiles
COMPILED = ("proxy.wire.framer", "proxy.wire.protocol", "proxy.relay.records", "proxy.relay.serverstate",
            "proxy.relay.replies", "proxy.relay.conversation", "proxy.relay.hothits", "proxy.net.bytepath",
            "proxy.shapes", "proxy.stats", "proxy.replicas.choice")
_ROOT = Path(__file__).resolve().parent.parent


class _SourceOnly(importlib.abc.MetaPathFinder):
    """Finds the compiled modules' .py sources, ahead of the extension modules beside them."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if name not in COMPILED:
            return None
        source = _ROOT.joinpath(*name.split(".")).with_suffix(".py")
        return importlib.util.spec_from_file_location(name, source) if source.exists() else None


def force_pure() -> None:
    if not any(isinstance(f, _SourceOnly) for f in sys.meta_path):
        sys.meta_path.insert(0, _SourceOnly())


if os.environ.get("PGFRONT_PURE_PYTHON") == "1":
    force_pure()


def _extension(name: str) -> Path | None:
    parts = name.split(".")
    found = sorted(_ROOT.joinpath(*parts[:-1]).glob(parts[-1] + ".*.so"))
    return found[0] if found else None


def stale() -> list[str]:
    """Compiled modules whose extension is missing or older than their sources (.py, .pxd): a build
    in place (scripts/setup.sh) is due, or the tests would run yesterday's code."""
    out = []
    for name in COMPILED:
        ext = _extension(name)
        sources = [_ROOT.joinpath(*name.split(".")).with_suffix(s) for s in (".py", ".pxd")]
        sources.append(_ROOT / "setup.py")  # its compiler directives change the build too
        newest = max(p.stat().st_mtime for p in sources if p.exists())
        if ext is None or ext.stat().st_mtime < newest:
            out.append(name)
    return out


@functools.cache  # fixed for the life of the process: the CLI and every metrics scrape ask
def core() -> str:
    """"compiled" when every hot module runs as an extension module, else "pure"."""
    import importlib

    for name in COMPILED:
        origin = getattr(importlib.import_module(name), "__file__", "") or ""
        if origin.endswith(".py"):
            return "pure"
    return "compiled"
