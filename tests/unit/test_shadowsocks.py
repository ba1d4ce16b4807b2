"""The sans-IO Shadowsocks codec (bridge.shadowsocks): known answers (OpenSSL, RFC 5869, BLAKE3,
bytes captured from shadowsocks-libev), SIP022 wire format decoded independently, round trips for
every method with fragmentation at every byte boundary, tampering, replay, timestamps, the salt
filter's bounds, SIP002 URIs, and hypothesis on every parser of untrusted bytes: whatever comes in,
only the codec's own error type comes out."""

from __future__ import annotations

import base64
import ipaddress
import json
import os
from pathlib import Path

import blake3
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher as BlockCipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from bridge.shadowsocks import (
    METHODS,
    Address,
    AuthenticationError,
    Cipher,
    ConfigError,
    ProtocolError,
    ReplayError,
    SaltFilter,
    ServerConfig,
    ShadowsocksError,
    TcpDecryptor,
    TcpEncryptor,
    Udp2022Client,
    Udp2022Server,
    UriError,
    UsageError,
    aead_subkey,
    encode_address,
    evp_bytes_to_key,
    format_uri,
    hkdf_sha1,
    parse_address,
    parse_uri,
    session_subkey_2022,
)
from bridge.shadowsocks.stream import MAX_PADDING, _ChunkAead

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "shadowsocks"
KDF = json.loads((VECTORS / "kdf.json").read_text())
LIBEV = json.loads((VECTORS / "libev_captures.json").read_text())

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NOW = 1_700_000_000.0  # Unix time for the 2022 tests
M2017 = [m for m in METHODS if not METHODS[m].is_2022]
M2022 = [m for m in METHODS if METHODS[m].is_2022]
PSK = {m: base64.b64encode(bytes(range(METHODS[m].key_len))).decode() for m in M2022}
TARGET = ("10.9.8.7", 51820)


def cipher(method: str) -> Cipher:
    return Cipher(method, PSK[method] if method in PSK else "correct horse battery staple")


def feed_all(dec: TcpDecryptor, pieces, now: float | None = NOW) -> bytes:
    return b"".join(p for piece in pieces for p in dec.feed(piece, now))


def splits(data: bytes):
    """Every way of cutting `data` in two, plus byte by byte."""
    for i in range(len(data) + 1):
        yield [data[:i], data[i:]]
    yield [data[i:i + 1] for i in range(len(data))]


# ====================================================================== key derivation


@pytest.mark.parametrize("case", KDF["evp_bytes_to_key"]["cases"], ids=lambda c: c["password"] or "empty")
def test_evp_bytes_to_key_matches_openssl(case):
    password = bytes.fromhex(case["password_utf8_hex"])
    assert evp_bytes_to_key(password, 16).hex() == case["key16"]
    assert evp_bytes_to_key(password, 32).hex() == case["key32"]
    if password:
        assert Cipher("aes-128-gcm", case["password"]).key.hex() == case["key16"]
        assert Cipher("aes-256-gcm", password).key.hex() == case["key32"]
        assert Cipher("chacha20-ietf-poly1305", case["password"]).key.hex() == case["key32"]


@pytest.mark.parametrize("case", KDF["hkdf_sha1"]["cases"], ids=lambda c: c["case"])
def test_hkdf_sha1_rfc5869(case):
    salt = bytes.fromhex(case["salt"]) if case["salt"] is not None else b""
    okm = hkdf_sha1(bytes.fromhex(case["ikm"]), salt, bytes.fromhex(case["info"]), case["length"])
    assert okm.hex() == case["okm"]


@settings(max_examples=50, deadline=None)
@given(st.binary(min_size=1, max_size=64), st.binary(max_size=64), st.integers(1, 200))
def test_hkdf_sha1_agrees_with_cryptography(key, salt, length):
    ref = HKDF(hashes.SHA1(), length, salt or None, b"ss-subkey").derive(key)
    assert hkdf_sha1(key, salt, b"ss-subkey", length) == ref
    assert aead_subkey(key, salt) == hkdf_sha1(key, salt, b"ss-subkey", len(key))


@pytest.mark.parametrize("case", KDF["blake3_derive_key"]["cases"], ids=lambda c: str(c["input_len"]))
def test_blake3_derive_key_vectors(case):
    data = bytes(i % 251 for i in range(case["input_len"]))
    context = KDF["blake3_derive_key"]["context"]
    assert blake3.blake3(data, derive_key_context=context).digest(32).hex() == case["derive_key32"]


def test_2022_session_subkey_is_blake3_derive_key_of_psk_and_salt():
    psk, salt = bytes(range(32)), bytes(range(100, 132))
    expected = blake3.blake3(psk + salt, derive_key_context="shadowsocks 2022 session subkey").digest(32)
    assert session_subkey_2022(psk, salt) == expected
    assert session_subkey_2022(psk[:16], salt[:16]) == blake3.blake3(
        psk[:16] + salt[:16], derive_key_context="shadowsocks 2022 session subkey").digest(16)


def test_cipher_construction_errors_never_show_the_secret():
    with pytest.raises(ConfigError, match="unsupported method"):
        Cipher("rc4-md5", "x")
    with pytest.raises(ConfigError, match="exactly one"):
        Cipher("aes-256-gcm")
    with pytest.raises(ConfigError, match="exactly one"):
        Cipher("aes-256-gcm", "pw", key=bytes(32))
    with pytest.raises(ConfigError, match="32 bytes"):
        Cipher("aes-256-gcm", key=bytes(16))
    with pytest.raises(ConfigError, match="empty"):
        Cipher("aes-128-gcm", "")
    short = base64.b64encode(b"S3cretS3cretS3cr").decode()  # 16 bytes for a 32-byte method
    for bad in (short, "not base64 at all!", "c2VjcmV0"):
        with pytest.raises(ConfigError) as info:
            Cipher("2022-blake3-aes-256-gcm", bad)
        assert bad not in str(info.value) and "openssl rand -base64 32" in str(info.value)
    c = Cipher("AES-256-GCM", "hunter2")
    assert c.method.name == "aes-256-gcm" and "hunter2" not in repr(c) and c.key.hex() not in repr(c)


# ====================================================================== addresses


@pytest.mark.parametrize("address, wire", [
    (("1.2.3.4", 80), "01010203040050"),
    (("::1", 443), "04" + "00" * 15 + "01" + "01bb"),
    (("example.com", 53), "030b" + b"example.com".hex() + "0035"),
    ((ipaddress.ip_address("10.0.0.1"), 0), "010a0000010000"),
    (("2001:db8::1", 51820, 0, 0), "0420010db8" + "00" * 11 + "01" + "ca6c"),
])
def test_address_wire_format(address, wire):
    assert encode_address(address).hex() == wire
    parsed, used = parse_address(bytes.fromhex(wire) + b"trailing")
    assert used == len(wire) // 2
    assert parsed == Address(str(ipaddress.ip_address(address[0])) if address[0] != "example.com" else "example.com",
                             address[1])


@pytest.mark.parametrize("bad", [
    ("1.2.3.4", -1), ("1.2.3.4", 65536), ("1.2.3.4", True), ("1.2.3.4", "80"), ("", 80),
    ("x" * 256, 80), (b"1.2.3.4", 80), ("1.2.3.4",), None, 5, ("\udcff", 1),
])
def test_address_encode_errors(bad):
    with pytest.raises(UsageError):
        encode_address(bad)


@pytest.mark.parametrize("wire, why", [
    ("", "truncated"), ("01", "truncated"), ("01010203", "truncated"), ("010102030400", "truncated"),
    ("03", "truncated"), ("0305616263", "truncated"), ("04" + "00" * 17, "truncated"),
    ("0300", "empty"), ("0302ff000000", "UTF-8"), ("02", "unknown type"), ("00", "unknown type"),
])
def test_address_parse_errors(wire, why):
    with pytest.raises(ProtocolError, match=why):
        parse_address(bytes.fromhex(wire))


hosts = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    st.text(min_size=1, max_size=80).filter(lambda s: 0 < len(s.encode("utf-8", "surrogatepass")) <= 255),
)


@FUZZ
@given(hosts, st.integers(0, 65535))
def test_address_round_trip(host, port):
    try:
        wire = encode_address((host, port))
    except UsageError:
        assume(False)  # lone surrogates cannot be UTF-8
    parsed, used = parse_address(wire)
    assert used == len(wire)
    try:
        canonical = str(ipaddress.ip_address(host))
    except ValueError:
        canonical = host
    assert parsed == (canonical, port)
    assert encode_address(parsed) == wire


@FUZZ
@given(st.binary(max_size=300), st.integers(0, 10))
def test_address_parse_untrusted_bytes(data, offset):
    try:
        address, used = parse_address(data, offset)
    except ProtocolError:
        return
    assert 0 < used <= len(data) - offset
    assert encode_address(address)  # whatever parsed can be encoded again


# ====================================================================== AEAD-2017 UDP


@pytest.mark.parametrize("case", LIBEV["cases"], ids=lambda c: c["method"])
def test_udp_packets_captured_from_libev(case):
    c = Cipher(case["method"], LIBEV["password"])
    req = case["udp_request"]
    assert c.open_udp(bytes.fromhex(req["hex"])) == (tuple(req["target"]), req["payload"].encode())
    rep = case["udp_reply"]
    assert c.open_udp(bytes.fromhex(rep["hex"])) == (tuple(rep["source"]), rep["payload"].encode())
    with pytest.raises(AuthenticationError):
        Cipher(case["method"], "another password").open_udp(bytes.fromhex(req["hex"]))


@pytest.mark.parametrize("method", M2017)
def test_udp_round_trip_and_format(method):
    c = cipher(method)
    m = c.method
    salt = bytes(range(m.salt_len))
    for target in (TARGET, ("::1", 53), ("example.com", 443)):
        for payload in (b"", b"x", os.urandom(1400)):
            packet = c.seal_udp(target, payload, salt=salt)
            assert packet[:m.salt_len] == salt
            assert len(packet) == len(payload) + c.udp_overhead(target)
            # the construction, step by step: salt || AEAD(HKDF-SHA1(key, salt, "ss-subkey"), 0, addr || payload)
            subkey = HKDF(hashes.SHA1(), m.key_len, salt, b"ss-subkey").derive(c.key)
            plain = m.aead(subkey).decrypt(bytes(12), packet[m.salt_len:], None)
            assert plain == encode_address(target) + payload
            assert c.open_udp(packet) == (parse_address(encode_address(target))[0], payload)
    a, b = c.seal_udp(TARGET, b"same"), c.seal_udp(TARGET, b"same")
    assert a[:m.salt_len] != b[:m.salt_len]  # a fresh salt per packet


@pytest.mark.parametrize("method", M2017)
def test_udp_tamper_and_truncation(method):
    c = cipher(method)
    packet = c.seal_udp(TARGET, b"payload")
    for i in range(len(packet)):
        bad = bytearray(packet)
        bad[i] ^= 0x40
        with pytest.raises(AuthenticationError):
            c.open_udp(bytes(bad))
    for n in range(len(packet)):
        with pytest.raises(ProtocolError):
            c.open_udp(packet[:n])
    # authentic but empty or malformed plaintext
    salt = c.new_salt()
    aead = c.session_aead(salt)
    for plain, why in ((b"\x01\x01\x02", "truncated"), (b"\x09abc", "unknown type")):
        with pytest.raises(ProtocolError, match=why):
            c.open_udp(salt + aead.encrypt(bytes(12), plain, None))


def test_udp_salt_filter_drops_replays_but_not_forgeries():
    c = cipher("aes-256-gcm")
    f = SaltFilter()
    packet = c.seal_udp(TARGET, b"once")
    assert c.open_udp(packet, salt_filter=f, now=10)[1] == b"once"
    with pytest.raises(ReplayError):
        c.open_udp(packet, salt_filter=f, now=11)
    forged = packet[:c.salt_len] + bytes(len(packet) - c.salt_len)
    other = c.seal_udp(TARGET, b"other")
    forged_other = other[:c.salt_len] + bytes(len(other) - c.salt_len)
    with pytest.raises(AuthenticationError):
        c.open_udp(forged_other, salt_filter=f, now=12)
    assert c.open_udp(other, salt_filter=f, now=12)[1] == b"other"  # the forgery did not poison it
    with pytest.raises(AuthenticationError):
        c.open_udp(forged, salt_filter=f, now=12)
    with pytest.raises(UsageError):
        c.open_udp(packet, salt_filter=f)


def test_udp_on_a_2022_cipher_is_a_usage_error():
    c = cipher("2022-blake3-aes-128-gcm")
    with pytest.raises(UsageError, match="Udp2022"):
        c.seal_udp(TARGET, b"x")
    with pytest.raises(UsageError):
        c.open_udp(b"x" * 100)
    with pytest.raises(UsageError):
        cipher("aes-128-gcm").encrypt_block(bytes(16))


@FUZZ
@given(st.sampled_from(M2017), st.binary(max_size=200))
def test_udp_open_untrusted_bytes(method, data):
    with pytest.raises(ProtocolError):
        cipher(method).open_udp(data)


def mutate(draw, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        if not out:
            break
        i = draw(st.integers(0, len(out) - 1))
        out[i] ^= draw(st.integers(1, 255))
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(out)))
        out = out[:cut] if draw(st.booleans()) else out + draw(st.binary(min_size=1, max_size=20))
    return bytes(out)


@FUZZ
@given(st.data())
def test_udp_open_mutated_packets(data):
    method = data.draw(st.sampled_from(M2017))
    packet = data.draw(st.sampled_from([cipher(method).seal_udp(TARGET, b"wireguard datagram"),
                                         cipher(method).seal_udp(("a.example", 1), b"")]))
    bad = mutate(data.draw, packet)
    assume(bad != packet)
    with pytest.raises(ProtocolError):
        cipher(method).open_udp(bad)


# ====================================================================== AEAD-2017 TCP


@pytest.mark.parametrize("case", LIBEV["cases"], ids=lambda c: c["method"])
def test_tcp_streams_captured_from_libev(case):
    c = Cipher(case["method"], LIBEV["password"])
    req = case["tcp_request"]
    stream = bytes.fromhex(req["hex"])
    for pieces in splits(stream):
        dec = TcpDecryptor(c, expect_target=True)
        assert feed_all(dec, pieces, None) == req["payload"].encode()
        assert dec.target == tuple(req["target"])
        dec.feed_eof()
    dec = TcpDecryptor(c)
    assert feed_all(dec, [bytes.fromhex(case["tcp_response"]["hex"])], None) == \
        case["tcp_response"]["payload"].encode()
    dec.feed_eof()


@pytest.mark.parametrize("method", M2017)
def test_tcp_round_trip_every_fragmentation(method):
    c = cipher(method)
    enc = TcpEncryptor(c, ("example.com", 443))
    stream = enc.encrypt(b"GET / HTTP/1.0\r\n") + enc.encrypt(b"") + enc.encrypt(b"\r\n")
    for pieces in splits(stream):
        dec = TcpDecryptor(c, expect_target=True)
        assert feed_all(dec, pieces, None) == b"GET / HTTP/1.0\r\n\r\n"
        assert dec.target == ("example.com", 443) and dec.established
        dec.feed_eof()
    # response direction: no address
    enc = TcpEncryptor(c)
    stream = enc.encrypt(b"HTTP/1.0 200 OK")
    for pieces in splits(stream):
        dec = TcpDecryptor(c)
        assert feed_all(dec, pieces, None) == b"HTTP/1.0 200 OK" and dec.target is None


@pytest.mark.parametrize("method", M2017)
def test_tcp_chunking_and_nonces(method):
    c = cipher(method)
    m = c.method
    data = os.urandom(3 * 0x3FFF + 5)
    salt = bytes(m.salt_len)
    enc = TcpEncryptor(c, TARGET, salt=salt)
    stream = enc.encrypt(data)
    first = encode_address(TARGET) + data
    chunks = -(-len(first) // 0x3FFF)
    assert len(stream) == m.salt_len + chunks * (2 + 16 + 16) + len(first)
    # decode by hand: the little-endian counter nonce goes up by one per seal
    aead = m.aead(aead_subkey(c.key, salt))
    pos, n, out = m.salt_len, 0, b""
    while pos < len(stream):
        length = int.from_bytes(aead.decrypt(n.to_bytes(12, "little"), stream[pos:pos + 18], None), "big")
        assert 0 < length <= 0x3FFF
        out += aead.decrypt((n + 1).to_bytes(12, "little"), stream[pos + 18:pos + 18 + length + 16], None)
        pos, n = pos + 18 + length + 16, n + 2
    assert out == first
    dec = TcpDecryptor(c, expect_target=True)
    assert feed_all(dec, [stream[i:i + 1000] for i in range(0, len(stream), 1000)], None) == data


def hand_stream(c: Cipher, chunks: list[bytes]) -> bytes:
    """salt || seal(x) for each x, with the stream nonce counter (to build invalid streams)."""
    salt = c.new_salt()
    aead = _ChunkAead(c.session_aead(salt))
    return salt + b"".join(aead.seal(x) for x in chunks)


@pytest.mark.parametrize("length, why", [(0, "empty chunk"), (0x4000, "reserved"), (0x8005, "reserved")])
def test_tcp_bad_lengths(length, why):
    c = cipher("aes-128-gcm")
    with pytest.raises(ProtocolError, match=why):
        TcpDecryptor(c).feed(hand_stream(c, [length.to_bytes(2, "big"), b"x"]))


def test_tcp_tamper_is_fatal_and_sticky():
    c = cipher("chacha20-ietf-poly1305")
    enc = TcpEncryptor(c, TARGET)
    stream = enc.encrypt(b"hello") + enc.encrypt(b"world")
    for i in range(c.salt_len, len(stream)):
        bad = bytearray(stream)
        bad[i] ^= 1
        dec = TcpDecryptor(c, expect_target=True)
        with pytest.raises(AuthenticationError):
            dec.feed(bytes(bad))
        assert dec.failed
        with pytest.raises(AuthenticationError):
            dec.feed(b"more")
        with pytest.raises(AuthenticationError):
            dec.feed_eof()
    # reordered chunks fail too (the nonce counter)
    enc = TcpEncryptor(c)
    first, second = enc.encrypt(b"a"), enc.encrypt(b"b")
    dec = TcpDecryptor(c)
    assert dec.feed(first[:c.salt_len]) == []
    with pytest.raises(AuthenticationError):
        dec.feed(second)


def test_tcp_truncation_is_reported_at_eof():
    c = cipher("aes-256-gcm")
    enc = TcpEncryptor(c, TARGET)
    stream = enc.encrypt(b"hello")
    TcpDecryptor(c, expect_target=True).feed_eof()  # nothing ever arrived: a clean close
    for n in range(1, len(stream)):
        dec = TcpDecryptor(c, expect_target=True)
        dec.feed(stream[:n])
        with pytest.raises(ProtocolError):
            dec.feed_eof()
    # a stream that ends between chunks but before the whole target address
    half = hand_stream(c, [b"\x00\x03", b"\x01\x0a\x00"])
    dec = TcpDecryptor(c, expect_target=True)
    assert dec.feed(half) == [] and dec.target is None
    with pytest.raises(ProtocolError, match="target address"):
        dec.feed_eof()


def test_tcp_address_may_span_chunks():
    c = cipher("aes-128-gcm")
    wire = encode_address(("example.org", 80))
    pieces = [wire[:1], wire[1:5], wire[5:] + b"data", b"more"]
    stream = hand_stream(c, [x for p in pieces for x in (len(p).to_bytes(2, "big"), p)])
    dec = TcpDecryptor(c, expect_target=True)
    assert feed_all(dec, [stream], None) == b"datamore" and dec.target == ("example.org", 80)
    bad = hand_stream(c, [b"\x00\x01", b"\x07"])
    with pytest.raises(ProtocolError, match="unknown type"):
        TcpDecryptor(c, expect_target=True).feed(bad)


def test_tcp_buffering_is_bounded():
    c = cipher("aes-256-gcm")
    enc = TcpEncryptor(c)
    stream = enc.encrypt(os.urandom(200_000))
    dec = TcpDecryptor(c)
    got = b""
    for i in range(0, len(stream), 7777):
        got += b"".join(dec.feed(stream[i:i + 7777]))
        assert dec.buffered < 2 + 16 + 0x3FFF + 16
    assert len(got) == 200_000
    # a peer that announces a full chunk and then trickles: still one chunk at most
    dec = TcpDecryptor(c)
    dec.feed(stream[:c.salt_len + 18 + 100])
    assert dec.buffered == 100


def test_tcp_salt_filter_drops_replayed_streams():
    c = cipher("aes-256-gcm")
    f = SaltFilter()
    stream = TcpEncryptor(c, TARGET).encrypt(b"once")
    assert feed_all(TcpDecryptor(c, expect_target=True, salt_filter=f), [stream], 5) == b"once"
    dec = TcpDecryptor(c, expect_target=True, salt_filter=f)
    with pytest.raises(ReplayError):
        dec.feed(stream, 6)
    with pytest.raises(UsageError, match="now"):
        TcpDecryptor(c, expect_target=True, salt_filter=f).feed(stream)
    # a forged stream (salt only, garbage after) does not enter the filter
    fresh = TcpEncryptor(c, TARGET).encrypt(b"x")
    with pytest.raises(AuthenticationError):
        TcpDecryptor(c, salt_filter=f).feed(fresh[:c.salt_len] + bytes(40), 7)
    assert feed_all(TcpDecryptor(c, expect_target=True, salt_filter=f), [fresh], 7) == b"x"


def tcp_samples() -> list[tuple[str, bool, bytes | None, bytes]]:
    """(method, expect_target, request_salt, valid stream) for every method and direction."""
    out = []
    for method in METHODS:
        c = cipher(method)
        req = TcpEncryptor(c, ("fuzz.example", 9))
        stream = req.encrypt(b"first", NOW) + req.encrypt(b"second", NOW)
        out.append((method, True, None, stream))
        resp = TcpEncryptor(c, request_salt=req.salt)
        out.append((method, False, req.salt, resp.encrypt(b"reply", NOW) + resp.encrypt(b"more", NOW)))
    return out


TCP_SAMPLES = tcp_samples()


@FUZZ
@given(st.sampled_from(range(len(TCP_SAMPLES))), st.lists(st.binary(max_size=120), max_size=6))
def test_tcp_feed_untrusted_bytes(index, pieces):
    method, expect_target, request_salt, _ = TCP_SAMPLES[index]
    dec = TcpDecryptor(cipher(method), expect_target=expect_target, request_salt=request_salt,
                       salt_filter=SaltFilter())
    try:
        for p in pieces:
            assert dec.feed(p, NOW) == []  # nothing authentic can come out of random bytes
        dec.feed_eof()
    except ProtocolError:
        pass


@FUZZ
@given(st.data())
def test_tcp_feed_mutated_streams(data):
    method, expect_target, request_salt, stream = data.draw(st.sampled_from(TCP_SAMPLES))
    bad = mutate(data.draw, stream)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(bad)), max_size=5)))
    pieces = [bad[a:b] for a, b in zip([0, *cuts], [*cuts, len(bad)])]
    dec = TcpDecryptor(cipher(method), expect_target=expect_target, request_salt=request_salt)
    good = TcpDecryptor(cipher(method), expect_target=expect_target, request_salt=request_salt)
    expected = feed_all(good, [stream])
    try:
        got = feed_all(dec, pieces)
        dec.feed_eof()
    except ProtocolError:
        return
    assert expected.startswith(got)  # whatever came out was authentic


# ====================================================================== 2022 UDP


def aes_ecb(key: bytes, block: bytes, decrypt: bool = False) -> bytes:
    ctx = BlockCipher(algorithms.AES(key), modes.ECB())
    op = ctx.decryptor() if decrypt else ctx.encryptor()
    return op.update(block) + op.finalize()


@pytest.mark.parametrize("method", M2022)
def test_2022_udp_wire_format_decoded_independently(method):
    """Decode a client packet and a server reply with cryptography + blake3 only, per SIP022 3.2."""
    c = cipher(method)
    psk = base64.b64decode(PSK[method])
    client = Udp2022Client(c, session_id=b"\x01\x02\x03\x04\x05\x06\x07\x08")
    client.seal(TARGET, b"first", NOW)
    packet = client.seal(TARGET, b"wireguard", NOW + 1, padding=3)
    header = aes_ecb(psk, packet[:16], decrypt=True)
    assert header == b"\x01\x02\x03\x04\x05\x06\x07\x08" + (1).to_bytes(8, "big")
    subkey = blake3.blake3(psk + header[:8], derive_key_context="shadowsocks 2022 session subkey").digest(len(psk))
    body = AESGCM(subkey).decrypt(header[4:16], packet[16:], None)
    assert body[0] == 0 and int.from_bytes(body[1:9], "big") == int(NOW + 1)
    assert body[9:11] == b"\x00\x03" and body[14:] == encode_address(TARGET) + b"wireguard"

    server = Udp2022Server(c)
    got = server.open(packet, NOW + 1)
    assert got == (header[:8], 1, TARGET, b"wireguard")
    reply = server.seal(got.session_id, ("10.9.8.7", 51820), b"answer", NOW + 2, padding=0)
    rheader = aes_ecb(psk, reply[:16], decrypt=True)
    server_id = rheader[:8]
    assert server_id != header[:8] and rheader[8:] == bytes(8)  # server packet ids count from 0
    rkey = blake3.blake3(psk + server_id, derive_key_context="shadowsocks 2022 session subkey").digest(len(psk))
    rbody = AESGCM(rkey).decrypt(rheader[4:16], reply[16:], None)
    assert rbody[0] == 1 and int.from_bytes(rbody[1:9], "big") == int(NOW + 2)
    assert rbody[9:17] == header[:8] and rbody[17:19] == b"\x00\x00"
    assert rbody[19:] == encode_address(TARGET) + b"answer"
    assert client.open(reply, NOW + 2) == (TARGET, b"answer")
    assert client.server_session_id == server_id == server.server_session_id(got.session_id)
    assert len(packet) == 9 + client.overhead(TARGET, padding=3)
    assert len(reply) == 6 + server.overhead(TARGET)


@pytest.mark.parametrize("method", M2022)
def test_2022_udp_round_trips_and_sessions(method):
    c = cipher(method)
    server = Udp2022Server(c)
    clients = [Udp2022Client(c) for _ in range(3)]
    for i in range(5):
        for n, client in enumerate(clients):
            payload = f"client {n} packet {i}".encode()
            got = server.open(client.seal(("::1", 53), payload, NOW), NOW)
            assert got.session_id == client.session_id and got.packet_id == i
            assert got.target == ("::1", 53) and got.payload == payload
            assert client.open(server.seal(got.session_id, got.target, payload[::-1], NOW), NOW) == \
                (("::1", 53), payload[::-1])
    assert len(server) == 3
    # a reply for client 0 is not for client 1
    reply = server.seal(clients[0].session_id, TARGET, b"x", NOW)
    with pytest.raises(ProtocolError, match="another client session"):
        clients[1].open(reply, NOW)
    with pytest.raises(UsageError):
        server.seal(b"\x00" * 8, TARGET, b"x", NOW)


def test_2022_udp_padding():
    c = cipher("2022-blake3-aes-128-gcm")
    client, server = Udp2022Client(c), Udp2022Server(c)
    base = len(client.seal(TARGET, b"p", NOW, padding=0))
    assert len(client.seal(TARGET, b"p", NOW, padding=MAX_PADDING)) == base + MAX_PADDING
    assert len(client.seal(TARGET, b"p", NOW)) == base  # payload present: no padding by default
    sizes = {len(client.seal(TARGET, b"", NOW)) for _ in range(20)}
    assert len(sizes) > 1 and max(sizes) <= base - 1 + MAX_PADDING  # empty payload: random padding
    for bad in (-1, MAX_PADDING + 1, True, 1.5):
        with pytest.raises(UsageError):
            client.seal(TARGET, b"p", NOW, padding=bad)
    assert server.open(client.seal(TARGET, b"", NOW), NOW).payload == b""


@pytest.mark.parametrize("skew, ok", [(-30, True), (30, True), (-31, False), (31, False), (-3600, False)])
def test_2022_udp_timestamp_window(skew, ok):
    c = cipher("2022-blake3-aes-256-gcm")
    client, server = Udp2022Client(c), Udp2022Server(c)
    packet = client.seal(TARGET, b"t", NOW + skew)
    if ok:
        sid = server.open(packet, NOW).session_id
        reply = server.seal(sid, TARGET, b"r", NOW + skew)
        assert client.open(reply, NOW)[1] == b"r"
    else:
        with pytest.raises(ReplayError, match="timestamp"):
            server.open(packet, NOW)
        assert len(server) == 0  # no session for a rejected packet
        server.open(client.seal(TARGET, b"t", NOW), NOW)
        reply = server.seal(client.session_id, TARGET, b"r", NOW + skew)
        with pytest.raises(ReplayError, match="timestamp"):
            client.open(reply, NOW)


def test_2022_udp_replay_window():
    c = cipher("2022-blake3-aes-256-gcm")
    client, server = Udp2022Client(c), Udp2022Server(c)
    packets = [client.seal(TARGET, b"%d" % i, NOW) for i in range(10_000)]
    server.open(packets[5], NOW)
    with pytest.raises(ReplayError):
        server.open(packets[5], NOW)
    assert server.open(packets[0], NOW).packet_id == 0  # older, inside the window: accepted once
    with pytest.raises(ReplayError):
        server.open(packets[0], NOW)
    server.open(packets[9999], NOW)
    with pytest.raises(ReplayError):
        server.open(packets[1], NOW)  # now more than 8128 behind
    assert server.open(packets[9998], NOW).packet_id == 9998


def test_2022_udp_rejected_packets_do_not_move_the_window():
    """A packet that fails validation (bad timestamp) must not burn its packet id."""
    c = cipher("2022-blake3-aes-128-gcm")
    sid = os.urandom(8)
    server = Udp2022Server(c)
    server.open(Udp2022Client(c, session_id=sid).seal(TARGET, b"first", NOW), NOW)
    stale = Udp2022Client(c, session_id=sid)
    stale.seal(TARGET, b"", NOW)  # packet id 0
    with pytest.raises(ReplayError, match="timestamp"):
        server.open(stale.seal(TARGET, b"late", NOW - 100), NOW)  # packet id 1, stale
    fresh = Udp2022Client(c, session_id=sid)
    fresh.seal(TARGET, b"", NOW)
    assert server.open(fresh.seal(TARGET, b"ok", NOW), NOW).packet_id == 1


def test_2022_udp_client_follows_server_restarts():
    """SIP022 3.2.4: one old and one current server session; a third is refused while the old
    one was heard from in the last 60 s."""
    c = cipher("2022-blake3-aes-256-gcm")
    client = Udp2022Client(c)
    servers = [Udp2022Server(c) for _ in range(3)]
    t = NOW
    for s in servers:
        s.open(client.seal(TARGET, b"hi", t), t)

    def reply(i: int, when: float) -> bytes:
        return servers[i].seal(client.session_id, TARGET, b"from %d" % i, when)

    assert client.open(reply(0, t), t)[1] == b"from 0"
    assert client.open(reply(1, t + 1), t + 1)[1] == b"from 1"  # a restart: accepted, S0 is old
    with pytest.raises(ProtocolError, match="third server session"):
        client.open(reply(2, t + 59), t + 59)
    assert client.open(reply(0, t + 59), t + 59)[1] == b"from 0"  # the old one still works
    with pytest.raises(ProtocolError, match="third server session"):
        client.open(reply(2, t + 100), t + 100)  # S0 was heard at t+59
    late = reply(2, t + 120)
    assert client.open(late, t + 120)[1] == b"from 2"  # S0 silent for 61 s: S2 replaces it
    assert client.server_session_id == servers[2].server_session_id(client.session_id)
    with pytest.raises(ReplayError):
        client.open(late, t + 120)
    assert client.open(reply(1, t + 121), t + 121)[1] == b"from 1"  # S1 is the old one now
    with pytest.raises(ProtocolError, match="third server session"):
        client.open(reply(0, t + 122), t + 122)


def test_2022_udp_server_session_limits():
    c = cipher("2022-blake3-aes-128-gcm")
    with pytest.raises(ConfigError):
        Udp2022Server(c, session_timeout=30)
    with pytest.raises(ConfigError):
        Udp2022Client(cipher("aes-128-gcm"))
    server = Udp2022Server(c, max_sessions=2)
    a, b, d = Udp2022Client(c), Udp2022Client(c), Udp2022Client(c)
    server.open(a.seal(TARGET, b"a", NOW), NOW)
    server.open(b.seal(TARGET, b"b", NOW + 30), NOW + 30)
    with pytest.raises(ProtocolError, match="too many sessions"):
        server.open(d.seal(TARGET, b"d", NOW + 30), NOW + 30)
    assert server.open(d.seal(TARGET, b"d", NOW + 60), NOW + 60).payload == b"d"  # a expired
    assert a.session_id not in server and b.session_id in server and d.session_id in server
    assert server.expire(NOW + 200) == 2 and len(server) == 0


def udp2022_samples() -> list[tuple[str, str, bytes]]:
    out = []
    for method in M2022:
        c = cipher(method)
        client, server = Udp2022Client(c), Udp2022Server(c)
        packet = client.seal(TARGET, b"wireguard datagram", NOW)
        sid = server.open(packet, NOW).session_id
        out.append((method, "server", client.seal(("x.example", 7), b"", NOW, padding=5)))
        out.append((method, "client", server.seal(sid, TARGET, b"reply", NOW)))
    return out


UDP2022_SAMPLES = udp2022_samples()


@FUZZ
@given(st.sampled_from(M2022), st.booleans(), st.binary(max_size=200))
def test_2022_udp_open_untrusted_bytes(method, as_server, data):
    c = cipher(method)
    side = Udp2022Server(c) if as_server else Udp2022Client(c)
    with pytest.raises(ProtocolError):
        side.open(data, NOW)


@FUZZ
@given(st.data())
def test_2022_udp_open_mutated_packets(data):
    method, side, packet = data.draw(st.sampled_from(UDP2022_SAMPLES))
    c = cipher(method)
    opener = Udp2022Server(c) if side == "server" else Udp2022Client(c)
    bad = mutate(data.draw, packet)
    assume(bad != packet)
    with pytest.raises(ProtocolError):
        opener.open(bad, NOW)


# ====================================================================== 2022 TCP


@pytest.mark.parametrize("method", M2022)
def test_2022_tcp_wire_format_decoded_independently(method):
    """SIP022 3.1: salt, fixed header (type 0, timestamp, length), variable header (address,
    padding length, padding, initial payload); the response: salt, header (type 1, timestamp,
    request salt, length) as the first length chunk."""
    c = cipher(method)
    psk, n = base64.b64decode(PSK[method]), METHODS[method].salt_len
    req = TcpEncryptor(c, ("example.com", 443), padding=4)
    stream = req.encrypt(b"GET /", NOW)
    salt = stream[:n]
    aead = AESGCM(blake3.blake3(psk + salt, derive_key_context="shadowsocks 2022 session subkey").digest(len(psk)))
    fixed = aead.decrypt((0).to_bytes(12, "little"), stream[n:n + 11 + 16], None)
    assert fixed[0] == 0 and int.from_bytes(fixed[1:9], "big") == int(NOW)
    length = int.from_bytes(fixed[9:11], "big")
    variable = aead.decrypt((1).to_bytes(12, "little"), stream[n + 27:n + 27 + length + 16], None)
    assert variable == encode_address(("example.com", 443)) + b"\x00\x04" + bytes(4) + b"GET /"
    assert len(stream) == n + 27 + length + 16

    resp = TcpEncryptor(c, request_salt=salt)
    assert resp.encrypt(b"", NOW) == b""  # the header waits for payload
    rstream = resp.encrypt(b"200", NOW + 1)
    rsalt = rstream[:n]
    raead = AESGCM(blake3.blake3(psk + rsalt, derive_key_context="shadowsocks 2022 session subkey").digest(len(psk)))
    header = raead.decrypt(bytes(12), rstream[n:n + 1 + 8 + n + 2 + 16], None)
    assert header[0] == 1 and int.from_bytes(header[1:9], "big") == int(NOW + 1)
    assert header[9:9 + n] == salt and int.from_bytes(header[-2:], "big") == 3
    assert raead.decrypt((1).to_bytes(12, "little"), rstream[n + 1 + 8 + n + 2 + 16:], None) == b"200"


@pytest.mark.parametrize("method", M2022)
def test_2022_tcp_round_trip_every_fragmentation(method):
    c = cipher(method)
    req = TcpEncryptor(c, ("203.0.113.9", 80))
    stream = req.encrypt(b"", NOW) + req.encrypt(b"after padding-only header", NOW)
    for pieces in splits(stream):
        dec = TcpDecryptor(c, expect_target=True, salt_filter=SaltFilter())
        assert feed_all(dec, pieces) == b"after padding-only header"
        assert dec.target == ("203.0.113.9", 80) and dec.salt == req.salt
        dec.feed_eof()
    resp = TcpEncryptor(c, request_salt=req.salt)
    rstream = resp.encrypt(b"HTTP/1.1 204", NOW) + resp.encrypt(b" No Content", NOW)
    for pieces in splits(rstream):
        dec = TcpDecryptor(c, request_salt=req.salt)
        assert feed_all(dec, pieces) == b"HTTP/1.1 204 No Content"
        dec.feed_eof()


@pytest.mark.parametrize("method", M2022)
def test_2022_tcp_big_payloads(method):
    c = cipher(method)
    data = os.urandom(3 * 0xFFFF + 77)
    req = TcpEncryptor(c, TARGET)
    dec = TcpDecryptor(c, expect_target=True)
    stream = req.encrypt(data, NOW)
    assert feed_all(dec, [stream[i:i + 5000] for i in range(0, len(stream), 5000)]) == data
    assert dec.buffered == 0
    resp = TcpEncryptor(c, request_salt=req.salt)
    rdec = TcpDecryptor(c, request_salt=req.salt)
    assert feed_all(rdec, [resp.encrypt(data, NOW)]) == data


def test_2022_tcp_checks():
    c = cipher("2022-blake3-aes-256-gcm")
    f = SaltFilter()
    req = TcpEncryptor(c, TARGET)
    stream = req.encrypt(b"x", NOW)
    assert feed_all(TcpDecryptor(c, expect_target=True, salt_filter=f), [stream]) == b"x"
    with pytest.raises(ReplayError, match="salt"):
        TcpDecryptor(c, expect_target=True, salt_filter=f).feed(stream, NOW + 1)
    for skew in (-31, 31):
        with pytest.raises(ReplayError, match="timestamp"):
            TcpDecryptor(c, expect_target=True).feed(TcpEncryptor(c, TARGET).encrypt(b"x", NOW + skew), NOW)
    for skew in (-30, 30):
        assert feed_all(TcpDecryptor(c, expect_target=True), [TcpEncryptor(c, TARGET).encrypt(b"x", NOW + skew)]) == b"x"
    # the response must echo our request salt, and be a response
    resp = TcpEncryptor(c, request_salt=c.new_salt()).encrypt(b"y", NOW)
    with pytest.raises(ProtocolError, match="another request"):
        TcpDecryptor(c, request_salt=req.salt).feed(resp, NOW)
    long_request = TcpEncryptor(c, TARGET).encrypt(os.urandom(100), NOW)
    with pytest.raises(AuthenticationError):  # a request is not a response (other header size)
        TcpDecryptor(c, request_salt=req.salt).feed(long_request, NOW)
    short = TcpDecryptor(c, request_salt=req.salt)
    assert short.feed(stream, NOW) == []  # shorter than a response header: waits...
    with pytest.raises(ProtocolError, match="inside a chunk"):
        short.feed_eof()  # ...and is truncated at the end
    with pytest.raises(ProtocolError):
        TcpDecryptor(c, expect_target=True).feed(TcpEncryptor(c, request_salt=req.salt).encrypt(b"y", NOW), NOW)
    # API misuse
    with pytest.raises(UsageError, match="now"):
        TcpEncryptor(c, TARGET).encrypt(b"x")
    with pytest.raises(UsageError, match="now"):
        TcpDecryptor(c, expect_target=True).feed(stream)
    with pytest.raises(UsageError):
        TcpEncryptor(c)  # neither a request nor a response
    with pytest.raises(UsageError):
        TcpDecryptor(c)  # a response decryptor needs the request salt
    with pytest.raises(UsageError, match="padding"):
        TcpEncryptor(c, TARGET, padding=0).encrypt(b"", NOW)
    with pytest.raises(UsageError):
        TcpEncryptor(c, TARGET, padding=901)
    with pytest.raises(UsageError):
        TcpEncryptor(cipher("aes-256-gcm"), TARGET, padding=1)


def hand_request_2022(c: Cipher, variable: bytes, timestamp: int = int(NOW), kind: int = 0) -> bytes:
    salt = c.new_salt()
    aead = _ChunkAead(c.session_aead(salt))
    fixed = bytes((kind,)) + timestamp.to_bytes(8, "big") + len(variable).to_bytes(2, "big")
    return salt + aead.seal(fixed) + (aead.seal(variable) if variable else b"")


@pytest.mark.parametrize("variable, why", [
    (encode_address(TARGET) + b"\x00\x00", "neither payload nor padding"),
    (encode_address(TARGET) + b"\x03\x85" + bytes(901), "padding 901"),
    (encode_address(TARGET) + b"\x00\x05abc", "beyond the request header"),
    (encode_address(TARGET) + b"\x00", "padding length"),
    (encode_address(TARGET)[:4], "inside the address"),
    (b"\x05" + bytes(8), "unknown type"),
    (b"", "empty request header"),
])
def test_2022_tcp_bad_request_headers(variable, why):
    c = cipher("2022-blake3-aes-128-gcm")
    with pytest.raises(ProtocolError, match=why):
        TcpDecryptor(c, expect_target=True).feed(hand_request_2022(c, variable), NOW)


def test_2022_tcp_wrong_header_type():
    c = cipher("2022-blake3-aes-128-gcm")
    stream = hand_request_2022(c, encode_address(TARGET) + b"\x00\x00x", kind=1)
    with pytest.raises(ProtocolError, match="header type 1"):
        TcpDecryptor(c, expect_target=True).feed(stream, NOW)


# ====================================================================== salt filter


def test_salt_filter_is_bounded_by_count_not_time():
    """A salt is remembered however much time passes (AEAD-2017 streams have no timestamp: a
    recorded stream must not replay after the 60-120 s a time-bounded filter would keep it)."""
    f = SaltFilter(max_entries=8)
    assert not f.seen(b"a", 0)
    assert f.seen(b"a", 59.9) and f.seen(b"a", 119.9)
    assert f.seen(b"a", 600) and f.seen(b"a", 10**9)  # 10 minutes, 30 years: still a replay
    assert f.seen(b"a", 10) and f.contains(b"a") and not f.contains(b"b")  # time is ignored


def test_salt_filter_forgets_only_after_enough_newer_salts():
    f = SaltFilter(max_entries=8)
    assert not f.seen(b"first")
    for i in range(3):  # 1 + 3 fill the current set (8 // 2)
        assert not f.seen(bytes([i]))
    for i in range(3, 7):  # 4 more: "first" is now in the older set, still remembered
        assert not f.seen(bytes([i]))
    assert f.seen(b"first") and f.rotations == 1
    assert not f.seen(b"x")  # the next rotation drops the set holding "first"
    assert not f.contains(b"first") and f.rotations == 2


def test_salt_filter_memory_is_bounded():
    f = SaltFilter(max_entries=100)
    for i in range(10_000):
        assert not f.seen(i.to_bytes(4, "big"), 1.0)
        assert len(f) <= 100
    assert f.rotations > 0
    assert f.seen((9_999).to_bytes(4, "big"), 1.0)  # the newest are still there
    with pytest.raises(UsageError):
        SaltFilter(max_entries=1)
    with pytest.raises(UsageError):
        SaltFilter(max_entries=True)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 200), min_size=1, max_size=300))
def test_salt_filter_model(salts):
    """Against a model of the guarantee: a salt recorded is reported as long as fewer than
    max_entries/2 other salts were recorded after it, and never once max_entries were."""
    n = 16
    f = SaltFilter(max_entries=n)
    recorded: dict[int, int] = {}  # salt -> count of recordings when it was recorded
    count = 0
    for salt in salts:
        result = f.seen(bytes((salt,)))
        if salt in recorded:
            newer = count - recorded[salt] - 1
            if newer < n // 2:
                assert result
            if newer >= n:
                assert not result
        else:
            assert not result
        if not result:
            recorded[salt] = count
            count += 1
        assert len(f) <= n


# ====================================================================== SIP002 URIs

PSK256 = "YctPZ6U7xPPcU+gp3u+0tx/tRizJN9K8y+uKlW2qjlI="


@pytest.mark.parametrize("uri, expected", [
    ("ss://YWVzLTEyOC1nY206dGVzdA@192.168.100.1:8888#Example1",
     ServerConfig("aes-128-gcm", "test", "192.168.100.1", 8888, None, "Example1")),
    ("ss://2022-blake3-aes-256-gcm:YctPZ6U7xPPcU%2Bgp3u%2B0tx%2FtRizJN9K8y%2BuKlW2qjlI%3D@192.168.100.1:8888#Example3",
     ServerConfig("2022-blake3-aes-256-gcm", PSK256, "192.168.100.1", 8888, None, "Example3")),
    ("ss://2022-blake3-aes-256-gcm:YctPZ6U7xPPcU%2Bgp3u%2B0tx%2FtRizJN9K8y%2BuKlW2qjlI%3D@192.168.100.1:8888/?plugin=v2ray-plugin%3Bserver#Example3",
     ServerConfig("2022-blake3-aes-256-gcm", PSK256, "192.168.100.1", 8888, "v2ray-plugin;server", "Example3")),
    # base64 with padding, padding as %3D, the standard alphabet, a trailing slash, no tag
    ("ss://YWVzLTEyOC1nY206dGVzdA==@host.example:1/", ServerConfig("aes-128-gcm", "test", "host.example", 1)),
    ("ss://YWVzLTEyOC1nY206dGVzdA%3D%3D@host.example:1", ServerConfig("aes-128-gcm", "test", "host.example", 1)),
    ("ss://" + base64.b64encode(b"aes-256-gcm:a>b?c").decode() + "@h:2",
     ServerConfig("aes-256-gcm", "a>b?c", "h", 2)),
    # plain percent-encoded for an AEAD-2017 method; a password with ':' and '@'
    ("ss://aes-256-gcm:p%40ss%3Aword@[2001:db8::1]:8388/?plugin=obfs-local%3Bobfs%3Dhttp&x=1#tag%20one",
     ServerConfig("aes-256-gcm", "p@ss:word", "2001:db8::1", 8388, "obfs-local;obfs=http", "tag one")),
    ("SS://chacha20-ietf-poly1305:mullvad@185.65.134.1:443",
     ServerConfig("chacha20-ietf-poly1305", "mullvad", "185.65.134.1", 443)),
    # legacy: the whole thing in base64
    ("ss://" + base64.b64encode(b"aes-256-gcm:mullvad@10.0.0.1:8388").decode() + "#old",
     ServerConfig("aes-256-gcm", "mullvad", "10.0.0.1", 8388, None, "old")),
])
def test_uri_parse(uri, expected):
    got = parse_uri(uri)
    assert got == expected
    assert parse_uri(format_uri(got)) == got
    assert got.cipher().method.name == expected.method


def test_uri_format():
    assert format_uri(ServerConfig("aes-128-gcm", "test", "192.168.100.1", 8888, None, "Example1")) == \
        "ss://YWVzLTEyOC1nY206dGVzdA@192.168.100.1:8888#Example1"
    assert ServerConfig("2022-blake3-aes-256-gcm", PSK256, "192.168.100.1", 8888, "v2ray-plugin;server",
                        "Example3").to_uri() == \
        ("ss://2022-blake3-aes-256-gcm:YctPZ6U7xPPcU%2Bgp3u%2B0tx%2FtRizJN9K8y%2BuKlW2qjlI%3D"
         "@192.168.100.1:8888/?plugin=v2ray-plugin%3Bserver#Example3")
    assert format_uri(ServerConfig("aes-256-gcm", "mullvad", "2001:db8::1", 443, tag="a b#c")) == \
        "ss://YWVzLTI1Ni1nY206bXVsbHZhZA@[2001:db8::1]:443#a%20b%23c"
    assert "mullvad" not in repr(ServerConfig("aes-256-gcm", "mullvad", "h", 1))


SECRET = "Zq9-very-secret-Pw"


@pytest.mark.parametrize("uri, why", [
    ("http://YWVzLTEyOC1nY206dGVzdA@h:1", "ss://"),
    ("ss://YWVzLTEyOC1nY206dGVzdA@h", "port"),
    ("ss://YWVzLTEyOC1nY206dGVzdA@h:", "port"),
    ("ss://YWVzLTEyOC1nY206dGVzdA@h:0", "out of range"),
    ("ss://YWVzLTEyOC1nY206dGVzdA@h:65536", "out of range"),
    ("ss://YWVzLTEyOC1nY206dGVzdA@h:8x", "not a number"),
    ("ss://YWVzLTEyOC1nY206dGVzdA@:1", "host is empty"),
    ("ss://YWVzLTEyOC1nY206dGVzdA@2001:db8::1:1", "brackets"),
    ("ss://YWVzLTEyOC1nY206dGVzdA@[2001:db8::1:1", "unclosed"),
    ("ss://YWVzLTEyOC1nY206dGVzdA@[not-v6]:1", "not an IPv6"),
    ("ss://YWVzLTEyOC1nY206dGVzdA@bad_host!:1", "not a valid host"),
    ("ss://YWVzLTEyOC1nY206dGVzdA@h:1/path", "path"),
    ("ss://h:1", "missing '@'"),
    ("ss://@h:1", "user info"),
    ("ss://cmM0LW1kNTpwYXNzd2Q@192.168.100.1:8888/?plugin=obfs-local%3Bobfs%3Dhttp#Example2", "unsupported method"),
    (f"ss://{SECRET}:aes-256-gcm@h:1", "unsupported method"),
    ("ss://aes-256-gcm:@h:1", "password is empty"),
    (f"ss://2022-blake3-aes-256-gcm:{SECRET}@h:1", "exactly 32 bytes"),
    (f"ss://2022-blake3-aes-128-gcm:{base64.b64encode(SECRET.encode()).decode()}@h:1", "exactly 16 bytes"),
    (f"ss://{base64.urlsafe_b64encode(SECRET.encode()).decode()}@h:1", "no ':'"),
    ("ss://!!!!@h:1", "neither"),
    ("ss://aes-256-gcm:%ff%fe@h:1", "UTF-8"),
    ("ss://YWVzLTEyOC1nY206dGVzdA@h :1", "whitespace"),
])
def test_uri_errors(uri, why):
    with pytest.raises(UriError, match=why) as info:
        parse_uri(uri)
    message = str(info.value)
    assert SECRET not in message and "dGVzdA" not in message and "test" not in message.replace("ss URI", "")


passwords = st.text(min_size=1, max_size=40).filter(lambda s: "\x00" not in s)
uri_hosts = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]{1,10}){0,3}", fullmatch=True),
)


@st.composite
def configs(draw):
    method = draw(st.sampled_from(sorted(METHODS)))
    if METHODS[method].is_2022:
        password = base64.b64encode(draw(st.binary(min_size=METHODS[method].key_len,
                                                   max_size=METHODS[method].key_len))).decode()
    else:
        password = draw(passwords)
    return ServerConfig(method, password, draw(uri_hosts), draw(st.integers(1, 65535)),
                        draw(st.none() | st.text(min_size=1, max_size=30)),
                        draw(st.none() | st.text(min_size=1, max_size=30)))


@FUZZ
@given(configs())
def test_uri_round_trip(config):
    try:
        uri = format_uri(config)
    except UnicodeEncodeError:
        assume(False)  # lone surrogates
    assert uri.isascii()
    assert parse_uri(uri) == ServerConfig(config.method, config.password,
                                          str(ipaddress.ip_address(config.host)) if ":" in config.host else config.host,
                                          config.port, config.plugin, config.tag)


@FUZZ
@given(st.one_of(st.text(max_size=120), st.binary(max_size=120), st.text(max_size=100).map(lambda s: "ss://" + s)))
def test_uri_parse_untrusted_text(text):
    try:
        parse_uri(text)
    except UriError:
        pass


@FUZZ
@given(st.data())
def test_uri_parse_mutated_never_echoes_the_password(data):
    config = ServerConfig(data.draw(st.sampled_from(M2017)), SECRET, "example.com", 8388, "p;o=1", "t")
    uri = data.draw(st.sampled_from([format_uri(config),
                                      f"ss://{config.method}:{SECRET}@example.com:8388/?plugin=x#t"]))
    chars = list(uri)
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(chars) - 1))
        chars[i] = data.draw(st.sampled_from(list("@:/?#[]%=+-_ aZ09\x00é")))
    mutated = "".join(chars)
    try:
        parse_uri(mutated)
    except UriError as exc:
        assert SECRET not in str(exc)
        userinfo = format_uri(config)[5:].split("@")[0]
        assert userinfo not in str(exc)


def test_all_errors_share_one_base():
    for exc in (ProtocolError, AuthenticationError, ReplayError, ConfigError, UsageError, UriError):
        assert issubclass(exc, ShadowsocksError)
    assert issubclass(UriError, ValueError) and issubclass(UsageError, ValueError)
