"""`wgpy show`: the `wg show` view, and the same data as JSON."""

from __future__ import annotations

import json

from transport.address import format_address

from .grammar import format_prefix
from .keys import encode_base64_key
from .uapi import InterfaceStatus, PeerStatus


def _plural(n: int, unit: str) -> str:
    return f"{n} {unit}{'' if n == 1 else 's'}"


def ago(seconds: int) -> str:
    """wg's "1 minute, 5 seconds ago" style."""
    if seconds <= 0:
        return "Now"
    parts = []
    for unit, size in (("year", 365 * 86400), ("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        if seconds >= size:
            parts.append(_plural(seconds // size, unit))
            seconds %= size
    return ", ".join(parts) + " ago"


def human_bytes(n: int) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _endpoint(peer: PeerStatus) -> str | None:
    return format_address(peer.endpoint) if peer.endpoint is not None else None


def format_text(status: InterfaceStatus, now: float) -> str:
    lines = [f"interface: {status.name}"]
    if status.public_key:
        lines.append(f"  public key: {encode_base64_key(status.public_key)}")
        lines.append("  private key: (hidden)")
    if status.listen_port:
        lines.append(f"  listening port: {status.listen_port}")
    if status.fwmark:
        lines.append(f"  fwmark: 0x{status.fwmark:x}")
    # Most recent handshake first, as wg sorts them.
    for p in sorted(status.peers, key=lambda p: -p.latest_handshake):
        lines.append("")
        lines.append(f"peer: {encode_base64_key(p.public_key)}")
        if p.preshared_key:
            lines.append("  preshared key: (hidden)")
        if p.endpoint is not None:
            lines.append(f"  endpoint: {_endpoint(p)}{' (as the bridge server sees it)' if p.bridge else ''}")
        if p.bridge:
            state = "connected" if p.bridge_connected else "not connected"
            lines.append(f"  bridge: {p.bridge}, {state}; {p.bridge_tx_packets} packets sent, "
                         f"{p.bridge_rx_packets} received, {p.bridge_dropped} dropped")
        shown = ", ".join(format_prefix(n) for n in p.allowed_ips)
        lines.append(f"  allowed ips: {shown or '(none)'}")
        if p.latest_handshake:
            lines.append(f"  latest handshake: {ago(int(now) - p.latest_handshake)}")
        if p.rx_bytes or p.tx_bytes:
            lines.append(f"  transfer: {human_bytes(p.rx_bytes)} received, {human_bytes(p.tx_bytes)} sent")
        if p.persistent_keepalive:
            lines.append(f"  persistent keepalive: every {_plural(p.persistent_keepalive, 'second')}")
    return "\n".join(lines)


def as_json(statuses: list[InterfaceStatus], now: float) -> str:
    """Keys in base64, addresses as `wg show` prints them; no private or preshared key (only
    whether a peer has one)."""
    out = []
    for st in statuses:
        peers = []
        for p in st.peers:
            peers.append({
                "public_key": encode_base64_key(p.public_key),
                "preshared_key": p.preshared_key is not None,
                "endpoint": _endpoint(p),
                "allowed_ips": [format_prefix(n) for n in p.allowed_ips],
                "latest_handshake": p.latest_handshake,
                "rx_bytes": p.rx_bytes,
                "tx_bytes": p.tx_bytes,
                "persistent_keepalive": p.persistent_keepalive,
                "bridge": p.bridge,
                "bridge_connected": p.bridge_connected,
                "bridge_tx_packets": p.bridge_tx_packets,
                "bridge_rx_packets": p.bridge_rx_packets,
                "bridge_dropped": p.bridge_dropped,
                "latest_handshake_seconds_ago": int(now) - p.latest_handshake if p.latest_handshake else None,
            })
        out.append({
            "name": st.name,
            "public_key": encode_base64_key(st.public_key) if st.public_key is not None else None,
            "listen_port": st.listen_port,
            "fwmark": st.fwmark,
            "peers": peers,
        })
    return json.dumps(out, indent=2)
