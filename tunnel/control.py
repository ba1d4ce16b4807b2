"""Client side of the UAPI socket (what `wg` does), for `wgpy up` and `wgpy show`."""

from __future__ import annotations

import base64
import os
import socket
from dataclasses import dataclass, field

SOCKET_DIR = "/var/run/wireguard"


class ControlError(Exception):
    pass


def socket_path(ifname: str, socket_dir: str = SOCKET_DIR) -> str:
    return os.path.join(socket_dir, f"{ifname}.sock")


def list_interfaces(socket_dir: str = SOCKET_DIR) -> list[str]:
    try:
        names = os.listdir(socket_dir)
    except FileNotFoundError:
        return []
    return sorted(n[: -len(".sock")] for n in names if n.endswith(".sock"))


def _request(ifname: str, body: str, timeout: float = 5.0, socket_dir: str = SOCKET_DIR) -> str:
    path = socket_path(ifname, socket_dir)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(path)
        except FileNotFoundError:
            raise ControlError(f"{ifname}: no such WireGuard interface ({path} missing)") from None
        except OSError as exc:
            raise ControlError(f"{ifname}: cannot connect to {path}: {exc.strerror}") from None
        s.sendall(body.encode())
        data = b""
        while not data.endswith(b"\n\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except socket.timeout:
        raise ControlError(f"{ifname}: the daemon did not answer in {timeout:.0f} s") from None
    finally:
        s.close()
    text = data.decode(errors="replace")
    lines = text.rstrip("\n").split("\n")
    if not lines or not lines[-1].startswith("errno="):
        raise ControlError(f"{ifname}: malformed reply from the daemon")
    err = int(lines[-1][6:] or 0)
    if err:
        raise ControlError(f"{ifname}: the daemon refused the request: {os.strerror(-err)}")
    return "\n".join(lines[:-1])


def set_config(ifname: str, lines: list[str], socket_dir: str = SOCKET_DIR) -> None:
    _request(ifname, "set=1\n" + "".join(line + "\n" for line in lines) + "\n", socket_dir=socket_dir)


@dataclass
class PeerStatus:
    public_key: str
    preshared_key: bool = False
    endpoint: str | None = None
    allowed_ips: list[str] = field(default_factory=list)
    latest_handshake: int = 0  # Unix seconds, 0 = never
    rx_bytes: int = 0
    tx_bytes: int = 0
    persistent_keepalive: int = 0
    # wgpy-daemon only (UAPI `get=wgpy`): the bridge, without its password, and its counters.
    bridge: str | None = None
    bridge_connected: bool = False
    bridge_tx_packets: int = 0
    bridge_rx_packets: int = 0
    bridge_dropped: int = 0


@dataclass
class InterfaceStatus:
    name: str
    public_key: str | None = None
    listen_port: int = 0
    fwmark: int = 0
    peers: list[PeerStatus] = field(default_factory=list)


def _b64(hex_key: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_key)).decode()


def get_lines(ifname: str, socket_dir: str = SOCKET_DIR) -> list[tuple[str, str]]:
    """The raw `get` reply as (key, value) pairs (private and preshared keys in hex)."""
    return [tuple(line.split("=", 1)) for line in _request(ifname, "get=1\n\n", socket_dir=socket_dir).split("\n")
            if "=" in line]


def _get_extended(ifname: str, socket_dir: str) -> str:
    """`get=wgpy` from a wgpy-daemon; `get=1` from anything else (wireguard-go closes the
    connection on an operation it does not know)."""
    try:
        return _request(ifname, "get=wgpy\n\n", socket_dir=socket_dir)
    except ControlError:
        return _request(ifname, "get=1\n\n", socket_dir=socket_dir)


def get_status(ifname: str, socket_dir: str = SOCKET_DIR) -> InterfaceStatus:
    from .keys import public_key

    status = InterfaceStatus(ifname)
    peer: PeerStatus | None = None
    for line in _get_extended(ifname, socket_dir).split("\n"):
        if "=" not in line:
            continue
        key, value = line.split("=", 1)
        if key == "private_key":
            status.public_key = base64.b64encode(public_key(bytes.fromhex(value))).decode()
        elif key == "listen_port":
            status.listen_port = int(value)
        elif key == "fwmark":
            status.fwmark = int(value)
        elif key == "public_key":
            peer = PeerStatus(_b64(value))
            status.peers.append(peer)
        elif peer is None:
            continue
        elif key == "preshared_key":
            peer.preshared_key = value.strip("0") != ""
        elif key == "endpoint":
            peer.endpoint = value
        elif key == "allowed_ip":
            peer.allowed_ips.append(value)
        elif key == "last_handshake_time_sec":
            peer.latest_handshake = int(value)
        elif key == "rx_bytes":
            peer.rx_bytes = int(value)
        elif key == "tx_bytes":
            peer.tx_bytes = int(value)
        elif key == "persistent_keepalive_interval":
            peer.persistent_keepalive = int(value)
        elif key == "wgpy_bridge":
            peer.bridge = value
        elif key == "wgpy_bridge_connected":
            peer.bridge_connected = value == "1"
        elif key == "wgpy_bridge_tx_packets":
            peer.bridge_tx_packets = int(value)
        elif key == "wgpy_bridge_rx_packets":
            peer.bridge_rx_packets = int(value)
        elif key == "wgpy_bridge_dropped":
            peer.bridge_dropped = int(value)
    return status
