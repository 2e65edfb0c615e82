"""Builds pgfront's relay core with Cython (pure-Python mode: the same .py files, typed by the .pxd
files beside them) when a C compiler is there; installs the interpreted core, with one warning line,
when it is not. PGFRONT_PURE_PYTHON=1 skips the build. `pyproject.toml` holds everything else."""

from __future__ import annotations

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from proxy.core import COMPILED as _MODULES  # noqa: E402 - the one list, shared with the runtime switch

COMPILED = [name.replace(".", "/") + ".py" for name in _MODULES]


def _warn(why: str) -> None:
    print(f"pgfront: building the compiled core failed ({why}); installing the pure-Python core", file=sys.stderr)


class OptionalBuildExt(build_ext):
    """A failed compile (no compiler, no headers) leaves the pure-Python modules in place."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as e:  # noqa: BLE001 - any build failure falls back to pure Python
            _warn(str(e).splitlines()[0] if str(e) else type(e).__name__)

    def build_extension(self, ext) -> None:
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001
            _warn(f"{ext.name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")


def _extensions() -> list:
    if os.environ.get("PGFRONT_PURE_PYTHON") == "1":
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        _warn("Cython is not installed")
        return []
    # The compiled modules must behave exactly as the interpreted ones: the type hints stay hints
    # (annotation_typing off: a `bytes` hint would otherwise refuse the bytearray a caller passes), and
    # bounds checks and negative indexes stay on. C types come only from the .pxd files beside the
    # sources, where each one is a decision.
    return cythonize(COMPILED, quiet=True, compiler_directives={
        "language_level": 3, "binding": False, "annotation_typing": False})


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
