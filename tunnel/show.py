"""`wgpy show`: the `wg show` view, and the same data as JSON."""

from __future__ import annotations

import json
from dataclasses import asdict

from .control import InterfaceStatus


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


def format_text(status: InterfaceStatus, now: float) -> str:
    lines = [f"interface: {status.name}"]
    if status.public_key:
        lines.append(f"  public key: {status.public_key}")
        lines.append("  private key: (hidden)")
    if status.listen_port:
        lines.append(f"  listening port: {status.listen_port}")
    if status.fwmark:
        lines.append(f"  fwmark: 0x{status.fwmark:x}")
    # Most recent handshake first, as wg sorts them.
    for p in sorted(status.peers, key=lambda p: -p.latest_handshake):
        lines.append("")
        lines.append(f"peer: {p.public_key}")
        if p.preshared_key:
            lines.append("  preshared key: (hidden)")
        if p.endpoint:
            lines.append(f"  endpoint: {p.endpoint}{' (as the bridge server sees it)' if p.bridge else ''}")
        if p.bridge:
            state = "connected" if p.bridge_connected else "not connected"
            lines.append(f"  bridge: {p.bridge}, {state}; {p.bridge_tx_packets} packets sent, "
                         f"{p.bridge_rx_packets} received, {p.bridge_dropped} dropped")
        lines.append(f"  allowed ips: {', '.join(p.allowed_ips) if p.allowed_ips else '(none)'}")
        if p.latest_handshake:
            lines.append(f"  latest handshake: {ago(int(now) - p.latest_handshake)}")
        if p.rx_bytes or p.tx_bytes:
            lines.append(f"  transfer: {human_bytes(p.rx_bytes)} received, {human_bytes(p.tx_bytes)} sent")
        if p.persistent_keepalive:
            lines.append(f"  persistent keepalive: every {_plural(p.persistent_keepalive, 'second')}")
    return "\n".join(lines)


def as_json(statuses: list[InterfaceStatus], now: float) -> str:
    out = []
    for st in statuses:
        d = asdict(st)
        for p in d["peers"]:
            p["latest_handshake_seconds_ago"] = int(now) - p["latest_handshake"] if p["latest_handshake"] else None
        out.append(d)
    return json.dumps(out, indent=2)
