"""TLS toward clients (sslmode=require and verify-full) and toward the upstream."""

from __future__ import annotations

import subprocess

import psycopg
import pytest

from proxy.devdb import TempPostgres


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """A throwaway CA and a server certificate for 127.0.0.1 / localhost."""
    d = tmp_path_factory.mktemp("certs")

    def run(*args):
        subprocess.run(args, check=True, capture_output=True, cwd=d)

    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "2", "-subj", "/CN=pgfront test CA")
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=localhost")
    (d / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "2", "-extfile", "ext.cnf")
    (d / "server.key").chmod(0o600)
    return d


@pytest.fixture(scope="module")
def tls_pg(certs):
    """An upstream that accepts only TLS connections (hostssl)."""
    import os
    import pwd
    import shutil

    pg = TempPostgres(hba=["hostssl all all 127.0.0.1/32 trust"],
                      settings={"ssl": "on", "ssl_cert_file": "'server.crt'", "ssl_key_file": "'server.key'"})
    for name in ("server.crt", "server.key"):
        shutil.copy(certs / name, pg.data / name)
        if os.geteuid() == 0:
            os.chown(pg.data / name, pwd.getpwnam("postgres").pw_uid, -1)
    pg.start()
    yield pg
    pg.cleanup()


def tls_config(certs, extra=""):
    return (f"[tls]\ncert_file = '{certs}/server.crt'\nkey_file = '{certs}/server.key'\n{extra}")


def test_client_tls_require_and_verify_full(pgfront_factory, certs):
    p = pgfront_factory(config=tls_config(certs))
    with psycopg.connect(p.conninfo(sslmode="require")) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT 1").fetchone()[0] == 1
    with psycopg.connect(p.conninfo(sslmode="verify-full", sslrootcert=str(certs / "ca.crt"),
                                    host="localhost")) as conn:
        assert conn.pgconn.ssl_in_use
    with psycopg.connect(p.conninfo(sslmode="disable")) as conn:  # plain still allowed by default
        assert not conn.pgconn.ssl_in_use


def test_scram_through_tls(pgfront_factory, certs):
    p = pgfront_factory(config=tls_config(certs))
    with psycopg.connect(p.conninfo(user="scramuser", password="s3cret-pw", sslmode="require")) as conn:
        assert conn.execute("SELECT current_user").fetchone()[0] == "scramuser"


def test_require_client_tls(pgfront_factory, certs):
    p = pgfront_factory(config=tls_config(certs, "require_client_tls = true\n"))
    with pytest.raises(psycopg.OperationalError, match="requires TLS"):
        psycopg.connect(p.conninfo(sslmode="disable"))
    with psycopg.connect(p.conninfo(sslmode="require")) as conn:
        assert conn.execute("SELECT 1").fetchone()[0] == 1


def test_no_certificate_means_no_tls(pgfront_factory):
    p = pgfront_factory()
    with pytest.raises(psycopg.OperationalError, match="does not support SSL"):
        psycopg.connect(p.conninfo(sslmode="require"))


def test_upstream_tls_verify_full(pgfront_factory, tls_pg, certs):
    p = pgfront_factory(upstream=f"postgresql://localhost:{tls_pg.port}",
                        config=f"[tls]\nupstream_sslmode = 'verify-full'\nupstream_ca_file = '{certs}/ca.crt'\n")
    with psycopg.connect(p.conninfo()) as conn:
        assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()[0] is True


def test_upstream_tls_disabled_is_refused_by_hostssl(pgfront_factory, tls_pg):
    p = pgfront_factory(upstream=f"postgresql://127.0.0.1:{tls_pg.port}")
    with pytest.raises(psycopg.OperationalError, match="no pg_hba.conf entry"):
        psycopg.connect(p.conninfo())


def test_upstream_verify_full_rejects_unknown_ca(pgfront_factory, tls_pg, tmp_path):
    p = pgfront_factory(upstream=f"postgresql://localhost:{tls_pg.port}",
                        config="[tls]\nupstream_sslmode = 'verify-full'\n")
    with pytest.raises(psycopg.OperationalError, match="could not connect to the upstream"):
        psycopg.connect(p.conninfo())
