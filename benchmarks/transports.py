"""In-memory stand-ins for asyncio transports, for the in-process relay harnesses (hotpath, hothit)."""

from __future__ import annotations


class NullTransport:
    """Enough of asyncio.Transport for the relay: records nothing, costs nothing."""

    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 1) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def close(self) -> None:
        pass
