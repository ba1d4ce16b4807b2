"""`wgpy show` (issue 12, item 14): a bridge is "connected" only once a reply came back through it
and was accepted; before that "no reply yet" (a wrong password, a silent server), and "not
connected" without a socket or connection to its server. From the daemon's counters
(`get=wgpy`) through the UAPI client's parser to the text and JSON views."""

from __future__ import annotations

import json
import time

import trio

from bridge.carrier import BridgeTransport
from transport.memory import MemoryNetwork, MemoryTransport
from tunnel import show, uapi
from tunnel.keys import encode_base64_key

from ..helpers import ip4
from .test_engine import A_ADDR, A_IN, B_ADDR, B_IN, Node, peer_lines, socket_dir  # noqa: F401

KEY = bytes(range(32))
URI = "ss://aes-256-gcm@192.0.2.80:8388"


def bridged(**kw) -> uapi.InterfaceStatus:
    peer = uapi.PeerStatus(KEY, bridge=URI, **kw)
    return uapi.InterfaceStatus("wgt", peers=[peer])


def test_states_in_text_and_json():
    now = 1_700_000_100
    cases = [
        (dict(bridge_connected=False), "not connected"),
        (dict(bridge_connected=True, bridge_tx_packets=7), "no reply yet"),
        (dict(bridge_connected=True, bridge_last_reply=now - 3), "connected"),
    ]
    for fields, state in cases:
        status = bridged(**fields)
        text = show.format_text(status, now)
        assert f"  bridge: {URI}, {state};" in text, text
        assert ("latest bridge reply: 3 seconds ago" in text) == (state == "connected")
        peer = json.loads(show.as_json([status], now))[0]["peers"][0]
        assert peer["bridge_state"] == state
        assert peer["bridge_latest_reply"] == fields.get("bridge_last_reply", 0)


def test_a_peer_without_bridge_has_no_bridge_state():
    status = uapi.InterfaceStatus("wgt", peers=[uapi.PeerStatus(KEY)])
    assert "bridge" not in show.format_text(status, 0)
    assert json.loads(show.as_json([status], 0))[0]["peers"][0]["bridge_state"] is None


def test_get_reply_carries_the_last_reply():
    text = (f"public_key={KEY.hex()}\nwgpy_bridge={URI}\nwgpy_bridge_connected=1\n"
            "wgpy_bridge_last_reply=1700000000\n")
    peer = uapi.parse_get_reply("wgt", text).peers[0]
    assert peer.bridge_connected and peer.bridge_last_reply == 1_700_000_000
    assert show.bridge_state(peer) == "connected"


class ReplyingBridge(MemoryTransport, BridgeTransport):
    """A bridge on the memory network that, as the real ones, stamps `last_reply` when a reply
    it accepts arrives (every datagram on this network is accepted)."""

    def __init__(self, net: MemoryNetwork, spec, ident: int) -> None:
        MemoryTransport.__init__(self, net, ("203.0.113.9", 9000 + ident), ident=ident)
        net.transports[self.address] = self
        self.spec = spec

    async def _receive(self, generation):
        batch = await super()._receive(generation)
        self.last_reply = time.time()
        return batch


async def test_show_says_no_reply_yet_until_the_bridge_hears_back(socket_dir, autojump_clock):  # noqa: F811
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        a = Node("wga", net, A_ADDR, socket_dir,
                 open_bridge=lambda spec, ident, fwmark: ReplyingBridge(net, spec, ident))
        b = Node("wgb", net, B_ADDR, socket_dir)
        await nursery.start(a.engine.run)
        await nursery.start(b.engine.run)
        await a.set(f"private_key={a.key.hex()}", f"listen_port={A_ADDR[1]}",
                    *peer_lines(b, B_ADDR, f"{B_IN}/32"), "wgpy_bridge=udp2tcp://203.0.113.9:443")
        # b has no key yet: a's initiations go out through the bridge, nothing comes back
        a.tun.inject(ip4(A_IN, B_IN, b"anyone?"))
        await trio.sleep(0.1)

        def status() -> uapi.InterfaceStatus:
            return uapi.get_status("wga", socket_dir)

        peer = (await trio.to_thread.run_sync(status)).peers[0]
        assert peer.bridge_tx_packets >= 1 and peer.bridge_rx_packets == 0
        assert show.bridge_state(peer) == "no reply yet"
        assert "no reply yet" in show.format_text(await trio.to_thread.run_sync(status), time.time())
        await b.set(f"private_key={b.key.hex()}", f"listen_port={B_ADDR[1]}", *peer_lines(a, None, f"{A_IN}/32"))
        a.tun.inject(ip4(A_IN, B_IN, b"now?"))
        with trio.fail_after(30):  # a's next initiation: its retry, 5 s later (driven clock)
            while not b.tun.written:
                await trio.sleep(0.05)
        peer = (await trio.to_thread.run_sync(status)).peers[0]
        assert show.bridge_state(peer) == "connected", (peer, [t.statistics() for t in a.engine.transports.values()])
        assert abs(peer.bridge_last_reply - time.time()) < 5
        text = show.format_text(await trio.to_thread.run_sync(status), time.time())
        assert f"peer: {encode_base64_key(b.public)}" in text and "connected;" in text
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------- the kill switch

def test_kill_switch_lines_in_text_and_json():
    from tunnel.killswitch import Status  # noqa: PLC0415

    status = uapi.InterfaceStatus("wg0", listen_port=51820, peers=[uapi.PeerStatus(KEY)])
    cases = [
        (None, None),
        (Status("wgpy-ks-wg0", True, False, True), "  kill switch: on\n"),
        (Status("wgpy-ks-wg0", True, True, True), "  kill switch: on (allow LAN)\n"),
        (Status("wgpy-ks-wg0", True, None, True), "  kill switch: on\n"),  # an older `up`: AllowLAN unknown
        (Status("wgpy-ks-wg0", True, True, False),
         "  kill switch: on (allow LAN), table missing! (inet wgpy-ks-wg0 is gone: nothing is blocked;"),
        (Status("wgpy-ks-wg0", True, False, None), "  kill switch: on, its table not checked"),
        (Status("wgpy-ks-wg0", False, None, True),
         "  kill switch: on (table inet wgpy-ks-wg0, which `wgpy up` has no record of)\n"),
    ]
    for ks, line in cases:
        text = show.format_text(status, 0, ks)
        if line is None:
            assert "kill switch" not in text and text == show.format_text(status, 0)
        else:
            assert line in text and text.index("listening port") < text.index("kill switch") < text.index("peer:")
        (iface,) = json.loads(show.as_json([status], 0, {"wg0": ks}))
        if ks is None:
            assert iface["kill_switch"] is None
        else:
            assert iface["kill_switch"] == {"table": "inet wgpy-ks-wg0", "made_by_up": ks.asked,
                                            "allow_lan": ks.allow_lan, "table_present": ks.present}
    assert json.loads(show.as_json([status], 0))[0]["kill_switch"] is None


def test_kill_switch_status_from_the_journal_and_the_tables(tmp_path, monkeypatch):
    from tunnel import netconfig, quick  # noqa: PLC0415
    from tunnel.killswitch import Status, inet_tables  # noqa: PLC0415

    monkeypatch.setattr(netconfig, "state_dir", lambda: str(tmp_path))
    tables = inet_tables("table ip nat\ntable inet wgpy-ks-wg0\ntable inet filter\n")
    assert tables == {"wgpy-ks-wg0", "filter"}
    assert quick.kill_switch_status("wg0", tables) == Status("wgpy-ks-wg0", False, None, True)  # no journal
    assert quick.kill_switch_status("wg0", set()) is None
    assert quick.kill_switch_status("wg0", None) is None
    journal = netconfig.Journal("wg0", str(tmp_path))
    journal.meta = {"config": "/etc/wireguard/wg0.conf"}
    journal.undo = [{"cmd": ["ip", "link", "del", "dev", "wg0"], "may_fail": True}]
    (tmp_path / "wg0.json").write_text(json.dumps({"undo": journal.undo, "meta": journal.meta}))
    assert quick.kill_switch_status("wg0", set()) is None  # `up` without KillSwitch
    # `up` with it: its meta (AllowLAN), or only the undo entry of an older `up`.
    journal.meta["kill_switch"] = {"allow_lan": True}
    (tmp_path / "wg0.json").write_text(json.dumps({"undo": journal.undo, "meta": journal.meta}))
    assert quick.kill_switch_status("wg0", tables) == Status("wgpy-ks-wg0", True, True, True)
    assert quick.kill_switch_status("wg0", set()) == Status("wgpy-ks-wg0", True, True, False)
    assert quick.kill_switch_status("wg0", None) == Status("wgpy-ks-wg0", True, True, None)
    older = {"undo": [{"cmd": ["nft", "delete", "table", "inet", "wgpy-ks-wg0"], "may_fail": True,
                       "kill_switch": True}], "meta": {}}
    (tmp_path / "wg0.json").write_text(json.dumps(older))
    assert quick.kill_switch_status("wg0", set()) == Status("wgpy-ks-wg0", True, None, False)
    (tmp_path / "wg0.json").write_text("{not json")
    assert quick.kill_switch_status("wg0", set()) is None  # unreadable: nothing claimed
