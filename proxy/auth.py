"""Client authentication done by pgfront itself, and logging in to the upstream on the client's behalf.

Pass-through (the default) needs none of this. With `[auth] mode = "userlist"` or `"query"`,
pgfront checks the client's password itself (SCRAM-SHA-256, or md5 when only an md5 hash is known)
against a PgBouncer-style userlist file or the upstream's own pg_authid (auth_query), and then logs
in to the upstream as that user. For that second login it needs no plaintext password: a client
that passed SCRAM has revealed its ClientKey (proof XOR signature), which together with the
verifier's ServerKey answers the upstream's SCRAM challenge, provided the upstream holds the same
verifier (same salt and iterations), which auth_query guarantees. An md5 hash is enough for md5.

Everything here is sans-I/O: message bodies in, message bodies out.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import shlex
import struct
from dataclasses import dataclass

SCRAM = "SCRAM-SHA-256"
ITERATIONS = 4096


class AuthFailed(Exception):
    """The client's credentials are wrong or the exchange is malformed (SQLSTATE 28P01)."""


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass(frozen=True)
class Secret:
    """What pgfront knows about one role's password."""

    kind: str  # "plain", "md5" or "scram"
    value: str = ""  # plaintext password, or the md5 hash "md5..."
    iterations: int = 0
    salt: bytes = b""
    stored_key: bytes = b""
    server_key: bytes = b""

    @classmethod
    def parse(cls, text: str) -> Secret:
        m = re.fullmatch(r"SCRAM-SHA-256\$(\d+):([^$]+)\$([^:]+):(.+)", text)
        if m:
            return cls("scram", iterations=int(m.group(1)), salt=base64.b64decode(m.group(2)),
                       stored_key=base64.b64decode(m.group(3)), server_key=base64.b64decode(m.group(4)))
        if re.fullmatch(r"md5[0-9a-f]{32}", text):
            return cls("md5", text)
        return cls("plain", text)

    def scram(self) -> Secret:
        """A SCRAM verifier for this secret (computed once from a plaintext password)."""
        if self.kind == "scram":
            return self
        if self.kind != "plain":
            raise ValueError("an md5 hash cannot be turned into a SCRAM verifier")
        cached = _verifiers.get(self.value)
        if cached is None:
            cached = _verifiers[self.value] = self._derive()
        return cached

    def _derive(self) -> Secret:
        salt = os.urandom(16)
        salted = hashlib.pbkdf2_hmac("sha256", self.value.encode(), salt, ITERATIONS)
        client_key = _hmac(salted, b"Client Key")
        return Secret("scram", self.value, ITERATIONS, salt, _h(client_key), _hmac(salted, b"Server Key"))


_verifiers: dict[str, Secret] = {}  # plaintext password -> derived verifier (PBKDF2 is slow on purpose)


def md5_hash(password: str, user: str) -> str:
    return "md5" + hashlib.md5((password + user).encode()).hexdigest()


def md5_response(secret: Secret, user: str, salt: bytes) -> str:
    """The md5 PasswordMessage for a 4-byte salt, from a plaintext password or an md5 hash."""
    inner = secret.value if secret.kind == "md5" else md5_hash(secret.value, user)
    return "md5" + hashlib.md5(inner[3:].encode() + salt).hexdigest()


def read_userlist(path: str) -> dict[str, Secret]:
    """PgBouncer's auth_file format: one `"user" "password-or-verifier"` per line; ; and # comment."""
    users: dict[str, Secret] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith((";", "#")):
                continue
            try:
                parts = shlex.split(line)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: {e}") from None
            if len(parts) < 2:
                raise ValueError(f'{path}:{n}: expected "user" "password"')
            users[parts[0]] = Secret.parse(parts[1])
    return users


def _attrs(message: str) -> dict[str, str]:
    out = {}
    for part in message.split(","):
        if len(part) >= 2 and part[1] == "=":
            out[part[0]] = part[2:]
    return out


class ScramServer:
    """pgfront's side of SCRAM-SHA-256 toward a client. After `final()`, `client_key` is known."""

    def __init__(self, secret: Secret) -> None:
        self.secret = secret.scram()
        self.nonce = _b64(os.urandom(18))
        self.client_first_bare = ""
        self.server_first = ""
        self.client_key: bytes | None = None

    def first(self, initial: bytes) -> bytes:
        """SASLInitialResponse body -> AuthenticationSASLContinue payload."""
        try:
            pos = initial.index(0)
            mech = initial[:pos].decode()
            (n,) = struct.unpack_from("!i", initial, pos + 1)
            msg = initial[pos + 5:pos + 5 + n].decode()
        except (ValueError, struct.error, UnicodeDecodeError):
            raise AuthFailed("malformed SCRAM message") from None
        if mech != SCRAM:
            raise AuthFailed(f"unsupported SASL mechanism {mech!r}")
        if not msg.startswith(("n,", "y,")):
            raise AuthFailed("channel binding is not supported by pgfront")
        gs2_end = msg.index(",", 2) + 1
        self.gs2 = msg[:gs2_end]
        self.client_first_bare = msg[gs2_end:]
        cnonce = _attrs(self.client_first_bare).get("r")
        if not cnonce:
            raise AuthFailed("malformed SCRAM message: no nonce")
        self.combined = cnonce + self.nonce
        s = self.secret
        self.server_first = f"r={self.combined},s={_b64(s.salt)},i={s.iterations}"
        return self.server_first.encode()

    def final(self, response: bytes) -> bytes:
        """SASLResponse body -> AuthenticationSASLFinal payload; raises AuthFailed on a wrong proof."""
        try:
            msg = response.decode()
        except UnicodeDecodeError:
            raise AuthFailed("malformed SCRAM message") from None
        attrs = _attrs(msg)
        without_proof = msg.rsplit(",p=", 1)[0]
        if attrs.get("r") != self.combined or "p" not in attrs:
            raise AuthFailed("SCRAM nonce mismatch")
        if base64.b64decode(attrs.get("c", "")) != self.gs2.encode():
            raise AuthFailed("SCRAM channel binding mismatch")
        auth_message = f"{self.client_first_bare},{self.server_first},{without_proof}".encode()
        proof = base64.b64decode(attrs["p"])
        signature = _hmac(self.secret.stored_key, auth_message)
        if len(proof) != len(signature):
            raise AuthFailed("password authentication failed")
        client_key = _xor(proof, signature)
        if not hmac.compare_digest(_h(client_key), self.secret.stored_key):
            raise AuthFailed("password authentication failed")
        self.client_key = client_key
        return f"v={_b64(_hmac(self.secret.server_key, auth_message))}".encode()


class ScramClient:
    """pgfront's side of SCRAM-SHA-256 toward the upstream, with a password or a ClientKey."""

    def __init__(self, password: str | None = None, client_key: bytes | None = None,
                 server_key: bytes | None = None) -> None:
        self.password = password
        self.client_key = client_key
        self.server_key = server_key
        self.nonce = _b64(os.urandom(18))
        self.first_bare = f"n=,r={self.nonce}"

    def initial(self) -> bytes:
        msg = ("n,," + self.first_bare).encode()
        return SCRAM.encode() + b"\0" + struct.pack("!i", len(msg)) + msg

    def respond(self, server_first: bytes) -> bytes:
        text = server_first.decode()
        attrs = _attrs(text)
        if not attrs.get("r", "").startswith(self.nonce):
            raise AuthFailed("upstream SCRAM nonce mismatch")
        salt, iterations = base64.b64decode(attrs["s"]), int(attrs["i"])
        if self.password is not None:
            salted = hashlib.pbkdf2_hmac("sha256", self.password.encode(), salt, iterations)
            client_key = _hmac(salted, b"Client Key")
            self.server_key = _hmac(salted, b"Server Key")
        elif self.client_key is not None:
            client_key = self.client_key
        else:
            raise AuthFailed("no credentials for the upstream's SCRAM login")
        without_proof = f"c=biws,r={attrs['r']}"
        self.auth_message = f"{self.first_bare},{text},{without_proof}".encode()
        proof = _xor(client_key, _hmac(_h(client_key), self.auth_message))
        return f"{without_proof},p={_b64(proof)}".encode()

    def verify(self, server_final: bytes) -> None:
        attrs = _attrs(server_final.decode())
        if self.server_key is None:
            return
        expected = _hmac(self.server_key, self.auth_message)
        if not hmac.compare_digest(base64.b64decode(attrs.get("v", "")), expected):
            raise AuthFailed("the upstream's SCRAM signature is wrong")


class UpstreamLogin:
    """Answers the upstream's authentication requests for a role, with what pgfront knows of it."""

    def __init__(self, user: str, secret: Secret, client_key: bytes | None = None) -> None:
        self.user = user
        self.secret = secret
        self.client_key = client_key
        self.scram: ScramClient | None = None

    def answer(self, body: bytes) -> bytes | None:
        """AuthenticationXXX message body -> PasswordMessage to send (b"" = nothing), None once OK."""
        secret = self.secret
        (code,) = struct.unpack_from("!i", body, 0)
        if code == 0:
            return None
        if code == 3 and secret.kind == "plain":
            return _password_message(secret.value.encode() + b"\0")
        if code == 5 and secret.kind in ("plain", "md5"):
            return _password_message(md5_response(secret, self.user, body[4:8]).encode() + b"\0")
        if code == 10:
            if secret.kind == "plain":
                self.scram = ScramClient(password=secret.value)
            elif secret.kind == "scram" and self.client_key is not None:
                self.scram = ScramClient(client_key=self.client_key, server_key=secret.server_key)
            else:
                raise AuthFailed("no usable secret for the upstream's SCRAM login (a client must log in first)")
            return _password_message(self.scram.initial())
        if code == 11 and self.scram is not None:
            return _password_message(self.scram.respond(body[4:]))
        if code == 12 and self.scram is not None:
            self.scram.verify(body[4:])
            return b""
        raise AuthFailed(f"the upstream asked for an authentication method pgfront cannot answer ({code})")


def _password_message(body: bytes) -> bytes:
    return b"p" + struct.pack("!I", len(body) + 4) + body


class Credentials:
    """Where secrets come from: a userlist file (re-read on reload) or the upstream (auth_query)."""

    def __init__(self, mode: str, file: str = "", query: str = "", query_dsn: str = "") -> None:
        self.mode = mode
        self.file = file
        self.query = query
        self.query_dsn = query_dsn
        self.users: dict[str, Secret] = read_userlist(file) if mode == "userlist" else {}
        self._pool = None

    def reload(self) -> None:
        if self.mode == "userlist":
            self.users = read_userlist(self.file)

    async def lookup(self, user: str) -> Secret | None:
        if self.mode == "userlist":
            return self.users.get(user)
        import asyncpg

        if self._pool is None:
            self._pool = await asyncpg.create_pool(self.query_dsn, min_size=0, max_size=2)
        row = await self._pool.fetchrow(self.query, user)
        if row is None or row[1] is None:
            return None
        return Secret.parse(row[1])

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
