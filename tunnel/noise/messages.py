"""Wire layout of the four WireGuard messages (all integers little-endian).

Offsets are named once here; the rest of the core slices messages with them.
"""

from __future__ import annotations

import struct

from .constants import MSG_COOKIE_REPLY, MSG_INITIATION, MSG_RESPONSE

# Initiation: type u32 | sender u32 | ephemeral 32 | static 32+16 | timestamp 12+16 | mac1 | mac2
INIT_SENDER = slice(4, 8)
INIT_EPHEMERAL = slice(8, 40)
INIT_STATIC = slice(40, 88)
INIT_TIMESTAMP = slice(88, 116)
# Response: type u32 | sender u32 | receiver u32 | ephemeral 32 | empty 0+16 | mac1 | mac2
RESP_SENDER = slice(4, 8)
RESP_RECEIVER = slice(8, 12)
RESP_EPHEMERAL = slice(12, 44)
RESP_EMPTY = slice(44, 60)
# Cookie reply: type u32 | receiver u32 | nonce 24 | cookie 16+16
COOKIE_RECEIVER = slice(4, 8)
COOKIE_NONCE = slice(8, 32)
COOKIE_SEALED = slice(32, 64)

# mac1 and mac2 are always the last 32 bytes of an initiation or a response.
MAC1_FROM_END = 32
MAC2_FROM_END = 16

HEADER_INIT = struct.pack("<I", MSG_INITIATION)
HEADER_RESPONSE = struct.pack("<I", MSG_RESPONSE)
HEADER_COOKIE = struct.pack("<I", MSG_COOKIE_REPLY)
TRANSPORT_HEADER = struct.Struct("<IIQ")  # type, receiver, counter
U32 = struct.Struct("<I")

def u32(data: bytes | bytearray | memoryview, sl: slice) -> int:
    return U32.unpack_from(data, sl.start)[0]
