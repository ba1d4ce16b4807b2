"""The kill switch without namespaces: the KillSwitch/AllowLAN config keys (FILE:LINE errors),
the ruleset text (structure and rule order; with nft installed and root, every rendering is
also checked by `nft -c` in a throwaway network namespace), the first-hop sets' updates, the
engine's first hops (plain, bridged, nested) and the daemon's follower on in-memory engines
(UAPI changes at once, roaming by the poll, failures retried)."""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import shutil
import subprocess

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.spec import parse_bridge
from transport.memory import MemoryNetwork
from tunnel import config as wgconfig
from tunnel import killswitch
from tunnel.config import ConfigError, parse_config, render_config
from tunnel.killswitch import Hop, KillSwitch, hops_of, render, render_hops, table_name
from tunnel.quick import dns_route_warnings, kill_switch_plan

from ..helpers import ip4
from .test_engine import A_ADDR, A_IN, B_ADDR, B_IN, MemoryBridge, Node, peer_lines, socket_dir  # noqa: F401

KEY = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk="
PEER = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="
PEER2 = "TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0="

# ---------------------------------------------------------------------------- config


def conf(interface: str, peer: str = "") -> str:
    return f"[Interface]\nPrivateKey = {KEY}\n{interface}\n[Peer]\nPublicKey = {PEER}\nAllowedIPs = 0.0.0.0/0\n{peer}"


def _cases(word: str):
    return st.lists(st.booleans(), min_size=len(word), max_size=len(word)).map(
        lambda upper: "".join(c.upper() if u else c for c, u in zip(word, upper)))


@given(ks=st.sampled_from(["on", "off", "true", "false"]).flatmap(_cases),
       lan=st.sampled_from(["on", "off", "true", "false"]).flatmap(_cases))
def test_kill_switch_and_allow_lan_take_on_off_in_any_case(ks, lan):
    enabled = ks.lower() in ("on", "true")
    text = conf(f"KillSwitch = {ks}\nAllowLAN = {lan}")
    if lan.lower() in ("on", "true") and not enabled:
        with pytest.raises(ConfigError) as e:
            parse_config(text, "k.conf")
        assert str(e.value).startswith("k.conf:4: AllowLAN = on opens the kill switch")
        return
    iface = parse_config(text, "k.conf").interface
    assert (iface.kill_switch, iface.allow_lan) == (enabled, lan.lower() in ("on", "true"))


@given(value=st.text(alphabet=st.characters(blacklist_characters="#\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\u2028\u2029"),
                     min_size=1, max_size=20))
def test_bad_on_off_values_name_file_and_line(value):
    value = value.strip(" \t\n\v\f\r")
    if not value or value.lower() in ("on", "off", "true", "false"):
        return
    with pytest.raises(ConfigError) as e:
        parse_config(conf(f"MTU = 1400\nKillSwitch = {value}"), "/etc/wireguard/wg0.conf")
    assert str(e.value).splitlines()[0].startswith("/etc/wireguard/wg0.conf:4: KillSwitch: ")
    assert "is neither on nor off" in str(e.value)


@pytest.mark.parametrize("text, line, message", [
    (conf("KillSwitch = on\nKillSwitch = off"), 4, "KillSwitch is given twice"),
    (conf("AllowLAN = on"), 3, "AllowLAN = on opens the kill switch to the local network, but KillSwitch is not on"),
    (conf("", "KillSwitch = on"), 7, "KillSwitch belongs in [Interface], not [Peer]"),
    (conf("KillSwitch ="), 3, "KillSwitch has no value"),
])
def test_config_mistakes(text, line, message):
    with pytest.raises(ConfigError) as e:
        parse_config(text, "wg0.conf")
    assert str(e.value).startswith(f"wg0.conf:{line}: {message}"), str(e.value)


def test_render_config_keeps_the_keys():
    cfg = parse_config(conf("KillSwitch = on\nAllowLAN = true\nDNS = 10.64.0.1"), "wg0.conf")
    text = render_config(cfg)
    assert "KillSwitch = on\n" in text and "AllowLAN = on\n" in text
    assert parse_config(text, "wg0.conf") == cfg
    off = parse_config(conf("KillSwitch = off"), "wg0.conf")
    assert "KillSwitch" not in render_config(off) and not off.interface.kill_switch


# ---------------------------------------------------------------------------- rendering

IFNAME_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_=+.-"
ifnames = st.text(alphabet=IFNAME_CHARS, min_size=1, max_size=15)
v4 = st.integers(0, 2**32 - 1).map(lambda i: str(ipaddress.IPv4Address(i)))
v6 = st.integers(0, 2**128 - 1).map(lambda i: str(ipaddress.IPv6Address(i)))
hop_entries = st.tuples(st.one_of(v4, v6), st.sampled_from(["udp", "tcp"]), st.integers(1, 65535))
plans = st.builds(
    KillSwitch,
    ifname=ifnames,
    fwmark=st.integers(0, 2**32 - 1),
    hops=st.lists(hop_entries, max_size=4).map(hops_of),
    allow_lan=st.booleans(),
    dns=st.lists(st.one_of(v4, v6).map(ipaddress.ip_address), max_size=3).map(tuple),
    block_ipv6=st.booleans(),
)


@given(a=ifnames, b=ifnames)
def test_table_names_are_nft_identifiers_and_never_shared(a, b):
    for name in (a, b):
        assert re.fullmatch(r"wgpy-ksx?-[A-Za-z0-9_.-]+", table_name(name))
    assert (table_name(a) == table_name(b)) == (a == b)


@pytest.mark.parametrize("bad", ['wg0" accept', "wg 0", "", "a" * 16, "wg0\n", "wg0;"])
def test_an_interface_name_cannot_inject_rules(bad):
    with pytest.raises(ValueError):
        render(KillSwitch(bad))
    with pytest.raises(ValueError):
        render_hops(bad, 0, ())


@given(entries=st.lists(hop_entries, max_size=6))
def test_hops_of_keeps_every_valid_entry_canonical(entries):
    hops = hops_of(entries)
    assert hops == {Hop(ipaddress.ip_address(a).version, p, str(ipaddress.ip_address(a)), port)
                    for a, p, port in entries}


def test_other_kill_switch_tables_are_found_in_a_listing():
    listing = ("table inet wgpy-ks-wg0\ntable ip wgpy-wg1\ntable inet wgpy-ksx-612b62\ntable inet filter\n"
               "table ip wgpy-ks-wg9\n")
    assert killswitch.other_tables(listing, "wgpy-ks-wg0") == ["wgpy-ksx-612b62"]
    assert killswitch.other_tables(listing, "wgpy-ks-wg5") == ["wgpy-ks-wg0", "wgpy-ksx-612b62"]


def test_hops_of_leaves_out_what_cannot_be_sent_to():
    assert hops_of([("vpn.example.net", "udp", 1), ("10.0.0.1", "icmp", 1), ("10.0.0.1", "udp", 0),
                    ("10.0.0.1", "udp", 65536)]) == frozenset()
    assert hops_of([("fe80::1%eth0", "udp", 51820)]) == {Hop(6, "udp", "fe80::1", 51820)}


def _chain(text: str, name: str) -> list[str]:
    body = text.split(f"\tchain {name} {{\n", 1)[1].split("\t}\n", 1)[0]
    return [line.strip() for line in body.splitlines()]


def _index(rules: list[str], start: str) -> int:
    matches = [i for i, r in enumerate(rules) if r.startswith(start)]
    assert len(matches) == 1, (start, rules)
    return matches[0]


@given(plan=plans)
def test_rendered_rules_and_their_order(plan):
    text = render(plan)
    t = table_name(plan.ifname)
    assert text.startswith(f"add table inet {t}\ndelete table inet {t}\ntable inet {t} {{\n")
    out = _chain(text, "output")
    assert out[0] == "type filter hook output priority filter; policy drop;" and out[-1] == "counter drop"
    assert out[1] == 'oifname "lo" accept'
    hops = _index(out, "meta mark . ip daddr")
    tunnel = out.index(f'oifname "{plan.ifname}" accept')
    assert hops < tunnel
    # Each hop in its family's set, with the mark.
    for hop in plan.hops:
        name = "hops4" if hop.family == 4 else "hops6"
        line = next(line for line in text.splitlines() if line.startswith(f"\tset {name} "))
        assert f"{plan.fwmark:#x} . {hop.address} . {hop.proto} . {hop.port}" in line
    # DNS: checked before the tunnel and the LAN are accepted; to the servers only via the tunnel.
    if plan.dns:
        dns = _chain(text, "dns")
        assert dns[-1] == "counter drop"
        assert all(r.startswith(f'oifname "{plan.ifname}" ') for r in dns[:-1])
        for server in plan.dns:
            if server.version == 4 or not plan.block_ipv6:
                assert any(str(server) in r for r in dns[:-1]), (server, dns)
            else:
                assert all(str(server) not in r for r in dns)
        for jump in ("udp dport { 53 } jump dns", "tcp dport { 53, 853 } jump dns"):
            assert hops < out.index(jump) < tunnel
            assert jump in _chain(text, "forward")
    else:
        assert "chain dns" not in text and "jump dns" not in text
    # IPv6 blocked before the tunnel accepts anything.
    if plan.block_ipv6:
        assert hops < out.index("meta nfproto ipv6 counter drop") < tunnel
        assert "meta nfproto ipv6 counter drop" in _chain(text, "forward")
    else:
        assert "meta nfproto ipv6" not in text
    # AllowLAN: after DNS, and IPv6 LAN ranges only when IPv6 is not blocked.
    lan = [r for r in out if r.startswith(("ip daddr { 10.0.0.0/8", "ip6 daddr { fc00::/7", "ip6 daddr { fe80::/10"))]
    if plan.allow_lan:
        assert lan and all(out.index(r) > out.index("tcp dport { 53, 853 } jump dns") for r in lan if plan.dns)
        assert any("fc00::/7" in r for r in lan) != plan.block_ipv6
    else:
        assert not lan and "10.0.0.0/8" not in text


@given(plan=plans)
def test_render_hops_replaces_both_sets_in_one_script(plan):
    text = render_hops(plan.ifname, plan.fwmark, plan.hops)
    t = table_name(plan.ifname)
    lines = text.splitlines()
    assert lines[:2] == [f"flush set inet {t} hops4", f"flush set inet {t} hops6"]
    assert "table inet" not in text.replace(f"set inet {t}", "").replace(f"element inet {t}", "")
    for family, name in ((4, "hops4"), (6, "hops6")):
        mine = sorted(h for h in plan.hops if h.family == family)
        adds = [line for line in lines if line.startswith(f"add element inet {t} {name} ")]
        assert len(adds) == (1 if mine else 0)
        for h in mine:
            assert f"{plan.fwmark:#x} . {h.address} . {h.proto} . {h.port}" in adds[0]


def _nft_in_throwaway_netns(text: str) -> subprocess.CompletedProcess:
    return subprocess.run(["unshare", "--net", "nft", "-c", "-f", "-"], input=text, capture_output=True,
                          text=True, timeout=20)


NFT_CHECK = os.geteuid() == 0 and shutil.which("nft") is not None and shutil.which("unshare") is not None


@pytest.mark.skipif(not NFT_CHECK, reason="needs root, nft and unshare")
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=plans)
def test_nft_accepts_every_rendering(plan):
    """`nft -c` (check only) in a network namespace of its own: nothing is applied anywhere."""
    table = render(plan)
    r = _nft_in_throwaway_netns(table)
    assert r.returncode == 0, r.stderr + table
    # The set update only makes sense on top of the table: check them together.
    r = _nft_in_throwaway_netns(table + render_hops(plan.ifname, plan.fwmark ^ 1, plan.hops))
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(not NFT_CHECK, reason="needs root, nft and unshare")
def test_nft_refuses_a_set_update_without_the_table():
    r = _nft_in_throwaway_netns(render_hops("wg0", 1, hops_of([("192.0.2.1", "udp", 51820)])))
    assert r.returncode != 0


# ---------------------------------------------------------------------------- engine and follower


class Recorder:
    """`apply` for the follower: records each script (optionally failing the first ones)."""

    def __init__(self, fail: int = 0) -> None:
        self.scripts: list[str] = []
        self.fail = fail
        self.changed = trio.Event()

    async def __call__(self, text: str) -> None:
        self.scripts.append(text)
        self.changed.set()
        self.changed = trio.Event()
        if self.fail:
            self.fail -= 1
            raise killswitch.KillSwitchError("nft: Error: No such file or directory")

    async def wait_for(self, needle: str) -> str:
        while not self.scripts or needle not in self.scripts[-1]:
            await self.changed.wait()
        return self.scripts[-1]


async def test_follower_applies_uapi_changes_at_once_and_roaming_by_polling(socket_dir, autojump_clock):
    net = MemoryNetwork()
    record = Recorder()
    async with trio.open_nursery() as nursery:
        a = Node("wga", net, A_ADDR, socket_dir)
        b = Node("wgb", net, B_ADDR, socket_dir)
        await nursery.start(a.engine.run)
        await nursery.start(b.engine.run)
        nursery.start_soon(lambda: killswitch.follow(a.engine, apply=record, poll=0.25))
        await trio.sleep(1)
        assert record.scripts == []  # nothing configured yet: the sets `wgpy up` wrote stay
        await b.set(f"private_key={b.key.hex()}", f"listen_port={B_ADDR[1]}",
                    *peer_lines(a, A_ADDR, f"{A_IN}/32"))
        start = trio.current_time()
        await a.set(f"private_key={a.key.hex()}", f"listen_port={A_ADDR[1]}", "fwmark=51820",
                    *peer_lines(b, B_ADDR, f"{B_IN}/32"))
        with trio.fail_after(1):
            text = await record.wait_for(f"0xca6c . {B_ADDR[0]} . udp . {B_ADDR[1]}")
        assert trio.current_time() - start < 0.01  # woken by the set, not the poll
        assert text == render_hops("wga", 51820, hops_of([(B_ADDR[0], "udp", B_ADDR[1])]))
        count = len(record.scripts)
        await trio.sleep(2)
        assert len(record.scripts) == count  # nothing changed: nothing applied

        # b moves to another port and sends: a's peer roams; the follower sees it by polling.
        await b.set("listen_port=40000")
        b.tun.inject(ip4(B_IN, A_IN, b"from the new port"))
        with trio.fail_after(5):
            await a.tun.next_written()
        roamed = trio.current_time()
        with trio.fail_after(1):
            await record.wait_for(f"{B_ADDR[0]} . udp . 40000")
        assert trio.current_time() - roamed <= 0.25 + 0.01
        assert f". udp . {B_ADDR[1]}" not in record.scripts[-1]

        # The peer goes: the sets are emptied.
        await a.set(f"public_key={b.public.hex()}", "remove=true")
        with trio.fail_after(1):
            while "add element" in record.scripts[-1]:
                await record.changed.wait()
        nursery.cancel_scope.cancel()


async def test_follower_retries_a_failed_update_and_logs_it_once(socket_dir, autojump_clock, caplog):
    caplog.set_level(logging.INFO, logger="wgpy")
    net = MemoryNetwork()
    record = Recorder(fail=3)
    async with trio.open_nursery() as nursery:
        a = Node("wga", net, A_ADDR, socket_dir)
        await nursery.start(a.engine.run)
        nursery.start_soon(lambda: killswitch.follow(a.engine, apply=record, poll=0.25))
        b = Node("wgb", net, B_ADDR, socket_dir)
        await a.set(f"private_key={a.key.hex()}", *peer_lines(b, B_ADDR, f"{B_IN}/32"))
        start = trio.current_time()
        with trio.fail_after(30):
            while len(record.scripts) < 4:
                await record.changed.wait()
        # Backoff 0.5, 1, 2 s between the four tries; then it stops (applied).
        assert 3.4 < trio.current_time() - start < 3.6
        await trio.sleep(10)
        assert len(record.scripts) == 4 and len(set(record.scripts)) == 1
        nursery.cancel_scope.cancel()
    errors = [r for r in caplog.records if "cannot update the allowed first hops" in r.getMessage()]
    assert len(errors) == 1 and "No such file or directory" in errors[0].getMessage()


async def test_engine_first_hops_plain_bridged_and_nested(socket_dir):
    net = MemoryNetwork()

    def open_bridge(spec, ident, fwmark):
        return MemoryBridge(net, spec, ident)

    entry, exit_, bridged, ss = (Node(n, net, (f"192.0.2.{i}", 51820), socket_dir) for i, n in
                                 enumerate(("wge", "wgx", "wgb", "wgs"), 10))
    async with trio.open_nursery() as nursery:
        a = Node("wga", net, A_ADDR, socket_dir, open_bridge=open_bridge)
        await nursery.start(a.engine.run)
        await a.set(f"private_key={a.key.hex()}",
                    *peer_lines(entry, ("192.0.2.10", 51820), "10.64.0.1/32"),
                    *peer_lines(exit_, ("198.51.100.9", 51820), "0.0.0.0/0"), f"wgpy_via={entry.public.hex()}",
                    *peer_lines(bridged, ("127.0.0.1", 51820), "10.65.0.1/32"),
                    "wgpy_bridge=udp2tcp://203.0.113.9:443",
                    *peer_lines(ss, ("127.0.0.1", 51821), "10.66.0.1/32"),
                    "wgpy_bridge=ss://aes-256-gcm:pw@203.0.113.8:8388",
                    *peer_lines(Node("wgn", net, ("192.0.2.99", 1), socket_dir), None, "10.67.0.1/32"))
        assert a.engine.first_hops() == {("192.0.2.10", "udp", 51820), ("203.0.113.9", "tcp", 443),
                                         ("203.0.113.8", "udp", 8388)}
        # The exit reached directly: its own endpoint becomes a first hop.
        await a.set(f"public_key={exit_.public.hex()}", "wgpy_via=")
        assert ("198.51.100.9", "udp", 51820) in a.engine.first_hops()
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------- the plan `wgpy up` makes


def _plan(text: str, endpoints: dict, bridges: dict | None = None):
    cfg = parse_config(text, "wg0.conf")
    nest = wgconfig.nesting(cfg, endpoints)
    specs = {i: parse_bridge(uri) for i, uri in (bridges or {}).items()}
    return cfg, kill_switch_plan(cfg, "wg0", endpoints, specs, nest, 0xCA6C)


def test_plan_first_hops_from_the_config():
    text = (f"[Interface]\nPrivateKey = {KEY}\nKillSwitch = on\nAllowLAN = on\nDNS = 10.64.0.1, fd00::53, lan\n"
            f"[Peer]\nPublicKey = {PEER}\nEndpoint = 192.0.2.1:51820\nAllowedIPs = 10.64.0.0/24\n"
            f"[Peer]\nPublicKey = {PEER2}\nEndpoint = 198.51.100.9:51820\nAllowedIPs = 0.0.0.0/0\nVia = {PEER}\n")
    cfg, plan = _plan(text, {0: ("192.0.2.1", 51820), 1: ("198.51.100.9", 51820)})
    # The exit travels inside the entry: only the entry is a first hop. No IPv6 AllowedIP: blocked.
    assert plan == KillSwitch("wg0", 0xCA6C, hops_of([("192.0.2.1", "udp", 51820)]), allow_lan=True,
                              dns=(ipaddress.ip_address("10.64.0.1"), ipaddress.ip_address("fd00::53")),
                              block_ipv6=True)


@pytest.mark.parametrize("uri, hop", [
    ("udp2tcp://203.0.113.9:443", ("203.0.113.9", "tcp", 443)),
    ("ss://aes-256-gcm:pw@[2001:db8::9]:8388", ("2001:db8::9", "udp", 8388)),
])
def test_plan_a_bridged_peer_is_its_bridge_server(uri, hop):
    text = (f"[Interface]\nPrivateKey = {KEY}\nKillSwitch = on\n"
            f"[Peer]\nPublicKey = {PEER}\nEndpoint = 127.0.0.1:51820\nAllowedIPs = 0.0.0.0/0, ::/0\nBridge = {uri}\n")
    _, plan = _plan(text, {0: ("127.0.0.1", 51820)}, {0: uri})
    assert plan.hops == hops_of([hop]) and not plan.block_ipv6


def test_a_dns_server_outside_the_tunnel_is_warned_about_with_its_line():
    cfg = parse_config(f"[Interface]\nPrivateKey = {KEY}\nKillSwitch = on\nDNS = 10.64.0.1, 192.0.2.53\n"
                       f"[Peer]\nPublicKey = {PEER}\nAllowedIPs = 10.64.0.0/24\n", "wg0.conf")
    warnings = dns_route_warnings(cfg)
    assert len(warnings) == 1 and warnings[0].startswith("Warning: wg0.conf:4: DNS server 192.0.2.53 is in no peer's")
