"""Which relay core runs, and that a user can tell: `pgfront --version`, the admin console's SHOW VERSION
and the pgfront_build_info metric, for the compiled core and with PGFRONT_PURE_PYTHON=1."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request

import pytest

from proxy.core import COMPILED, core
from proxy.devdb import free_port
from tests.conftest import ROOT, psql

EXPECTED = core()  # what this test session runs (compiled when scripts/setup.sh could build it)


def _version(env: dict[str, str]) -> str:
    res = subprocess.run([sys.executable, "-m", "proxy", "--version"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT), **env}, check=True)
    return res.stdout.strip()


def test_version_names_the_core():
    assert _version({}).endswith(f"({EXPECTED} core)")
    assert _version({"PGFRONT_PURE_PYTHON": "1"}).endswith("(pure core)")


def test_pure_python_switch_imports_the_sources():
    code = ("import importlib, sys; from proxy.core import COMPILED; "
            "print(all(importlib.import_module(m).__file__.endswith('.py') for m in COMPILED))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "PGFRONT_PURE_PYTHON": "1"})
    assert res.stdout.strip() == "True"


@pytest.mark.skipif(EXPECTED != "compiled", reason="the interpreted core runs here (PGFRONT_PURE_PYTHON=1, or no C compiler to build the other)")
def test_compiled_core_is_every_hot_module():
    import importlib

    assert all(not importlib.import_module(m).__file__.endswith(".py") for m in COMPILED)


@pytest.mark.parametrize("pure", [False, True])
def test_admin_console_and_metrics_say_which_core_runs(pgfront_factory, pure):
    port = free_port()
    p = pgfront_factory(config=f"[admin]\nusers = ['postgres']\n[metrics]\nlisten = '127.0.0.1:{port}'\n",
                        env={"PGFRONT_PURE_PYTHON": "1"} if pure else None)
    want = "pure" if pure else EXPECTED
    assert psql(p.port, "SHOW VERSION", dbname="pgfront").stdout.strip().endswith(f"({want} core)")
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert f'core="{want}"' in next(line for line in body.splitlines() if line.startswith("pgfront_build_info{"))
