"""LWO codec (bridge/lwo.py) against Mullvad's format (mullvadvpn-app tunnel-obfuscation/src/lwo.rs).

Mullvad's source has no byte-level test vectors: its unit tests check a round trip, that the
payload after the header region is unchanged, and that byte 1 is the random byte with 0x80 set
(`test_obfuscation`, `test_obfuscation_reserved_byte_uses_full_random_byte`); those checks are
repeated here with their inputs. The literal vectors below use the two public keys of Mullvad's
end-to-end test and were worked out byte by byte from the format (XOR byte i with key[i % 32]
over the header region, then byte 1 = random | 0x80); `reference_obfuscate` is that rule as a
plain loop, and hypothesis compares the codec with it."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, strategies as st

from bridge import lwo
from bridge.lwo import HEADER_SIZES, LwoError, LwoKey, deobfuscate, is_lwo, obfuscate

# The keys of Mullvad's test_e2e_obfuscation.
CLIENT = base64.b64decode("8Ka2l4T0tVrSR5pkcsvRG++mBlxfuf8XOxpqBkOCikU=")
SERVER = base64.b64decode("4EkA4c160oQgN/YaNR9GN3gLMevXEfx5hnlc9jYmw14=")

COOKIE = bytes([3, 0, 0, 0]) + bytes(range(1, 61))
COOKIE_TO_CLIENT = bytes.fromhex(
    "f395b69785f6b65ed7419d6c7bc1da17e2a8094c4eabec032e0c7d1e5a989159"
    "edb8a9b7a5d6967ef761bd4c5be1fa37c288296c6e8bcc230e2c5d3e7ab8b179")
DATA = bytes([4, 0, 0, 0]) + bytes.fromhex("11223344") + (7).to_bytes(8, "little") + bytes(range(0xA0, 0xB8))
DATA_TO_SERVER = bytes.fromhex(
    "e4ff00e1dc58e1c02737f61a351f4637d8aa934873b45ade2ed0f65d9a8b6df1b0b1b2b3b4b5b6b7")


def reference_obfuscate(message: bytes, key: bytes, noise: int) -> bytes:
    out = bytearray(message)
    for i in range(HEADER_SIZES[message[0]]):
        out[i] ^= key[i % 32]
    out[1] = noise | 0x80
    return bytes(out)


def wg_message(mtype: int, body: bytes) -> bytes:
    """A WireGuard-shaped message: type, three zero bytes, then `body` padded to the type's
    minimum size (data messages may be longer)."""
    size = HEADER_SIZES[mtype]
    rest = body.ljust(size - 4, b"\x00")
    if mtype != 4:
        rest = rest[:size - 4]
    return bytes([mtype, 0, 0, 0]) + rest


messages = st.builds(wg_message, st.sampled_from(sorted(HEADER_SIZES)), st.binary(max_size=1600))
keys = st.binary(min_size=32, max_size=32)
noise = st.integers(0, 255)


def test_vectors():
    assert obfuscate(COOKIE, CLIENT, 0x15) == COOKIE_TO_CLIENT
    assert obfuscate(DATA, SERVER, 0xFF) == DATA_TO_SERVER
    assert deobfuscate(COOKIE_TO_CLIENT, CLIENT) == COOKIE
    assert deobfuscate(DATA_TO_SERVER, SERVER) == DATA
    # Read with the wrong key (the sender's own instead of the receiver's): not this message.
    assert deobfuscate(DATA_TO_SERVER, CLIENT) != DATA


def test_mullvad_unit_test_checks():
    """Mullvad's test_obfuscation and test_obfuscation_reserved_byte_uses_full_random_byte:
    key 0xef * 32, a data message of 32 + 100 bytes."""
    key = bytes([0xEF]) * 32
    packet = bytes([4]) + bytes(31) + bytes(range(100))
    sealed = obfuscate(packet, key, 0x3C)
    assert sealed != packet
    assert sealed[32:] == packet[32:], "payload unchanged"
    assert deobfuscate(sealed, key) == packet
    assert obfuscate(packet, key, 0xFF)[1] == 0xFF  # the whole random byte, top bit set


@given(messages, keys, noise)
def test_matches_the_byte_by_byte_rule(message, key, n):
    assert obfuscate(message, key, n) == reference_obfuscate(message, key, n)
    assert obfuscate(message, LwoKey(key), n) == obfuscate(message, key, n)


@given(messages, keys, noise)
def test_round_trip_with_zero_overhead(message, key, n):
    sealed = obfuscate(message, key, n)
    assert len(sealed) == len(message)
    assert is_lwo(sealed) and not is_lwo(message)
    assert deobfuscate(sealed, key) == message
    assert deobfuscate(sealed, LwoKey(key)) == message


@given(messages, keys, noise)
def test_never_looks_like_wireguard(message, key, n):
    """No LWO datagram starts with a message type followed by three zero bytes (what a simple
    DPI rule matches): byte 1 always has its top bit set."""
    sealed = obfuscate(message, key, n)
    assert not (1 <= sealed[0] <= 4 and sealed[1:4] == b"\x00\x00\x00")


@pytest.mark.parametrize("mtype", sorted(HEADER_SIZES))
def test_each_type_obfuscates_exactly_its_header_region(mtype):
    key = bytes(range(1, 33))
    message = wg_message(mtype, bytes(200))
    sealed = obfuscate(message, key, 0)
    size = HEADER_SIZES[mtype]
    changed = [i for i in range(len(message)) if sealed[i] != message[i]]
    assert changed == list(range(size))  # every key byte is nonzero, so every header byte changes
    assert sealed[size:] == message[size:]
    assert sealed[1] == 0x80 and sealed[0] == mtype ^ key[0]
    assert sealed[2:4] == bytes([key[2], key[3]])  # zero reserved bytes become key bytes


@given(st.binary(max_size=300), keys)
def test_deobfuscate_takes_any_bytes(data, key):
    """Arbitrary bytes: None, or a message of the same length with byte 1 zero, type 1..4, as long
    as its header region. Never an exception."""
    out = deobfuscate(data, key)
    if out is None:
        return
    assert len(out) == len(data)
    assert 1 <= out[0] <= 4 and out[1] == 0 and len(out) >= HEADER_SIZES[out[0]]
    assert is_lwo(data)


@pytest.mark.parametrize("data", [b"", b"\x04", b"\x04\x00" + bytes(40), bytes([4 ^ 0x11, 0x80]) + bytes(10)])
def test_deobfuscate_refuses_what_is_not_lwo(data):
    key = bytes([0x11]) * 32
    assert deobfuscate(data, key) is None  # empty, one byte, plain WireGuard, too short


def test_deobfuscate_refuses_unknown_types():
    key = bytes([0x11]) * 32
    for first in range(256):
        sealed = bytes([first, 0x80]) + bytes(200)
        assert (deobfuscate(sealed, key) is None) == (first ^ 0x11 not in HEADER_SIZES)


@pytest.mark.parametrize("message, reason", [
    (b"", "message type"), (bytes([5, 0, 0, 0]) + bytes(40), "message type"),
    (bytes([1, 0, 0, 0]) + bytes(100), "at least 148"), (bytes([4, 0, 0, 0]) + bytes(20), "at least 32"),
])
def test_obfuscate_refuses_what_is_not_wireguard(message, reason):
    with pytest.raises(LwoError, match=reason):
        obfuscate(message, bytes(32), 1)


def test_bad_key_and_noise_are_clear_errors():
    with pytest.raises(LwoError, match="32-byte"):
        LwoKey(bytes(31))
    with pytest.raises(LwoError, match="0..255"):
        obfuscate(DATA, SERVER, 256)
    assert lwo.OBFUSCATION_BIT == 0x80
