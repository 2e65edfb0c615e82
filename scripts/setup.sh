#!/usr/bin/env bash
# Installs what pgfront, its tests and its benchmarks need on a Debian/Ubuntu machine, then a
# virtualenv in .venv with pgfront and its test dependencies. Idempotent and quick when done before.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

need=()
have_cmd() { command -v "$1" >/dev/null 2>&1; }
pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)
[ -n "$pg_bin" ] && [ -x "$pg_bin/initdb" ] || need+=(postgresql postgresql-contrib)
have_cmd psql || need+=(postgresql-client)
have_cmd pgbench || need+=(postgresql-contrib)
have_cmd redis-server || need+=(redis-server)
have_cmd redis-cli || need+=(redis-tools)
have_cmd pgbouncer || [ -x /usr/sbin/pgbouncer ] || need+=(pgbouncer)
have_cmd pgpool || [ -x /usr/sbin/pgpool ] || need+=(pgpool2)
have_cmd chromium || need+=(chromium)
# The distribution's Python 3.11+ is preferred: Debian and Ubuntu build it with PGO and LTO, and the
# relay runs 15-30% faster on it than on a default pyenv build (benchmarks/hotpath.py measures it).
# PGFRONT_PYTHON overrides the choice.
PY="${PGFRONT_PYTHON:-}"
if [ -z "$PY" ]; then
  PY=python3
  if [ -x /usr/bin/python3 ] && /usr/bin/python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    PY=/usr/bin/python3
  fi
fi
"$PY" -c "import venv, ensurepip" 2>/dev/null || need+=(python3-venv)

if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
  # the Debian packages start their own services on 5432/6379/6432: pgfront and its tests use
  # their own throwaway servers, so leave those alone
  pg_bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)
fi

# HypoPG (hypothetical indexes for the advisor) matches the server's major version
major=$(basename "$(dirname "$pg_bin")")
if [ ! -f "/usr/share/postgresql/$major/extension/hypopg.control" ]; then
  echo "setup: installing postgresql-$major-hypopg" >&2
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "postgresql-$major-hypopg" >/dev/null || echo "setup: HypoPG unavailable; advisor reports will say 'not validated'" >&2
fi

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.pgfront-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e ".[test]"
  touch "$stamp"
fi
# the compiled relay core is built in place (setup.py): again whenever its sources changed since, so
# that nothing runs yesterday's code; without a C compiler pgfront runs its pure-Python core
if [ "${PGFRONT_PURE_PYTHON:-}" != 1 ] && have_cmd cc && \
    ! .venv/bin/python -c "import sys; from proxy.core import stale; sys.exit(bool(stale()))"; then
  echo "setup: building the compiled relay core" >&2
  .venv/bin/python setup.py -q build_ext --inplace 2>&1 | grep -v "^copying\|beta\|warnings.warn" >&2 || true
fi
