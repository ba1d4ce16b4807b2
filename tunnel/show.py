"""`wgpy show`: the `wg show` view, and the same data as JSON.

Multihop: a peer reached through another one shows `via: ENTRY` (how: its Via, or detected
because its endpoint lies in the entry's allowed ips) and the entry's bridge if it has one; the
entry shows which peers it carries. Each keeps its own handshake age and counters."""

from __future__ import annotations

import json

from transport.address import format_address

from .grammar import format_prefix
from .keys import encode_base64_key
from .killswitch import Status as KillSwitchStatus
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


def bridge_state(peer: PeerStatus) -> str:
    """"connected" only once a reply came back through the bridge and was accepted (for
    Shadowsocks: it authenticated with our key); a socket or TCP connection alone is
    "no reply yet" (a wrong password, a server that does not answer); no socket or connection
    to the server is "not connected"."""
    if not peer.bridge_connected:
        return "not connected"
    return "connected" if peer.bridge_last_reply else "no reply yet"


def _endpoint(peer: PeerStatus) -> str | None:
    return format_address(peer.endpoint) if peer.endpoint is not None else None


def kill_switch_line(ks: KillSwitchStatus | None) -> str | None:
    """`kill switch: on (allow LAN)`, `kill switch: on, table missing! ...` (`wgpy up` made it,
    and someone deleted its table: nothing is blocked), or None when there is none."""
    if ks is None:
        return None
    if not ks.asked:
        return f"kill switch: on (table inet {ks.table}, which `wgpy up` has no record of)"
    text = "kill switch: on" + (" (allow LAN)" if ks.allow_lan else "")
    if ks.present is False:
        text += f", table missing! (inet {ks.table} is gone: nothing is blocked; `wgpy down` and `up` again)"
    elif ks.present is None:
        text += ", its table not checked (nft cannot list tables)"
    return text


def format_text(status: InterfaceStatus, now: float, kill_switch: KillSwitchStatus | None = None) -> str:
    lines = [f"interface: {status.name}"]
    if status.public_key:
        lines.append(f"  public key: {encode_base64_key(status.public_key)}")
        lines.append("  private key: (hidden)")
    if status.listen_port:
        lines.append(f"  listening port: {status.listen_port}")
    if status.fwmark:
        lines.append(f"  fwmark: 0x{status.fwmark:x}")
    ks_line = kill_switch_line(kill_switch)
    if ks_line is not None:
        lines.append(f"  {ks_line}")
    by_key = {p.public_key: p for p in status.peers}
    carries: dict[bytes, list[bytes]] = {}
    for p in status.peers:
        if p.entry is not None:
            carries.setdefault(p.entry, []).append(p.public_key)
    # Most recent handshake first, as wg sorts them.
    for p in sorted(status.peers, key=lambda p: -p.latest_handshake):
        lines.append("")
        lines.append(f"peer: {encode_base64_key(p.public_key)}")
        if p.preshared_key:
            lines.append("  preshared key: (hidden)")
        if p.entry is not None:
            how = "Via" if p.via == p.entry else "its endpoint is in the entry's allowed ips"
            lines.append(f"  via: {encode_base64_key(p.entry)} ({how})")
            entry = by_key.get(p.entry)
            if entry is not None and entry.bridge:
                lines.append(f"  via bridge: {entry.bridge} (the entry's)")
        elif p.via is not None:
            lines.append(f"  via: {encode_base64_key(p.via)} (not in effect: no such peer, a cycle, or too deep)")
        if p.endpoint is not None:
            note = (" (as the bridge server sees it)" if p.bridge
                    else " (reached inside the entry's tunnel)" if p.entry is not None else "")
            lines.append(f"  endpoint: {_endpoint(p)}{note}")
        if p.obfuscation:
            lines.append(f"  obfuscation: {p.obfuscation}")
        if p.fallback:
            in_use = p.fallback[p.fallback_in_use] if p.fallback_in_use < len(p.fallback) else "?"
            lines.append(f"  ways: {', '.join(p.fallback)} (in use: {in_use})")
        for exit_key in carries.get(p.public_key, []):
            lines.append(f"  carries: {encode_base64_key(exit_key)}")
        if p.bridge:
            state = bridge_state(p)
            lines.append(f"  bridge: {p.bridge}, {state}; {p.bridge_tx_packets} packets sent, "
                         f"{p.bridge_rx_packets} received, {p.bridge_dropped} dropped")
            if p.bridge_last_reply:
                lines.append(f"  latest bridge reply: {ago(int(now) - p.bridge_last_reply)}")
        shown = ", ".join(format_prefix(n) for n in p.allowed_ips)
        lines.append(f"  allowed ips: {shown or '(none)'}")
        if p.latest_handshake:
            lines.append(f"  latest handshake: {ago(int(now) - p.latest_handshake)}")
        if p.rx_bytes or p.tx_bytes:
            lines.append(f"  transfer: {human_bytes(p.rx_bytes)} received, {human_bytes(p.tx_bytes)} sent")
        if p.persistent_keepalive:
            lines.append(f"  persistent keepalive: every {_plural(p.persistent_keepalive, 'second')}")
    return "\n".join(lines)


def as_json(statuses: list[InterfaceStatus], now: float,
            kill_switches: dict[str, KillSwitchStatus | None] | None = None) -> str:
    """Keys in base64, addresses as `wg show` prints them; no private or preshared key (only
    whether a peer has one). Per peer, `via` is its explicit via and `entry` the peer it is
    reached through now (by via or detected); both base64 keys or null. Per interface,
    `kill_switch` is null or {"table", "made_by_up", "allow_lan", "table_present"} (the last
    two null when unknown), from `kill_switches` by interface name."""
    kill_switches = kill_switches or {}
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
                "bridge_state": bridge_state(p) if p.bridge else None,
                "bridge_latest_reply": p.bridge_last_reply,
                "bridge_tx_packets": p.bridge_tx_packets,
                "bridge_rx_packets": p.bridge_rx_packets,
                "bridge_dropped": p.bridge_dropped,
                "via": encode_base64_key(p.via) if p.via is not None else None,
                "obfuscation": p.obfuscation,
                "ways": p.fallback,
                "way_in_use": p.fallback[p.fallback_in_use] if p.fallback_in_use < len(p.fallback) else None,
                "entry": encode_base64_key(p.entry) if p.entry is not None else None,
                "latest_handshake_seconds_ago": int(now) - p.latest_handshake if p.latest_handshake else None,
            })
        out.append({
            "name": st.name,
            "public_key": encode_base64_key(st.public_key) if st.public_key is not None else None,
            "listen_port": st.listen_port,
            "fwmark": st.fwmark,
            "kill_switch": _kill_switch_json(kill_switches.get(st.name)),
            "peers": peers,
        })
    return json.dumps(out, indent=2)


def _kill_switch_json(ks: KillSwitchStatus | None) -> dict | None:
    if ks is None:
        return None
    return {"table": f"inet {ks.table}", "made_by_up": ks.asked, "allow_lan": ks.allow_lan,
            "table_present": ks.present}
