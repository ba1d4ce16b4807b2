"""transport/address.py (host:port) and tunnel/grammar.py (the value grammars of configuration
files and the UAPI): what each accepts, what each refuses, and that arbitrary text only ever
raises the documented error."""

from __future__ import annotations

import base64
import ipaddress

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from transport.address import AddressError, canonical_host, check_host, format_address, split_host_port
from tunnel import grammar
from tunnel.grammar import BadValue

FUZZ = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KEY = bytes(range(32))

# Text made mostly of the characters that matter to these grammars, so the fuzzer reaches the
# interesting branches instead of stopping at the first character.
address_text = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.sampled_from("[]:%.0123456789abcdefABCDEF-_x/ \u0661\u00b2"), max_size=40),
)


# ---------------------------------------------------------------------------- host:port


@pytest.mark.parametrize("text, expected", [
    ("192.0.2.1:51820", ("192.0.2.1", 51820)),
    ("[2001:db8::1]:443", ("2001:db8::1", 443)),
    ("[FE80::1%eth0]:1", ("FE80::1%eth0", 1)),  # as written
    ("vpn.example.net:51820", ("vpn.example.net", 51820)),
    ("under_score-host.example.:7", ("under_score-host.example.", 7)),
    ("192.0.2.1:00443", ("192.0.2.1", 443)),
])
def test_split_host_port_accepts(text, expected):
    assert split_host_port(text) == expected


@pytest.mark.parametrize("text, words", [
    ("192.0.2.1", "missing ':port'"),
    ("192.0.2.1:", "missing ':port'"),
    ("[::1]", "missing ':port'"),
    ("[::1:5", "unclosed"),
    ("2001:db8::1:51820", "must be in square brackets"),
    ("[192.0.2.1]:5", "only for an IPv6 address"),
    ("a]b:5", "misplaced square brackets"),
    (":5", "host is empty"),
    ("h:x", "not a decimal number"),
    ("h:\u0661", "not a decimal number"),  # an Arabic-Indic digit
    ("h:65536", "out of range"),
    ("h:0", "port 0"),
    ("192.0.2:5", "not an IPv4 address"),  # getaddrinfo would read it as 192.0.0.2
    ("0x7f.1:5", "not an IPv4 address"),  # and this as 127.0.0.1
    ("bad host:5", "not a valid host name"),
    ("[fe80::1%]:5", "not an IPv6 address"),
    ("[fe80::1%e/th0]:5", "not an IPv6 address"),
])
def test_split_host_port_refuses(text, words):
    with pytest.raises(AddressError, match=words):
        split_host_port(text)


def test_split_host_port_options():
    assert split_host_port("[::]:0", port_zero=True) == ("::", 0)
    with pytest.raises(AddressError, match="numeric"):
        split_host_port("example.com:1", numeric=True)
    with pytest.raises(AddressError, match="numeric"):
        split_host_port("192.0.2.1%eth0:1", numeric=True)
    assert split_host_port("[fe80::1%eth0]:1", numeric=True) == ("fe80::1%eth0", 1)
    # SIP002 hosts are taken as written, even ending in a numeric label.
    assert split_host_port("host.1:8388", numeric_last_label_is_ipv4=False) == ("host.1", 8388)
    with pytest.raises(AddressError):
        split_host_port("host.1:8388")


def test_errors_quote_nothing():
    secret = "Zq9verysecret"
    for text in (f"{secret}", f"{secret}:x", f"[{secret}]:1", f"{secret} x:1", f"{secret}:99999"):
        with pytest.raises(AddressError) as info:
            split_host_port(text)
        assert secret not in str(info.value)


def test_format_address_and_canonical_host():
    assert format_address(("192.0.2.1", 5)) == "192.0.2.1:5"
    assert format_address(("2001:db8::1", 5, 0, 0)) == "[2001:db8::1]:5"  # a socket's AF_INET6 tuple
    assert canonical_host("2001:DB8:0::1") == "2001:db8::1"
    assert canonical_host("Example.COM") == "Example.COM"
    assert check_host("example.com") == "example.com"


@FUZZ
@given(address_text, st.booleans(), st.booleans(), st.booleans())
@example("[]:1", False, False, True)
@example("1.2.3.4:" + "9" * 5000, False, False, True)  # past int()'s digit limit
def test_split_host_port_raises_only_address_error(text, numeric, port_zero, strict):
    try:
        host, port = split_host_port(text, numeric=numeric, port_zero=port_zero,
                                     numeric_last_label_is_ipv4=strict)
    except AddressError:
        return
    assert (0 if port_zero else 1) <= port <= 65535
    # What is accepted formats back to text that reads the same.
    assert split_host_port(format_address((host, port)), numeric=numeric, port_zero=port_zero,
                           numeric_last_label_is_ipv4=strict) == (host, port)
    if numeric:
        ipaddress.ip_address(host)


@FUZZ
@given(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)), st.integers(1, 65535))
def test_every_address_round_trips(addr, port):
    text = format_address((str(addr), port))
    assert split_host_port(text, numeric=True) == (str(addr), port)


# ---------------------------------------------------------------------------- keys


def test_keys():
    b64 = base64.b64encode(KEY).decode()
    assert grammar.base64_key(b64) == KEY
    assert grammar.hex_key(KEY.hex()) == KEY
    assert grammar.hex_key(KEY.hex().upper()) == KEY
    for bad in (b64[:-1], b64[:-2] + "B=", b64 + " ", KEY.hex()):
        with pytest.raises(BadValue):
            grammar.base64_key(bad)
    for bad in (KEY.hex()[:-1], "g" * 64, KEY.hex()[:30] + "  " + KEY.hex()[32:], b64):
        with pytest.raises(BadValue) as info:
            grammar.hex_key(bad)
        assert KEY.hex()[:16] not in str(info.value)


@FUZZ
@given(st.one_of(st.text(max_size=70),
                 st.text(alphabet=st.sampled_from("0123456789abcdefABCDEF+/=g \u0661"), min_size=40, max_size=70)))
def test_key_grammars_raise_only_bad_value(text):
    for parse, encode in ((grammar.base64_key, lambda k: base64.b64encode(k).decode()),
                          (grammar.hex_key, bytes.hex)):
        try:
            key = parse(text)
        except BadValue as exc:
            assert text not in str(exc) or len(text) < 8
            continue
        assert len(key) == 32
        assert encode(key).lower() == text.lower()


# ---------------------------------------------------------------------------- config vs UAPI


def test_endpoint_grammars_differ_where_documented():
    # Names: a configuration file takes them (wg resolves); the UAPI does not.
    assert grammar.config_endpoint("vpn.example.net:1") == ("vpn.example.net", 1)
    with pytest.raises(BadValue):
        grammar.uapi_endpoint("vpn.example.net:1")
    # Port 0: the UAPI takes it, as wireguard-go does; a file's Endpoint is a destination.
    assert grammar.uapi_endpoint("[::]:0") == ("::", 0)
    with pytest.raises(BadValue, match="port 0"):
        grammar.config_endpoint("192.0.2.1:0")
    # Text: kept as written in a file; canonical (and unmapped) from the UAPI.
    assert grammar.config_endpoint("[::FFFF:192.0.2.1]:5") == ("::FFFF:192.0.2.1", 5)
    assert grammar.uapi_endpoint("[::FFFF:192.0.2.1]:5") == ("192.0.2.1", 5)
    assert grammar.uapi_endpoint("[2001:DB8:0::1]:5") == ("2001:db8::1", 5)


def test_prefix_grammars_differ_where_documented():
    assert grammar.config_prefix("10.0.0.1") == (ipaddress.ip_network("10.0.0.1/32"), ipaddress.ip_address("10.0.0.1"))
    assert grammar.config_prefix("10.0.0.1/08")[0] == ipaddress.ip_network("10.0.0.0/8")
    assert grammar.uapi_prefix("10.0.0.1/8") == ipaddress.ip_network("10.0.0.0/8")
    for bad in ("10.0.0.1", "10.0.0.1/08", "fe80::%eth0/64", "10.0.0.0/33"):
        with pytest.raises(BadValue):
            grammar.uapi_prefix(bad)
    assert grammar.format_prefix(ipaddress.ip_network("::ffff:192.0.2.0/120")) == "::ffff:192.0.2.0/120"


def test_show_redacts_key_material():
    b64 = base64.b64encode(KEY).decode()
    assert b64 not in grammar.show(f"x {b64}") and "<redacted>" in grammar.show(f"x {b64}")
    assert KEY.hex() not in grammar.show(KEY.hex())
    assert grammar.config_name(b64[:-1]) == f"<{len(b64) - 1} characters>"
    assert grammar.uapi_name("persistent_keepalive_interval") == "'persistent_keepalive_interval'"
    assert grammar.uapi_name(KEY.hex()) == "<64 characters>"


@FUZZ
@given(address_text)
def test_value_grammars_raise_only_bad_value(text):
    for parse in (grammar.config_endpoint, grammar.uapi_endpoint, grammar.config_prefix, grammar.uapi_prefix,
                  lambda t: grammar.uint(t, 65535), grammar.config_ip, lambda t: grammar.config_ip(t, zone=True)):
        try:
            parse(text)
        except BadValue:
            pass
