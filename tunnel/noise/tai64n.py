"""TAI64N timestamps carried in handshake initiations.

The responder compares them as 12-byte big-endian strings: a later timestamp is a greater string.
"""

from __future__ import annotations

import struct

TAI64N_LEN = 12
# TAI64 label of the Unix epoch: 2^62 plus the 10 s TAI-UTC offset of 1970.
_BASE = (1 << 62) + 10
# wireguard-go clears the low 24 bits of the nanoseconds (~16.8 ms granularity) so the
# timestamp reveals less about the sender's clock; we do the same.
_WHITENER = 0x1000000

_PACK = struct.Struct(">QI")


def encode(unix_seconds: int, nanoseconds: int) -> bytes:
    """Exact TAI64N encoding of a Unix time."""
    if not 0 <= nanoseconds < 1_000_000_000:
        raise ValueError("nanoseconds out of range")
    return _PACK.pack(_BASE + unix_seconds, nanoseconds)


def whiten(nanoseconds: int) -> int:
    return nanoseconds - nanoseconds % _WHITENER


def stamp(wall_time: float) -> bytes:
    """The timestamp we put in an initiation at Unix time `wall_time` (whitened)."""
    seconds = int(wall_time // 1)
    nanos = min(int((wall_time - seconds) * 1e9), 999_999_999)
    return encode(seconds, whiten(nanos))


def decode(data: bytes) -> tuple[int, int]:
    """(unix_seconds, nanoseconds) of a 12-byte TAI64N label."""
    label, nanos = _PACK.unpack(data)
    return label - _BASE, nanos
