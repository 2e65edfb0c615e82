"""SQL understanding for pgfront: fingerprints and statement facts from the real Postgres parser."""

from proxy.sql.analyze import analyze, constants, split_statements
from proxy.sql.info import StatementInfo

__all__ = ["StatementInfo", "analyze", "constants", "split_statements"]
