"""A multihop lab: client -> entry relay -> exit relay -> destination host, in four namespaces.

    client              entry relay              exit relay               destination
    C_LINK4/6  <-veth->  E_LINK4/6
                         E_FWD4/6     <-veth->    X_LINK4/6
                                                  X_FWD4/6     <-veth->    DEST4/6
                         wg: RELAY_TUN            wg: RELAY_TUN
                         forward + masquerade     forward + masquerade
                         towards the exit         towards the destination

Each relay has routes only to its neighbours: the destination is reachable only through the exit
relay's tunnel, the exit only through the entry relay. The client's default route points to the
entry relay's host (which forwards), as an Internet gateway would: a packet the client sent
around the tunnel would leave, and be counted. The relays are wireguard-go or wgpy-daemon
interfaces configured by `wg setconf` (tests/netns/wg_peers.py), with the client as
their only peer (AllowedIPs = the client's tunnel address, as Mullvad's relays); the client is
`wgpy up CONFIG` (`MultihopLab.client`). The entry relay's namespace also runs `wgpy bridge
serve` (Shadowsocks and udp-over-tcp, to the relay's 127.0.0.1:51820).

nftables counters watch what each link carries (`watch_client_link`, `counters`): on the client's
link everything but the entry hop's own packets; at the exit, everything not from the entry's
address; at the destination, everything not from the exit's address; and IP fragments
received anywhere (`fragments`).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

from .netlab import LabProcess, Namespace, NetLab
from .wg_peers import Keys, PeerConf, WgInterface

WGPY = str(Path(sys.executable).with_name("wgpy"))

C_LINK4, C_LINK6 = "10.111.1.2", "fd11:1::2"     # the client's own address
E_LINK4, E_LINK6 = "10.111.1.1", "fd11:1::1"     # the entry relay, as the client reaches it
E_FWD4, E_FWD6 = "10.111.2.1", "fd11:2::1"       # the entry relay towards the exit
X_LINK4, X_LINK6 = "10.111.2.2", "fd11:2::2"     # the exit relay, as the entry reaches it
X_FWD4, X_FWD6 = "10.111.3.1", "fd11:3::1"       # the exit relay towards the destination
DEST4, DEST6 = "10.111.3.2", "fd11:3::2"         # the destination host
TUN4, TUN6 = "10.64.0.2", "fd64::2"              # the client's tunnel address (both hops)
RELAY_TUN = ("10.64.0.1/24", "fd64::1/64")       # each relay's own tunnel address
WG_PORT = 51820
SS_PORT, UDP2TCP_PORT = 8388, 443
SS_METHOD, SS_PASSWORD = "aes-256-gcm", "multihop-bridge-pw"
SS_URI = f"ss://{SS_METHOD}:{SS_PASSWORD}@{E_LINK4}:{SS_PORT}"
UDP2TCP_URI = f"udp2tcp://{E_LINK4}:{UDP2TCP_PORT}"
LINK_MTU = 1500
NEST_OVERHEAD = 80  # per WireGuard layer, as wg-quick counts it
SS_OVERHEAD = 55    # aes-256-gcm to an IPv4 target: salt 32 + address 7 + tag 16


def _nft(ns: Namespace, text: str) -> None:
    ns.run(["nft", "-f", "-"], input=text)


def _watch_table(name: str, iif: str | None, oif: str | None, allowed: dict[str, str]) -> str:
    """A table that counts every IP packet on a link: `allowed` ({counter: match}) each in its
    own counter, the rest (link-scope multicast aside: IPv6 router solicitations and MLD reports
    a fresh link sends by itself) in `other`."""
    hook, dev = ("prerouting", f'iifname != "{iif}"') if iif else ("postrouting", f'oifname != "{oif}"')
    counters = "".join(f"  counter {c} {{}}\n" for c in [*allowed, "other"])
    rules = "".join(f"    {match} counter name {c} accept\n" for c, match in allowed.items())
    return (f"table inet {name} {{\n{counters}"
            f"  chain watch {{\n    type filter hook {hook} priority -400; policy accept;\n"
            f"    {dev} accept\n{rules}"
            f"    ip6 daddr ff02::/16 accept\n"
            f"    counter name other\n  }}\n}}\n")


class MultihopLab:
    def __init__(self, lab: NetLab, relay_kind: str) -> None:
        self.lab = lab
        self.kind = relay_kind
        self.client_keys = Keys()
        c, e, x, d = (lab.netns(t) for t in ("mhcli", "mhentry", "mhexit", "mhdest"))
        self.client_ns, self.entry_ns, self.exit_ns, self.dest_ns = c, e, x, d
        self.c_link, self.e_link = lab.veth(c, e, addrs_a=[f"{C_LINK4}/24", f"{C_LINK6}/64"],
                                            addrs_b=[f"{E_LINK4}/24", f"{E_LINK6}/64"])
        self.e_fwd, self.x_link = lab.veth(e, x, addrs_a=[f"{E_FWD4}/24", f"{E_FWD6}/64"],
                                           addrs_b=[f"{X_LINK4}/24", f"{X_LINK6}/64"])
        self.x_fwd, self.d_link = lab.veth(x, d, addrs_a=[f"{X_FWD4}/24", f"{X_FWD6}/64"],
                                           addrs_b=[f"{DEST4}/24", f"{DEST6}/64"])
        # The client's default gateway is the entry relay's host, as on the Internet: anything the
        # client sent around the tunnel (to the exit, say) would be routed, and counted.
        c.ip("-4", "route", "add", "default", "via", E_LINK4)
        c.ip("-6", "route", "add", "default", "via", E_LINK6)
        for relay_ns, out in ((e, self.e_fwd), (x, self.x_fwd)):
            relay_ns.run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
            relay_ns.run(["sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1"])
            _nft(relay_ns, f"""table inet mhnat {{
  chain post {{ type nat hook postrouting priority 100; oifname "{out}" masquerade; }}
}}
""")
        self.entry = WgInterface(lab, e, relay_kind)
        self.exit = WgInterface(lab, x, relay_kind)
        for relay in (self.entry, self.exit):
            self._start_relay(relay)
        # The exit sees only the entry's address; the destination only the exit's.
        _nft(x, _watch_table("mhwatch", self.x_link, None, {
            "entry": f"ip saddr {E_FWD4}", "entry6": f"ip6 saddr {E_FWD6}"}))
        _nft(d, _watch_table("mhwatch", self.d_link, None, {
            "exit4": f"ip saddr {X_FWD4}", "exit6": f"ip6 saddr {X_FWD6}"}))
        # Fragments anywhere (any interface, before conntrack reassembles them): none may appear.
        for ns in (c, e, x, d):
            _nft(ns, """table inet mhfrag {
  counter fragments {}
  chain pre { type filter hook prerouting priority -450; policy accept;
    ip frag-off & 0x3fff != 0 counter name fragments
    exthdr frag exists counter name fragments
  }
}
""")
        self.bridge_server: LabProcess | None = None
        self._n = 0

    # ---- relays

    def _start_relay(self, relay: WgInterface) -> None:
        relay.start()
        relay.setconf(listen_port=WG_PORT, peers=[PeerConf(self.client_keys.public_b64,
                                                           [f"{TUN4}/32", f"{TUN6}/128"])])
        relay.address(*RELAY_TUN)

    def restart_relay(self, relay: WgInterface) -> None:
        """Stop the relay's daemon (SIGTERM) and start it again with the same keys and config."""
        relay.stop()
        deadline = time.monotonic() + 5
        while os.path.exists(relay.socket_path) or relay.ns.link_exists(relay.ifname):
            assert time.monotonic() < deadline, f"{relay.kind} {relay.ifname} did not go away"
            time.sleep(0.02)
        self._start_relay(relay)

    def relay_state(self) -> str:
        """`wg show` of both relays, their logs' tails: for failure messages."""
        out = []
        for name, relay in (("entry", self.entry), ("exit", self.exit)):
            out.append(f"--- {name} relay ({relay.kind}): wg show")
            out.append(relay.wg("show", relay.ifname, check=False).stdout)
            out.append(f"--- {name} relay log (tail)\n{relay.log()[-2000:]}")
        return "\n".join(out)

    # ---- bridges on the entry relay

    def start_bridge_server(self) -> None:
        if self.bridge_server is not None:
            return
        self.bridge_server = self.entry_ns.popen([
            WGPY, "bridge", "serve", "--listen", f"ss://{SS_METHOD}:{SS_PASSWORD}@0.0.0.0:{SS_PORT}",
            "--listen", f"udp2tcp://0.0.0.0:{UDP2TCP_PORT}", "--allow", f"127.0.0.1:{WG_PORT}"])
        deadline = time.monotonic() + 10
        while "ready" not in self.bridge_server.output():
            assert self.bridge_server.poll() is None, self.bridge_server.output()
            assert time.monotonic() < deadline, "bridge server not ready:\n" + self.bridge_server.output()
            time.sleep(0.05)

    @contextlib.contextmanager
    def censor_udp(self) -> Iterator[None]:
        """The entry relay drops every UDP packet arriving on the client's link."""
        _nft(self.entry_ns, f"""table inet mhcensor {{
  counter dropped {{}}
  chain in {{ type filter hook prerouting priority -400; iifname "{self.e_link}" meta l4proto udp counter name dropped drop; }}
}}
""")
        try:
            yield
        finally:
            self.entry_ns.run(["nft", "delete", "table", "inet", "mhcensor"], check=False)

    def censored(self) -> int:
        """UDP packets the censor dropped so far."""
        data = json.loads(self.entry_ns.run(["nft", "-j", "list", "counters", "table", "inet", "mhcensor"]).stdout)
        return sum(o["counter"]["packets"] for o in data["nftables"] if "counter" in o)

    # ---- the client

    def client_config(self, *, via: bool, bridge: str | None = None, mtu: int | None = None,
                      exit_v6: bool = False) -> str:
        """The client's wg-quick config: the entry peer and the exit peer (full tunnel). `via`:
        the exit names its entry (`Via =`); else the Mullvad layout (entry AllowedIPs = the
        exit's address/32 or /128) lets the daemon detect the nesting. `exit_v6`: the exit's
        endpoint is its IPv6 address (the nested datagrams are IPv6 between the relays)."""
        exit_host = f"[{X_LINK6}]" if exit_v6 else X_LINK4
        entry_endpoint = f"127.0.0.1:{WG_PORT}" if bridge else f"{E_LINK4}:{WG_PORT}"
        text = f"""[Interface]
PrivateKey = {self.client_keys.private_b64}
Address = {TUN4}/32, {TUN6}/128
"""
        if mtu is not None:
            text += f"MTU = {mtu}\n"
        text += f"""
[Peer]
# entry relay
PublicKey = {self.entry.keys.public_b64}
Endpoint = {entry_endpoint}
"""
        if not via:
            text += f"AllowedIPs = {X_LINK6}/128\n" if exit_v6 else f"AllowedIPs = {X_LINK4}/32\n"
        if bridge:
            text += f"Bridge = {bridge}\n"
        text += f"""
[Peer]
# exit relay
PublicKey = {self.exit.keys.public_b64}
Endpoint = {exit_host}:{WG_PORT}
AllowedIPs = 0.0.0.0/0, ::/0
"""
        if via:
            text += f"Via = {self.entry.keys.public_b64}\n"
        return text

    @contextlib.contextmanager
    def client(self, config: str) -> Iterator[str]:
        """`wgpy up` the config in the client namespace; `wgpy down` afterwards, whatever
        happened (a failed test must not leave a full tunnel behind for the next one). Yields
        the interface name."""
        self._n += 1
        ifname = f"wgmh{os.getpid() % 10000}x{self._n}"[:15]
        path = os.path.join(self.lab.tmpdir, f"{ifname}.conf")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(config)
        for leftover in (f"/run/wgpy/{ifname}.json", f"/var/log/wgpy/{ifname}.log"):
            self.lab.defer(lambda p=leftover: os.path.exists(p) and os.unlink(p))
        env = {"LOG_LEVEL": "verbose"}
        r = self.wgpy("up", path, env=env)
        if r.returncode != 0:
            raise AssertionError(f"wgpy up failed ({r.returncode}):\n{r.stdout}{r.stderr}\n{config}")
        ok = False
        try:
            yield ifname
            ok = True
        finally:
            d = self.wgpy("down", path)
            if ok:
                assert d.returncode == 0, d.stdout + d.stderr

    def wgpy(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        argv = [WGPY, *args]
        if env:
            argv = ["env", *(f"{k}={v}" for k, v in env.items()), *argv]
        return self.client_ns.run(argv, check=False, timeout=60)

    def client_log(self, ifname: str) -> str:
        try:
            with open(f"/var/log/wgpy/{ifname}.log", errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def mtu(self, ifname: str) -> int:
        info = json.loads(self.client_ns.ip("-j", "link", "show", "dev", ifname).stdout)[0]
        return int(info["mtu"])

    # ---- at the destination

    def tcp_echo(self, port: int) -> None:
        """A TCP echo server on DEST4:port, without an idle timeout (a connection must outlive a
        relay restart), served by threads of this process until the lab closes."""
        listener = self.dest_ns.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((DEST4, port))
        listener.listen(4)
        stop = threading.Event()

        def serve(conn: socket.socket) -> None:
            with conn:
                while not stop.is_set():
                    try:
                        if not select.select([conn], [], [], 0.1)[0]:
                            continue
                        data = conn.recv(65536)
                        if not data:
                            return
                        conn.sendall(data)
                    except (OSError, ValueError):
                        return

        def accept() -> None:
            while not stop.is_set():
                try:
                    if select.select([listener], [], [], 0.1)[0]:
                        conn, _ = listener.accept()
                        threading.Thread(target=serve, args=(conn,), daemon=True).start()
                except (OSError, ValueError):
                    return

        t = threading.Thread(target=accept, daemon=True)
        t.start()
        self.lab.defer(lambda: (stop.set(), t.join(2)))

    # ---- what the links carried

    def watch_client_link(self, proto: str = "udp", port: int = WG_PORT) -> None:
        """(Re)start counting what leaves the client's link: `entry` counts packets to the entry
        relay's `proto` `port` (the entry hop, or its bridge), `other` everything else. Also
        resets the exit's, the destination's and the fragment counters."""
        c = self.client_ns
        c.run(["nft", "delete", "table", "inet", "mhwatch"], check=False)
        _nft(c, _watch_table("mhwatch", None, self.c_link, {
            "entry": f"ip daddr {E_LINK4} {proto} dport {port}"}))
        for ns in (self.exit_ns, self.dest_ns):
            ns.run(["nft", "reset", "counters", "table", "inet", "mhwatch"])
        for ns in (self.client_ns, self.entry_ns, self.exit_ns, self.dest_ns):
            ns.run(["nft", "reset", "counters", "table", "inet", "mhfrag"])
            # Path MTUs learned by an earlier test (ICMP "too big") are forgotten too.
            ns.ip("-4", "route", "flush", "cache")
            ns.ip("-6", "route", "flush", "cache")

    def fragments(self) -> dict[str, int]:
        """IPv4 or IPv6 fragments each namespace received so far, on any interface."""
        out = {}
        for name, ns in (("client", self.client_ns), ("entry", self.entry_ns), ("exit", self.exit_ns),
                         ("dest", self.dest_ns)):
            data = json.loads(ns.run(["nft", "-j", "list", "counters", "table", "inet", "mhfrag"]).stdout)
            out[name] = sum(o["counter"]["packets"] for o in data["nftables"] if "counter" in o)
        return out

    def counters(self) -> dict[str, dict[str, int]]:
        """{"client"|"exit"|"dest": {counter: packets}}."""
        out = {}
        for name, ns in (("client", self.client_ns), ("exit", self.exit_ns), ("dest", self.dest_ns)):
            data = json.loads(ns.run(["nft", "-j", "list", "counters", "table", "inet", "mhwatch"]).stdout)
            out[name] = {o["counter"]["name"]: o["counter"]["packets"]
                         for o in data["nftables"] if "counter" in o}
        return out

