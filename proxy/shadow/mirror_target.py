"""A [mirror.NAME] target, as the worker and its shadow runner process both know it."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass(frozen=True, slots=True)
class MirrorTarget:
    """A [mirror.NAME] table: where its statements go, and how much each worker may queue and run."""

    name: str
    url: str
    queue_size: int = 1000
    connections: int = 2
    timeout: float = 5.0  # seconds; a statement slower on the shadow is cancelled, counted an error


def safe_url(url: str) -> str:
    """The URL with its password masked, for logs and the admin console."""
    try:
        parts = urlsplit(url)
        if parts.password:
            netloc = parts.netloc.replace(f":{parts.password}@", ":********@", 1)
            return parts._replace(netloc=netloc).geturl()
    except ValueError:
        return "(unparsable url)"
    return url
