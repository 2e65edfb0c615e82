"""pgfront's own authentication of a client ([auth] mode = userlist | query), sans I/O.

`ClientAuth` is the server side of the exchange: `start()` gives the first AuthenticationRequest,
`receive(body)` takes each PasswordMessage body and gives the reply, until `done`; a wrong password
raises `AuthFailed`. It never tells an unknown role from a wrong password: an unknown role goes
through the same motions with a random secret and fails at the end. After SCRAM, `client_key` holds
the ClientKey the client's proof revealed, with which pgfront logs in to the upstream for it.
"""

from __future__ import annotations

import os
import struct

from proxy.auth import AuthFailed, ScramServer, Secret, md5_response
from proxy.wire import protocol as pq


class ClientAuth:
    __slots__ = ("user", "secret", "known", "trust", "scram", "md5_salt", "done", "client_key")

    def __init__(self, user: str, secret: Secret | None, trust: bool) -> None:
        self.user = user
        self.known = secret is not None
        # an unknown role goes through the motions anyway, so that role names cannot be probed
        self.secret = secret if secret is not None else Secret("plain", os.urandom(16).hex())
        self.trust = trust
        self.scram: ScramServer | None = None
        self.md5_salt = b""
        self.done = False
        self.client_key: bytes | None = None

    def start(self) -> bytes:
        """The first message to the client: an AuthenticationRequest, or b"" when trusted (done)."""
        if self.trust:
            if not self.known:
                raise AuthFailed(f'role "{self.user}" is not in the pgfront userlist')
            self.done = True
            return b""
        if self.secret.kind == "md5":
            self.md5_salt = os.urandom(4)
            return pq.msg(b"R", struct.pack("!i", 5) + self.md5_salt)
        self.scram = ScramServer(self.secret)
        return pq.msg(b"R", struct.pack("!i", 10) + b"SCRAM-SHA-256\0\0")

    def receive(self, body: bytes) -> bytes:
        """A PasswordMessage body: the reply (AuthenticationOk is the caller's, once `done`)."""
        scram = self.scram
        if scram is None:
            answer = body.rstrip(b"\0").decode()
            if answer != md5_response(self.secret, self.user, self.md5_salt) or not self.known:
                raise AuthFailed("password authentication failed")
            self.done = True
            return b""
        if not scram.server_first:
            return pq.msg(b"R", struct.pack("!i", 11) + scram.first(body))
        final = scram.final(body)
        if not self.known:
            raise AuthFailed("password authentication failed")
        self.done = True
        self.client_key = scram.client_key
        return pq.msg(b"R", struct.pack("!i", 12) + final)
