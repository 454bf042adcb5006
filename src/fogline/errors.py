"""The one error tree of fogline.

    FoglineError
    ├── RetryableError(delay_s)   the same call may succeed later (network, hub down)
    ├── TerminalError             retrying cannot help
    │   ├── ConfigError           bad configuration or user input
    │   ├── ProtocolError         a malformed, oversized or unknown-version message
    │   └── AuthError             bad token, bad certificate, revoked identity
    └── NotFoundError             the named object does not exist

Library errors are translated into these at one boundary with `raise ... from exc`.
"""

from __future__ import annotations


class FoglineError(Exception):
    """Root of every error fogline raises on purpose."""


class RetryableError(FoglineError):
    """A transient failure; retry after `delay_s`."""

    def __init__(self, message: str, delay_s: float = 1.0) -> None:
        super().__init__(message)
        self.delay_s = delay_s


class TerminalError(FoglineError):
    """A failure that retrying cannot fix."""


class ConfigError(TerminalError):
    """Invalid configuration or user input."""


class ProtocolError(TerminalError):
    """A message that cannot be decoded or is not allowed."""


class AuthError(TerminalError):
    """Authentication or authorization failed."""


class NotFoundError(FoglineError):
    """The named object does not exist."""
