"""LWO between two wgpy-daemons through a "router" namespace that blocks WireGuard the way a simple
DPI box does: nftables drops every forwarded UDP datagram whose payload starts with a WireGuard
message type (1..4) followed by three zero bytes. Plain WireGuard cannot complete a handshake
through it; the same two daemons with `wgpy_obfuscation=lwo` on both sides carry pings.

    a (wgpy-daemon) --veth-- r (forwarding, nft drop rule) --veth-- b (wgpy-daemon)

Everything lives in the lab's namespaces (tests/netns/netlab.py), removed pass or fail; the
daemons are the lab's processes (stopped by pid)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from .netlab import missing_requirements
from .uapi_client import UapiClient
from .wg_peers import PeerConf, WgInterface

WGPY = str(Path(sys.executable).with_name("wgpy"))
A_LINK, B_LINK = "10.222.1.1", "10.222.2.2"
A_TUN, B_TUN = "10.223.0.1", "10.223.0.2"
PORT = 51820

DPI_RULES = """
table inet wgpy_test_dpi {
    chain forward {
        type filter hook forward priority 0; policy accept;
        meta l4proto udp @th,64,32 { 0x01000000, 0x02000000, 0x03000000, 0x04000000 } counter drop
    }
}
"""


@pytest.fixture(autouse=True)
def _needs_tools():
    reason = missing_requirements(("wg", "ping", "nft"), need_tun=True)
    if reason:
        pytest.skip(reason)


def dropped(r) -> int:
    """Packets the DPI rule has dropped so far."""
    ruleset = json.loads(r.run(["nft", "-j", "list", "table", "inet", "wgpy_test_dpi"]).stdout)
    return sum(item["rule"]["expr"][-2]["counter"]["packets"]
               for item in ruleset["nftables"] if "rule" in item)


def set_lwo(wg: WgInterface, peer: WgInterface, value: str) -> None:
    with UapiClient(wg.socket_path) as c:
        c.send(f"set=1\npublic_key={peer.keys.public.hex()}\nwgpy_obfuscation={value}\n\n".encode())
        reply = c.reply()
    assert reply.errno == 0, reply


def ping(ns, target: str, count: int, deadline: int) -> int:
    """Replies received (ping stops at `count` replies or after `deadline` seconds)."""
    r = ns.run(["ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-w", str(deadline), target],
               check=False, timeout=deadline + 5)
    for line in r.stdout.splitlines():
        if "received" in line:
            return int(line.split(",")[1].split()[0])
    return 0


def test_lwo_gets_through_a_router_that_drops_wireguard(netlab):
    a, r, b = netlab.netns("lwoa"), netlab.netns("lwor"), netlab.netns("lwob")
    netlab.veth(a, r, addrs_a=[f"{A_LINK}/24"], addrs_b=["10.222.1.254/24"])
    netlab.veth(r, b, addrs_a=["10.222.2.254/24"], addrs_b=[f"{B_LINK}/24"])
    a.ip("route", "add", "default", "via", "10.222.1.254")
    b.ip("route", "add", "default", "via", "10.222.2.254")
    r.run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
    r.run(["nft", "-f", "-"], input=DPI_RULES)

    wa = WgInterface(netlab, a, "wgpy").start()
    wb = WgInterface(netlab, b, "wgpy").start()
    wa.setconf(listen_port=PORT, peers=[wb.peer_conf([f"{B_TUN}/32"], f"{B_LINK}:{PORT}")])
    wb.setconf(listen_port=PORT, peers=[PeerConf(wa.keys.public_b64, [f"{A_TUN}/32"])])
    wa.address(f"{A_TUN}/24")
    wb.address(f"{B_TUN}/24")
    assert ping(a, B_LINK, 1, 3) == 1  # the router forwards ordinary traffic

    # Plain WireGuard: the initiation never arrives, no handshake, no reply.
    assert ping(a, B_TUN, 2, 3) == 0
    blocked = dropped(r)
    assert blocked >= 1, "the DPI rule matched no plain WireGuard"
    assert wb.dump()["peers"][wa.keys.public_b64]["latest_handshake"] == 0
    assert wa.dump()["peers"][wb.keys.public_b64]["latest_handshake"] == 0

    # LWO on both sides (b's peer a has no endpoint: b learns it from a's LWO datagrams).
    set_lwo(wa, wb, "lwo")
    set_lwo(wb, wa, "lwo")
    start = time.monotonic()
    # At least one reply: the requests sent while the handshake waited out REKEY_TIMEOUT (the plain
    # attempt above may have just sent one) are staged and all answered at once.
    assert ping(a, B_TUN, 1, 15) >= 1, wa.log()[-3000:] + wb.log()[-3000:]
    assert ping(a, B_TUN, 5, 5) == 5 and ping(b, A_TUN, 3, 5) == 3
    assert time.monotonic() - start < 20
    assert dropped(r) == blocked, "something that looks like WireGuard crossed the router"
    assert wb.dump()["peers"][wa.keys.public_b64]["endpoint"] == f"{A_LINK}:{PORT}"
    show = a.run([WGPY, "show", wa.ifname]).stdout
    assert "obfuscation: lwo" in show, show

    # LWO off again on a: its datagrams are plain, dropped; b (still LWO) gets nothing new.
    set_lwo(wa, wb, "")
    rx = wb.dump()["peers"][wa.keys.public_b64]["rx"]
    assert ping(a, B_TUN, 2, 3) == 0
    assert dropped(r) > blocked and wb.dump()["peers"][wa.keys.public_b64]["rx"] == rx
