"""pgfront: a PostgreSQL wire-protocol proxy."""

__version__ = "0.1.0"

# first of all: with PGFRONT_PURE_PYTHON=1 the interpreted relay core is imported, not the compiled one
from proxy import core as _core  # noqa: E402, F401
