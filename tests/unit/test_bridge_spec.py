"""bridge/spec.py: what a Bridge value means (ss:// or udp2tcp://), its overhead, and that no
message or redacted form ever shows an ss:// password."""

from __future__ import annotations

import base64
import os
import time
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, assume, example, given, settings, strategies as st

from bridge.shadowsocks import METHODS, Cipher, Udp2022Client, Udp2022Server, parse_uri
from bridge.spec import BridgeError, BridgeSpec, parse_bridge
from transport.base import Endpoint

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
M2017 = [m for m in METHODS if not METHODS[m].is_2022]
M2022 = [m for m in METHODS if METHODS[m].is_2022]
ALL_METHODS = M2017 + M2022
PASSWORD = "Tr0ub4dor&3-not-in-any-message"
V4_TARGET = ("192.0.2.44", 51820)
V6_TARGET = ("2001:db8::44", 51820)


def psk(method: str) -> str:
    """A 2022 PSK: standard base64 of key_len random bytes (as `openssl rand -base64 N`)."""
    return base64.b64encode(os.urandom(METHODS[method].key_len)).decode()


def secret_for(method: str) -> str:
    return psk(method) if METHODS[method].is_2022 else PASSWORD


def b64_form(method: str, password: str, hostport: str) -> str:
    """SIP002 with base64url user info (AEAD-2017 methods are formatted that way)."""
    userinfo = base64.urlsafe_b64encode(f"{method}:{password}".encode()).decode().rstrip("=")
    return f"ss://{userinfo}@{hostport}"


def plain_form(method: str, password: str, hostport: str) -> str:
    """SIP002 with percent-encoded method:password (the only form for 2022 methods)."""
    return f"ss://{quote(method, safe='')}:{quote(password, safe='')}@{hostport}"


def ss_uri(method: str, password: str, hostport: str) -> str:
    if METHODS[method].is_2022:
        return plain_form(method, password, hostport)
    return b64_form(method, password, hostport)


# ---------------------------------------------------------------- valid values


# SIP002: 2022 methods must not use base64 user info; AEAD-2017 ones may use either form.
FORMS = [pytest.param(m, f, id=f"{m}-{name}") for m in ALL_METHODS
         for f, name in ((b64_form, "base64url"), (plain_form, "percent"))
         if not (METHODS[m].is_2022 and f is b64_form)]


@pytest.mark.parametrize("method, form", FORMS)
@pytest.mark.parametrize("hostport, server", [
    ("192.0.2.1:8388", ("192.0.2.1", 8388)),
    ("[2001:db8::1]:443", ("2001:db8::1", 443)),
    ("[2001:DB8:0:0::1]:1", ("2001:db8::1", 1)),  # canonical text
    ("203.0.113.9:65535", ("203.0.113.9", 65535)),
])
def test_ss_valid_uris(method, form, hostport, server):
    secret = secret_for(method)
    spec = parse_bridge(form(method, secret, hostport), numeric=True)
    assert spec.kind == "ss"
    assert spec.method == method
    assert spec.server == server
    assert spec.numeric
    config = parse_uri(spec.uri)
    assert (config.method, config.password, config.host, config.port) == (method, secret, *server)
    assert parse_bridge(spec.uri) == spec  # the canonical text parses back to the same spec
    assert secret not in repr(spec)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_ss_2022_and_2017_keys_reach_the_cipher(method):
    secret = secret_for(method)
    spec = parse_bridge(ss_uri(method, secret, "192.0.2.1:8388"))
    assert parse_uri(spec.uri).cipher().key == Cipher(method, secret).key
    if METHODS[method].is_2022:
        assert parse_uri(spec.uri).cipher().key == base64.b64decode(secret)


def test_ss_accepted_variants():
    password = PASSWORD + "+"  # 38 bytes of user info: base64 needs padding
    uri = b64_form("aes-256-gcm", password, "192.0.2.1:8388")
    userinfo, _, hostport = uri[5:].partition("@")
    padded = f"ss://{userinfo}{'=' * (-len(userinfo) % 4)}@{hostport}"
    assert padded != uri
    for variant in (uri + "/", uri + "#my%20tag", uri + "/?foo=bar", "SS://" + uri[5:], padded):
        spec = parse_bridge(variant)
        assert (spec.kind, spec.method, spec.server) == ("ss", "aes-256-gcm", ("192.0.2.1", 8388))
        assert parse_uri(spec.uri).password == password
    legacy = "ss://" + base64.b64encode(f"aes-128-gcm:{PASSWORD}@192.0.2.1:8388".encode()).decode()
    spec = parse_bridge(legacy)
    assert (spec.method, spec.server, parse_uri(spec.uri).password) == (
        "aes-128-gcm", ("192.0.2.1", 8388), PASSWORD)


def test_ss_host_names_only_without_numeric():
    uri = b64_form("chacha20-ietf-poly1305", PASSWORD, "bridge.example.net:8388")
    spec = parse_bridge(uri)
    assert spec.server == ("bridge.example.net", 8388)
    assert not spec.numeric
    with pytest.raises(BridgeError, match="IP address") as exc:
        parse_bridge(uri, numeric=True)
    assert PASSWORD not in str(exc.value)
    assert "bridge.example.net" not in str(exc.value)  # quotes nothing from the value


@pytest.mark.parametrize("value, server", [
    ("udp2tcp://192.0.2.7:443", ("192.0.2.7", 443)),
    ("udp2tcp://192.0.2.7:443/", ("192.0.2.7", 443)),
    ("UDP2TCP://192.0.2.7:1", ("192.0.2.7", 1)),
    ("udp2tcp://[2001:db8::7]:5001", ("2001:db8::7", 5001)),
    ("udp2tcp://relay.example.net:443", ("relay.example.net", 443)),
])
def test_udp2tcp_valid(value, server):
    spec = parse_bridge(value)
    assert (spec.kind, spec.server, spec.method) == ("udp2tcp", server, "")
    host = f"[{server[0]}]" if ":" in server[0] else server[0]
    assert spec.uri == f"udp2tcp://{host}:{server[1]}"
    assert parse_bridge(spec.uri) == spec
    assert spec.redacted() == spec.uri
    assert spec.overhead(V4_TARGET) == spec.overhead(V6_TARGET) == 0
    numeric = server[0] != "relay.example.net"
    assert spec.numeric is numeric
    if numeric:
        assert parse_bridge(value, numeric=True) == spec
    else:
        with pytest.raises(BridgeError, match="IP address"):
            parse_bridge(value, numeric=True)


# ---------------------------------------------------------------- refused values


BAD_TEMPLATES = {
    "no scheme": lambda pw: f"aes-256-gcm:{pw}@192.0.2.1:8388",
    "unknown scheme": lambda pw: f"http://aes-256-gcm:{pw}@192.0.2.1:8388",
    "unknown method": lambda pw: f"ss://rc4-md5:{quote(pw, safe='')}@192.0.2.1:8388",
    "password where the method goes": lambda pw: f"ss://{quote(pw, safe='')}@192.0.2.1:8388",
    "password as method and password": lambda pw: f"ss://{quote(pw, safe='')}:{quote(pw, safe='')}@192.0.2.1:8388",
    "bad port": lambda pw: b64_form("aes-256-gcm", pw, "192.0.2.1:88x8"),
    "bad port, plain form": lambda pw: plain_form("aes-256-gcm", pw, "192.0.2.1:88x8"),
    "bad host, plain form": lambda pw: plain_form("chacha20-ietf-poly1305", pw, "[::g]:1"),
    "plugin, plain form": lambda pw: plain_form("aes-128-gcm", pw, "192.0.2.1:1?plugin=obfs-local"),
    "port 0": lambda pw: b64_form("aes-256-gcm", pw, "192.0.2.1:0"),
    "port 65536": lambda pw: b64_form("aes-256-gcm", pw, "192.0.2.1:65536"),
    "no port": lambda pw: b64_form("aes-256-gcm", pw, "192.0.2.1"),
    "empty host": lambda pw: b64_form("aes-256-gcm", pw, ":8388"),
    "bad host": lambda pw: b64_form("aes-256-gcm", pw, "bad_host!:8388"),
    "v6 without brackets": lambda pw: b64_form("aes-256-gcm", pw, "2001:db8::1:8388"),
    "unclosed bracket": lambda pw: b64_form("aes-256-gcm", pw, "[2001:db8::1:8388"),
    "plugin": lambda pw: b64_form("aes-256-gcm", pw, "192.0.2.1:8388/?plugin=v2ray-plugin"),
    "path": lambda pw: b64_form("aes-256-gcm", pw, "192.0.2.1:8388/extra"),
    "no @": lambda pw: "ss://" + base64.urlsafe_b64encode(f"aes-256-gcm:{pw}".encode()).decode(),
    "2022 password not base64": lambda pw: plain_form("2022-blake3-aes-256-gcm", pw, "192.0.2.1:8388"),
    "2022 key wrong length": lambda pw: plain_form(
        "2022-blake3-aes-128-gcm", base64.b64encode(pw.encode()[:15].ljust(15, b"x")).decode(),
        "192.0.2.1:8388"),
    "hostname with numeric": lambda pw: b64_form("aes-256-gcm", pw, "ss.example.com:8388"),
    "udp2tcp with user info": lambda pw: f"udp2tcp://{pw}@192.0.2.1:443",
}


def _bridge_error(value: str) -> str:
    with pytest.raises(BridgeError) as exc:
        parse_bridge(value, numeric=True)
    assert type(exc.value) is BridgeError
    # nothing chained that could quote the value (a UriError, a UnicodeDecodeError...)
    assert exc.value.__cause__ is None
    assert exc.value.__context__ is None or exc.value.__suppress_context__
    return str(exc.value)


@pytest.mark.parametrize("make", BAD_TEMPLATES.values(), ids=BAD_TEMPLATES.keys())
def test_refused_values_never_quote_the_password(make):
    value = make(PASSWORD)
    message = _bridge_error(value)
    assert message
    assert PASSWORD not in message
    assert "Tr0ub4dor" not in message
    b64 = base64.urlsafe_b64encode(f"aes-256-gcm:{PASSWORD}".encode()).decode().rstrip("=")
    assert b64[:12] not in message


# Characters a password may hold in a URI, including the ones that cut it (':', '@', '/', '#').
secret_text = st.text(
    alphabet=st.sampled_from("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                             "-._~!$&'()*+,;=%:@/?#"),
    min_size=12, max_size=40,
)


def secret_forms(password: str) -> list[str]:
    """The password as it may be spelled inside a value: plain, percent-encoded, and (the start
    of) base64url user info for each method."""
    forms = [password, quote(password, safe="")]
    for method in ALL_METHODS:
        encoded = base64.urlsafe_b64encode(f"{method}:{password}".encode()).decode()
        forms.append(encoded[len(method) + 4:][:16])  # past the method's own bytes
    return forms


@FUZZ
@given(st.sampled_from(list(BAD_TEMPLATES)), secret_text)
def test_fuzz_refused_values_never_quote_random_passwords(name, password):
    value = BAD_TEMPLATES[name](password)
    try:
        parse_bridge(value, numeric=True)
    except BridgeError as exc:
        message = str(exc)
    else:  # a cutting character can turn a bad template into a valid value; nothing to check
        return
    # A password that happens to be a word of the message says nothing about leaking.
    clean = _bridge_error(BAD_TEMPLATES[name]("Q" * 12))
    forms = [form for form in secret_forms(password) if len(form) >= 8]
    assume(not any(form in clean for form in forms))
    for form in forms:
        assert form not in message, (name, message)


@FUZZ
@given(st.one_of(
    st.text(max_size=80),
    st.builds(lambda p, t: p + t, st.sampled_from(["ss://", "udp2tcp://", "SS://", "ss://aes-256-gcm:"]),
              st.text(max_size=80)),
    st.builds(lambda m, pw, h: f"ss://{m}:{pw}@{h}", st.sampled_from(ALL_METHODS + ["x"]),
              st.text(max_size=30), st.text(max_size=30)),
))
@example("ss://aes-256-gcm:pw@[]:1")
@example("udp2tcp://[]:1")
@example("udp2tcp://1.2.3.4:\u00b2")
def test_fuzz_arbitrary_text_raises_only_bridge_error(value):
    for numeric in (False, True):
        try:
            spec = parse_bridge(value, numeric=numeric)
        except BridgeError:
            continue
        assert isinstance(spec, BridgeSpec) and spec.kind in ("ss", "udp2tcp")
        assert not numeric or spec.numeric


@FUZZ
@given(st.binary(max_size=24))
@example(b"\xff\xfe")
def test_undecodable_bytes_in_a_password_raise_bridge_error(junk):
    # tunnel/config.py reads files with errors="surrogateescape" and sys.argv does the same, so a
    # value can hold lone surrogates; they must be refused like any other bad value.
    password = "pw" + junk.decode("utf-8", "surrogateescape")
    for value in (f"ss://aes-256-gcm:{password}@192.0.2.1:8388",
                  f"ss://2022-blake3-aes-128-gcm:{password}@192.0.2.1:8388"):
        try:
            parse_bridge(value)
        except BridgeError as exc:
            assert password not in str(exc)


def test_udp2tcp_refused():
    for value in ("udp2tcp://192.0.2.1", "udp2tcp://192.0.2.1:0", "udp2tcp://192.0.2.1:65536",
                  "udp2tcp://:443", "udp2tcp://192.0.2.1:4x3", "udp2tcp://192.0.2.1:443/path",
                  "udp2tcp:/192.0.2.1:443", "udp2tcp//192.0.2.1:443", "", "://", "ss:/x"):
        with pytest.raises(BridgeError):
            parse_bridge(value)


def test_udp2tcp_canonical_text_always_parses_back():
    """Whatever parse_bridge accepts, its canonical `uri` must be accepted again as the same
    bridge (wgpy set and the config writer hand that text to the daemon)."""
    for value in ("udp2tcp://192.0.2.1:443", "udp2tcp://[2001:db8::1]:443", "udp2tcp://[]:443",
                  "udp2tcp://[::1:443", "udp2tcp://foo bar:443"):
        try:
            spec = parse_bridge(value)
        except BridgeError:
            continue
        assert parse_bridge(spec.uri) == spec, value


# ---------------------------------------------------------------- overhead = real growth


PAYLOADS = [b"\x01", bytes(148), os.urandom(1420)]


def real_growth(method: str, secret: str, target, payload: bytes) -> tuple[int, int]:
    """(request growth, reply growth) of `payload` sealed for `target` (replies come back with
    `target` as their source), as the codec really seals them."""
    cipher = Cipher(method, secret)
    if METHODS[method].is_2022:
        now = time.time()
        request = Udp2022Client(cipher).seal(target, payload, now)  # default padding: none
        server = Udp2022Server(cipher)
        session = server.open(request, now).session_id
        reply = server.seal(session, target, payload, now)
    else:
        request = cipher.seal_udp(target, payload)
        reply = cipher.seal_udp(target, payload)
    return len(request) - len(payload), len(reply) - len(payload)


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("target", [V4_TARGET, V6_TARGET, ("::ffff:192.0.2.1", 1)], ids=["v4", "v6", "mapped"])
def test_overhead_equals_real_growth(method, target):
    """overhead(target) is what the tunnel MTU must leave room for: the larger of the growth of a
    request to `target` and of a reply from it (2022 replies also carry the client session id)."""
    secret = secret_for(method)
    spec = parse_bridge(ss_uri(method, secret, "192.0.2.1:8388"))
    for payload in PAYLOADS:
        up, down = real_growth(method, secret, target, payload)
        assert spec.overhead(target) == max(up, down), (target, len(payload), up, down)
    # And the sizes as the wire formats define them.
    m = METHODS[method]
    address = 1 + (4 if ":" not in target[0] else 16) + 2  # a mapped literal stays IPv6
    if m.is_2022:
        expected = 16 + 16 + (1 + 8 + 8 + 2) + address  # separate header, tag, server header
    else:
        expected = m.salt_len + address + 16
    assert spec.overhead(target) == expected


def test_overhead_accepts_an_endpoint_and_list():
    spec = parse_bridge(b64_form("aes-256-gcm", PASSWORD, "192.0.2.1:8388"))
    assert spec.overhead(Endpoint("192.0.2.5", 1, 3)) == 32 + 7 + 16
    assert spec.overhead(["2001:db8::1", 2]) == 32 + 19 + 16


def test_overhead_of_an_unencodable_target_is_a_bridge_error():
    spec = parse_bridge(b64_form("aes-256-gcm", PASSWORD, "192.0.2.1:8388"))
    with pytest.raises(BridgeError):
        spec.overhead(("192.0.2.1", 70000))
    with pytest.raises(BridgeError):
        spec.overhead(("x" * 300, 1))


# ---------------------------------------------------------------- redacted, with_host


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("hostport, shown", [
    ("192.0.2.1:8388", "192.0.2.1:8388"),
    ("[2001:db8::1]:443", "[2001:db8::1]:443"),
    ("ss.example.com:1", "ss.example.com:1"),
])
def test_redacted_has_no_password(method, hostport, shown):
    secret = secret_for(method)
    spec = parse_bridge(ss_uri(method, secret, hostport))
    text = spec.redacted()
    assert text == f"ss://{method}@{shown}"
    assert secret not in text and quote(secret, safe="") not in text
    assert spec.uri.split("@")[0][5:] not in text  # nor the encoded user info
    assert secret not in repr(spec) and secret not in str(spec)


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("new_host, server_host, in_uri", [
    ("198.51.100.7", "198.51.100.7", "@198.51.100.7:8388"),
    ("2001:db8::7", "2001:db8::7", "@[2001:db8::7]:8388"),
    ("other.example.org", "other.example.org", "@other.example.org:8388"),
])
def test_with_host_keeps_method_password_port(method, new_host, server_host, in_uri):
    secret = secret_for(method)
    spec = parse_bridge(ss_uri(method, secret, "name.example.net:8388"))
    moved = spec.with_host(new_host)
    assert moved.kind == "ss"
    assert moved.method == method
    assert moved.server == (server_host, 8388)
    assert in_uri in moved.uri
    config = parse_uri(moved.uri)
    assert (config.method, config.password, config.host, config.port) == (method, secret, server_host, 8388)
    assert moved.numeric is (new_host != "other.example.org")
    assert spec.server == ("name.example.net", 8388)  # the original is unchanged


def test_with_host_udp2tcp():
    spec = parse_bridge("udp2tcp://relay.example.net:443")
    assert spec.with_host("192.0.2.9") == parse_bridge("udp2tcp://192.0.2.9:443")
    moved = spec.with_host("2001:db8::9")
    assert moved.server == ("2001:db8::9", 443) and moved.uri == "udp2tcp://[2001:db8::9]:443"
    assert moved.numeric and not spec.numeric


# ---------------------------------------------------------------- parsed once


@pytest.mark.parametrize("method", ALL_METHODS)
def test_spec_holds_the_parsed_server_and_hides_the_password(method):
    secret = secret_for(method)
    spec = parse_bridge(ss_uri(method, secret, "192.0.2.1:8388"))
    config = spec.shadowsocks
    assert (config.method, config.password, config.host, config.port) == (method, secret, "192.0.2.1", 8388)
    for text in (repr(spec), str(spec), repr(spec.with_host("192.0.2.2"))):
        assert secret not in text and quote(secret, safe="") not in text
        assert spec.uri.split("@")[0][5:] not in text  # nor the encoded user info
    assert spec.cipher().key == Cipher(method, secret).key
    assert spec.cipher() is not spec.cipher()  # each carrier gets its own


def test_udp2tcp_has_no_cipher():
    spec = parse_bridge("udp2tcp://192.0.2.7:443")
    assert spec.shadowsocks is None
    with pytest.raises(BridgeError, match="no cipher"):
        spec.cipher()


def test_with_host_refuses_a_bad_host():
    spec = parse_bridge(b64_form("aes-256-gcm", PASSWORD, "name.example.net:8388"))
    for bad in ("", "bad host", "1.2.3", "[::1]"):
        with pytest.raises(BridgeError) as exc:
            spec.with_host(bad)
        assert PASSWORD not in str(exc.value)
