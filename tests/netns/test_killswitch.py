"""Kill switch and DNS leak protection (`KillSwitch = on`, `AllowLAN = on`, tunnel/killswitch.py)
with real peers:

    client (wgpy up) --veth-- router (counts every packet from the client) --veth-- server

The router's nftables counters see every IP packet arriving from the client (link-scope IPv6
multicast aside: router solicitations and MLD a fresh link sends by itself, which never leave
the link): the first hop's own packets in their counter(s), everything else in `other`. The
server is a wgpy-daemon configured with `wg setconf`, with a UDP echo on port 53 and 5353 (a
stand-in resolver: the tests only need a datagram to come back).

- full tunnel: only the first hop reaches the router; LAN, IPv6 (the tunnel carries none) and
  DNS to anything but the configured server (even through the tunnel) are dropped, while DNS to
  it and other ports through the tunnel work; after the daemon is SIGKILLed nothing at all
  leaves, until `wgpy down`; `up` again on top of the dead one replaces the table; after `down`
  the client's ruleset is exactly what it was, and the same traffic then reaches the router (the
  counters can fail);
- `up` failing half-way (PostUp) leaves the ruleset as it was;
- AllowLAN with a split tunnel: private and link-local destinations pass, a public one does not;
- the allowed set follows the endpoint: `wg set ... endpoint` (at once) and roaming (the server
  answers from another address); the old endpoint is refused even with the daemon's mark;
- bridges (udp2tcp over TCP, Shadowsocks over UDP, `wgpy bridge serve` on the server): only the
  bridge's server, by its protocol;
- multihop (tests/netns/multihop_lab.py): only the entry relay; `via off` adds the exit.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from tunnel.killswitch import table_name
from tunnel.netconfig import probe_socket

from .multihop_lab import E_LINK4, WG_PORT, X_LINK4, DEST4, MultihopLab
from .netlab import Namespace, NetLab, missing_requirements, unique_ifname
from .traffic import ping, received, udp_echo, wait_for_ping
from .wg_peers import Keys, PeerConf, WgInterface

pytestmark = pytest.mark.netns
WGPY = str(Path(sys.executable).with_name("wgpy"))
SO_MARK = getattr(socket, "SO_MARK", 36)

C4, C6 = "10.220.1.2", "fd20:1::2"  # the client on its link
R4, R6 = "10.220.1.1", "fd20:1::1"  # the router, client side
RS4 = "10.220.2.1"                  # the router, server side
S4, S4B = "10.220.2.2", "10.220.2.3"  # the server's two addresses
PUBLIC = "198.51.100.7"             # a non-private address behind the router (on the server)
TUN_C, TUN_S = "10.77.0.2", "10.77.0.1"
PORT = 51820
UDP2TCP_PORT, SS_PORT, SS_PW = 443, 8388, "ks-bridge-pw"
BLOCKED_WAIT = 1.0  # how long a probe that must get no answer waits


@pytest.fixture(autouse=True)
def _needs_tools():
    reason = missing_requirements(("ip", "wg", "ping", "nft"), need_tun=True)
    if reason:
        pytest.skip(reason)


def nft(ns: Namespace, text: str) -> None:
    ns.run(["nft", "-f", "-"], input=text)


class Lab:
    """client -- router -- server; the router forwards and counts what the client sends."""

    def __init__(self, netlab: NetLab) -> None:
        self.netlab = netlab
        c, r, s = netlab.netns("kscli"), netlab.netns("ksrtr"), netlab.netns("kssrv")
        self.c, self.r, self.s = c, r, s
        self.c_link, self.r_link = netlab.veth(c, r, addrs_a=[f"{C4}/24", f"{C6}/64"], addrs_b=[f"{R4}/24", f"{R6}/64"])
        self.r_srv, self.s_link = netlab.veth(r, s, addrs_a=[f"{RS4}/24"], addrs_b=[f"{S4}/24", f"{S4B}/24"])
        s.addr_add(self.s_link, f"{PUBLIC}/32")
        c.ip("-4", "route", "add", "default", "via", R4)
        c.ip("-6", "route", "add", "default", "via", R6)
        s.ip("-4", "route", "add", "default", "via", RS4)
        r.ip("-4", "route", "add", f"{PUBLIC}/32", "via", S4)
        r.run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        r.run(["sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1"])
        # `ip netns exec` puts /etc/netns/NS/resolv.conf over /etc/resolv.conf: DNS = stays here.
        d = f"/etc/netns/{c.name}"
        os.makedirs(d, exist_ok=True)
        with open(f"{d}/resolv.conf", "w") as f:
            f.write("nameserver 192.0.2.53\n")
        netlab.defer(lambda: (os.unlink(f"{d}/resolv.conf"), os.rmdir(d)))
        self.client_keys = Keys()
        self.server = WgInterface(netlab, s, "wgpy").start()
        self.server.setconf(listen_port=PORT, peers=[PeerConf(self.client_keys.public_b64, [f"{TUN_C}/32"])])
        self.server.address(f"{TUN_S}/24")
        for port in (53, 5353):
            udp_echo(netlab, s, ("0.0.0.0", port))
        self.ifname = unique_ifname("wgks")
        self.path = os.path.join(netlab.tmpdir, f"{self.ifname}.conf")
        ifname = self.ifname
        for leftover in (f"/var/log/wgpy/{ifname}.log",):
            netlab.defer(lambda p=leftover: os.path.exists(p) and os.unlink(p))
        # A test that fails with the tunnel up still takes it down (journal, table) before the
        # namespaces go.
        netlab.defer(lambda: self.wgpy("down", self.path) if os.path.exists(self.path) else None)

    # ---- counting at the router

    def watch(self, **allowed: str) -> None:
        """(Re)start counting every IP packet arriving from the client: each `allowed` match in
        its own counter, the rest in `other`."""
        self.r.run(["nft", "delete", "table", "inet", "kswatch"], check=False)
        names = [*allowed, "other"]
        rules = "".join(f"    {match} counter name {name} accept\n" for name, match in allowed.items())
        nft(self.r, "table inet kswatch {\n" + "".join(f"  counter {n} {{}}\n" for n in names)
            + "  chain watch {\n    type filter hook prerouting priority -400; policy accept;\n"
            + f'    iifname != "{self.r_link}" accept\n' + rules
            + "    ip6 daddr ff02::/16 accept\n    counter name other\n  }\n}\n")

    def counters(self) -> dict[str, int]:
        data = json.loads(self.r.run(["nft", "-j", "list", "counters", "table", "inet", "kswatch"]).stdout)
        return {o["counter"]["name"]: o["counter"]["packets"] for o in data["nftables"] if "counter" in o}

    # ---- the client

    def config(self, *, endpoint: str = S4, allowed: str = "0.0.0.0/0", extra: str = "KillSwitch = on\n",
               peer_extra: str = "") -> str:
        return (f"[Interface]\nPrivateKey = {self.client_keys.private_b64}\nAddress = {TUN_C}/24\n{extra}"
                f"\n[Peer]\nPublicKey = {self.server.keys.public_b64}\nEndpoint = {endpoint}:{PORT}\n"
                f"AllowedIPs = {allowed}\nPersistentKeepalive = 1\n{peer_extra}")

    def write(self, text: str) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)

    def wgpy(self, *args: str, check: bool = False):
        r = self.c.run([WGPY, *args], check=False, timeout=60)
        if check:
            assert r.returncode == 0, r.stdout + r.stderr
        return r

    def up(self, text: str) -> None:
        self.write(text)
        self.wgpy("up", self.path, check=True)

    def ruleset(self) -> str:
        return self.c.run(["nft", "list", "ruleset"]).stdout

    def allowed_hops(self) -> set[tuple[str, str, int]]:
        """The kill switch's first-hop sets: {(address, proto, port)}."""
        out = set()
        for name in ("hops4", "hops6"):
            data = json.loads(self.c.run(["nft", "-j", "list", "set", "inet", table_name(self.ifname), name]).stdout)
            for o in data["nftables"]:
                for elem in o.get("set", {}).get("elem", []):
                    _, addr, proto, port = elem["concat"]
                    out.add((addr, proto, port))
        return out

    def wait_hops(self, want: set, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while self.allowed_hops() != want:
            assert time.monotonic() < deadline, (self.allowed_hops(), want, self.log())
            time.sleep(0.05)

    def daemon_pid(self) -> int:
        state, pid = probe_socket(f"/var/run/wireguard/{self.ifname}.sock")
        assert state == "live" and pid, state
        return pid

    def log(self) -> str:
        try:
            with open(f"/var/log/wgpy/{self.ifname}.log", errors="replace") as f:
                return f.read()[-3000:]
        except OSError:
            return ""

    def fwmark(self) -> int:
        return json.loads(self.wgpy("show", self.ifname, "--json", check=True).stdout)[0]["fwmark"]

    # ---- probes from the client

    def udp_answered(self, dst: str, port: int, *, mark: int = 0, wait: float = BLOCKED_WAIT) -> bool:
        """One datagram to dst:port; whether the echo came back within `wait` seconds."""
        sock = self.c.socket(socket.AF_INET6 if ":" in dst else socket.AF_INET, socket.SOCK_DGRAM)
        if mark:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        sock.settimeout(wait)
        try:
            sock.sendto(b"probe", (dst, port))
            return sock.recv(100) == b"probe"
        except OSError:  # timeout, or the kernel refused to send
            return False
        finally:
            sock.close()

    def tcp_connects(self, dst: str, port: int, wait: float = BLOCKED_WAIT) -> bool:
        sock = self.c.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(wait)
        try:
            sock.connect((dst, port))
            return True
        except OSError:
            return False
        finally:
            sock.close()

    def pings(self, dst: str, count: int = 2) -> int:
        return received(ping(self.c, dst, count=count, wait=BLOCKED_WAIT, interval=0.2))


@pytest.fixture
def lab(netlab) -> Lab:
    return Lab(netlab)


def _ruleset_diff(before: str, after: str) -> str:
    return f"--- before\n{before}\n--- after\n{after}"


def test_full_tunnel_only_the_first_hop_leaves_also_after_sigkill_until_down(lab):
    lab.c.run(["nft", "-f", "-"], input="table inet bystander {\n  chain c { type filter hook output priority 10; }\n}\n")
    before = lab.ruleset()
    lab.watch(hop=f"ip daddr {S4} udp dport {PORT}")
    lab.up(lab.config(extra=f"KillSwitch = on\nDNS = {TUN_S}\n"))
    table = table_name(lab.ifname)
    assert f"table inet {table}" in lab.ruleset() and "table inet bystander" in lab.ruleset()
    assert lab.allowed_hops() == {(S4, "udp", PORT)}
    shown = lab.wgpy("show", lab.ifname, check=True).stdout
    assert "\n  kill switch: on\n" in shown, shown

    assert wait_for_ping(lab.c, TUN_S, 10) is not None, lab.log()
    assert lab.pings(S4) == 2  # the server's link address, through the tunnel
    # DNS: the configured server through the tunnel answers; another resolver (reachable
    # through the tunnel, as port 5353 shows) does not, over UDP or TCP (53, DoT 853).
    assert lab.udp_answered(TUN_S, 53)
    assert lab.udp_answered(S4, 5353) and not lab.udp_answered(S4, 53)
    assert not lab.tcp_connects(S4, 853) and not lab.tcp_connects(S4, 53)
    # Outside the tunnel nothing leaves: the router itself (LAN), IPv6 (the tunnel has none).
    assert lab.pings(R4) == 0 and lab.pings(R6) == 0
    assert not lab.udp_answered(R4, 53)
    seen = lab.counters()
    assert seen["other"] == 0 and seen["hop"] > 0, seen

    # The daemon dies: the table stays, nothing leaves, not even the first hop's traffic.
    pid = lab.daemon_pid()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while lab.c.link_exists(lab.ifname):
        assert time.monotonic() < deadline, "the interface outlived its daemon"
        time.sleep(0.05)
    assert f"table inet {table}" in lab.ruleset()
    lab.watch(hop=f"ip daddr {S4} udp dport {PORT}")
    for dst in (TUN_S, S4, R4, PUBLIC, R6):
        assert lab.pings(dst, count=1) == 0, dst
    assert not lab.udp_answered(S4, 53) and not lab.udp_answered(R4, 53) and not lab.udp_answered(TUN_S, 53)
    assert not lab.tcp_connects(PUBLIC, 80)
    assert lab.counters() == {"hop": 0, "other": 0}

    # `up` again on top of the dead one: one table, replaced, and the tunnel works again.
    lab.wgpy("up", lab.path, check=True)
    assert lab.ruleset().count(f"table inet {table}") == 1
    assert wait_for_ping(lab.c, TUN_S, 10) is not None, lab.log()
    os.kill(lab.daemon_pid(), signal.SIGKILL)

    # `down` after the kill: everything as before, and the same probes now reach the router.
    lab.wgpy("down", lab.path, check=True)
    after = lab.ruleset()
    assert after == before, _ruleset_diff(before, after)
    assert lab.pings(R4) == 2
    assert lab.counters()["other"] > 0


def test_up_failing_half_way_removes_the_kill_switch(lab):
    # Another interface's kill switch: refused before anything changes (each would drop the
    # other's tunnel).
    nft(lab.c, "table inet wgpy-ks-wgother {\n}\n")
    before = lab.ruleset()
    lab.write(lab.config())
    r = lab.wgpy("up", lab.path)
    assert r.returncode == 1 and "another kill switch is active here (nftables table inet wgpy-ks-wgother)" in r.stderr
    assert r.stderr.startswith(f"wgpy: {lab.path}:4: "), r.stderr  # the KillSwitch line
    assert lab.ruleset() == before and not lab.c.link_exists(lab.ifname)
    lab.c.run(["nft", "delete", "table", "inet", "wgpy-ks-wgother"])

    before = lab.ruleset()
    lab.write(lab.config(extra=f"KillSwitch = on\nDNS = {TUN_S}\nPostUp = exit 1\n"))
    r = lab.wgpy("up", lab.path)
    assert r.returncode == 1 and "PostUp" in r.stderr, r.stderr
    assert lab.ruleset() == before
    assert not lab.c.link_exists(lab.ifname)


def test_allow_lan_with_a_split_tunnel(lab):
    lab.watch(hop=f"ip daddr {S4} udp dport {PORT}", lan4=f"ip daddr {R4}", lan6="ip6 daddr fe80::/10")
    lab.up(lab.config(allowed=f"{TUN_S}/32", extra="KillSwitch = on\nAllowLAN = on\n"))
    assert wait_for_ping(lab.c, TUN_S, 10) is not None, lab.log()
    assert lab.pings(R4) == 2  # private: the LAN
    router_ll = lab.r.run(["ip", "-6", "-brief", "addr", "show", "dev", lab.r_link]).stdout.split()[-1].split("/")[0]
    # IPv6 link-local: allowed with AllowLAN (the first neighbour solicitation on a fresh link
    # may be lost: wait for the first answer)
    assert wait_for_ping(lab.c, f"{router_ll}%{lab.c_link}", 5) is not None
    assert lab.pings(R6) == 0  # IPv6 beyond the link: the tunnel carries none
    assert lab.pings(PUBLIC) == 0 and not lab.udp_answered(PUBLIC, 5353)  # public, outside the tunnel
    seen = lab.counters()
    assert seen["other"] == 0 and seen["lan4"] >= 2 and seen["lan6"] >= 1 and seen["hop"] > 0, seen
    # `wgpy show` says so, and says when the table is gone (deleted by hand: nothing is blocked).
    shown = lab.wgpy("show", lab.ifname, check=True).stdout
    assert "\n  kill switch: on (allow LAN)\n" in shown, shown
    lab.c.run(["nft", "delete", "table", "inet", table_name(lab.ifname)])
    shown = lab.wgpy("show", lab.ifname, check=True).stdout
    assert "\n  kill switch: on (allow LAN), table missing!" in shown, shown
    assert json.loads(lab.wgpy("show", lab.ifname, "--json", check=True).stdout)[0]["kill_switch"] == {
        "table": f"inet {table_name(lab.ifname)}", "made_by_up": True, "allow_lan": True, "table_present": False}


def test_the_allowed_set_follows_the_endpoint(lab):
    lab.watch(hop_a=f"ip daddr {S4} udp dport {PORT}", hop_b=f"ip daddr {S4B} udp dport {PORT}")
    lab.up(lab.config())
    assert wait_for_ping(lab.c, TUN_S, 10) is not None, lab.log()
    mark = lab.fwmark()
    assert mark and lab.allowed_hops() == {(S4, "udp", PORT)}

    # `wg set` moves the endpoint to the server's second address: the set follows at once
    # (the client's keepalives go there), and the old endpoint is refused, even to a socket
    # with the daemon's mark. (No data yet: the server would answer from its first address.)
    lab.c.run(["wg", "set", lab.ifname, "peer", lab.server.keys.public_b64, "endpoint", f"{S4B}:{PORT}"])
    lab.wait_hops({(S4B, "udp", PORT)}, timeout=1.0)
    deadline = time.monotonic() + 3
    while lab.counters()["hop_b"] == 0:
        assert time.monotonic() < deadline, lab.counters()
        time.sleep(0.1)
    seen = lab.counters()
    assert not lab.udp_answered(S4, PORT, mark=mark, wait=0.2)
    assert lab.counters()["hop_a"] == seen["hop_a"] and lab.counters()["other"] == 0

    # Roaming: the server answers the ping from its first address (its route's source), so the
    # client's daemon moves back there by itself, and the set follows within its poll.
    assert wait_for_ping(lab.c, TUN_S, 10) is not None, lab.log()
    lab.wait_hops({(S4, "udp", PORT)}, timeout=2.0)
    assert wait_for_ping(lab.c, TUN_S, 10) is not None, lab.log()
    after = lab.counters()
    assert after["hop_a"] > seen["hop_a"] and after["other"] == 0, after


@pytest.mark.parametrize("carrier", ["udp2tcp", "ss"])
def test_bridge_only_the_bridge_server_leaves(lab, carrier):
    listen = {"udp2tcp": f"udp2tcp://0.0.0.0:{UDP2TCP_PORT}", "ss": f"ss://aes-256-gcm:{SS_PW}@0.0.0.0:{SS_PORT}"}
    uri = {"udp2tcp": f"udp2tcp://{S4}:{UDP2TCP_PORT}", "ss": f"ss://aes-256-gcm:{SS_PW}@{S4}:{SS_PORT}"}
    hop = {"udp2tcp": ("tcp", UDP2TCP_PORT), "ss": ("udp", SS_PORT)}[carrier]
    server = lab.s.popen([WGPY, "bridge", "serve", "--listen", listen[carrier], "--allow", f"127.0.0.1:{PORT}"])
    deadline = time.monotonic() + 10
    while "ready" not in server.output():
        assert server.poll() is None and time.monotonic() < deadline, server.output()
        time.sleep(0.05)
    lab.watch(hop=f"ip daddr {S4} {hop[0]} dport {hop[1]}")
    lab.up(lab.config(endpoint="127.0.0.1", peer_extra=f"Bridge = {uri[carrier]}\n"))
    assert lab.allowed_hops() == {(S4, *hop)}
    assert wait_for_ping(lab.c, TUN_S, 10) is not None, lab.log()
    assert lab.pings(S4) == 2
    # WireGuard straight to the server, with the daemon's mark: not a first hop.
    assert not lab.udp_answered(S4, PORT, mark=lab.fwmark(), wait=0.3)
    seen = lab.counters()
    assert seen["other"] == 0 and seen["hop"] > 0, seen


@pytest.fixture
def multihop(netlab) -> MultihopLab:
    reason = missing_requirements(("wireguard-go",))
    if reason:
        pytest.skip(reason)
    return MultihopLab(netlab, "wireguard-go")


def test_multihop_only_the_entry_relay_leaves(multihop):
    m = multihop
    config = m.client_config(via=True).replace("[Interface]\n", "[Interface]\nKillSwitch = on\n", 1)
    m.watch_client_link()
    with m.client(config) as ifname:
        table = table_name(ifname)

        def hops():
            data = json.loads(m.client_ns.run(["nft", "-j", "list", "set", "inet", table, "hops4"]).stdout)
            return {tuple(e["concat"][1:]) for o in data["nftables"] for e in o.get("set", {}).get("elem", [])}

        assert hops() == {(E_LINK4, "udp", WG_PORT)}
        r = ping(m.client_ns, DEST4, count=3, wait=3)
        assert received(r) == 3, r.stdout + m.client_log(ifname)
        seen = m.counters()
        assert seen["client"]["other"] == 0 and seen["client"]["entry"] > 0, seen
        # The exit reached directly instead (via off): its endpoint joins the set at once.
        r = m.wgpy("set", ifname, "peer", m.exit.keys.public_b64, "via", "off")
        assert r.returncode == 0, r.stderr
        deadline = time.monotonic() + 2
        while hops() != {(E_LINK4, "udp", WG_PORT), (X_LINK4, "udp", WG_PORT)}:
            assert time.monotonic() < deadline, hops()
            time.sleep(0.05)
