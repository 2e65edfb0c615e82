"""What pooling must carry for a client across server connections, sans I/O: the settings it asked
for at startup, the session state a statement would leave on a connection, and statement renaming.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from proxy.wire import protocol as pq

if TYPE_CHECKING:
    from proxy.sql import StatementInfo

# settings a client may give at startup that a pooled server connection must be given for it
_POOLED_SETTINGS = ("application_name", "client_encoding", "datestyle", "timezone", "intervalstyle",
                    "extra_float_digits", "search_path", "standard_conforming_strings", "bytea_output")
REPORTED = {"application_name", "client_encoding", "datestyle", "timezone", "intervalstyle",
             "standard_conforming_strings"}
_CANONICAL = {"datestyle": "DateStyle", "timezone": "TimeZone", "intervalstyle": "IntervalStyle"}


def wanted_settings(params: dict[str, str]) -> dict[str, str]:
    """Startup parameters and `options=-c k=v` that a pooled server connection must carry."""
    out: dict[str, str] = {}
    for k, v in params.items():
        if k.lower() in _POOLED_SETTINGS:
            out[_CANONICAL.get(k.lower(), k.lower())] = v
    opts = params.get("options", "").replace("--", "-c ").split()
    for i, word in enumerate(opts):
        if word == "-c" and i + 1 < len(opts) and "=" in opts[i + 1]:
            k, _, v = opts[i + 1].partition("=")
            k = k.replace("-", "_").lower()
            if k in _POOLED_SETTINGS:
                out[_CANONICAL.get(k, k)] = v
    return out


_SESSION_LOCKS = frozenset({"pg_advisory_lock", "pg_advisory_lock_shared", "pg_try_advisory_lock",
                            "pg_try_advisory_lock_shared"})
_SESSION_UTILITY = re.compile(r"\s*(?:(LISTEN)\b|(PREPARE)\b|DECLARE\b.*\b(WITH\s+HOLD)\b)", re.I | re.S)
_features: dict[str, str] = {}


def session_feature(info: StatementInfo) -> str:
    """The session state a statement creates ("" for none): what transaction pooling cannot lend."""
    text = info.text
    found = _features.get(text)
    if found is not None:
        return found
    found = ""
    if info.kind == "set" and not info.set_local and info.set_name != "transaction":
        found = "SET" if info.set_name != "all" else "RESET ALL"
    elif info.functions & _SESSION_LOCKS:
        found = "a session advisory lock"
    elif info.temp_objects and info.kind == "ddl":
        found = "a temporary table"
    elif info.kind == "utility":
        m = _SESSION_UTILITY.match(text)
        if m:
            found = (m.group(1) or m.group(2) or "DECLARE ... " + m.group(3)).upper()
    if len(_features) > 10_000:
        _features.clear()
    _features[text] = found
    return found


def rename_bind(body: bytes, portal: str, statement: str) -> bytes:
    """The client's Bind with its statement name replaced."""
    pos = body.index(0) + 1
    pos = body.index(0, pos) + 1
    return pq.msg(b"B", pq.cstr(portal) + pq.cstr(statement) + body[pos:])


def literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'




_DROPS = re.compile(r"\b(?:DEALLOCATE|DISCARD\s+ALL)\b", re.I)


def drops_statements(text: str) -> bool:
    """Whether a statement may drop prepared statements (DEALLOCATE, DISCARD ALL)."""
    return _DROPS.search(text) is not None


def settings_query(applied: dict[str, str], login: dict[str, str], wanted: dict[str, str]) -> str:
    """The query that turns a connection carrying `applied` (settings pgfront set on it for its last
    client; `login`: its values at login) into one carrying `wanted`, updating `applied`; "" if none."""
    changes = {k: v for k, v in wanted.items() if applied.get(k, login.get(k)) != v}
    stale = [k for k in applied if k not in wanted]
    if not changes and not stale:
        return ""
    parts = [f"RESET {ident(k)}" for k in stale]
    if changes:
        parts.append("SELECT " + ", ".join(f"set_config({literal(k)}, {literal(v)}, false)" for k, v in changes.items()))
    for k in stale:
        del applied[k]
    applied.update(changes)
    return "; ".join(parts)
