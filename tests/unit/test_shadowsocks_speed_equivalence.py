"""The Shadowsocks UDP fast paths give exactly what the plain constructions give: the unrolled
per-packet HKDF-SHA1 (aead_subkey) against cryptography's HKDF for every key and salt length, the
cached UDP address parser against parse_address_untrusted, and seal/open with any bytes-like
payload or packet against the same packet built from bytes."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings, strategies as st

from bridge.shadowsocks import (
    METHODS,
    Address,
    Cipher,
    ProtocolError,
    Udp2022Client,
    Udp2022Server,
    aead_subkey,
    encode_address,
    hkdf_sha1,
)
from bridge.shadowsocks.address import parse_address_untrusted
from bridge.shadowsocks.cipher import parse_udp_address
from bridge.shadowsocks.udp2022 import (
    _CLIENT_HEADER,
    _SEPARATE_HEADER,
    _SERVER_HEADER,
    CLIENT_HEADER_LEN,
    SEPARATE_HEADER_LEN,
    SERVER_HEADER_LEN,
)

M2017 = [m for m in METHODS if not METHODS[m].is_2022]
NOW = 1_700_000_000.0
TARGETS = [("10.9.8.7", 51820), ("2001:db8::1", 443), ("example.com", 53)]


def reference_hkdf(key: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    return HKDF(hashes.SHA1(), length, salt or None, info).derive(key)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=80), st.binary(max_size=100))
def test_aead_subkey_is_hkdf_sha1_for_every_key_and_salt_length(key, salt):
    """Both sides of the unrolled path's 20- and 40-byte limits, and salts longer than a SHA-1
    block (hashed into the HMAC key)."""
    assert aead_subkey(key, salt) == reference_hkdf(key, salt, b"ss-subkey", len(key))


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=32), st.binary(min_size=65, max_size=150), st.binary(max_size=20),
       st.integers(1, 100))
def test_hkdf_sha1_with_salts_longer_than_a_block(key, salt, info, length):
    assert hkdf_sha1(key, salt, info, length) == reference_hkdf(key, salt, info, length)


def parse_or_error(parse, data: bytes, offset: int):
    try:
        return parse(data, offset)
    except ProtocolError as exc:
        return ProtocolError, str(exc)


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.binary(max_size=40),
                 st.sampled_from([b"\x01", b"\x04"]).flatmap(
                     lambda atyp: st.binary(max_size=30).map(lambda rest: atyp + rest))),
       st.integers(0, 3))
def test_udp_address_parser_agrees_with_parse_address_untrusted(data, offset):
    for _ in range(2):  # the second time from the cache
        assert parse_or_error(parse_udp_address, data, offset) == \
            parse_or_error(parse_address_untrusted, data, offset)


def test_udp_address_parser_returns_addresses():
    for target in TARGETS:
        wire = b"\x00\x00" + encode_address(target) + b"payload"
        for _ in range(2):
            address, end = parse_udp_address(wire, 2)
            assert type(address) is Address and address == target
            assert wire[end:] == b"payload"
    assert parse_udp_address(b"\x01\x7f\x00\x00\x01\x00", 0) is None  # one port byte short


@pytest.mark.parametrize("method", M2017)
def test_udp_seal_and_open_take_any_bytes_like(method):
    c = Cipher(method, "pw")
    salt = bytes(range(c.salt_len))
    for target in TARGETS:
        payload = bytes(range(200)) * 7
        packet = c.seal_udp(target, payload, salt=salt)
        for kind in (bytearray, memoryview):
            again = c.seal_udp(target, kind(payload), salt=kind(salt))
            assert type(again) is bytes and again == packet
            address, data = c.open_udp(kind(packet))
            assert address == target and type(data) is bytes and data == payload


def test_2022_udp_seal_and_open_take_any_bytes_like():
    c = Cipher("2022-blake3-aes-256-gcm", base64.b64encode(bytes(range(32))).decode())
    payload = bytes(range(256)) * 5
    packets = []
    for kind in (bytes, bytearray, memoryview):
        client = Udp2022Client(c, session_id=b"12345678")
        packets.append(client.seal(TARGETS[1], kind(payload), NOW, padding=3))
    assert all(type(p) is bytes for p in packets) and len(set(packets)) == 1
    server = Udp2022Server(c)
    got = server.open(memoryview(packets[0]), NOW)
    assert (got.target, got.payload, type(got.payload)) == (TARGETS[1], payload, bytes)
    reply = server.seal(got.session_id, TARGETS[2], bytearray(payload), NOW)
    assert type(reply) is bytes
    assert client.open(bytearray(reply), NOW) == (TARGETS[2], payload)


def test_2022_udp_header_structs_match_the_lengths():
    assert _SEPARATE_HEADER.size == SEPARATE_HEADER_LEN
    assert _CLIENT_HEADER.size == CLIENT_HEADER_LEN
    assert _SERVER_HEADER.size == SERVER_HEADER_LEN
