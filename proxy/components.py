"""Wiring of the subsystems into a worker's App: statistics, metrics, rules, cache, slow log, and the
per-worker housekeeping loop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from typing import Any

from proxy import stats as st
from proxy.app import App
from proxy.log import log


async def attach(app: App) -> list[asyncio.Task]:
    cfg = app.cfg
    app.stats = st.Stats(cfg.stats.max_fingerprints)
    publisher = st.StatsPublisher(app.stats, app.run_dir, app.worker_id)
    app.publisher = publisher
    app.merged_stats = lambda: _merged(app)
    app.reload = lambda: reload(app)
    tasks = [asyncio.ensure_future(publisher.run(cfg.stats.flush_interval)),
             asyncio.ensure_future(_housekeeping(app))]
    if cfg.auth.mode != "passthrough":
        from proxy.pool import PoolManager

        app.pools = PoolManager(app)
        # other workers pass cancel requests for our clients through this socket
        path = os.path.join(app.run_dir, f"cancel-{app.worker_id}.sock")
        if os.path.exists(path):
            os.unlink(path)
        app.cancel_server = await asyncio.start_unix_server(lambda r, w: _cancel_from_peer(app, r, w), path)
    if cfg.cache.enabled:
        from proxy.cache import ResultCache

        app.cache = ResultCache(cfg, app.upstream.dsn(user="postgres", database="postgres"))
        await app.cache.start()
    if cfg.replicas and app.pools is not None:
        app.router = await _router(app)
    if cfg.tracing.endpoint:
        from proxy.tracing import Tracing  # the SDK's import costs ~70 ms: only when tracing is on

        app.tracing = Tracing.from_config(cfg.tracing, service_instance=f"{socket.gethostname()}:{os.getpid()}")
    if cfg.mirror_targets or cfg.capture.path:
        app.observers = await _observers(cfg, app.run_dir, app.worker_id)
    if cfg.slowlog.threshold_ms > 0:
        from proxy.slowlog import SlowLog

        app.slowlog = SlowLog(cfg, app.upstream.dsn())
    holder = load_rule_holder(cfg)
    if holder is not None:
        from proxy.rules import RuleWatcher
        from proxy.rules_glue import RulesAdapter

        app.rules = RulesAdapter(holder, app)
        app.throttler = make_throttler(cfg, app.stats)
        if cfg.rules.watch:
            app.rule_watcher = RuleWatcher(holder)
            app.rule_watcher.start()
    if cfg.metrics.listen:
        from proxy.metrics import start_metrics_server

        host, port = cfg.metrics.listen
        app.metrics_server = await start_metrics_server(host, port, app.merged_stats, lambda: _health(app),
                                                        top_n=cfg.metrics.top_n,
                                                        mirror=_mirror_counters(app) if cfg.mirror_targets else None)
    return tasks


async def _router(app: App) -> Any:
    """Read routing: the replicas' health probes, and the function facts that prove a read read-only
    (the cache's catalog when the cache is on, else one of its own)."""
    from proxy.cache.catalog import Catalog
    from proxy.replicas.health import ReplicaSet, ReplicaTarget
    from proxy.replicas.routing import Router
    from proxy.upstream import parse_upstream

    cfg = app.cfg
    primary = app.upstream.dsn(user="postgres", database="postgres")
    targets = []
    for r in cfg.replicas:
        up = parse_upstream(r["url"])
        user = up.user or app.upstream.user or "postgres"
        password = up.password or (app.upstream.password if not up.user else None)
        auth = f"{user}:{password}@" if password else f"{user}@"
        host = f"[{up.host}]" if ":" in up.host else up.host
        probe = (f"postgresql://{auth}/{up.database or 'postgres'}?host={up.host}&port={up.port}" if up.is_unix
                 else f"postgresql://{auth}{host}:{up.port}/{up.database or 'postgres'}")
        targets.append(ReplicaTarget(r["name"], probe, r["weight"], frozenset(r["databases"]) or None))
    routing = cfg.routing
    replicas = ReplicaSet(targets, primary, max_lag_bytes=routing.max_lag_bytes, max_lag_seconds=routing.max_lag_seconds,
                          probe_interval=routing.probe_interval, connect_timeout=min(cfg.server.connect_timeout, 2.0))
    await replicas.start()
    if app.cache is not None:
        router = Router(replicas, app.cache.catalog, routing)
    else:
        router = Router(replicas, Catalog(primary), routing, own_catalog=True)
    router.serve(app)  # set up before the router (`attach`), and never replaced
    if routing.read_your_writes and routing.read_your_writes_scope != "session":
        from proxy.replicas.marks import WriteMarks

        router.marks = WriteMarks(routing.redis_url or cfg.cache.redis_url, routing.read_your_writes_scope,
                                  routing.read_your_writes_ttl)
    if app.cache is not None:  # WAL positions recorded with version bumps let replicas' reads fill the cache
        app.cache.lsn_source = replicas.primary_lsn_after
    replicas.on_change = router.state_changed
    return router


async def _observers(cfg, run_dir: str, worker_id: int) -> Any:
    """The sinks of observed statements: the shadow targets rules mirror to, and the capture file."""
    from proxy.shadow.observe import ObservedSinks

    sinks = ObservedSinks()
    if cfg.mirror_targets:
        from proxy.shadow.mirror import Mirrors

        sinks.mirror = Mirrors.from_config(cfg.mirror_targets)
        await sinks.mirror.start(run_dir, worker_id)
    if cfg.capture.path:
        from proxy.shadow.capture import CaptureWriter

        sinks.capture = CaptureWriter.from_config(cfg.capture)  # None with share = 0
        if sinks.capture is not None:
            sinks.capture.start(worker_id)
    return sinks


def _mirror_counters(app: App) -> Any:
    """The mirror's report merged over the workers: each target's counters and the runner restarts
    (for /metrics)."""
    from proxy.shadow.mirror import merged_for

    return lambda: merged_for(app)


def make_throttler(cfg, stats: st.Stats | None) -> Any:
    """The worker's throttle, sharing limits through Redis when one is configured ([throttle] redis_url)."""
    from proxy.throttle.shared import SharedLimits
    from proxy.throttle.throttler import Throttler

    url = cfg.throttle.redis_url or (cfg.cache.redis_url if cfg.cache.enabled else "off")
    shared = SharedLimits(url, cfg.throttle.redis_timeout) if url != "off" else None
    throttler = Throttler(shared, lease=cfg.throttle.lease)
    if stats is not None:
        throttler.on_event = lambda fp, rule, event, observed: stats.rule_event(fp, rule, event, observed)
    return throttler


def rules_base_dir(cfg) -> str:
    """Relative rule paths are relative to the config file's directory (else the working directory)."""
    return os.path.dirname(os.path.abspath(cfg.source)) if cfg.source != "<defaults>" else os.getcwd()


def load_rule_holder(cfg):
    """A RuleHolder for the configured files, or None when no rule file is configured or found."""
    import glob

    from proxy.rules import RuleHolder

    if not cfg.rules.files:
        return None
    base = rules_base_dir(cfg)
    found = [f for pattern in cfg.rules.files
             for f in glob.glob(pattern if os.path.isabs(pattern) else os.path.join(base, pattern))]
    if not found:
        log.warning("no rule files found", extra={"patterns": cfg.rules.files, "base_dir": base})
        return None
    return RuleHolder(cfg.rules.files, base_dir=base, default_ttl=cfg.cache.default_ttl)


def _merged(app: App) -> st.MergedStats:
    _gauges(app)
    app.publisher.flush()
    return st.load_merged(app.run_dir, app.stats)


def _gauges(app: App) -> None:
    s = app.stats
    s.set_gauge("client_connections", len(app.sessions))
    s.set_gauge("server_connections", sum(1 for x in app.sessions if x.has_server))
    s.set_counter("bytes_received", sum(x.bytes_in for x in app.sessions) + app.closed_bytes[0])
    s.set_counter("bytes_sent", sum(x.bytes_out for x in app.sessions) + app.closed_bytes[1])
    if app.tracing is not None:
        for name, value in app.tracing.describe().items():
            if isinstance(value, int | float) and not isinstance(value, bool) and name != "sample_ratio":
                (s.set_gauge if name == "queued" else s.set_counter)(f"tracing_{name}", value)
    if app.throttler is not None:
        t = app.throttler
        s.set_gauge("throttle_waiting", t.waiting)
        s.set_counter("throttle_redis_errors", t.redis_errors)
        s.set_counter("throttle_local_fallbacks", t.fallbacks)


def _health(app: App) -> dict:
    return {"status": "ok" if app.accepting else "stopping", "worker": app.worker_id,
            "clients": len(app.sessions), "uptime_s": round(time.time() - app.started_at, 1)}


async def _cancel_from_peer(app: App, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        data = await asyncio.wait_for(reader.readexactly(8), 5)
        import struct

        app.cancel_local(struct.unpack_from("!i", data)[0], data[4:8])
    except (asyncio.IncompleteReadError, TimeoutError, OSError):
        pass
    finally:
        writer.close()


async def _housekeeping(app: App) -> None:
    """Once a second: gauges, and dropping clients idle longer than client_idle_timeout."""
    while True:
        await asyncio.sleep(1.0)
        idle_limit = app.cfg.server.client_idle_timeout  # read each time: a reload may change it
        _gauges(app)
        if app.router is not None and app.stats is not None and app.worker_id == 0:
            app.router.publish(app.stats)  # every worker probes; one reports (gauges add up over workers)
        if app.pools is not None:
            app.pools.maintain()
        if idle_limit > 0:
            now = time.perf_counter()
            for s in list(app.sessions):
                if s.idle_for(now) > idle_limit:
                    s.fatal("57P05", "terminating connection due to idle-session timeout (pgfront "
                                     "client_idle_timeout)")


async def detach(app: App) -> None:
    if app.cache is not None:
        await app.cache.close()
    if app.throttler is not None:
        await app.throttler.close()
    observers = app.observers
    if observers is not None:
        if observers.mirror is not None:
            await observers.mirror.close()
        if observers.capture is not None:
            await observers.capture.close()
    if app.router is not None:
        await app.router.close()
    if app.tracing is not None:  # flushes what is queued: may take a while, off the event loop
        await asyncio.get_running_loop().run_in_executor(None, app.tracing.shutdown)
    if app.pools is not None:
        app.pools.close_all()
    if app.slowlog is not None:
        await app.slowlog.close()
    watcher = getattr(app, "rule_watcher", None)
    if watcher is not None:
        await watcher.stop()
    server = getattr(app, "metrics_server", None)
    if server is not None:
        server.close()
    publisher = getattr(app, "publisher", None)
    if publisher is not None:
        with contextlib.suppress(OSError):
            publisher.flush()


# settings that only take effect on a restart: a reload reports them instead of half-applying them
_RESTART_ONLY = {("server", "listen"), ("server", "workers"), ("server", "upstream"), ("server", "run_dir"),
                 ("metrics", "listen"), ("auth", "mode"), ("cache", "enabled"), ("cache", "redis_url"),
                 ("cache", "replication_listener"), ("cache", "replication_slot"), ("throttle", "redis_url"),
                 ("tracing", "endpoint"), ("tracing", "sample_ratio"), ("tracing", "service_name"),
                 ("tracing", "headers"), ("tracing", "export_timeout"), ("tracing", "max_queue_size"),
                 ("capture", "path"), ("capture", "share"), ("capture", "max_size"),
                 ("tls", "cert_file"),
                 ("tls", "key_file"), ("tls", "upstream_sslmode"), ("tls", "upstream_ca_file"), ("rules", "watch"),
                 ("server", "log_format"), ("slowlog", "path"), ("slowlog", "dsn")}


def reload_config(app: App) -> str:
    """Re-read config.toml: apply what can change live, name what needs a restart; keep the running
    configuration when the file is invalid."""
    from proxy import config as config_mod

    source = getattr(app.cfg, "reload_from", None)
    if not source or source[0] is None:
        return "no config file to reload"
    try:
        new = config_mod.load(*source)
    except config_mod.ConfigError as e:
        log.error("config not reloaded, keeping the running one", extra={"reason": str(e)})
        return f"config not reloaded: {e}"
    new.reload_from = source
    old = app.cfg.as_dict()
    fresh = new.as_dict()
    changed = [(sec, key) for sec in fresh for key in fresh[sec] if fresh[sec][key] != old[sec].get(key)]
    pending = [f"{s}.{k}" for s, k in changed if (s, k) in _RESTART_ONLY]
    app.cfg = new
    app.slow_threshold = new.slowlog.threshold_ms / 1000.0 if new.slowlog.threshold_ms > 0 else None
    if app.pools is not None:
        app.pools.cfg = new.pool
    note = f"config reloaded ({len(changed)} changed)"
    if pending:
        note += f"; needs a restart to take effect: {', '.join(pending)}"
    log.info(note, extra={"worker": app.worker_id, "changed": [f"{s}.{k}" for s, k in changed]})
    return note


async def reload(app: App) -> tuple[bool, str]:
    """SIGHUP and the admin console's RELOAD: re-read config.toml, the userlist and the rule files; a
    bad file keeps what was running."""
    config_note = reload_config(app)
    if app.credentials is not None:
        try:
            app.credentials.reload()
        except (OSError, ValueError) as e:
            log.error("userlist not reloaded, keeping the running one", extra={"reason": str(e)})
    if app.rules is None:
        return True, f"{config_note}; no rule files configured"
    ok, message = app.rules.reload()
    message = f"{config_note}; {message}"
    log.info("rules reloaded" if ok else "rules reload failed, keeping the running rules",
             extra={"worker": app.worker_id, "detail": message})
    return ok, message
