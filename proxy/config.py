"""config.toml: a declarative schema, loading, validation and command-line overrides.

Every key lives in SCHEMA with its type, default and a one-line description; config.toml in the repo
documents the same keys. A bad file or flag raises ConfigError with one line naming the key, which the
CLI prints before exiting with status 2.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ConfigError(Exception):
    """A configuration mistake; str() is the one line shown to the operator."""


_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024**2, "mb": 1024**2,
               "mib": 1024**2, "g": 1024**3, "gb": 1024**3, "gib": 1024**3}
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


def parse_size(value: Any) -> int:
    """'1GiB', '64kB', 1024 -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    m = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"not a size: {value!r} (use bytes or a unit: kB, MB, GB, KiB, MiB, GiB)")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]


def parse_duration(value: Any) -> float:
    """'60s', '250ms', '5m', 1.5 -> seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|min|m|h|d)\s*", str(value))
    if not m:
        raise ValueError(f"not a duration: {value!r} (use a number with ms, s, m, h or d)")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def parse_hostport(value: Any) -> tuple[str, int]:
    m = re.fullmatch(r"\[?([^\]]*?)\]?:(\d+)", str(value).strip())
    if not m or not (0 < int(m.group(2)) < 65536):
        raise ValueError(f"not HOST:PORT: {value!r}")
    return m.group(1) or "127.0.0.1", int(m.group(2))  # ":PORT" means loopback; say 0.0.0.0 to expose it


@dataclass(frozen=True)
class Key:
    kind: str  # str, int, bool, float, size, duration, hostport, list, optional_hostport
    default: Any
    doc: str


# section -> key -> Key. Keep config.toml in step with this table.
SCHEMA: dict[str, dict[str, Key]] = {
    "server": {
        "listen": Key("hostport", "127.0.0.1:6432", "address clients connect to"),
        "upstream": Key("str", "postgresql://localhost:5432",
                        "PostgreSQL server to proxy to (host, port, sslmode); 'local' starts a throwaway local one"),
        "workers": Key("int", 1, "worker processes sharing the listen port (SO_REUSEPORT)"),
        "max_message_size": Key("size", "1GiB", "largest protocol message accepted from a client"),
        "connect_timeout": Key("duration", "10s", "how long to wait for the upstream to accept a connection"),
        "startup_timeout": Key("duration", "15s", "a client that has not finished its startup by then is dropped"),
        "client_idle_timeout": Key("duration", "0s", "drop clients idle (no transaction open) this long; 0 = never"),
        "max_client_conn": Key("int", 10000, "client connections accepted at once, per worker"),
        "max_user_client_conn": Key("int", 0, "client connections per user at once, per worker; 0 = no limit"),
        "max_db_client_conn": Key("int", 0, "client connections per database at once, per worker; 0 = no limit"),
        "shutdown_timeout": Key("duration", "30s", "on SIGTERM, how long running transactions may finish"),
        "run_dir": Key("str", "", "directory for worker state (stats snapshots); empty = a temp dir per instance"),
        "log_level": Key("str", "info", "debug, info, warning or error"),
        "log_format": Key("str", "json", "json (one object per line) or text"),
        "log_parameters": Key("bool", False, "include query parameter values in logs"),
    },
    "auth": {
        "mode": Key("str", "passthrough", "passthrough (the upstream checks passwords), userlist or query "
                                          "(pgfront checks them and logs in to the upstream itself)"),
        "file": Key("str", "", "userlist for mode = userlist: lines of \"user\" \"password or SCRAM/md5 verifier\""),
        "query": Key("str", "SELECT rolname, rolpassword FROM pg_authid WHERE rolname = $1 AND rolcanlogin",
                     "for mode = query: returns (name, password verifier) of a role"),
        "query_dsn": Key("str", "", "login used to run the auth query; empty = the upstream URL as postgres"),
        "method": Key("str", "password", "password (SCRAM-SHA-256, or md5 for md5-hashed secrets) or trust (a listed "
                                         "role gets in without a password: for trusted networks only)"),
    },
    "pool": {
        "mode": Key("str", "session", "session (a server connection per client session) or transaction (lent per "
                                      "transaction); pooling reuses connections only with [auth] mode userlist/query"),
        "databases": Key("map", {}, "pool mode per database, e.g. { app = \"transaction\" }"),
        "users": Key("map", {}, "pool mode per user (wins over databases)"),
        "default_pool_size": Key("int", 20, "server connections per (database, user) pool"),
        "min_pool_size": Key("int", 0, "server connections kept open per pool even when idle"),
        "reserve_pool_size": Key("int", 0, "extra connections for clients that waited reserve_pool_timeout"),
        "reserve_pool_timeout": Key("duration", "5s", "wait after which the reserve pool may be used"),
        "max_db_connections": Key("int", 0, "server connections per database across users; 0 = no limit"),
        "server_idle_timeout": Key("duration", "600s", "close pooled server connections idle this long"),
        "server_lifetime": Key("duration", "3600s", "close pooled server connections older than this"),
        "query_wait_timeout": Key("duration", "120s", "a client waiting longer for a server connection gets an error"),
        "server_reset_query": Key("str", "DISCARD ALL", "run on a server connection before another client gets it "
                                                        "(session mode); empty = none"),
        "session_state": Key("str", "pin", "transaction mode, on SET/LISTEN/advisory locks/WITH HOLD/temp tables/"
                                           "PREPARE: pin (keep the server for the session) or refuse"),
    },
    "admin": {
        "users": Key("list", ["postgres"], "roles allowed on the admin console (dbname=pgfront)"),
    },
    "metrics": {
        "listen": Key("optional_hostport", "", "serve /metrics and /healthz here; empty = off"),
        "top_n": Key("int", 50, "fingerprints given their own labels in /metrics"),
    },
    "stats": {
        "max_fingerprints": Key("int", 5000, "fingerprints tracked per worker; the least used fold into 'other'"),
        "flush_interval": Key("duration", "1s", "how often workers publish their statistics"),
    },
    "rules": {
        "files": Key("list", ["rules/*.toml"], "rule files or globs, loaded in name order"),
        "watch": Key("bool", True, "reload rules when a rule file changes on disk"),
    },
    "cache": {
        "enabled": Key("bool", False, "serve reads selected by cache rules from Redis"),
        "redis_url": Key("str", "redis://127.0.0.1:6379/0", "Redis (or redis+cluster://) holding results and table versions"),
        "max_result_size": Key("size", "1MiB", "larger results are streamed through and not cached"),
        "l1_size": Key("size", "64MiB", "in-process cache in front of Redis, per worker"),
        "redis_timeout": Key("duration", "50ms", "a Redis call slower than this bypasses the cache"),
        "local_validity": Key("duration", "20ms", "an L1 hit checked against Redis this recently is served with "
                                                   "no round trip; a commit invalidating it waits out the rest of "
                                                   "that window first; 0 = check every hit; same value on every "
                                                   "instance sharing a Redis"),
        "default_ttl": Key("duration", "60s", "TTL for cache rules that give none"),
        "replication_listener": Key("bool", False, "follow the upstream's logical replication stream to catch writes that bypass pgfront"),
        "replication_slot": Key("str", "pgfront_invalidation", "slot used by the replication listener"),
    },
    "throttle": {
        "redis_url": Key("str", "", "Redis sharing throttle rules' limits across workers and instances; empty = "
                                    "[cache] redis_url when the cache is enabled; off = each worker keeps its own"),
        "redis_timeout": Key("duration", "50ms", "a Redis call slower than this makes each worker keep the limits "
                                                 "on its own until Redis answers again"),
        "lease": Key("duration", "30s", "a worker that stops renewing its concurrency slots (it crashed) loses "
                                        "them after this long"),
    },
    "slowlog": {
        "threshold_ms": Key("float", 200.0, "statements slower than this get their plan captured; 0 = off"),
        "path": Key("str", "pgfront-slowlog.jsonl", "slow-plan store (JSON lines), rotated by size"),
        "max_size": Key("size", "100MiB", "rotate the slow-plan store at this size"),
        "store_parameters": Key("bool", True, "keep parameter values with captured plans"),
        "explain_analyze": Key("bool", False, "EXPLAIN ANALYZE slow reads (never writes)"),
        "per_fingerprint_interval": Key("duration", "60s", "at most one captured plan per fingerprint this often"),
        "dsn": Key("str", "", "login for plan captures (a monitoring role; SET ROLE to the statement's user when "
                              "allowed); empty = the upstream URL, logging in as the statement's user"),
        "keep": Key("int", 5, "rotated slow-plan files kept (.1 ... .N)"),
        "queue_size": Key("int", 100, "plan captures waiting at most; more are dropped and counted"),
    },
    "capture": {
        "path": Key("str", "", "write a sampled capture of statements (parameters, timing, sessions) to this path, "
                               "one file per worker (PATH.N); pgfront replay reads it; empty = off"),
        "share": Key("float", 1.0, "share of statements captured (0 to 1)"),
        "max_size": Key("size", "100MiB", "stop capturing when a worker's file reaches this size"),
    },
    "tls": {
        "cert_file": Key("str", "", "server certificate for client TLS; empty = refuse SSLRequest"),
        "key_file": Key("str", "", "private key for cert_file"),
        "require_client_tls": Key("bool", False, "refuse clients that do not use TLS (needs cert_file)"),
        "upstream_sslmode": Key("str", "disable", "disable, prefer, require, verify-ca or verify-full"),
        "upstream_ca_file": Key("str", "", "CA bundle for verify-ca / verify-full"),
    },
    "advisor": {
        "p95_target_ms": Key("float", 50.0, "scorecard: p95 latency target per fingerprint"),
        "index_scan_share_target": Key("float", 0.90, "scorecard: share of calls served by index scans"),
        "cache_hit_target": Key("float", 0.85, "scorecard: pgfront and Postgres buffer cache hit ratio"),
        "pool_utilisation_target": Key("float", 0.80, "scorecard: pool utilisation ceiling"),
        "min_improvement": Key("float", 0.20, "keep an index only if it cuts estimated cost by this share"),
        "deadlocks_per_hour_target": Key("float", 1.0, "scorecard: deadlocks per hour ceiling"),
    },
    "routing": {
        "read_your_writes": Key("bool", True, "after a client's write commits, its reads go only to replicas that "
                                              "have replayed it (or to the primary)"),
        "max_wait": Key("duration", "200ms", "how long a read may wait for a replica to replay the client's last "
                                             "write before it goes to the primary"),
        "max_lag_bytes": Key("size", "16MiB", "a replica further behind the primary's WAL than this gets no reads"),
        "max_lag_seconds": Key("duration", "10s", "a replica whose replay is this far behind gets no reads"),
        "probe_interval": Key("duration", "1s", "how often each replica's health and replay position are probed"),
        "read_your_writes_scope": Key("str", "session", "whose writes a client's reads must see: session (its "
                                                        "own), user (every session of its role) or application "
                                                        "(of its application_name), across instances via Redis"),
        "read_your_writes_ttl": Key("duration", "10min", "scope user/application: how long a session's write mark "
                                                        "outlives it (longer than any write transaction)"),
        "redis_url": Key("str", "", "Redis for read_your_writes_scope user/application; empty = [cache] redis_url"),
        "read_only_functions": Key("list", [], "functions (besides PostgreSQL's read-only built-ins and those the "
                                              "catalog says are STABLE or IMMUTABLE) that reads may call on a replica"),
    },
    "tracing": {
        "endpoint": Key("str", "", "OTLP/HTTP traces endpoint, e.g. http://127.0.0.1:4318/v1/traces; empty = "
                                   "tracing off (the hot path pays nothing)"),
        "sample_ratio": Key("float", 0.01, "share of statements without a sampled traceparent that get a span; "
                                           "a sqlcommenter traceparent's own sampled flag always wins"),
        "service_name": Key("str", "pgfront", "service.name of the spans"),
        "headers": Key("map", {}, "extra HTTP headers for the exporter (authentication)"),
        "export_timeout": Key("duration", "10s", "how long one export request (retries included) may take"),
        "max_queue_size": Key("int", 2048, "spans buffered for export; more are dropped (and counted)"),
    },
}


def _coerce(kind: str, value: Any) -> Any:
    if kind == "str":
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {value!r}")
        return value
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ValueError(f"expected true or false, got {value!r}")
    if kind == "int":
        if isinstance(value, bool):
            raise ValueError(f"expected a whole number, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a whole number, got {value!r}") from None
    if kind == "float":
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {value!r}") from None
    if kind == "size":
        return parse_size(value)
    if kind == "duration":
        return parse_duration(value)
    if kind == "hostport":
        return parse_hostport(value)
    if kind == "optional_hostport":
        return parse_hostport(value) if value else None
    if kind == "map":
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise ValueError(f"expected a table of strings, got {value!r}")
        return dict(value)
    if kind == "list":
        if isinstance(value, str):
            return [v for v in (x.strip() for x in value.split(",")) if v]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"expected a list of strings, got {value!r}")
        return list(value)
    raise AssertionError(kind)


class Section:
    """Attribute access to one section's validated values."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Config:
    def __init__(self, raw: dict[str, dict[str, Any]], source: str = "<defaults>") -> None:
        self.source = source
        self.raw = raw
        self.mirror_targets = _mirror_targets(raw.get("mirror", {}), source)
        self.replicas = _replicas(raw.get("replica", []), source)
        for section, keys in SCHEMA.items():
            given = raw.get(section, {})
            values = {}
            for name, key in keys.items():
                value = given.get(name, key.default)
                try:
                    values[name] = _coerce(key.kind, value)
                except ValueError as e:
                    raise ConfigError(f"{source}: [{section}] {name}: {e}") from None
            setattr(self, section, Section(values))
        if self.server.workers < 1:
            raise ConfigError(f"{source}: [server] workers: must be at least 1")
        if self.server.log_format not in ("json", "text"):
            raise ConfigError(f"{source}: [server] log_format: expected json or text")
        for mode in [self.pool.mode, *self.pool.databases.values(), *self.pool.users.values()]:
            if mode not in ("session", "transaction"):
                raise ConfigError(f"{source}: [pool] mode: expected session or transaction, got {mode!r}")
        if self.pool.session_state not in ("pin", "refuse"):
            raise ConfigError(f"{source}: [pool] session_state: expected pin or refuse")
        uses_tx = "transaction" in (self.pool.mode, *self.pool.databases.values(), *self.pool.users.values())
        if uses_tx and self.auth.mode == "passthrough":
            raise ConfigError(f"{source}: [pool] mode: transaction pooling needs [auth] mode = userlist or query "
                              "(pgfront must log in to server connections without the client)")
        if self.auth.method not in ("password", "trust"):
            raise ConfigError(f"{source}: [auth] method: expected password or trust")
        if self.auth.mode not in ("passthrough", "userlist", "query"):
            raise ConfigError(f"{source}: [auth] mode: expected passthrough, userlist or query")
        if self.auth.mode == "userlist" and not self.auth.file:
            raise ConfigError(f"{source}: [auth] file: mode = userlist needs a userlist file")
        if self.tls.upstream_sslmode not in ("disable", "prefer", "require", "verify-ca", "verify-full"):
            raise ConfigError(f"{source}: [tls] upstream_sslmode: unknown mode {self.tls.upstream_sslmode!r}")
        if not 0.0 <= self.capture.share <= 1.0:
            raise ConfigError(f"{source}: [capture] share: expected a number from 0 to 1")
        if not 0.0 <= self.tracing.sample_ratio <= 1.0:
            raise ConfigError(f"{source}: [tracing] sample_ratio: expected a number from 0 to 1")
        if self.tracing.endpoint:
            from urllib.parse import urlsplit

            try:
                url = urlsplit(self.tracing.endpoint)
                ok = url.scheme in ("http", "https") and bool(url.hostname) and (url.port or 1) > 0
            except ValueError:  # a port that is not a number, or out of range
                ok = False
            if not ok:
                raise ConfigError(f"{source}: [tracing] endpoint: expected an http:// or https:// URL with a "
                                  "host (OTLP/HTTP, e.g. http://127.0.0.1:4318/v1/traces)")
        if self.replicas and self.auth.mode == "passthrough":
            raise ConfigError(f"{source}: [[replica]]: routing reads to replicas needs [auth] mode = userlist or "
                              "query and [pool] mode = transaction (pgfront logs in to each upstream itself)")
        scope = self.routing.read_your_writes_scope
        if scope not in ("session", "user", "application"):
            raise ConfigError(f"{source}: [routing] read_your_writes_scope: expected session, user or application")
        if scope != "session" and not (self.routing.redis_url or self.cache.enabled):
            raise ConfigError(f"{source}: [routing] read_your_writes_scope = {scope} shares writes through Redis: "
                              "set [routing] redis_url (or enable the cache)")
        if self.tracing.max_queue_size < 1:
            raise ConfigError(f"{source}: [tracing] max_queue_size: must be at least 1")

    # typed views used everywhere
    server: Section
    auth: Section
    pool: Section
    admin: Section
    metrics: Section
    stats: Section
    rules: Section
    cache: Section
    throttle: Section
    capture: Section
    slowlog: Section
    tls: Section
    advisor: Section
    tracing: Section
    routing: Section

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {s: getattr(self, s).as_dict() for s in SCHEMA}


# [mirror.NAME] tables: shadow targets named by the rules' `mirror` action, as many as wanted
MIRROR_KEYS = {
    "url": Key("str", "", "the shadow PostgreSQL (postgresql://user:password@host:port/dbname)"),
    "queue_size": Key("int", 1000, "mirrored statements waiting per worker; more are dropped and counted"),
    "connections": Key("int", 2, "connections to the shadow per worker"),
    "timeout": Key("duration", "5s", "a statement slower than this on the shadow is cancelled and counted as an error"),
}


def _mirror_targets(raw: Any, source: str) -> dict[str, dict[str, Any]]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: mirror targets go in [mirror.NAME] tables")
    targets = {}
    for name, body in raw.items():
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: [mirror.{name}] must be a table with a url")
        for key in body:
            if key not in MIRROR_KEYS:
                raise ConfigError(f"{source}: [mirror.{name}] unknown key {key!r} (known: {', '.join(MIRROR_KEYS)})")
        values = {}
        for key, spec in MIRROR_KEYS.items():
            try:
                values[key] = _coerce(spec.kind, body.get(key, spec.default))
            except ValueError as e:
                raise ConfigError(f"{source}: [mirror.{name}] {key}: {e}") from None
        if not values["url"].startswith(("postgresql://", "postgres://")):
            raise ConfigError(f"{source}: [mirror.{name}] url: expected postgresql://..., got {values['url']!r}")
        if values["queue_size"] < 1 or values["connections"] < 1:
            raise ConfigError(f"{source}: [mirror.{name}]: queue_size and connections must be at least 1")
        targets[name] = values
    return targets


# [[replica]] entries: streaming replicas of [server] upstream (the primary) that serve reads
REPLICA_KEYS = {
    "url": Key("str", "", "the replica (postgresql://host:port; user and password are used by pgfront's probes)"),
    "name": Key("str", "", "its name in SHOW REPLICAS and the metrics; empty = replica1, replica2, ..."),
    "weight": Key("float", 1.0, "its share of the reads, relative to the other replicas"),
    "databases": Key("list", [], "databases it serves reads of; empty = all"),
}


def _replicas(raw: Any, source: str) -> list[dict[str, Any]]:
    if not isinstance(raw, list):
        raise ConfigError(f"{source}: replicas go in [[replica]] entries (an array of tables)")
    out = []
    for n, body in enumerate(raw, 1):
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: [[replica]] #{n} must be a table with a url")
        for key in body:
            if key not in REPLICA_KEYS:
                raise ConfigError(f"{source}: [[replica]] #{n}: unknown key {key!r} (known: {', '.join(REPLICA_KEYS)})")
        values = {}
        for key, spec in REPLICA_KEYS.items():
            try:
                values[key] = _coerce(spec.kind, body.get(key, spec.default))
            except ValueError as e:
                raise ConfigError(f"{source}: [[replica]] #{n} {key}: {e}") from None
        if not values["url"].startswith(("postgresql://", "postgres://")):
            raise ConfigError(f"{source}: [[replica]] #{n} url: expected postgresql://..., got {values['url']!r}")
        if values["weight"] <= 0:
            raise ConfigError(f"{source}: [[replica]] #{n} weight: must be above 0")
        values["name"] = values["name"] or f"replica{n}"
        if values["name"] in (r["name"] for r in out) or values["name"] == "primary":
            raise ConfigError(f"{source}: [[replica]] #{n} name: {values['name']!r} is taken")
        out.append(values)
    return out


def _check_known(raw: dict[str, Any], source: str) -> None:
    for section, body in raw.items():
        if section in ("mirror", "replica"):
            continue  # [mirror.NAME] tables and [[replica]] entries: checked by _mirror_targets and _replicas
        if section not in SCHEMA:
            raise ConfigError(f"{source}: unknown section [{section}] (known: {', '.join(SCHEMA)})")
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: {section} must be a table ([{section}])")
        for key in body:
            if key not in SCHEMA[section]:
                raise ConfigError(f"{source}: [{section}] unknown key {key!r} (known: {', '.join(SCHEMA[section])})")


def load(path: str | Path | None, overrides: dict[str, dict[str, Any]] | None = None) -> Config:
    """Read a config file (None: defaults only) and apply overrides such as command-line flags."""
    raw: dict[str, dict[str, Any]] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{source}: no such config file") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{source}: not valid TOML: {e}") from None
        _check_known(raw, source)
    for section, values in (overrides or {}).items():
        raw.setdefault(section, {}).update(values)
    return Config(raw, source)


def render_defaults() -> str:
    """config.toml with every key at its default, each under its description (`pgfront config`)."""
    import json

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {json.dumps(x)}" for k, x in v.items()) + " }" if v else "{}"
        return json.dumps(v)

    out = ["# pgfront configuration. Every key is shown with its default and what it does.",
           "# Command-line flags (pgfront serve --listen/--upstream/--workers/--metrics/--rules/--slow-ms/--slowlog)",
           "# override these. Sizes take kB/MB/GB/KiB/MiB/GiB; durations take ms/s/m/h/d.", ""]
    for section, keys in SCHEMA.items():
        out.append(f"[{section}]")
        for name, key in keys.items():
            out.append(f"# {key.doc}")
            out.append(f"{name} = {fmt(key.default)}")
        out.append("")
    out.append("# Shadow targets for the rules' mirror action, one [mirror.NAME] table each, e.g.:")
    out.append("# [mirror.shadow]")
    for name, key in MIRROR_KEYS.items():
        out.append(f"# # {key.doc}")
        out.append(f"# {name} = {fmt(key.default or 'postgresql://postgres@shadow-host:5432/app')}")
    out.append("")
    return "\n".join(out)
