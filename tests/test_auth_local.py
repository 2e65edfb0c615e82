"""pgfront authenticating clients itself (userlist / auth_query) and logging in to the upstream for them."""

from __future__ import annotations

import asyncio

import asyncpg
import psycopg
import pytest

from tests.conftest import PASSWORD


def verifier(pg, role: str) -> str:
    return pg.psql(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{role}'").strip()


@pytest.fixture
def userlist(pg, tmp_path):
    path = tmp_path / "userlist.txt"
    path.write_text(
        "; PgBouncer-style auth file\n"
        f'"scramuser" "{verifier(pg, "scramuser")}"\n'  # SCRAM verifier: no plaintext anywhere
        f'"md5user" "{verifier(pg, "md5user")}"\n'  # md5 hash
        f'"pwuser" "{PASSWORD}"\n'  # plaintext (the upstream asks for a cleartext password)
        f'"app" "{PASSWORD}"\n'
    )
    return path


@pytest.mark.parametrize("user", ["scramuser", "md5user", "pwuser", "app"])
def test_userlist_logins(pgfront_factory, userlist, user):
    p = pgfront_factory(config=f"[auth]\nmode = 'userlist'\nfile = '{userlist}'\n")
    with psycopg.connect(p.conninfo(user=user, password=PASSWORD)) as conn:
        assert conn.execute("SELECT current_user").fetchone()[0] == user
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(p.conninfo(user=user, password="wrong"))


def test_unknown_user_fails_like_a_wrong_password(pgfront_factory, userlist):
    p = pgfront_factory(config=f"[auth]\nmode = 'userlist'\nfile = '{userlist}'\n")
    with pytest.raises(psycopg.OperationalError, match='password authentication failed for user "nobody"'):
        psycopg.connect(p.conninfo(user="nobody", password="x"))


def test_auth_query_with_scram_verifier_from_the_upstream(pgfront_factory, pg):
    p = pgfront_factory(config=f"[auth]\nmode = 'query'\nquery_dsn = '{pg.dsn()}'\n")
    with psycopg.connect(p.conninfo(user="scramuser", password=PASSWORD)) as conn:
        assert conn.execute("SELECT current_user").fetchone()[0] == "scramuser"

    async def go():
        conn = await asyncpg.connect(host="127.0.0.1", port=p.port, user="scramuser", password=PASSWORD,
                                     database="postgres")
        try:
            return await conn.fetchval("SELECT 41 + 1")
        finally:
            await conn.close()

    assert asyncio.run(go()) == 42
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(p.conninfo(user="scramuser", password="nope"))


def test_bad_userlist_config(tmp_path):
    from proxy import config

    with pytest.raises(config.ConfigError, match="needs a userlist file"):
        config.load(None, {"auth": {"mode": "userlist"}})
    with pytest.raises(config.ConfigError, match=r"\[auth\] mode"):
        config.load(None, {"auth": {"mode": "ldap"}})


def test_trust_method_admits_listed_roles_only(pgfront_factory, userlist):
    p = pgfront_factory(config=f"[auth]\nmode = 'userlist'\nfile = '{userlist}'\nmethod = 'trust'\n")
    with psycopg.connect(p.conninfo(user="app")) as conn:  # no password asked
        assert conn.execute("SELECT current_user").fetchone()[0] == "app"
    with pytest.raises(psycopg.OperationalError, match="not in the pgfront userlist"):
        psycopg.connect(p.conninfo(user="trustuser"))
