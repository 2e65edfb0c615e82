"""What the rest of pgfront may read of a client connection: the registry's view.

The admin console, the metrics, the cancel-key map, housekeeping and shutdown hold client connections
in `App.sessions`; they see them only through this interface, never their conversation's insides.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from proxy.net.serverlink import ServerLink


class RegisteredClient(Protocol):
    id: int
    user: str
    database: str
    bytes_in: int
    bytes_out: int

    @property
    def ready(self) -> bool:
        """Past startup and authentication, relaying."""

    @property
    def busy(self) -> bool:
        """Inside a transaction, or awaiting replies: not to be interrupted."""

    @property
    def has_server(self) -> bool:
        """Holding a server connection right now."""

    @property
    def on_console(self) -> bool:
        """Connected to the admin console."""

    @property
    def pool_key(self) -> tuple[str, str] | None:
        """(database, user) of the pool it borrows from, None when it has a server of its own."""

    def cancel_target(self) -> ServerLink | None:
        """The server connection running this client's statement now, if one is running."""

    def idle_for(self, now: float) -> float: ...

    def describe(self) -> dict[str, object]: ...

    def fatal(self, code: str, message: str) -> None: ...


class Console(Protocol):
    """The admin console's side of a client connection in phase ADMIN (`proxy.admin.AdminConsole`),
    opened by the worker (`App.open_console`) so that the connection does not import what is above it."""

    def feed(self, frames: list, data: bytes) -> None: ...

    def close(self) -> None: ...
