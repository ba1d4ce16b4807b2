"""WireGuard interfaces in lab namespaces, driven only by the `wg` tool: a wgpy-daemon or a
wireguard-go, the same API for both so every test can run against either."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tunnel.keys import encode_base64_key, generate_private_key, public_key

from .netlab import LabProcess, Namespace, NetLab, unique_ifname

SOCKET_DIR = "/var/run/wireguard"
WGPY_DAEMON = str(Path(sys.executable).with_name("wgpy-daemon"))


@dataclass
class Keys:
    private: bytes = field(default_factory=generate_private_key)

    @property
    def public(self) -> bytes:
        return public_key(self.private)

    @property
    def private_b64(self) -> str:
        return encode_base64_key(self.private)

    @property
    def public_b64(self) -> str:
        return encode_base64_key(self.public)


@dataclass
class PeerConf:
    public_b64: str
    allowed_ips: list[str]
    endpoint: str | None = None
    persistent_keepalive: int = 0
    preshared_key_b64: str | None = None

    def render(self) -> str:
        lines = ["[Peer]", f"PublicKey = {self.public_b64}", f"AllowedIPs = {', '.join(self.allowed_ips)}"]
        if self.endpoint:
            lines.append(f"Endpoint = {self.endpoint}")
        if self.persistent_keepalive:
            lines.append(f"PersistentKeepalive = {self.persistent_keepalive}")
        if self.preshared_key_b64:
            lines.append(f"PresharedKey = {self.preshared_key_b64}")
        return "\n".join(lines) + "\n"


class WgInterface:
    """A userspace WireGuard interface (`kind` "wgpy" or "wireguard-go") in namespace `ns`."""

    def __init__(self, lab: NetLab, ns: Namespace, kind: str, keys: Keys | None = None,
                 ifname: str | None = None) -> None:
        self.lab, self.ns, self.kind = lab, ns, kind
        self.keys = keys or Keys()
        self.ifname = ifname or unique_ifname("wgpy" if kind == "wgpy" else "wggo")
        self.proc: LabProcess | None = None

    @property
    def socket_path(self) -> str:
        return os.path.join(SOCKET_DIR, f"{self.ifname}.sock")

    def start(self, timeout: float = 10.0, env: dict[str, str] | None = None) -> "WgInterface":
        argv = [WGPY_DAEMON, "-f", self.ifname] if self.kind == "wgpy" else ["wireguard-go", "-f", self.ifname]
        self.proc = self.ns.popen(argv, env={"LOG_LEVEL": "debug", **(env or {})})
        sock = self.socket_path
        self.lab.defer(lambda: os.path.exists(sock) and os.unlink(sock))
        deadline = time.monotonic() + timeout
        while not os.path.exists(sock):
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.kind} exited early:\n{self.proc.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.kind} made no UAPI socket in {timeout}s:\n{self.proc.output()}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def wg(self, *args: str, check: bool = True):
        return self.ns.run(["wg", *args], check=check)

    def setconf(self, *, listen_port: int, peers: list[PeerConf], fwmark: int = 0) -> None:
        """Configure with `wg setconf` (as wg-quick does): the whole config replaces the old one."""
        text = f"[Interface]\nPrivateKey = {self.keys.private_b64}\nListenPort = {listen_port}\n"
        if fwmark:
            text += f"FwMark = {fwmark}\n"
        text += "".join(p.render() for p in peers)
        path = os.path.join(self.lab.tmpdir, f"{self.ifname}.conf")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        self.wg("setconf", self.ifname, path)

    def address(self, *cidrs: str, mtu: int | None = None) -> None:
        for cidr in cidrs:
            self.ns.addr_add(self.ifname, cidr)
        if mtu:
            self.ns.ip("link", "set", self.ifname, "mtu", str(mtu))
        self.ns.link_up(self.ifname)

    def dump(self) -> dict:
        """`wg show IF dump` parsed: {"listen_port", "peers": {pubkey_b64: {...}}}."""
        out = self.wg("show", self.ifname, "dump").stdout.strip().splitlines()
        first = out[0].split("\t")
        peers = {}
        for line in out[1:]:
            f = line.split("\t")
            peers[f[0]] = {
                "endpoint": None if f[2] == "(none)" else f[2],
                "allowed_ips": [] if f[3] == "(none)" else f[3].split(","),
                "latest_handshake": int(f[4]),
                "rx": int(f[5]),
                "tx": int(f[6]),
                "keepalive": f[7],
            }
        return {"listen_port": int(first[2]), "peers": peers}

    def peer_conf(self, allowed_ips: list[str], endpoint: str | None = None, **kw) -> PeerConf:
        """How another interface would list this one as a peer."""
        return PeerConf(self.keys.public_b64, allowed_ips, endpoint, **kw)

    def log(self) -> str:
        return self.proc.output() if self.proc else ""
