"""Multihop, the configuration side: `Via` in config files and the nesting rule (tunnel/config.py),
`wgpy_via` / `wgpy_entry` in the UAPI (tunnel/uapi.py), `wgpy set ... via`, the MTU and routes of
`wgpy up` (tunnel/quick.py), and `wgpy show` (tunnel/show.py). No root, no network."""

from __future__ import annotations

import errno
import ipaddress
import json

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from bridge.multihop import check_chains
from tunnel import cli, quick, show, uapi
from tunnel.config import ConfigError, nesting, parse_config, render_config, uapi_set_lines
from tunnel.keys import encode_base64_key
from tunnel.noise import Device
from tunnel.noise.crypto import clamp, public_key
from tunnel.uapi import SetVia, UapiError, apply_set, format_get, parse_get_reply, parse_set

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PATH = "wg0.conf"
PRIV = clamp(bytes(range(1, 33)))
ENTRY, EXIT, OTHER, FOURTH = (public_key(clamp(bytes([n]) * 32)) for n in (1, 2, 3, 4))
B = {k: encode_base64_key(k) for k in (ENTRY, EXIT, OTHER, FOURTH)}
IFACE = f"[Interface]\nPrivateKey = {encode_base64_key(PRIV)}\nAddress = 10.64.0.2/32, fc00::2/128\n"  # lines 1-3


def peer(key: bytes, *lines: str) -> str:
    return "\n[Peer]\nPublicKey = " + B[key] + "\n" + "".join(line + "\n" for line in lines)


def errors_of(text: str, endpoints=None) -> list[tuple[str, int, str]]:
    with pytest.raises(ConfigError) as info:
        nesting(parse_config(text, PATH), endpoints)
    assert all(B[k] not in str(info.value) for k in B)  # keys are never echoed
    return info.value.errors


# Mullvad / kernel layout: lines 5-8 the entry, 10-12 the exit.
MULLVAD = (IFACE
           + peer(ENTRY, "Endpoint = 192.0.2.1:51820", "AllowedIPs = 198.51.100.9/32")
           + peer(EXIT, "Endpoint = 198.51.100.9:51820", "AllowedIPs = 0.0.0.0/0, ::/0"))


# ---------------------------------------------------------------------------- config: Via


def test_via_parses_renders_and_round_trips():
    text = (IFACE + peer(ENTRY, "Endpoint = 192.0.2.1:51820", "AllowedIPs = 10.64.0.1/32",
                         "Bridge = udp2tcp://192.0.2.1:443")
            + peer(EXIT, "Endpoint = 203.0.113.5:51820", "AllowedIPs = 0.0.0.0/0", f"via = {B[ENTRY]}"))
    cfg = parse_config(text, PATH)
    assert cfg.peers[1].via == ENTRY and cfg.peers[0].via is None
    assert cfg.peers[1].lines["Via"] == 15
    assert nesting(cfg) == {EXIT: ENTRY}
    rendered = render_config(cfg)
    assert f"Via = {B[ENTRY]}" in rendered
    assert parse_config(rendered, PATH) == cfg


def test_via_goes_to_the_uapi_after_the_endpoint_and_the_uapi_takes_it():
    cfg = parse_config(IFACE + peer(ENTRY, "Endpoint = 192.0.2.1:1")
                       + peer(EXIT, "Endpoint = 203.0.113.5:2", f"Via = {B[ENTRY]}"), PATH)
    lines = uapi_set_lines(cfg)
    at = lines.index(f"public_key={EXIT.hex()}")
    assert lines[at + 1:at + 3] == ["endpoint=203.0.113.5:2", f"wgpy_via={ENTRY.hex()}"]
    assert not any(line.startswith("wgpy_via") for line in lines[:at])
    tx = parse_set(lines)
    assert [op for op in tx.peers[1].ops if isinstance(op, SetVia)] == [SetVia(ENTRY)]


def test_detected_nesting_is_not_sent_as_wgpy_via():
    assert not any("wgpy_via" in line for line in uapi_set_lines(parse_config(MULLVAD, PATH)))


@pytest.mark.parametrize("text, line, message", [
    (IFACE + peer(ENTRY) + peer(EXIT, f"Via = {B[OTHER]}"), 10, "Via names no peer of this interface"),
    (IFACE + peer(ENTRY) + peer(EXIT, f"Via = {B[EXIT]}"), 10, "Via names the peer itself"),
    (IFACE + peer(ENTRY, f"Via = {B[EXIT]}") + peer(EXIT, f"Via = {B[ENTRY]}"), 7, "Via forms a cycle"),
    (IFACE + peer(ENTRY) + peer(EXIT, f"Via = {B[ENTRY]}") + peer(OTHER, f"Via = {B[EXIT]}"), 14,
     "Via nests 2 levels deep; at most 1"),
    (IFACE + peer(ENTRY) + peer(EXIT, "Via = nonsense"), 10, "Via: not a base64 key"),
    (IFACE + peer(ENTRY) + peer(EXIT, f"Via = {B[ENTRY]}", f"Via = {B[ENTRY]}"), 11, "Via is given twice"),
    (IFACE + f"Via = {B[ENTRY]}\n" + peer(ENTRY), 4, "Via belongs in [Peer], not [Interface]"),
])
def test_via_errors_name_file_and_line(text, line, message):
    errs = errors_of(text)
    assert len(errs) == 1, errs
    assert errs[0][:2] == (PATH, line)
    assert message in errs[0][2]
    assert str(ConfigError(errs)).startswith(f"{PATH}:{line}: ")


def test_every_via_error_is_reported():
    text = IFACE + peer(ENTRY, f"Via = {B[ENTRY]}") + peer(EXIT, f"Via = {B[OTHER]}")
    assert [(line, "itself" in m, "no peer" in m) for _, line, m in errors_of(text)] == [
        (7, True, False), (11, False, True)]


def test_bridge_on_a_via_peer_is_an_error_but_allowed_on_the_entry():
    text = (IFACE + peer(ENTRY, "Endpoint = 192.0.2.1:1", "Bridge = udp2tcp://192.0.2.1:443")
            + peer(EXIT, "Endpoint = 203.0.113.5:2", f"Via = {B[ENTRY]}", "Bridge = udp2tcp://192.0.2.7:443"))
    (path, line, message), = errors_of(text)
    assert line == 14 and "Bridge" in message and "first hop" in message and "line 5" in message
    nesting(parse_config(text.replace("Bridge = udp2tcp://192.0.2.7:443\n", ""), PATH))


# ---------------------------------------------------------------------------- config: detection


def test_mullvad_layout_is_detected():
    assert nesting(parse_config(MULLVAD, PATH)) == {EXIT: ENTRY}


def test_ipv6_layout_and_longest_prefix():
    text = (IFACE + peer(ENTRY, "Endpoint = [2001:db8::1]:1", "AllowedIPs = 2001:db8:5::/48")
            + peer(OTHER, "Endpoint = [2001:db8::3]:1", "AllowedIPs = 2001:db8:5:9::/64")
            + peer(EXIT, "Endpoint = [2001:db8:5:9::5]:51820", "AllowedIPs = ::/0"))
    assert nesting(parse_config(text, PATH)) == {EXIT: OTHER}


def test_full_tunnel_alone_nests_nothing():
    text = (IFACE + peer(ENTRY, "Endpoint = 192.0.2.1:1", "AllowedIPs = 0.0.0.0/0, ::/0")
            + peer(EXIT, "Endpoint = 198.51.100.9:2", "AllowedIPs = 10.0.0.0/8"))
    assert nesting(parse_config(text, PATH)) == {}


def test_names_are_detected_only_once_resolved():
    cfg = parse_config(MULLVAD.replace("198.51.100.9:51820", "exit.example.net:51820"), PATH)
    assert nesting(cfg) == {}
    assert nesting(cfg, {0: ("192.0.2.1", 51820), 1: ("198.51.100.9", 51820)}) == {EXIT: ENTRY}


def test_explicit_via_wins_over_detection():
    text = (IFACE + peer(ENTRY, "Endpoint = 192.0.2.1:1", "AllowedIPs = 198.51.100.9/32")
            + peer(OTHER, "Endpoint = 192.0.2.3:1")
            + peer(EXIT, "Endpoint = 198.51.100.9:51820", "AllowedIPs = 0.0.0.0/0", f"Via = {B[OTHER]}"))
    assert nesting(parse_config(text, PATH)) == {EXIT: OTHER}


def test_an_allowed_ip_on_two_peers_counts_for_the_last():
    text = (IFACE + peer(ENTRY, "Endpoint = 192.0.2.1:1", "AllowedIPs = 198.51.100.9/32")
            + peer(OTHER, "Endpoint = 192.0.2.3:1", "AllowedIPs = 198.51.100.9/32")
            + peer(EXIT, "Endpoint = 198.51.100.9:51820", "AllowedIPs = 0.0.0.0/0"))
    assert nesting(parse_config(text, PATH)) == {EXIT: OTHER}


def test_detected_cycle_is_an_error_at_the_endpoint_line():
    text = (IFACE + peer(ENTRY, "Endpoint = 198.51.100.9:1", "AllowedIPs = 192.0.2.1/32")
            + peer(EXIT, "Endpoint = 192.0.2.1:2", "AllowedIPs = 198.51.100.9/32"))
    (path, line, message), = errors_of(text)
    assert (path, line) == (PATH, 7) and "cycle" in message and "AllowedIPs of the [Peer] on line 10" in message


def test_detected_chain_too_deep_is_an_error():
    text = (IFACE + peer(ENTRY, "Endpoint = 192.0.2.1:1", "AllowedIPs = 198.51.100.9/32")
            + peer(EXIT, "Endpoint = 198.51.100.9:2", "AllowedIPs = 203.0.113.7/32")
            + peer(OTHER, "Endpoint = 203.0.113.7:3", "AllowedIPs = 0.0.0.0/0"))
    (path, line, message), = errors_of(text)
    assert line == 17 and "2 levels deep" in message


def test_detected_exit_with_bridge_is_an_error():
    text = MULLVAD + "Bridge = udp2tcp://192.0.2.8:443\n"
    (path, line, message), = errors_of(text)
    assert line == 14 and "first hop" in message


def test_detected_entry_with_bridge_is_fine():
    text = MULLVAD.replace("AllowedIPs = 198.51.100.9/32", "AllowedIPs = 198.51.100.9/32\nBridge = udp2tcp://192.0.2.1:443")
    assert nesting(parse_config(text, PATH)) == {EXIT: ENTRY}


KEYS = [ENTRY, EXIT, OTHER, FOURTH]


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from(range(4)), st.one_of(st.none(), st.sampled_from(range(5)))),
                min_size=1, max_size=4, unique_by=lambda t: t[0]),
       st.lists(st.tuples(st.sampled_from(range(4)), st.sampled_from(range(4))), max_size=4))
def test_any_via_graph_either_parses_to_valid_chains_or_names_the_via_lines(vias, detected):
    """Random Vias (index 4: a key of no peer) and detected layouts (peer i's endpoint in peer
    j's AllowedIPs): nesting() returns chains check_chains accepts, or every error is on a Via,
    Endpoint or Bridge line, never a traceback."""
    via = dict(vias)
    lines_of: dict[int, dict[str, int]] = {}
    text = IFACE
    n = IFACE.count("\n")
    for i in sorted(via):
        body = [f"Endpoint = 198.51.100.{i + 1}:51820"]
        body += [f"AllowedIPs = 198.51.100.{j + 1}/32" for a, j in detected if a == i] or ["AllowedIPs = 10.9.0.0/16"]
        if via[i] is not None:
            key = KEYS[via[i]] if via[i] < 4 else bytes([0x99] * 32)
            body.append(f"Via = {encode_base64_key(key)}")
        section = peer(KEYS[i], *body)
        lines_of[i] = {}
        for k, line in enumerate(section.split("\n")):
            name = line.partition(" =")[0]
            if name in ("Endpoint", "Via"):
                lines_of[i][name] = n + 1 + k
        text += section
        n += section.count("\n")
    try:
        result = nesting(parse_config(text, PATH))
    except ConfigError as exc:
        allowed = {line for d in lines_of.values() for line in d.values()}
        assert {line for _, line, _ in exc.errors} <= allowed
        return
    check_chains(result, KEYS)
    for i, entry in via.items():
        if entry is not None:
            assert result[KEYS[i]] == KEYS[entry]


@SETTINGS
@given(st.text(alphabet=st.characters(codec="latin-1"), max_size=60))
def test_any_via_value_is_a_config_error_or_a_key(value):
    text = IFACE + peer(ENTRY) + peer(EXIT) + f"Via = {value}\n"
    try:
        cfg = parse_config(text, PATH)
    except ConfigError as exc:
        assert all(line for _, line, _ in exc.errors)
        return
    assert cfg.peers[1].via is None or len(cfg.peers[1].via) == 32


# ---------------------------------------------------------------------------- UAPI


class Iface:
    listen_port = 51820
    fwmark = 0

    def __init__(self) -> None:
        self.vias: dict[bytes, bytes | None] = {}
        self.order: list[tuple[bytes, bytes | None]] = []

    def set_listen_port(self, port): self.listen_port = port
    def set_fwmark(self, mark): self.fwmark = mark
    def set_endpoint(self, peer, endpoint): peer.endpoint = endpoint
    def set_bridge(self, peer, bridge): pass

    def set_via(self, peer, entry: bytes | None) -> None:
        self.order.append((peer.public_key, entry))
        self.vias[peer.public_key] = entry

    def extension_lines(self, peer) -> list[str]:
        via = self.vias.get(peer.public_key)
        out = [f"wgpy_via={via.hex()}"] if via else []
        entry = via or (ENTRY if peer.public_key == OTHER else None)  # as if OTHER were detected
        return out + ([f"wgpy_entry={entry.hex()}"] if entry and entry in self.known else [])

    known: set = set()


def device() -> tuple[Device, Iface]:
    dev = Device(PRIV, wall_offset=1_700_000_000.0)
    dev.add_peer(ENTRY, endpoint=("192.0.2.1", 51820), allowed_ips=["198.51.100.9/32"])
    iface = Iface()
    iface.known = {ENTRY}
    return dev, iface


def set_lines(dev, iface, *lines: str) -> str:
    return uapi.handle(("set", list(lines)), dev, iface)


def test_wgpy_via_applies_set_via_in_order_and_the_entry_may_come_later():
    dev, iface = device()
    assert set_lines(dev, iface, f"public_key={EXIT.hex()}", f"wgpy_via={FOURTH.hex().upper()}",
                     f"public_key={FOURTH.hex()}", "endpoint=192.0.2.4:4",
                     f"public_key={OTHER.hex()}", "wgpy_via=") == "errno=0\n\n"
    assert iface.order == [(EXIT, FOURTH), (OTHER, None)]
    assert set(dev.peers) == {ENTRY, EXIT, FOURTH, OTHER}


@pytest.mark.parametrize("lines, message", [
    ([f"public_key={EXIT.hex()}", "wgpy_via=abc"], "line 2: 'wgpy_via': not 64 hex characters"),
    ([f"public_key={EXIT.hex()}", "wgpy_via=" + "g" * 64], "line 2: 'wgpy_via': invalid hex"),
    ([f"public_key={EXIT.hex()}", f"wgpy_via={ENTRY.hex()}00"], "not 64 hex characters"),
    ([f"public_key={EXIT.hex()}", f"wgpy_via= {ENTRY.hex()}"], "not 64 hex characters"),
    ([f"wgpy_via={ENTRY.hex()}"], "line 1: 'wgpy_via': a peer key needs a public_key line before it"),
    ([f"public_key={EXIT.hex()}", f"wgpy_via={EXIT.hex()}"], "cannot be reached via itself"),
])
def test_bad_wgpy_via_is_einval_with_the_line_and_changes_nothing(lines, message):
    with pytest.raises(UapiError) as info:
        parse_set(lines)
    assert info.value.errno == errno.EINVAL and message in info.value.message
    assert ENTRY.hex() not in info.value.message and EXIT.hex() not in info.value.message
    dev, iface = device()
    assert set_lines(dev, iface, *lines, f"public_key={OTHER.hex()}", f"wgpy_via={ENTRY.hex()}") == "errno=-22\n\n"
    assert iface.order == [] and set(dev.peers) == {ENTRY}


def test_wgpy_via_after_remove_is_ignored():
    dev, iface = device()
    assert set_lines(dev, iface, f"public_key={ENTRY.hex()}", "remove=true", f"wgpy_via={EXIT.hex()}") == "errno=0\n\n"
    assert iface.order == [] and not dev.peers


@SETTINGS
@given(st.text(alphabet=st.characters(codec="latin-1"), max_size=80))
def test_any_wgpy_via_value_is_parsed_or_refused_cleanly(value):
    try:
        tx = parse_set([f"public_key={EXIT.hex()}", f"wgpy_via={value}"])
    except UapiError as exc:
        assert exc.errno == errno.EINVAL and exc.message.startswith("line 2: 'wgpy_via': ")
        return
    (op,) = tx.peers[0].ops
    assert op == SetVia(bytes.fromhex(value) if value else None)


def test_get_wgpy_via_and_entry_round_trip_through_parse_get_reply():
    dev, iface = device()
    assert set_lines(dev, iface, f"public_key={EXIT.hex()}", f"wgpy_via={ENTRY.hex()}", "endpoint=198.51.100.9:51820",
                     f"public_key={OTHER.hex()}", "endpoint=198.51.100.9:1") == "errno=0\n\n"
    plain = format_get(dev, iface)
    assert "wgpy_" not in plain  # get=1 stays wireguard-go's
    reply = format_get(dev, iface, extensions=True)
    status = parse_get_reply("wg0", reply[: -len("errno=0\n\n")])
    by = {p.public_key: p for p in status.peers}
    assert (by[EXIT].via, by[EXIT].entry) == (ENTRY, ENTRY)
    assert (by[OTHER].via, by[OTHER].entry) == (None, ENTRY)
    assert (by[ENTRY].via, by[ENTRY].entry) == (None, None)


@pytest.mark.parametrize("line", ["wgpy_via=xyz", "wgpy_entry=" + "0" * 63])
def test_malformed_via_in_a_get_reply_is_a_control_error(line):
    with pytest.raises(uapi.ControlError, match="malformed reply"):
        parse_get_reply("wg0", f"public_key={EXIT.hex()}\n{line}")


# ---------------------------------------------------------------------------- wgpy up: MTU, routes


@pytest.fixture
def routes(monkeypatch):
    """route_mtu_towards from a table: address -> MTU (None: the default route's)."""
    table = {None: 1500}
    monkeypatch.setattr(quick.netconfig, "route_mtu_towards", lambda host, mark=0: table.get(host, table[None]))
    return table


def plan(text: str, endpoints=None):
    cfg = parse_config(text, PATH)
    endpoints = endpoints if endpoints is not None else quick.resolve_endpoints(cfg)
    nest = nesting(cfg, endpoints)
    return cfg, nest, quick.plan_mtu(cfg, endpoints, quick.bridge_plan(cfg, endpoints), nest)


def test_default_mtu_is_the_entry_path_minus_two_layers(routes):
    routes["192.0.2.1"] = 1500
    routes["198.51.100.9"] = 9000  # the exit's address is never routed by the host: not used
    assert plan(MULLVAD)[2] == 1328  # 1500 - 80 - 80, down to a multiple of 16


def test_default_mtu_with_a_bridge_on_the_entry(routes):
    routes["192.0.2.50"] = 1400
    v4 = MULLVAD.replace(", fc00::2/128", "")
    text = v4.replace("AllowedIPs = 198.51.100.9/32", "AllowedIPs = 198.51.100.9/32\nBridge = udp2tcp://192.0.2.50:443")
    assert plan(text)[2] == 1232  # 1400 - 160, down to a multiple of 16
    ss = v4.replace("AllowedIPs = 198.51.100.9/32",
                         "AllowedIPs = 198.51.100.9/32\nBridge = ss://aes-256-gcm:pw@192.0.2.50:8388")
    assert plan(ss)[2] == 1184  # 1400 - 160 - (32 + 7 + 16), down to a multiple of 16


def test_explicit_mtu_that_cannot_fit_says_why(routes):
    text = MULLVAD.replace("Address =", "MTU = 1420\nAddress =")
    with pytest.raises(quick.UpError) as info:
        plan(text)
    msg = str(info.value)
    assert "MTU 1420 cannot fit" in msg and "1500 bytes" in msg and "2 layers of WireGuard (2 x 80)" in msg
    assert "use MTU = 1328 or less" in msg and f"{PATH}:11" in msg  # 1340 padded by the exit: 1344
    assert plan(text.replace("MTU = 1420", "MTU = 1328"))[2] == 1328
    with pytest.raises(quick.UpError):
        plan(text.replace("MTU = 1420", "MTU = 1340"))


def test_ipv6_address_with_an_mtu_below_1280_is_refused(routes):
    routes["192.0.2.1"] = 1400
    with pytest.raises(quick.UpError, match="below 1280"):
        plan(MULLVAD)
    assert plan(MULLVAD.replace(", fc00::2/128", ""))[2] == 1232


def test_no_nesting_keeps_wg_quicks_rule(routes):
    text = MULLVAD.replace("AllowedIPs = 198.51.100.9/32", "AllowedIPs = 10.64.0.1/32")
    routes["198.51.100.9"] = 9000
    assert plan(text)[2] == 9000 - 80


def test_the_exits_host_route_is_left_out_and_nothing_else():
    text = MULLVAD.replace("AllowedIPs = 198.51.100.9/32", "AllowedIPs = 198.51.100.9/32, 10.64.0.1/32")
    cfg = parse_config(text, PATH)
    endpoints = quick.resolve_endpoints(cfg)
    assert quick.exit_host_routes(cfg, endpoints, nesting(cfg, endpoints)) == {ipaddress.ip_network("198.51.100.9/32")}
    wide = parse_config(MULLVAD.replace("198.51.100.9/32", "198.51.100.0/24"), PATH)
    assert quick.exit_host_routes(wide, quick.resolve_endpoints(wide), nesting(wide)) == set()


# ---------------------------------------------------------------------------- wgpy set ... via


def status_of(*peers: uapi.PeerStatus) -> uapi.InterfaceStatus:
    return uapi.InterfaceStatus("wg0", peers=list(peers))


@pytest.fixture
def daemon(monkeypatch, routes):
    state = {"status": status_of(
        uapi.PeerStatus(ENTRY, endpoint=("192.0.2.1", 51820), allowed_ips=[ipaddress.ip_network("10.64.0.1/32")]),
        uapi.PeerStatus(EXIT, endpoint=("198.51.100.9", 51820), allowed_ips=[ipaddress.ip_network("0.0.0.0/0")]),
        uapi.PeerStatus(OTHER, endpoint=("203.0.113.3", 51820)),
    ), "sent": []}
    monkeypatch.setattr(quick.uapi, "get_status", lambda ifname: state["status"])
    monkeypatch.setattr(quick.uapi, "set_config", lambda ifname, lines: state["sent"].append(lines))
    return state


def test_set_via_sends_one_request(daemon):
    quick.set_peers("wg0", [(EXIT, "via", ENTRY), (OTHER, "via", None)])
    assert daemon["sent"] == [[f"public_key={EXIT.hex()}", "update_only=true", f"wgpy_via={ENTRY.hex()}",
                               f"public_key={OTHER.hex()}", "update_only=true", "wgpy_via="]]


@pytest.mark.parametrize("changes, message", [
    ([(FOURTH, "via", ENTRY)], "wg0 has no peer"),
    ([(EXIT, "via", FOURTH)], "via for peer"),
    ([(EXIT, "via", EXIT)], "Via names the peer itself"),
    ([(EXIT, "via", ENTRY), (ENTRY, "via", EXIT)], "cycle"),
    ([(EXIT, "via", ENTRY), (OTHER, "via", EXIT)], "2 levels deep"),
    ([(EXIT, "via", ENTRY), (EXIT, "bridge", "udp2tcp://192.0.2.9:443")], "a bridge wraps only the first hop"),
])
def test_set_via_refused_sends_nothing(daemon, changes, message):
    with pytest.raises(quick.UpError, match=message):
        quick.set_peers("wg0", changes)
    assert daemon["sent"] == []


def test_set_via_sees_detected_nesting(daemon):
    daemon["status"].peers[0].allowed_ips.append(ipaddress.ip_network("198.51.100.9/32"))  # EXIT detected in ENTRY
    with pytest.raises(quick.UpError, match="2 levels deep"):
        quick.set_peers("wg0", [(ENTRY, "via", OTHER)])
    with pytest.raises(quick.UpError, match="first hop"):
        quick.set_peers("wg0", [(EXIT, "bridge", "udp2tcp://192.0.2.9:443")])
    quick.set_peers("wg0", [(ENTRY, "bridge", "udp2tcp://192.0.2.9:443")])  # the entry may have one
    assert daemon["sent"]


def test_redacted_bridge_gives_server_and_overhead():
    spec = quick._redacted_bridge("ss://aes-256-gcm@192.0.2.5:8388")
    assert spec.server == ("192.0.2.5", 8388) and spec.overhead(("127.0.0.1", 51820)) == 32 + 7 + 16
    spec = quick._redacted_bridge("ss://2022-blake3-aes-128-gcm@[2001:db8::5]:443")
    assert spec.server == ("2001:db8::5", 443) and spec.overhead(("127.0.0.1", 51820)) > 16
    assert quick._redacted_bridge("udp2tcp://192.0.2.5:443").server == ("192.0.2.5", 443)
    assert quick._redacted_bridge("ss://nonsense") is None and quick._redacted_bridge(None) is None


@pytest.fixture
def set_calls(monkeypatch):
    calls = []
    monkeypatch.setattr(quick, "set_peers", lambda ifname, changes: calls.append((ifname, changes)))
    return calls


def test_cli_set_via(set_calls):
    assert cli.main(["set", "wg0", "peer", B[EXIT], "via", B[ENTRY], "peer", B[OTHER], "via", "off",
                     "peer", B[ENTRY], "bridge", "udp2tcp://192.0.2.1:443"]) == 0
    assert set_calls == [("wg0", [(EXIT, "via", ENTRY), (OTHER, "via", None),
                                  (ENTRY, "bridge", "udp2tcp://192.0.2.1:443")])]


@pytest.mark.parametrize("argv, message", [
    (["peer", "K", "via"], "usage: wgpy set"),
    (["peer", B[EXIT], "via", "nonsense"], "argument 5: via takes the base64 public key"),
    (["peer", "nonsense", "via", B[ENTRY]], "argument 3: not a base64"),
    (["peer", B[EXIT], "vía", B[ENTRY]], "usage: wgpy set"),
])
def test_cli_set_via_errors_are_one_line(set_calls, capsys, argv, message):
    assert cli.main(["set", "wg0", *argv]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert set_calls == []


# ---------------------------------------------------------------------------- wgpy show


def chain_status() -> uapi.InterfaceStatus:
    return status_of(
        uapi.PeerStatus(ENTRY, endpoint=("192.0.2.1", 51820), latest_handshake=990, rx_bytes=2048, tx_bytes=4096,
                        bridge="udp2tcp://192.0.2.1:443", bridge_connected=True),
        uapi.PeerStatus(EXIT, endpoint=("198.51.100.9", 51820), latest_handshake=995, rx_bytes=1024,
                        tx_bytes=512, via=ENTRY, entry=ENTRY),
        uapi.PeerStatus(OTHER, endpoint=("198.51.100.10", 51820), entry=ENTRY),
        uapi.PeerStatus(FOURTH, via=EXIT),
    )


def test_show_text_shows_the_chain():
    text = show.format_text(chain_status(), 1000.0)
    blocks = {b.split("\n")[0]: b for b in text.split("\n\n")[1:]}
    exit_block = blocks[f"peer: {B[EXIT]}"]
    assert f"  via: {B[ENTRY]} (Via)" in exit_block
    assert "  via bridge: udp2tcp://192.0.2.1:443 (the entry's)" in exit_block
    assert "latest handshake: 5 seconds ago" in exit_block and "1.00 KiB received" in exit_block
    assert f"  via: {B[ENTRY]} (its endpoint is in the entry's allowed ips)" in blocks[f"peer: {B[OTHER]}"]
    assert "not in effect" in blocks[f"peer: {B[FOURTH]}"]
    entry_block = blocks[f"peer: {B[ENTRY]}"]
    assert f"  carries: {B[EXIT]}" in entry_block and "latest handshake: 10 seconds ago" in entry_block
    assert "via:" not in entry_block


def test_show_json_has_via_and_entry():
    (iface,) = json.loads(show.as_json([chain_status()], 1000.0))
    by = {p["public_key"]: p for p in iface["peers"]}
    assert (by[B[EXIT]]["via"], by[B[EXIT]]["entry"]) == (B[ENTRY], B[ENTRY])
    assert (by[B[OTHER]]["via"], by[B[OTHER]]["entry"]) == (None, B[ENTRY])
    assert (by[B[ENTRY]]["via"], by[B[ENTRY]]["entry"]) == (None, None)
