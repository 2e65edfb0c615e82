"""Side-by-side performance harness: pgfront against direct PostgreSQL, a bare uvloop forwarder,
PgBouncer and Pgpool-II, on a throwaway cluster. Run `python3 -m benchmarks run --help`."""
