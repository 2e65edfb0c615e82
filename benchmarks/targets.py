"""The paths a benchmark client can take to PostgreSQL, each on its own free port.

A Target knows how to start and stop itself against the shared throwaway cluster, which process
to watch for CPU time and memory, and which scenarios it is not meant for (reported as "n/a" with
that reason instead of a number).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from proxy.devdb import TempPostgres, TempRedis, free_port

from .services import Service, give_to_postgres

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = Path(__file__).resolve().parent / "configs"


# every client sends it; the trust-auth targets ignore it, pgfront's pooling target checks it
BENCH_PASSWORD = "pgfront-bench"
os.environ.setdefault("PGPASSWORD", BENCH_PASSWORD)


@dataclass
class Env:
    """What every target shares: the cluster, Redis and a scratch directory."""

    pg: TempPostgres
    redis: TempRedis | None
    work: Path
    cache_config: Path = CONFIGS / "pgfront-cache.toml"


class Unavailable(Exception):
    """The target cannot run here (binary missing, failed to start); str() says why."""


@dataclass
class Target:
    key: str
    label: str
    skip: dict[str, str] = field(default_factory=dict)  # scenario key -> why it is not measured
    only: frozenset[str] | None = None  # scenario keys it is measured in (None: all), others get no row
    port: int = 0
    service: Service | None = None

    @property
    def pid(self) -> int | None:
        return self.service.pid if self.service else None

    @property
    def is_proxy(self) -> bool:
        return True

    def start(self, env: Env) -> None:
        raise NotImplementedError

    def explain(self, error: str) -> str:
        """A pgbench failure as shown in the table; targets add what is known about it."""
        return error

    def stop(self) -> None:
        if self.service:
            self.service.stop()
            self.service = None

    def _spawn(self, env: Env, name: str, args: list[str], *, as_postgres: bool = False,
               cwd: Path | None = None, timeout: float = 20.0) -> None:
        self.port = self.port or free_port()
        log = env.work / f"{self.key}.log"
        self.service = Service(name, args, log, as_postgres=as_postgres, cwd=cwd or env.work)
        try:
            self.service.start(self.port, timeout)
        except RuntimeError as e:
            self.service = None
            raise Unavailable(str(e)) from None


class Direct(Target):
    _pid = None  # the postmaster, set by start()

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def is_proxy(self) -> bool:
        return False

    def start(self, env: Env) -> None:
        self.port = env.pg.port
        self._pid = env.pg.proc.pid if env.pg.proc else None

    def stop(self) -> None:
        pass


class Forwarder(Target):
    def start(self, env: Env) -> None:
        self.port = free_port()
        self._spawn(env, "forwarder", [sys.executable, "-m", "benchmarks.forwarder", "--listen",
                                       f"127.0.0.1:{self.port}", "--upstream", f"127.0.0.1:{env.pg.port}"],
                    cwd=ROOT)


class PgBouncer(Target):
    exe = "/usr/sbin/pgbouncer"

    def explain(self, error: str) -> str:
        if "prepared statement" in error:
            return (f"{error} (PgBouncer before 1.21 cannot carry protocol-level prepared statements "
                    "across server connections in transaction mode)")
        return error

    def start(self, env: Env) -> None:
        exe = shutil.which("pgbouncer") or (self.exe if Path(self.exe).exists() else None)
        if not exe:
            raise Unavailable("pgbouncer not installed (Debian package pgbouncer)")
        self.port = free_port()
        d = Path(tempfile.mkdtemp(prefix="pgbouncer-", dir=env.work))
        (d / "userlist.txt").write_text('"postgres" ""\n')
        (d / "pgbouncer.ini").write_text(f"""[databases]
* = host=127.0.0.1 port={env.pg.port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {d}/userlist.txt
pool_mode = transaction
max_client_conn = 20000
default_pool_size = 20
max_db_connections = 40
log_connections = 0
log_disconnections = 0
log_pooler_errors = 1
pidfile = {d}/pgbouncer.pid
ignore_startup_parameters = extra_float_digits
""")
        give_to_postgres(d)
        # PgBouncer refuses to run as root: the service drops to the postgres user first
        self._spawn(env, "pgbouncer", [exe, str(d / "pgbouncer.ini")], as_postgres=True)


class Pgpool(Target):
    exe = "/usr/sbin/pgpool"

    def start(self, env: Env) -> None:
        exe = shutil.which("pgpool") or (self.exe if Path(self.exe).exists() else None)
        if not exe:
            raise Unavailable("pgpool not installed (Debian package pgpool2)")
        self.port = free_port()
        d = Path(tempfile.mkdtemp(prefix="pgpool-", dir=env.work))
        (d / "oiddir").mkdir()
        (d / "pcp.conf").write_text("")
        (d / "pool_hba.conf").write_text("host all all 127.0.0.1/32 trust\n")
        (d / "pgpool.conf").write_text(f"""backend_clustering_mode = 'raw'
listen_addresses = '127.0.0.1'
port = {self.port}
unix_socket_directories = '{d}'
pcp_listen_addresses = ''
pcp_port = {free_port()}
pcp_socket_dir = '{d}'
backend_hostname0 = '127.0.0.1'
backend_port0 = {env.pg.port}
backend_weight0 = 1
backend_flag0 = 'DISALLOW_TO_FAILOVER'
enable_pool_hba = off
pool_passwd = ''
num_init_children = 32
max_pool = 1
reserved_connections = 0
load_balance_mode = off
health_check_period = 0
sr_check_period = 0
use_watchdog = off
failover_on_backend_error = off
memory_cache_enabled = on
memqcache_method = 'shmem'
memqcache_total_size = 64MB
memqcache_max_num_cache = 100000
memqcache_expire = 0
memqcache_auto_cache_invalidation = on
memqcache_maxcache = 409600
memqcache_oiddir = '{d}/oiddir'
pid_file_name = '{d}/pgpool.pid'
logdir = '{d}'
log_min_messages = warning
log_connections = off
""")
        give_to_postgres(d)
        self._spawn(env, "pgpool", [exe, "-n", "-D", "-f", str(d / "pgpool.conf"), "-F", str(d / "pcp.conf"),
                                    "-a", str(d / "pool_hba.conf")], as_postgres=True, timeout=30)


class Pgfront(Target):
    """`python -m proxy serve` with one of three configurations."""

    def __init__(self, key: str, label: str, flavour: str, workers: int = 1,
                 skip: dict[str, str] | None = None, python_args: list[str] | None = None,
                 only: frozenset[str] | None = None) -> None:
        super().__init__(key, label, skip or {}, only)
        self.flavour = flavour  # passthrough | rules | cache | pool
        self.workers = workers
        self.python_args = python_args or []  # e.g. ["-m", "cProfile", "-o", FILE] to profile it

    def config_text(self, env: Env) -> str:
        common = (f"[server]\nlog_level = \"warning\"\nmax_client_conn = 20000\n"
                  f"[slowlog]\npath = \"{env.work / (self.key + '-slowlog.jsonl')}\"\n")
        if self.flavour == "passthrough":
            return common + "[rules]\nfiles = []\nwatch = false\n"
        if self.flavour == "rules":
            return common + f"[rules]\nfiles = [\"{ROOT / 'rules'}/*.toml\"]\nwatch = false\n"
        if self.flavour == "pool":
            # transaction pooling, sized and authenticated like the PgBouncer target (trust for listed roles)
            users = env.work / "pgfront-userlist.txt"
            users.write_text(f'"postgres" "{BENCH_PASSWORD}"\n')
            return (common + "[rules]\nfiles = []\nwatch = false\n"
                    f"[auth]\nmode = \"userlist\"\nfile = \"{users}\"\nmethod = \"trust\"\n"
                    "[pool]\nmode = \"transaction\"\ndefault_pool_size = 20\nmax_db_connections = 40\n")
        # cache: a template with {redis_url}, {root}, {configs} and {work} placeholders
        if env.redis is None:
            raise Unavailable("redis-server not available for the cache")
        text = env.cache_config.read_text()
        return common + text.format(redis_url=env.redis.url, root=ROOT, configs=CONFIGS, work=env.work)

    def start(self, env: Env) -> None:
        self.port = free_port()
        cfg = env.work / f"{self.key}.toml"
        cfg.write_text(self.config_text(env))
        self._spawn(env, "pgfront", [sys.executable, *self.python_args, "-m", "proxy", "serve", "--config", str(cfg),
                                     "--listen", f"127.0.0.1:{self.port}",
                                     "--upstream", f"postgresql://postgres@127.0.0.1:{env.pg.port}/postgres",
                                     "--workers", str(self.workers)], cwd=ROOT, timeout=30)


PGPOOL_SKIP = {
    "many-conns": "Pgpool-II serves one client per pre-forked child (num_init_children); "
                  "1,000 held connections would need 1,000 processes",
}


def all_targets() -> list[Target]:
    """Every target in display order (baselines first)."""
    return [
        Direct("direct", "direct Postgres"),
        Forwarder("forwarder", "uvloop forwarder"),
        PgBouncer("pgbouncer", "PgBouncer (transaction)"),
        Pgpool("pgpool", "Pgpool-II (query cache)", skip=dict(PGPOOL_SKIP)),
        Pgfront("pgfront", "pgfront passthrough", "passthrough"),
        Pgfront("pgfront-rules", "pgfront + default rules", "rules"),
        Pgfront("pgfront-cache", "pgfront + cache", "cache"),
        # one worker per core, as deployed; Pgpool-II itself runs num_init_children = 32 processes
        Pgfront("pgfront-cache-2w", "pgfront + cache, 2 workers", "cache", workers=2, only=frozenset({"aggregate"})),
        Pgfront("pgfront-pool", "pgfront transaction pooling", "pool"),
    ]
