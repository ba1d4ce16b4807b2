"""The errors of the Shadowsocks codec: one base class, and the peer's faults kept apart from the
caller's (as in h11). Parsing untrusted bytes raises ProtocolError (or a subclass) and nothing else."""

from __future__ import annotations


class ShadowsocksError(Exception):
    """Base of every error this package raises on purpose."""


class ProtocolError(ShadowsocksError):
    """Bytes from the network are not valid Shadowsocks: truncated, malformed, wrong type."""


class AuthenticationError(ProtocolError):
    """AEAD authentication failed: a wrong key, tampered bytes, or not Shadowsocks at all."""


class ReplayError(ProtocolError):
    """Authentic, but seen before: a repeated salt or packet id, or a timestamp outside the window
    (SIP022 treats those as replays)."""


class ConfigError(ShadowsocksError, ValueError):
    """A method, key, password or URI is unusable. Messages never contain the password or key."""


class UsageError(ShadowsocksError, ValueError):
    """The caller misused the API (an address that cannot be encoded, a missing `now`, ...)."""
