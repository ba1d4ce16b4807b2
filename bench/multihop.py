"""The multihop scenario of `wgpy bench`: iperf3 through two relays, wgpy's nested multihop next
to a wireguard-go client set up as kernel users do it (one interface, two peers: the entry's
AllowedIPs hold the exit's address, so the exit's datagrams loop back through the interface).

    client ns --veth-- entry relay ns --veth-- exit relay ns --veth-- destination ns (iperf3 -s)

Both relays are wireguard-go (wgpy when wireguard-go is missing) with forwarding and masquerade,
the same for both clients; only the client differs. Interface MTU 1340 (1500 - 80 per hop) for
both. With a bridge, the entry relay has libev's ss-server in front: the wireguard-go client
reaches it through ss-tunnel, wgpy with its own carrier (`Bridge =` on the entry peer); MTU
`bridge_mtu(method, hops=2)`. CPU and RSS are the client side's alone (daemon and ss-tunnel):
the relays are the same programs in both rows.
"""

from __future__ import annotations

import os
import subprocess

from tunnel.keys import encode_base64_key, generate_private_key, public_key

from .tunnel import (BRIDGE_METHOD, Lab, _run, _wait_listening, _wgpy, bridge_mtu, bridge_password, bridge_uri,
                     throughput)

C_E = ("10.241.1.1", "10.241.1.2")  # client - entry
E_X = ("10.241.2.1", "10.241.2.2")  # entry - exit
X_D = ("10.241.3.1", "10.241.3.2")  # exit - destination
CLIENT_TUNNEL = "10.64.0.2"
MTU = 1340
RELAY = "wireguard-go"
NFT_MASQUERADE = """table ip relay {
  chain post { type nat hook postrouting priority 100; oifname "%s" masquerade; }
}"""


class MultihopLab(Lab):
    NAMES = ("c", "e", "x", "d")

    def __init__(self) -> None:
        super().__init__()
        self.ns = [f"wgpym-{self.tag}-{n}" for n in self.NAMES]

    def __enter__(self) -> "MultihopLab":
        for n in self.ns:
            _run("ip", "netns", "add", n)
            _run("ip", "-n", n, "link", "set", "lo", "up")
        for i, (left, right) in enumerate((C_E, E_X, X_D)):
            a, b = self.ns[i], self.ns[i + 1]
            _run("ip", "-n", a, "link", "add", f"m{i}r", "type", "veth", "peer", "name", f"m{i}l", "netns", b)
            _run("ip", "-n", a, "addr", "add", f"{left}/24", "dev", f"m{i}r")
            _run("ip", "-n", b, "addr", "add", f"{right}/24", "dev", f"m{i}l")
            _run("ip", "-n", a, "link", "set", f"m{i}r", "up")
            _run("ip", "-n", b, "link", "set", f"m{i}l", "up")
        return self

    def setconf(self, side: int, ifname: str, text: str) -> None:
        conf = os.path.join(self.tmp, f"{ifname}.conf")
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        _run(*self.exec(side, "wg", "setconf", ifname, conf))


def label(client: str, relay: str = RELAY, bridge: bool = False) -> str:
    return f"{client} client, two {relay} relays" + (f", ss {BRIDGE_METHOD} to the entry" if bridge else "")


def measure(client: str, seconds: int, relay: str = RELAY, bridge: bool = False, lab_factory=MultihopLab):
    keys = {n: generate_private_key() for n in ("c", "e", "x")}
    pub = {n: encode_base64_key(public_key(k)) for n, k in keys.items()}
    mtu = bridge_mtu(BRIDGE_METHOD, hops=2) if bridge else MTU
    with lab_factory() as lab:
        for side, name, out_link in ((1, "e", "m1r"), (2, "x", "m2r")):
            ifname = f"wgm{lab.tag}{name}"
            lab.start_interface(side, relay, ifname)
            lab.setconf(side, ifname, f"[Interface]\nPrivateKey = {encode_base64_key(keys[name])}\n"
                                      f"ListenPort = 51820\n[Peer]\nPublicKey = {pub['c']}\n"
                                      f"AllowedIPs = {CLIENT_TUNNEL}/32\n")
            _run("ip", "-n", lab.ns[side], "link", "set", ifname, "up")
            _run("ip", "-n", lab.ns[side], "route", "add", f"{CLIENT_TUNNEL}/32", "dev", ifname)
            _run(*lab.exec(side, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"))
            subprocess.run(lab.exec(side, "nft", "-f", "-"), input=NFT_MASQUERADE % out_link, text=True,
                           check=True, capture_output=True)
        entry = f"{C_E[1]}:51820"
        lab.tunnel_pids.clear()  # from here on: the client side only
        if bridge:
            password = bridge_password(BRIDGE_METHOD)
            server = subprocess.Popen(lab.exec(1, "ss-server", "-s", C_E[1], "-p", "8388", "-k", password,
                                               "-m", BRIDGE_METHOD, "-U"),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            lab.procs.append(server)
            _wait_listening(lab, 1, 8388, "u", "ss-server", server)
            entry = "127.0.0.1:51820"  # the entry's WireGuard port as the bridge server reaches it
            if client != "wgpy":
                tun = subprocess.Popen(lab.exec(0, "ss-tunnel", "-s", C_E[1], "-p", "8388", "-k", password,
                                                "-m", BRIDGE_METHOD, "-b", "127.0.0.1", "-l", "51999",
                                                "-L", "127.0.0.1:51820", "-U"),
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                lab.procs.append(tun)
                lab.tunnel_pids.append(tun.pid)
                _wait_listening(lab, 0, 51999, "u", "ss-tunnel", tun)
                entry = "127.0.0.1:51999"
        ifname = f"wgm{lab.tag}c"
        lab.start_interface(0, client, ifname)
        lab.setconf(0, ifname,
                    f"[Interface]\nPrivateKey = {encode_base64_key(keys['c'])}\n"
                    f"[Peer]\nPublicKey = {pub['e']}\nEndpoint = {entry}\nAllowedIPs = {E_X[1]}/32\n"
                    f"[Peer]\nPublicKey = {pub['x']}\nEndpoint = {E_X[1]}:51820\nAllowedIPs = {X_D[0]}/24\n")
        if bridge and client == "wgpy":
            _run(*lab.exec(0, *_wgpy(client), "set", ifname, "peer", pub["e"], "bridge",
                           bridge_uri(BRIDGE_METHOD, C_E[1], 8388)))
        c = lab.ns[0]
        _run("ip", "-n", c, "addr", "add", f"{CLIENT_TUNNEL}/32", "dev", ifname)
        _run("ip", "-n", c, "link", "set", ifname, "mtu", str(mtu), "up")
        _run("ip", "-n", c, "route", "add", f"{X_D[1]}/32", "dev", ifname)
        if client != "wgpy":  # kernel users' loop: the exit's datagrams routed back into the interface
            _run("ip", "-n", c, "route", "add", f"{E_X[1]}/32", "dev", ifname)
        _run("ip", "-n", lab.ns[3], "route", "add", "default", "via", X_D[0])
        _run(*lab.exec(0, "ping", "-c", "1", "-W", "5", X_D[1]), timeout=15)
        return throughput(lab, 3, X_D[1], label(client, relay, bridge), seconds)
