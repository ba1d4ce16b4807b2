"""The UAPI (wireguard-go's configuration protocol) in memory: framing, get, set, all-or-nothing."""

from __future__ import annotations

import errno
import ipaddress
import re

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tunnel import uapi
from tunnel.noise import Device
from tunnel.noise.crypto import clamp, public_key
from tunnel.uapi import RequestReader, UapiError, apply_set, format_get, handle, parse_set

WALL = 1_700_000_000.0
PRIV = clamp(bytes(range(1, 33)))
PRIV2 = clamp(bytes(range(33, 65)))
PUB = public_key(PRIV)
PK1, PK2, PK3 = (public_key(clamp(bytes([n]) * 32)) for n in (1, 2, 3))
PSK = bytes(range(100, 132))
Z = "00" * 32
OK = "errno=0\n\n"


class FakeIface:
    """InterfaceSettings double: records calls, can be told to fail."""

    def __init__(self, listen_port: int = 0, fwmark: int = 0) -> None:
        self.listen_port = listen_port
        self.fwmark = fwmark
        self.calls: list[tuple[str, int]] = []
        self.port_error: OSError | None = None
        self.mark_error: OSError | None = None
        self.bridges: dict = {}
        self.vias: dict = {}
        self.obfuscation: dict = {}

    def set_listen_port(self, port: int) -> None:
        self.calls.append(("port", port))
        if self.port_error is not None and port != self.listen_port:
            raise self.port_error
        self.listen_port = port or 43210  # 0: "any port"; pretend the kernel chose one

    def set_fwmark(self, mark: int) -> None:
        self.calls.append(("mark", mark))
        if self.mark_error is not None:
            raise self.mark_error
        self.fwmark = mark

    def set_endpoint(self, peer, endpoint) -> None:
        peer.endpoint = endpoint

    def set_bridge(self, peer, bridge) -> None:
        self.bridges[peer.public_key] = bridge

    def set_via(self, peer, entry: bytes | None) -> None:
        self.calls.append(("via", entry))
        if entry is None:
            self.vias.pop(peer.public_key, None)
        else:
            self.vias[peer.public_key] = entry

    def set_obfuscation(self, peer, kind: str | None) -> None:
        self.calls.append(("obfuscation", kind))
        self.obfuscation[peer.public_key] = kind

    def set_fallback(self, peer, ways) -> None:
        self.calls.append(("fallback", ways))

    def extension_lines(self, peer) -> list[str]:
        bridge = self.bridges.get(peer.public_key)
        via = self.vias.get(peer.public_key)
        return ([f"wgpy_bridge={bridge.uri}"] if bridge else []) + ([f"wgpy_via={via.hex()}"] if via else [])


def new_device(private: bytes | None = PRIV) -> Device:
    return Device(private, wall_offset=WALL)


def state(dev: Device, iface: FakeIface) -> tuple:
    """Everything a set request can change."""
    peers = tuple(
        (pk, p.preshared_key, p.endpoint, p.persistent_keepalive,
         tuple(str(n) for n in dev.allowed_ips.prefixes_of(p)))
        for pk, p in dev.peers.items()
    )
    private = dev.identity.private if dev.identity else None
    return private, iface.listen_port, iface.fwmark, peers


def configured() -> tuple[Device, FakeIface]:
    dev = new_device()
    iface = FakeIface(51820, 0x1234)
    p1 = dev.add_peer(PK1, preshared_key=PSK, endpoint=("192.0.2.1", 51820),
                      allowed_ips=["10.0.0.0/24", "fd00::/64"], persistent_keepalive=25)
    p1.keepalive_requested = False
    dev.add_peer(PK2, endpoint=("2001:db8::1", 443), allowed_ips=["0.0.0.0/0"])
    return dev, iface


def set_text(*lines: str) -> bytes:
    return ("set=1\n" + "".join(line + "\n" for line in lines) + "\n").encode()


def request(dev: Device, iface: FakeIface, data: bytes) -> list[str]:
    return [handle(r, dev, iface) for r in RequestReader().feed(data)]


def do_set(dev: Device, iface: FakeIface, *lines: str) -> str:
    return handle(("set", list(lines)), dev, iface)


def get_reply(dev: Device, iface: FakeIface) -> str:
    [reply] = request(dev, iface, b"get=1\n\n")
    return reply


def parse_get(reply: str) -> dict:
    """The reply as wireguard-tools' userspace_get_device reads it (the peers in order)."""
    assert reply.endswith("errno=0\n\n")
    dev: dict = {"peers": []}
    peer = None
    for line in reply[: -len("errno=0\n\n")].splitlines():
        key, _, value = line.partition("=")
        if key == "public_key":
            peer = {"public_key": value, "allowed_ip": []}
            dev["peers"].append(peer)
        elif key == "allowed_ip":
            peer["allowed_ip"].append(value)
        elif peer is not None:
            peer[key] = value
        else:
            dev[key] = value
    return dev


# ---------------------------------------------------------------------------- get


def test_get_empty_device():
    assert get_reply(new_device(None), FakeIface()) == "errno=0\n\n"
    assert get_reply(new_device(), FakeIface()) == f"private_key={PRIV.hex()}\nerrno=0\n\n"


def test_get_configured_device_exact_text():
    dev, iface = configured()
    p1, p2 = dev.peers[PK1], dev.peers[PK2]
    p1.rx_bytes, p1.tx_bytes = 1234, 5678
    p1.last_handshake_wall = 1_700_000_123.25
    dev.add_peer(PK3, endpoint=("::ffff:198.51.100.9", 7), allowed_ips=["10.9.0.7/16"])
    assert get_reply(dev, iface) == (
        f"private_key={PRIV.hex()}\n"
        "listen_port=51820\n"
        "fwmark=4660\n"
        f"public_key={PK1.hex()}\n"
        f"preshared_key={PSK.hex()}\n"
        "protocol_version=1\n"
        "endpoint=192.0.2.1:51820\n"
        "last_handshake_time_sec=1700000123\n"
        "last_handshake_time_nsec=250000000\n"
        "tx_bytes=5678\n"
        "rx_bytes=1234\n"
        "persistent_keepalive_interval=25\n"
        "allowed_ip=10.0.0.0/24\n"
        "allowed_ip=fd00::/64\n"
        f"public_key={PK2.hex()}\n"
        f"preshared_key={Z}\n"
        "protocol_version=1\n"
        "endpoint=[2001:db8::1]:443\n"
        "last_handshake_time_sec=0\n"
        "last_handshake_time_nsec=0\n"
        "tx_bytes=0\n"
        "rx_bytes=0\n"
        "persistent_keepalive_interval=0\n"
        "allowed_ip=0.0.0.0/0\n"
        f"public_key={PK3.hex()}\n"
        f"preshared_key={Z}\n"
        "protocol_version=1\n"
        "endpoint=[::ffff:198.51.100.9]:7\n"
        "last_handshake_time_sec=0\n"
        "last_handshake_time_nsec=0\n"
        "tx_bytes=0\n"
        "rx_bytes=0\n"
        "persistent_keepalive_interval=0\n"
        "allowed_ip=10.9.0.0/16\n"
        "errno=0\n\n"
    )
    assert p2.endpoint == ("2001:db8::1", 443)


def test_get_leaves_out_endpoints_wg_could_not_parse():
    dev = new_device()
    dev.add_peer(PK1, endpoint="some bridge object")
    dev.add_peer(PK2, endpoint=("fe80::1%eth0", 51820, 0, 2))  # an AF_INET6 recvfrom address
    got = parse_get(get_reply(dev, FakeIface()))
    assert "endpoint" not in got["peers"][0]
    assert got["peers"][1]["endpoint"] == "[fe80::1%eth0]:51820"


def test_round_trip_wg_setconf_then_get():
    """A request as `wg setconf` writes it, then get reports the same configuration."""
    dev, iface = new_device(None), FakeIface()
    lines = [
        f"private_key={PRIV.hex()}", "listen_port=51821", "fwmark=7", "replace_peers=true",
        f"public_key={PK1.hex()}", f"preshared_key={PSK.hex()}", "endpoint=[2001:db8::7]:1",
        "persistent_keepalive_interval=30", "replace_allowed_ips=true",
        "allowed_ip=192.168.0.0/16", "allowed_ip=2001:db8::/32",
        f"public_key={PK2.hex()}", "endpoint=203.0.113.5:65535", "replace_allowed_ips=true",
        "allowed_ip=10.1.0.0/16",
    ]
    assert request(dev, iface, set_text(*lines)) == ["errno=0\n\n"]
    got = parse_get(get_reply(dev, iface))
    assert got == {
        "private_key": PRIV.hex(), "listen_port": "51821", "fwmark": "7",
        "peers": [
            {"public_key": PK1.hex(), "preshared_key": PSK.hex(), "protocol_version": "1",
             "endpoint": "[2001:db8::7]:1", "last_handshake_time_sec": "0",
             "last_handshake_time_nsec": "0", "tx_bytes": "0", "rx_bytes": "0",
             "persistent_keepalive_interval": "30",
             "allowed_ip": ["192.168.0.0/16", "2001:db8::/32"]},
            {"public_key": PK2.hex(), "preshared_key": Z, "protocol_version": "1",
             "endpoint": "203.0.113.5:65535", "last_handshake_time_sec": "0",
             "last_handshake_time_nsec": "0", "tx_bytes": "0", "rx_bytes": "0",
             "persistent_keepalive_interval": "0", "allowed_ip": ["10.1.0.0/16"]},
        ],
    }
    # ... and get's own output, turned back into a set request, reproduces it exactly.
    before = get_reply(dev, iface)
    settable = {"private_key", "listen_port", "fwmark", "public_key", "preshared_key",
                "endpoint", "persistent_keepalive_interval", "allowed_ip", "protocol_version"}
    again = ["replace_peers=true"] + [
        line for line in before.splitlines() if line.partition("=")[0] in settable
    ]
    dev2, iface2 = new_device(None), FakeIface()
    assert do_set(dev2, iface2, *again) == "errno=0\n\n"
    assert get_reply(dev2, iface2) == before


# ---------------------------------------------------------------------------- set, key by key


def test_private_key_set_clamped_and_zero_removes():
    dev, iface = new_device(None), FakeIface()
    raw = bytes([0xFF] * 32)
    assert do_set(dev, iface, f"private_key={raw.hex()}") == "errno=0\n\n"
    assert dev.identity.private == clamp(raw)  # as wireguard-go's FromMaybeZeroHex
    assert do_set(dev, iface, f"private_key={PRIV.hex().upper()}") == "errno=0\n\n"
    assert dev.public_key == PUB
    assert do_set(dev, iface, f"private_key={Z}") == "errno=0\n\n"
    assert dev.identity is None
    assert get_reply(dev, iface) == "errno=0\n\n"


def test_new_private_key_drops_peer_with_that_public_key():
    dev, iface = new_device(), FakeIface()
    dev.add_peer(public_key(PRIV2))
    assert do_set(dev, iface, f"private_key={PRIV2.hex()}") == "errno=0\n\n"
    assert dev.peers == {}


def test_listen_port_and_fwmark_including_zero():
    dev, iface = new_device(), FakeIface(51820, 9)
    assert do_set(dev, iface, "listen_port=0", "fwmark=0") == "errno=0\n\n"
    assert iface.calls == [("port", 0), ("mark", 0)]
    assert (iface.listen_port, iface.fwmark) == (43210, 0)
    assert do_set(dev, iface, "listen_port=65535", "fwmark=4294967295", "listen_port=0001") == "errno=0\n\n"
    assert (iface.listen_port, iface.fwmark) == (1, 0xFFFFFFFF)  # the last value wins
    assert "fwmark" not in get_reply(dev, FakeIface(5, 0))


def test_iface_untouched_when_not_in_request():
    dev, iface = new_device(), FakeIface(51820, 1)
    assert do_set(dev, iface, f"public_key={PK1.hex()}") == "errno=0\n\n"
    assert iface.calls == []


def test_replace_peers():
    dev, iface = configured()
    assert do_set(dev, iface, "replace_peers=true", f"public_key={PK3.hex()}",
                  "allowed_ip=10.0.0.0/24") == "errno=0\n\n"
    assert list(dev.peers) == [PK3]
    assert dev.peers[PK3].endpoint is None
    assert [str(n) for n in dev.allowed_ips.prefixes_of(dev.peers[PK3])] == ["10.0.0.0/24"]


def test_replace_peers_keeps_nothing_of_a_peer_named_again():
    dev, iface = configured()
    assert do_set(dev, iface, "replace_peers=true", f"public_key={PK1.hex()}") == "errno=0\n\n"
    p1 = dev.peers[PK1]
    assert (p1.endpoint, p1.preshared_key, list(dev.allowed_ips.prefixes_of(p1))) == (None, bytes(32), [])


def test_public_key_creates_and_updates():
    dev, iface = configured()
    assert do_set(dev, iface, f"public_key={PK3.hex()}", f"public_key={PK1.hex()}",
                  "endpoint=198.51.100.1:9") == "errno=0\n\n"
    assert list(dev.peers) == [PK1, PK2, PK3]
    assert dev.peers[PK1].endpoint == ("198.51.100.1", 9)
    assert dev.peers[PK1].preshared_key == PSK  # what a request does not name stays


def test_update_only_existing_peer_is_updated():
    dev, iface = configured()
    assert do_set(dev, iface, f"public_key={PK1.hex()}", "update_only=true",
                  "persistent_keepalive_interval=5") == "errno=0\n\n"
    assert dev.peers[PK1].persistent_keepalive == 5


def test_update_only_absent_peer_skips_whole_section():
    dev, iface = configured()
    before = state(dev, iface)
    # Even a prefix named before update_only is not taken from its owner (see module docstring).
    assert do_set(dev, iface, f"public_key={PK3.hex()}", "allowed_ip=10.0.0.0/24",
                  "update_only=true", "endpoint=192.0.2.9:1") == "errno=0\n\n"
    assert state(dev, iface) == before


def test_remove_and_lines_after_it_are_ignored():
    dev, iface = configured()
    assert do_set(dev, iface, f"public_key={PK1.hex()}", "remove=true", "endpoint=192.0.2.9:1",
                  "allowed_ip=10.7.0.0/16", f"public_key={PK3.hex()}", "remove=true") == "errno=0\n\n"
    assert list(dev.peers) == [PK2]
    assert [str(n) for n in dev.allowed_ips.prefixes_of(dev.peers[PK2])] == ["0.0.0.0/0"]
    assert dev.allowed_ips.lookup_exact(ipaddress.ip_network("10.7.0.0/16")) is None


def test_same_peer_twice_in_one_request():
    dev, iface = new_device(), FakeIface()
    assert do_set(dev, iface, f"public_key={PK1.hex()}", "allowed_ip=10.0.0.0/8",
                  f"public_key={PK1.hex()}", "update_only=true", "allowed_ip=10.1.0.0/16") == OK
    prefixes = sorted(str(n) for n in dev.allowed_ips.prefixes_of(dev.peers[PK1]))
    assert prefixes == ["10.0.0.0/8", "10.1.0.0/16"]
    assert do_set(dev, iface, f"public_key={PK1.hex()}", "remove=true",
                  f"public_key={PK1.hex()}", "endpoint=192.0.2.1:1") == "errno=0\n\n"
    p1 = dev.peers[PK1]  # removed, then created afresh
    assert (p1.endpoint, list(dev.allowed_ips.prefixes_of(p1))) == (("192.0.2.1", 1), [])


def test_preshared_key_set_and_zero():
    dev, iface = configured()
    assert do_set(dev, iface, f"public_key={PK2.hex()}", f"preshared_key={PSK.hex()}") == "errno=0\n\n"
    assert dev.peers[PK2].preshared_key == PSK
    assert do_set(dev, iface, f"public_key={PK2.hex()}", f"preshared_key={Z}") == "errno=0\n\n"
    assert dev.peers[PK2].preshared_key == bytes(32)


@pytest.mark.parametrize("text, stored, shown", [
    ("192.0.2.1:51820", ("192.0.2.1", 51820), "192.0.2.1:51820"),
    ("[2001:DB8:0:0:0:0:0:1]:0443", ("2001:db8::1", 443), "[2001:db8::1]:443"),
    ("[fe80::1%eth0]:1", ("fe80::1%eth0", 1), "[fe80::1%eth0]:1"),
    ("[::ffff:192.0.2.1]:2", ("192.0.2.1", 2), "192.0.2.1:2"),  # unmapped, as tunnel.udp does
    ("[::]:0", ("::", 0), "[::]:0"),
])
def test_endpoint_forms(text, stored, shown):
    dev, iface = new_device(), FakeIface()
    assert do_set(dev, iface, f"public_key={PK1.hex()}", f"endpoint={text}") == "errno=0\n\n"
    assert dev.peers[PK1].endpoint == stored
    assert parse_get(get_reply(dev, iface))["peers"][0]["endpoint"] == shown


def test_persistent_keepalive():
    dev, iface = new_device(), FakeIface()
    assert do_set(dev, iface, f"public_key={PK1.hex()}", "persistent_keepalive_interval=65535") == OK
    peer = dev.peers[PK1]
    assert peer.persistent_keepalive == 65535 and peer.keepalive_requested
    assert do_set(dev, iface, f"public_key={PK1.hex()}", "persistent_keepalive_interval=0") == "errno=0\n\n"
    assert peer.persistent_keepalive == 0


def test_allowed_ips_add_mask_move_replace_and_remove():
    dev, iface = configured()
    p1, p2 = dev.peers[PK1], dev.peers[PK2]

    def prefixes(p):
        return sorted(str(n) for n in dev.allowed_ips.prefixes_of(p))

    assert do_set(dev, iface, f"public_key={PK2.hex()}", "allowed_ip=10.0.0.77/24",
                  "allowed_ip=2001:db8::1/128", "allowed_ip=fd00::1234/64") == "errno=0\n\n"
    assert prefixes(p1) == []  # both moved to PK2; host bits cleared
    assert prefixes(p2) == ["0.0.0.0/0", "10.0.0.0/24", "2001:db8::1/128", "fd00::/64"]
    # '-' removes the peer's own prefix (host bits cleared as well), never another peer's.
    assert do_set(dev, iface, f"public_key={PK1.hex()}", "allowed_ip=192.168.1.0/24",
                  "allowed_ip=-0.0.0.0/0", f"public_key={PK2.hex()}", "allowed_ip=-10.0.0.9/24",
                  "allowed_ip=-192.168.1.0/24", "allowed_ip=-172.16.0.0/12") == "errno=0\n\n"
    assert prefixes(p1) == ["192.168.1.0/24"]
    assert prefixes(p2) == ["0.0.0.0/0", "2001:db8::1/128", "fd00::/64"]
    assert do_set(dev, iface, f"public_key={PK2.hex()}", "replace_allowed_ips=true",
                  "allowed_ip=10.2.0.0/16") == "errno=0\n\n"
    assert prefixes(p2) == ["10.2.0.0/16"]
    assert do_set(dev, iface, f"public_key={PK2.hex()}", "replace_allowed_ips=true") == "errno=0\n\n"
    assert prefixes(p2) == [] and prefixes(p1) == ["192.168.1.0/24"]


def test_protocol_version_one_accepted():
    dev, iface = new_device(), FakeIface()
    assert do_set(dev, iface, f"public_key={PK1.hex()}", "protocol_version=1") == "errno=0\n\n"
    assert PK1 in dev.peers


def test_own_public_key_is_ignored_silently():
    dev, iface = configured()
    before = state(dev, iface)
    assert do_set(dev, iface, f"public_key={PUB.hex()}", "endpoint=192.0.2.1:1",
                  "allowed_ip=10.0.0.0/24", "remove=true") == "errno=0\n\n"
    assert state(dev, iface) == before
    # ... judged against the key this same request installs.
    assert do_set(dev, iface, f"private_key={PRIV2.hex()}", f"public_key={public_key(PRIV2).hex()}",
                  f"public_key={PUB.hex()}") == "errno=0\n\n"
    assert set(dev.peers) == {PK1, PK2, PUB}


def test_empty_set_request():
    dev, iface = configured()
    before = state(dev, iface)
    assert request(dev, iface, b"set=1\n\n") == ["errno=0\n\n"]
    assert state(dev, iface) == before and iface.calls == []


def test_peer_limit(monkeypatch):
    monkeypatch.setattr(uapi, "MAX_PEERS", 3)
    dev, iface = configured()  # 2 peers
    before = state(dev, iface)
    pks = [public_key(clamp(bytes([n]) * 32)) for n in range(10, 14)]
    reply = do_set(dev, iface, "listen_port=9", f"public_key={pks[0].hex()}", f"public_key={pks[1].hex()}")
    assert reply == "errno=-22\n\n" and state(dev, iface) == before and iface.calls == []
    # update_only sections, removals, replace_peers and our own key do not count.
    assert do_set(dev, iface, f"public_key={pks[0].hex()}", f"public_key={pks[1].hex()}", "update_only=true",
                  f"public_key={PK1.hex()}", "remove=true", f"public_key={pks[2].hex()}",
                  f"public_key={PUB.hex()}") == "errno=0\n\n"
    assert set(dev.peers) == {PK2, pks[0], pks[2]}
    assert do_set(dev, iface, "replace_peers=true", *(f"public_key={k.hex()}" for k in pks[:3])) == OK
    assert list(dev.peers) == pks[:3]


# ---------------------------------------------------------------------------- all or nothing

GOOD_DEVICE = (f"private_key={PRIV2.hex()}", "listen_port=1111", "fwmark=5", "replace_peers=true")
GOOD_PEER = (f"public_key={PK3.hex()}", "endpoint=192.0.2.3:3", "allowed_ip=10.0.0.0/24")
GOOD_PREFIX = GOOD_DEVICE + GOOD_PEER  # would change every part of the state

BAD_REQUESTS = {
    "private key bad hex": [f"private_key={'g' * 64}"],
    "private key short": [f"private_key={PRIV.hex()[:-2]}"],
    "private key long": [f"private_key={PRIV.hex()}00"],
    "hex with spaces": [f"private_key={PRIV.hex()[:30]}  {PRIV.hex()[32:]}"],  # bytes.fromhex takes it
    "public key short": ["public_key=abcd"],
    "preshared key bad": [f"public_key={PK1.hex()}", f"preshared_key=x{PSK.hex()[1:]}"],
    "port 70000": ["listen_port=70000"],
    "port negative": ["listen_port=-1"],
    "port plus": ["listen_port=+1"],
    "port space": ["listen_port= 1"],
    "port unicode digit": ["listen_port=\u0661"],
    "port hex": ["listen_port=0x10"],
    "port empty": ["listen_port="],
    "fwmark 2^32": ["fwmark=4294967296"],
    "unknown device key": ["hello=1"],
    "empty key": ["=1"],
    "replace_peers false": ["replace_peers=false"],
    "peer key before peer": ["endpoint=192.0.2.1:1"],
    "remove yes": [f"public_key={PK1.hex()}", "remove=yes"],
    "update_only TRUE": [f"public_key={PK1.hex()}", "update_only=TRUE"],
    "replace_allowed_ips 1": [f"public_key={PK1.hex()}", "replace_allowed_ips=1"],
    "unknown peer key": [f"public_key={PK1.hex()}", "hello=1"],
    "endpoint without port": [f"public_key={PK1.hex()}", "endpoint=192.0.2.1"],
    "endpoint empty port": [f"public_key={PK1.hex()}", "endpoint=192.0.2.1:"],
    "endpoint port 65536": [f"public_key={PK1.hex()}", "endpoint=192.0.2.1:65536"],
    "endpoint name": [f"public_key={PK1.hex()}", "endpoint=example.com:1"],
    "endpoint v6 unbracketed": [f"public_key={PK1.hex()}", "endpoint=2001:db8::1:51820"],
    "endpoint v4 bracketed": [f"public_key={PK1.hex()}", "endpoint=[192.0.2.1]:1"],
    "endpoint v4 zone": [f"public_key={PK1.hex()}", "endpoint=192.0.2.1%eth0:1"],
    "endpoint empty zone": [f"public_key={PK1.hex()}", "endpoint=[fe80::1%]:1"],
    "endpoint leading zero v4": [f"public_key={PK1.hex()}", "endpoint=192.0.2.01:1"],
    "endpoint unbalanced": [f"public_key={PK1.hex()}", "endpoint=[::1:1"],
    "cidr missing bits": [f"public_key={PK1.hex()}", "allowed_ip=10.0.0.0"],
    "cidr 33": [f"public_key={PK1.hex()}", "allowed_ip=10.0.0.0/33"],
    "cidr 129": [f"public_key={PK1.hex()}", "allowed_ip=::/129"],
    "cidr leading zero": [f"public_key={PK1.hex()}", "allowed_ip=10.0.0.0/08"],
    "cidr netmask": [f"public_key={PK1.hex()}", "allowed_ip=10.0.0.0/255.0.0.0"],
    "cidr zone": [f"public_key={PK1.hex()}", "allowed_ip=fe80::%eth0/64"],
    "cidr double minus": [f"public_key={PK1.hex()}", "allowed_ip=--10.0.0.0/8"],
    "cidr garbage": [f"public_key={PK1.hex()}", "allowed_ip=10.0.0.x/8"],
    "protocol_version 2": [f"public_key={PK1.hex()}", "protocol_version=2"],
    "protocol_version on device": ["protocol_version=1"],
    "device key after peer": [f"public_key={PK1.hex()}", "listen_port=1"],
    "private key after peer": [f"public_key={PK1.hex()}", f"private_key={PRIV.hex()}"],
    "nul byte": [f"public_key={PK1.hex()}", "protocol_version=1\x00"],
    "latin-1 junk": ["listen_port=\xff"],
}


@pytest.mark.parametrize("bad", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_request_changes_nothing(bad):
    dev, iface = configured()
    before = state(dev, iface)
    # Bad device lines go between the good device lines and the good peer section.
    peer_level = bad[0].startswith("public_key=")
    lines = [*GOOD_DEVICE, *GOOD_PEER, *bad] if peer_level else [*GOOD_DEVICE, *bad, *GOOD_PEER]
    with pytest.raises(UapiError) as exc:
        parse_set(lines)
    assert exc.value.errno == errno.EINVAL
    assert f"line {lines.index(bad[-1]) + 1}:" in exc.value.message
    assert do_set(dev, iface, *lines) == "errno=-22\n\n"
    assert state(dev, iface) == before
    assert iface.calls == []


def test_line_without_equals_is_a_protocol_error():
    dev, iface = configured()
    before = state(dev, iface)
    assert do_set(dev, iface, *GOOD_PREFIX, "allowed_ip") == f"errno=-{errno.EPROTO}\n\n"
    assert state(dev, iface) == before


def test_port_in_use_changes_nothing():
    dev, iface = configured()
    iface.port_error = OSError(errno.EADDRINUSE, "Address already in use")
    before = state(dev, iface)
    assert do_set(dev, iface, *GOOD_PREFIX) == "errno=-98\n\n"
    assert state(dev, iface) == before
    assert iface.calls == [("port", 1111)]  # the fwmark was never tried


def test_fwmark_failure_restores_port_and_changes_nothing_else():
    dev, iface = configured()
    iface.mark_error = OSError(errno.EPERM, "Operation not permitted")
    before = state(dev, iface)
    errors = []
    assert handle(("set", list(GOOD_PREFIX)), dev, iface, on_error=errors.append) == "errno=-1\n\n"
    assert state(dev, iface) == before
    assert iface.calls == [("port", 1111), ("mark", 5), ("port", 51820)]
    assert errors[0].errno == errno.EPERM and "fwmark" in errors[0].message


def test_oserror_without_errno_reports_eaddrinuse():
    dev, iface = configured()
    iface.port_error = OSError("no errno")
    assert do_set(dev, iface, "listen_port=2") == "errno=-98\n\n"


def test_error_messages_never_show_keys():
    secret = PRIV.hex()
    for lines in ([f"private_key={secret[:-1]}"], [f"private_key={secret}0"],
                  [f"public_key={PK1.hex()}", f"preshared_key={secret}x"], [secret], [f"{secret}=1"],
                  [f"public_key={PK1.hex()}", f"{secret}=1"]):
        with pytest.raises(UapiError) as exc:
            parse_set(lines)
        assert secret[:16] not in str(exc.value), lines
    with pytest.raises(UapiError) as exc:
        RequestReader().feed(f"set=1\n\nprivate_key={secret}\n".encode())
    assert exc.value.errno == errno.EPROTO and secret[:16] not in str(exc.value)
    with pytest.raises(UapiError) as exc:
        RequestReader().feed(f"{secret}\n".encode())
    assert secret[:16] not in str(exc.value)


# ---------------------------------------------------------------------------- framing

STREAM = (
    b"get=1\n\n"
    + set_text(f"private_key={PRIV.hex()}", f"public_key={PK1.hex()}", "allowed_ip=10.0.0.0/8")
    + b"set=1\nlisten_port=5\r\n\r\n"  # set lines may end in \\r\\n, as bufio.ScanLines allows
    + b"set=1\n\n"
    + b"get=1\n\n"
)
STREAM_REQUESTS = [
    ("get", None),
    ("set", [f"private_key={PRIV.hex()}", f"public_key={PK1.hex()}", "allowed_ip=10.0.0.0/8"]),
    ("set", ["listen_port=5"]),
    ("set", []),
    ("get", None),
]


def test_reader_multiple_requests_on_one_connection():
    assert RequestReader().feed(STREAM) == STREAM_REQUESTS


def test_reader_split_at_every_byte_boundary():
    for i in range(len(STREAM) + 1):
        r = RequestReader()
        assert r.feed(STREAM[:i]) + r.feed(STREAM[i:]) == STREAM_REQUESTS, i
    r = RequestReader()
    assert [req for b in STREAM for req in r.feed(bytes([b]))] == STREAM_REQUESTS


def test_reader_set_then_get_on_one_connection():
    dev, iface = new_device(None), FakeIface()
    replies = request(dev, iface, set_text(f"private_key={PRIV.hex()}") + b"get=1\n\n")
    assert replies == ["errno=0\n\n", f"private_key={PRIV.hex()}\nerrno=0\n\n"]


@pytest.mark.parametrize("data, code", [
    (b"get=1\nx", errno.EINVAL),  # wireguard-go: "trailing character in UAPI get"
    (b"get=1\r\n\n", errno.EPROTO),  # the operation line is matched exactly
    (b"get=2\n", errno.EPROTO),
    (b"\n", errno.EPROTO),
    (b"GET=1\n", errno.EPROTO),
    (b"set=1 \n", errno.EPROTO),
    (b"a" * 5000, errno.EPROTO),  # caught before any newline arrives
    (b"set=1\n" + b"a" * 4097 + b"\n", errno.EPROTO),
    (b"set=1\n" + b"a=" * 3000, errno.EPROTO),
])
def test_reader_violations(data, code):
    r = RequestReader()
    with pytest.raises(UapiError) as exc:
        r.feed(data)
    assert exc.value.errno == code
    with pytest.raises(UapiError) as again:  # the connection stays failed
        r.feed(b"get=1\n\n")
    assert again.value.errno == code


def test_reader_line_limit_is_4096_bytes():
    line = b"allowed_ip=" + b"1" * (4096 - 11)
    assert RequestReader().feed(b"set=1\n" + line + b"\n\n") == [("set", [line.decode()])]
    assert RequestReader().feed(b"set=1\n" + line + b"\r\n\n") == [("set", [line.decode()])]


def test_reader_error_carries_earlier_requests():
    with pytest.raises(UapiError) as exc:
        RequestReader().feed(b"get=1\n\nset=1\n\nbogus\n")
    assert exc.value.errno == errno.EPROTO
    assert exc.value.requests == [("get", None), ("set", [])]


def test_reader_request_size_limits(monkeypatch):
    monkeypatch.setattr(uapi, "MAX_REQUEST_LINES", 3)
    assert RequestReader().feed(b"set=1\na=1\na=1\na=1\n\n") == [("set", ["a=1"] * 3)]
    with pytest.raises(UapiError) as exc:
        RequestReader().feed(b"set=1\na=1\na=1\na=1\na=1\n")
    assert exc.value.errno == errno.EPROTO
    monkeypatch.setattr(uapi, "MAX_REQUEST_BYTES", 8)
    assert RequestReader().feed(b"set=1\na=1\na=1\n\n") == [("set", ["a=1"] * 2)]
    with pytest.raises(UapiError):
        RequestReader().feed(b"set=1\na=1\na=1\na=1\n")


def test_reader_bytes_reach_parse_set_as_latin1():
    [req] = RequestReader().feed(b"set=1\nlisten_port=\xc3\xa9\x00\n\n")
    assert req == ("set", ["listen_port=\xc3\xa9\x00"])
    with pytest.raises(UapiError) as exc:
        parse_set(req[1])
    assert exc.value.errno == errno.EINVAL


# ---------------------------------------------------------------------------- untrusted input

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
REPLY = r"(errno=-\d+|(?s:.*)errno=0)\n\n"

KEYS = sorted(uapi._DEVICE_KEYS | uapi._PEER_KEYS | {"public_key"})
VALUES = [
    "true", "false", "1", "0", "2", "65535", "65536", "4294967296", "", Z, PRIV.hex(), PK1.hex(), PK2.hex(),
    PUB.hex(), "192.0.2.1:1", "[2001:db8::1]:2", "[fe80::1%eth0]:3", "10.0.0.0/8", "-10.0.0.0/8",
    "::/0", "-::/0", "0.0.0.0/0", "10.1.2.3/33",
]
fuzz_line = st.one_of(
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), st.sampled_from(VALUES)),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), st.text(max_size=30)),
    st.text(max_size=40),
)

VALID_DEVICE = [f"private_key={PRIV2.hex()}", f"private_key={PRIV.hex()}", f"private_key={Z}",
                "listen_port=0", "listen_port=51820", "fwmark=0", "fwmark=7", "replace_peers=true"]
VALID_PEER = [
    "update_only=true", "remove=true", f"preshared_key={PSK.hex()}", f"preshared_key={Z}",
    "endpoint=192.0.2.1:1", "endpoint=[2001:db8::1]:2", "endpoint=[fe80::1%eth0]:3",
    "persistent_keepalive_interval=0", "persistent_keepalive_interval=25", "replace_allowed_ips=true",
    "allowed_ip=10.0.0.0/8", "allowed_ip=-10.0.0.0/8", "allowed_ip=10.0.0.0/24", "allowed_ip=::/0",
    "allowed_ip=-::/0", "allowed_ip=0.0.0.0/0", "allowed_ip=-0.0.0.0/0", "protocol_version=1",
    f"wgpy_via={bytes(range(1, 33)).hex()}", "wgpy_via=", "wgpy_obfuscation=lwo", "wgpy_obfuscation=",
]
section = st.builds(
    lambda pk, lines: [f"public_key={pk.hex()}", *lines],
    st.sampled_from([PK1, PK2, PK3, PUB, public_key(PRIV2)]),
    st.lists(st.sampled_from(VALID_PEER), max_size=6),
)
valid_request = st.builds(
    lambda dev, secs: dev + [line for sec in secs for line in sec],
    st.lists(st.sampled_from(VALID_DEVICE), max_size=4),
    st.lists(section, max_size=4),
)
# Mostly well-formed requests, some with one line replaced or inserted by something random.
fuzz_request = st.one_of(
    valid_request,
    st.builds(lambda lines, i, junk: lines[:i] + [junk] + lines[i + 1 :],
              valid_request, st.integers(0, 30), fuzz_line),
    st.lists(fuzz_line, max_size=25),
)


@FUZZ
@given(st.binary(max_size=600), st.integers(1, 64))
def test_fuzz_arbitrary_bytes(data, chunk):
    dev, iface = configured()
    reader = RequestReader()
    try:
        for i in range(0, len(data), chunk):
            for req in reader.feed(data[i : i + chunk]):
                assert re.fullmatch(REPLY, handle(req, dev, iface))
                if req[0] == "set":
                    try:
                        parse_set(req[1])
                    except UapiError:
                        pass
    except UapiError as e:
        assert e.errno in (errno.EINVAL, errno.EPROTO)


@FUZZ
@given(fuzz_request)
def test_fuzz_structured_set_is_all_or_nothing(lines):
    dev, iface = configured()
    before = state(dev, iface)
    try:
        tx = parse_set(lines)
    except UapiError as e:
        assert e.errno in (errno.EINVAL, errno.EPROTO)
        assert do_set(dev, iface, *lines) == f"errno=-{e.errno}\n\n"
        assert state(dev, iface) == before and iface.calls == []
        return
    apply_set(tx, dev, iface)
    reply = format_get(dev, iface)
    assert reply.endswith("errno=0\n\n")
    # Whatever state a valid request leaves, get describes it and a set of that rebuilds it.
    settable = {"private_key", "listen_port", "fwmark", "public_key", "preshared_key",
                "endpoint", "persistent_keepalive_interval", "allowed_ip"}
    again = [line for line in reply.splitlines() if line.partition("=")[0] in settable]
    dev2, iface2 = new_device(None), FakeIface()
    assert do_set(dev2, iface2, *again) == "errno=0\n\n"
    assert parse_get(format_get(dev2, iface2)) == parse_get(reply)


def model_apply(start: tuple, lines: list[str]) -> tuple:
    """wireguard-go's IpcSetOperation, line by line, on plain data (with update_only on an
    absent peer skipping its section, as tunnel.uapi documents)."""
    private, port, mark, peer_rows = start
    peers = {pk: {"psk": psk, "ep": ep, "pka": pka} for pk, psk, ep, pka, _ in peer_rows}
    owner = {ipaddress.ip_network(n): pk for pk, *_, nets in peer_rows for n in nets}
    endpoints = {"192.0.2.1:1": ("192.0.2.1", 1), "[2001:db8::1]:2": ("2001:db8::1", 2),
                 "[fe80::1%eth0]:3": ("fe80::1%eth0", 3)}

    def drop(pk):
        del peers[pk]
        for net in [n for n, p in owner.items() if p == pk]:
            del owner[net]

    pk, dummy = None, True
    for i, line in enumerate(lines):
        key, _, value = line.partition("=")
        if key == "public_key":
            pk = bytes.fromhex(value)
            section = lines[i + 1 :]
            for j, other in enumerate(section):
                if other.startswith("public_key="):
                    section = section[:j]
                    break
            own = public_key(private) if private is not None else None
            dummy = pk == own or (pk not in peers and "update_only=true" in section)
            if not dummy and pk not in peers:
                peers[pk] = {"psk": bytes(32), "ep": None, "pka": 0}
        elif key == "private_key":
            k = bytes.fromhex(value)
            k = clamp(k) if any(k) else None
            if k is not None and k != private and public_key(k) in peers:
                drop(public_key(k))
            private = k
        elif key == "listen_port":
            port = int(value) or 43210
        elif key == "fwmark":
            mark = int(value)
        elif key == "replace_peers":
            for p in list(peers):
                drop(p)
        elif dummy:
            continue
        elif key == "remove":
            drop(pk)
            dummy = True
        elif key == "preshared_key":
            peers[pk]["psk"] = bytes.fromhex(value)
        elif key == "endpoint":
            peers[pk]["ep"] = endpoints[value]
        elif key == "persistent_keepalive_interval":
            peers[pk]["pka"] = int(value)
        elif key == "replace_allowed_ips":
            for net in [n for n, p in owner.items() if p == pk]:
                del owner[net]
        elif key == "allowed_ip":
            net = ipaddress.ip_network(value.lstrip("-"))
            if not value.startswith("-"):
                owner[net] = pk
            elif owner.get(net) == pk:
                del owner[net]
    return private, port, mark, tuple(
        (p, v["psk"], v["ep"], v["pka"], frozenset(str(n) for n, o in owner.items() if o == p))
        for p, v in peers.items()
    )


@FUZZ
@given(valid_request)
def test_fuzz_apply_matches_line_by_line_model(lines):
    dev, iface = configured()
    before = state(dev, iface)
    assert do_set(dev, iface, *lines) == "errno=0\n\n"
    private, port, mark, rows = state(dev, iface)
    got = private, port, mark, tuple((*row[:4], frozenset(row[4])) for row in rows)
    assert got == model_apply(before, lines)


# ---------------------------------------------------------------------------- wgpy extensions

import base64 as _base64  # noqa: E402

from bridge.spec import parse_bridge  # noqa: E402
from tunnel.uapi import SetBridge, SetEndpoint  # noqa: E402

SS_PASSWORD = "uapi-bridge-secret-pw"
SS_USERINFO = _base64.urlsafe_b64encode(f"aes-256-gcm:{SS_PASSWORD}".encode()).decode().rstrip("=")
SS_BRIDGE = f"ss://{SS_USERINFO}@192.0.2.10:8388"
SS_BRIDGE_V6 = f"ss://aes-128-gcm:{SS_PASSWORD}@[2001:db8::10]:8388"
SS_2022_PSK = _base64.b64encode(bytes(range(32))).decode()
SS_BRIDGE_2022 = f"ss://2022-blake3-aes-256-gcm:{SS_2022_PSK.replace('+', '%2B').replace('/', '%2F')}@192.0.2.12:443"
UDP2TCP_BRIDGE = "udp2tcp://192.0.2.11:443"
UDP2TCP_BRIDGE_V6 = "udp2tcp://[2001:db8::11]:443"


class RecordingIface(FakeIface):
    """FakeIface that also records the peer-level calls, in order."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.peer_calls: list[tuple] = []

    def set_endpoint(self, peer, endpoint) -> None:
        self.peer_calls.append(("endpoint", peer.public_key, endpoint))
        super().set_endpoint(peer, endpoint)

    def set_bridge(self, peer, bridge) -> None:
        self.peer_calls.append(("bridge", peer.public_key, bridge))
        super().set_bridge(peer, bridge)


def bridged() -> tuple[Device, RecordingIface]:
    dev, _ = configured()
    iface = RecordingIface(51820, 0x1234)
    return dev, iface


@pytest.mark.parametrize("value", [SS_BRIDGE, SS_BRIDGE_V6, SS_BRIDGE_2022, UDP2TCP_BRIDGE, UDP2TCP_BRIDGE_V6])
def test_wgpy_bridge_parses_numeric_bridges(value):
    tx = parse_set([f"public_key={PK1.hex()}", f"wgpy_bridge={value}"])
    [section] = tx.peers
    assert section.ops == (SetBridge(parse_bridge(value, numeric=True)),)
    spec = section.ops[0].bridge
    assert spec.numeric and spec.kind == ("udp2tcp" if value.startswith("udp2tcp") else "ss")


def test_wgpy_bridge_empty_value_removes():
    tx = parse_set([f"public_key={PK1.hex()}", "wgpy_bridge="])
    assert tx.peers[0].ops == (SetBridge(None),)


@pytest.mark.parametrize("value", [
    f"ss://{SS_USERINFO}@bridge.example.com:8388",
    f"ss://aes-256-gcm:{SS_PASSWORD}@bridge.example.com:8388",
    "udp2tcp://relay.example.com:443",
])
def test_wgpy_bridge_host_name_refused(value):
    lines = [f"private_key={PRIV.hex()}", f"public_key={PK1.hex()}", "allowed_ip=10.0.0.0/8",
             f"wgpy_bridge={value}"]
    with pytest.raises(UapiError) as exc:
        parse_set(lines)
    assert exc.value.errno == errno.EINVAL
    message = exc.value.message
    assert message.startswith("line 4: ")
    assert "wgpy_bridge" in message
    assert "IP address" in message
    assert SS_PASSWORD not in str(exc.value) and SS_USERINFO[:16] not in str(exc.value)
    assert "example.com" not in message  # the value is never quoted


@pytest.mark.parametrize("value", [
    f"ss://{SS_USERINFO}@192.0.2.10:0",
    f"ss://{SS_USERINFO}@192.0.2.10:8388/?plugin=obfs-local",
    f"ss://rc4-md5:{SS_PASSWORD}@192.0.2.10:8388",
    f"ss://{SS_PASSWORD}@192.0.2.10:8388",
    f"ss://2022-blake3-aes-256-gcm:{SS_PASSWORD}@192.0.2.10:8388",
    f"ss://{SS_USERINFO}@2001:db8::1:8388",
    f"http://{SS_USERINFO}@192.0.2.10:8388",
    f"{SS_PASSWORD}",
    "udp2tcp://192.0.2.11",
    "udp2tcp://192.0.2.11:0",
])
def test_wgpy_bridge_errors_never_show_the_password(value):
    with pytest.raises(UapiError) as exc:
        parse_set([f"public_key={PK1.hex()}", f"wgpy_bridge={value}"])
    assert exc.value.errno == errno.EINVAL
    assert exc.value.message.startswith("line 2: 'wgpy_bridge': ")
    assert SS_PASSWORD not in str(exc.value)
    assert SS_USERINFO[:16] not in str(exc.value)


def test_wgpy_bridge_needs_a_peer():
    with pytest.raises(UapiError) as exc:
        parse_set([f"wgpy_bridge={SS_BRIDGE}"])
    assert exc.value.errno == errno.EINVAL and "line 1:" in exc.value.message
    assert SS_PASSWORD not in str(exc.value)


def test_wgpy_bridge_set_applies_set_bridge_in_line_order():
    dev, iface = bridged()
    assert do_set(dev, iface, f"public_key={PK1.hex()}", "endpoint=192.0.2.50:51820",
                  f"wgpy_bridge={SS_BRIDGE}", f"public_key={PK3.hex()}",
                  f"wgpy_bridge={UDP2TCP_BRIDGE}", "endpoint=[2001:db8::3]:3") == OK
    assert iface.peer_calls == [
        ("endpoint", PK1, ("192.0.2.50", 51820)),
        ("bridge", PK1, parse_bridge(SS_BRIDGE)),
        ("bridge", PK3, parse_bridge(UDP2TCP_BRIDGE)),
        ("endpoint", PK3, ("2001:db8::3", 3)),
    ]
    assert iface.bridges == {PK1: parse_bridge(SS_BRIDGE), PK3: parse_bridge(UDP2TCP_BRIDGE)}
    assert dev.peers[PK1].endpoint == ("192.0.2.50", 51820)
    assert dev.peers[PK3].endpoint == ("2001:db8::3", 3)
    # Empty value: no bridge.
    assert do_set(dev, iface, f"public_key={PK1.hex()}", "wgpy_bridge=") == OK
    assert iface.peer_calls[-1] == ("bridge", PK1, None)
    assert iface.bridges[PK1] is None


def test_endpoint_goes_through_iface_set_endpoint():
    dev, iface = bridged()
    assert request(dev, iface, set_text(f"public_key={PK2.hex()}", "endpoint=[::ffff:192.0.2.9]:9")) == [OK]
    assert iface.peer_calls == [("endpoint", PK2, ("192.0.2.9", 9))]
    assert SetEndpoint(("192.0.2.9", 9)) in parse_set(
        [f"public_key={PK2.hex()}", "endpoint=[::ffff:192.0.2.9]:9"]).peers[0].ops


def test_wgpy_bridge_after_remove_is_ignored():
    dev, iface = bridged()
    assert do_set(dev, iface, f"public_key={PK1.hex()}", "remove=true", f"wgpy_bridge={SS_BRIDGE}") == OK
    assert PK1 not in dev.peers
    assert iface.peer_calls == []


BAD_BRIDGE_LINES = {
    "host name": f"wgpy_bridge=ss://{SS_USERINFO}@ss.example.com:8388",
    "garbage": "wgpy_bridge=nonsense",
    "plugin": f"wgpy_bridge=ss://{SS_USERINFO}@192.0.2.10:8388/?plugin=x",
    "udp2tcp port 0": "wgpy_bridge=udp2tcp://192.0.2.11:0",
}


@pytest.mark.parametrize("bad", BAD_BRIDGE_LINES.values(), ids=BAD_BRIDGE_LINES.keys())
def test_bad_wgpy_bridge_changes_nothing(bad):
    dev, iface = bridged()
    assert do_set(dev, iface, f"public_key={PK2.hex()}", f"wgpy_bridge={UDP2TCP_BRIDGE}") == OK
    iface.peer_calls.clear()
    before = state(dev, iface), dict(iface.bridges)
    lines = [*GOOD_PREFIX, f"public_key={PK1.hex()}", "endpoint=192.0.2.99:1",
             f"wgpy_bridge={SS_BRIDGE}", f"public_key={PK2.hex()}", "wgpy_bridge=", bad]
    errors: list[UapiError] = []
    assert handle(("set", lines), dev, iface, on_error=errors.append) == "errno=-22\n\n"
    assert (state(dev, iface), dict(iface.bridges)) == before
    assert iface.calls == [] and iface.peer_calls == []
    assert errors[0].message.startswith(f"line {len(lines)}: 'wgpy_bridge': ")
    assert SS_PASSWORD not in str(errors[0])


def test_get_1_never_shows_extensions():
    dev, iface = bridged()
    plain = get_reply(dev, iface)
    assert do_set(dev, iface, f"public_key={PK1.hex()}", f"wgpy_bridge={SS_BRIDGE}",
                  f"public_key={PK2.hex()}", f"wgpy_bridge={UDP2TCP_BRIDGE}") == OK
    reply = get_reply(dev, iface)
    assert "wgpy_" not in reply
    assert SS_PASSWORD not in reply
    assert reply == plain  # a bridge changes nothing get=1 shows (the iface owns the endpoint)
    assert format_get(dev, iface) == reply


def test_get_wgpy_adds_extension_lines_per_peer():
    dev, iface = bridged()
    assert do_set(dev, iface, f"public_key={PK2.hex()}", f"wgpy_bridge={UDP2TCP_BRIDGE}") == OK
    [reply] = request(dev, iface, b"get=wgpy\n\n")
    assert reply.endswith("errno=0\n\n")
    lines = reply.splitlines()
    assert lines.count(f"wgpy_bridge={UDP2TCP_BRIDGE}") == 1
    # In PK2's section (after its allowed_ip lines), not PK1's.
    at = lines.index(f"wgpy_bridge={UDP2TCP_BRIDGE}")
    owner = [line for line in lines[:at] if line.startswith("public_key=")][-1]
    assert owner == f"public_key={PK2.hex()}"
    assert lines[at - 1] == "allowed_ip=0.0.0.0/0"
    # Without the extension lines it is exactly get=1's reply.
    assert "\n".join(line for line in lines if not line.startswith("wgpy_")) + "\n" == get_reply(dev, iface)
    assert format_get(dev, iface, extensions=True) == reply
    # A peer without a bridge has no extension lines; no peers, no lines.
    assert handle(("get-wgpy", None), new_device(None), FakeIface()) == OK


def test_reader_get_wgpy():
    assert RequestReader().feed(b"get=wgpy\n\n") == [("get-wgpy", None)]
    stream = b"get=wgpy\n\nget=1\n\n" + set_text("listen_port=1") + b"get=wgpy\n\n"
    expected = [("get-wgpy", None), ("get", None), ("set", ["listen_port=1"]), ("get-wgpy", None)]
    assert RequestReader().feed(stream) == expected
    for i in range(len(stream) + 1):
        r = RequestReader()
        assert r.feed(stream[:i]) + r.feed(stream[i:]) == expected, i


@pytest.mark.parametrize("data, code", [
    (b"get=wgpy\nx", errno.EINVAL),  # like get=1: one more byte, and it must be '\n'
    (b"get=1\nx", errno.EINVAL),
    (b"get=wgpy\r\n\n", errno.EPROTO),
    (b"get=WGPY\n\n", errno.EPROTO),
    (b"get=wgpy2\n\n", errno.EPROTO),
    (b"set=wgpy\n\n", errno.EPROTO),
])
def test_reader_get_wgpy_violations(data, code):
    r = RequestReader()
    with pytest.raises(UapiError) as exc:
        r.feed(data)
    assert exc.value.errno == code
    with pytest.raises(UapiError):
        r.feed(b"get=wgpy\n\n")


# ---------------------------------------------------------------------------- client side

import socket as _socket  # noqa: E402
import threading as _threading  # noqa: E402

from tunnel.uapi import ControlError, get_status, list_interfaces, parse_get_reply, set_config  # noqa: E402


def test_get_reply_parses_back_to_what_the_device_holds():
    dev, iface = configured()
    reply = get_reply(dev, iface)
    status = parse_get_reply("wg9", reply[: -len("errno=0\n\n")])
    assert (status.name, status.private_key, status.public_key) == ("wg9", PRIV, public_key(PRIV))
    assert (status.listen_port, status.fwmark) == (51820, 0x1234)
    p1, p2 = status.peers
    assert (p1.public_key, p1.preshared_key, p1.endpoint, p1.persistent_keepalive) == (PK1, PSK, ("192.0.2.1", 51820), 25)
    assert [str(n) for n in p1.allowed_ips] == ["10.0.0.0/24", "fd00::/64"]
    assert (p2.public_key, p2.preshared_key, p2.endpoint) == (PK2, None, ("2001:db8::1", 443))
    assert PRIV.hex() not in repr(status) and PSK.hex() not in repr(status)
    assert str(PRIV) not in repr(status) and str(PSK) not in repr(status)


@pytest.mark.parametrize("text", [
    "listen_port=x", f"public_key={PK1.hex()}\nendpoint=example.com:1", f"public_key={PK1.hex()}\nrx_bytes=-1",
    "private_key=abc", f"public_key={PK1.hex()}\nallowed_ip=10.0.0.0", "junk",
])
def test_malformed_get_reply_is_a_control_error(text):
    with pytest.raises(ControlError, match="wg9: malformed reply") as info:
        parse_get_reply("wg9", text)
    assert "abc" not in str(info.value)


def _serve_once(path: str, replies: list[bytes], received: list[bytes]) -> _threading.Thread:
    """A UNIX socket answering one request per connection with the next reply."""
    server = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    server.bind(path)
    server.listen()

    def run() -> None:
        with server:
            for reply in replies:
                conn, _ = server.accept()
                with conn:
                    data = b""
                    while not data.endswith(b"\n\n"):
                        data += conn.recv(4096)
                    received.append(data)
                    conn.sendall(reply)

    thread = _threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_client_get_falls_back_to_get_1_and_set_reports_refusal(tmp_path):
    dev, iface = configured()
    received: list[bytes] = []
    # wireguard-go closes the connection on get=wgpy: the client asks get=1 instead.
    thread = _serve_once(str(tmp_path / "wg9.sock"), [b"", get_reply(dev, iface).encode(), b"errno=-22\n\n"],
                         received)
    assert list_interfaces(str(tmp_path)) == ["wg9"]
    status = get_status("wg9", str(tmp_path))
    assert [p.public_key for p in status.peers] == [PK1, PK2]
    with pytest.raises(ControlError, match="wg9: the daemon refused the request"):
        set_config("wg9", ["listen_port=1"], str(tmp_path))
    thread.join(5)
    assert received == [b"get=wgpy\n\n", b"get=1\n\n", b"set=1\nlisten_port=1\n\n"]
    with pytest.raises(ControlError, match="no such WireGuard interface"):
        get_status("wg8", str(tmp_path))


# ---------------------------------------------------------------------------- wgpy_obfuscation


def test_wgpy_obfuscation_is_parsed_applied_and_read_back():
    tx = parse_set([f"public_key={PK1.hex()}", "wgpy_obfuscation=lwo", f"public_key={PK2.hex()}", "wgpy_obfuscation="])
    assert tx.peers[0].ops == (uapi.SetObfuscation("lwo"),) and tx.peers[1].ops == (uapi.SetObfuscation(None),)
    dev, iface = configured()
    apply_set(tx, dev, iface)
    assert iface.obfuscation == {PK1: "lwo", PK2: None}
    status = uapi.parse_get_reply("wg0", f"public_key={PK1.hex()}\nwgpy_obfuscation=lwo\npublic_key={PK2.hex()}\n")
    assert [p.obfuscation for p in status.peers] == ["lwo", None]


@pytest.mark.parametrize("value", ["LWO", "xor", "lwo ", "on", "1"])
def test_wgpy_obfuscation_refuses_what_it_does_not_know(value):
    with pytest.raises(UapiError) as info:
        parse_set([f"public_key={PK1.hex()}", f"wgpy_obfuscation={value}"])
    assert info.value.errno == uapi.EINVAL and "line 2: 'wgpy_obfuscation'" in info.value.message
    assert "lwo, or empty" in info.value.message
