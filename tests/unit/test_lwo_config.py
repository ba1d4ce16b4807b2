"""`Obfuscation = lwo` on a [Peer] (tunnel/config.py): parsed, checked with FILE:LINE, sent to the
daemon as `wgpy_obfuscation=lwo`, and written back."""

from __future__ import annotations

import pytest

from tunnel import uapi
from tunnel.config import ConfigError, parse_config, render_config, uapi_set_lines

from .test_config import IFACE, K1, K2, PATH, parse


def peer(key: str, *lines: str) -> str:
    return "\n[Peer]\nPublicKey = " + key + "\nAllowedIPs = 10.0.0.2/32\n" + "".join(f"{line}\n" for line in lines)


@pytest.mark.parametrize("value, expected", [("lwo", "lwo"), ("LWO", "lwo"), ("Lwo", "lwo"), ("off", None), ("OFF", None)])
def test_obfuscation_values(value, expected):
    cfg = parse(IFACE + peer(K1, "Endpoint = 192.0.2.1:51820", f"Obfuscation = {value}"))
    assert cfg.peers[0].obfuscation == expected


def test_no_obfuscation_by_default():
    assert parse(IFACE + peer(K1)).peers[0].obfuscation is None


def test_lwo_goes_to_the_daemon_and_back_to_a_file():
    cfg = parse(IFACE + peer(K1, "Endpoint = 192.0.2.1:51820", "obfuscation = lwo") + peer(K2))
    lines = uapi_set_lines(cfg)
    assert lines.count("wgpy_obfuscation=lwo") == 1
    assert lines.index("wgpy_obfuscation=lwo") < lines.index(f"public_key={cfg.peers[1].public_key.hex()}")
    tx = uapi.parse_set(lines)  # the daemon's parser takes what wgpy up sends
    assert uapi.SetObfuscation("lwo") in tx.peers[0].ops
    text = render_config(cfg)
    assert "Obfuscation = lwo\n" in text
    assert parse_config(text, PATH) == cfg


@pytest.mark.parametrize("value", ["xor", "lwo2", "on", "true"])
def test_unknown_obfuscation_is_an_error_at_its_line(value):
    text = IFACE + peer(K1, f"Obfuscation = {value}")
    with pytest.raises(ConfigError) as info:
        parse(text)
    (path, line, message), = info.value.errors
    assert (path, line) == (PATH, 7) and "lwo, or off" in message
    assert f"{PATH}:7:" in str(info.value)


def test_obfuscation_with_a_bridge_or_via_is_an_error():
    text = IFACE + peer(K1, "Endpoint = 127.0.0.1:51820", "Bridge = udp2tcp://192.0.2.9:443", "Obfuscation = lwo")
    with pytest.raises(ConfigError) as info:
        parse(text)
    (_, line, message), = info.value.errors
    assert line == 9 and "Obfuscation on a peer with Bridge" in message
    text = (IFACE + peer(K1, "Endpoint = 192.0.2.1:51820")
            + "\n[Peer]\nPublicKey = " + K2 + "\nAllowedIPs = 0.0.0.0/0\nEndpoint = 198.51.100.7:51820\n"
            + f"Via = {K1}\nObfuscation = lwo\n")
    with pytest.raises(ConfigError) as info:
        parse(text)
    (_, line, message), = info.value.errors
    assert line == 14 and "Obfuscation on a peer with Via" in message


def test_wgpy_show_names_the_obfuscation():
    from tunnel import show  # noqa: PLC0415 (only this test needs it)

    def status(obfuscation):
        return uapi.InterfaceStatus("wg0", peers=[uapi.PeerStatus(bytes([0x11] * 32), endpoint=("192.0.2.1", 51820),
                                                                  obfuscation=obfuscation)])

    assert "\n  obfuscation: lwo\n" in show.format_text(status("lwo"), 0)
    assert "obfuscation" not in show.format_text(status(None), 0)
    assert '"obfuscation": "lwo"' in show.as_json([status("lwo")], 0)


# ---------------------------------------------------------------------------- wgpy set ... obfuscation

P1, P2 = bytes([0x21] * 32), bytes([0x22] * 32)


@pytest.fixture
def set_calls(monkeypatch):
    from tunnel import cli, netconfig, quick  # noqa: PLC0415

    calls = []
    monkeypatch.setattr(netconfig, "have_net_admin", lambda: True, raising=False)
    monkeypatch.setattr(quick, "set_peers", lambda ifname, changes: calls.append((ifname, changes)))
    return cli, calls


def test_cli_set_obfuscation(set_calls):
    from tunnel.keys import encode_base64_key  # noqa: PLC0415

    cli, calls = set_calls
    assert cli.main(["set", "wg0", "peer", encode_base64_key(P1), "obfuscation", "lwo",
                     "peer", encode_base64_key(P2), "obfuscation", "off",
                     "peer", encode_base64_key(P2), "via", encode_base64_key(P1)]) == 0
    assert calls == [("wg0", [(P1, "obfuscation", "lwo"), (P2, "obfuscation", None), (P2, "via", P1)])]
    assert cli.main(["set", "wg0", "peer", encode_base64_key(P1), "obfuscation", "LWO"]) == 0
    assert calls[-1] == ("wg0", [(P1, "obfuscation", "lwo")])


@pytest.mark.parametrize("argv, message", [
    (["obfuscation", "xor"], "argument 5: obfuscation takes lwo or off, not 'xor'"),
    (["obfuscation", ""], "argument 5: obfuscation takes lwo or off, not ''"),
    (["obfuscation", "on"], "not 'on'"),
    (["obfuscation"], "usage: wgpy set IFNAME peer PUBKEY bridge URI|FILE|off|via PUBKEY|off|obfuscation lwo|off"),
    (["obfuscate", "lwo"], "usage: wgpy set"),
])
def test_cli_set_obfuscation_errors_are_one_line(set_calls, capsys, argv, message):
    from tunnel.keys import encode_base64_key  # noqa: PLC0415

    cli, calls = set_calls
    assert cli.main(["set", "wg0", "peer", encode_base64_key(P1), *argv]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert calls == []


def test_set_help_names_obfuscation(capsys):
    from tunnel import cli  # noqa: PLC0415

    with pytest.raises(SystemExit):
        cli.main(["set", "--help"])
    out = capsys.readouterr().out
    assert "obfuscation lwo|off" in out and "LWO" in out


@pytest.fixture
def daemon(monkeypatch):
    """quick.set_peers against a daemon whose status is `state["status"]` (no socket)."""
    from tunnel import quick  # noqa: PLC0415

    state = {"status": uapi.InterfaceStatus("wg0", peers=[
        uapi.PeerStatus(P1, endpoint=("192.0.2.1", 51820)),
        uapi.PeerStatus(P2, endpoint=("127.0.0.1", 51820), bridge="udp2tcp://192.0.2.9:443"),
    ]), "sent": []}
    monkeypatch.setattr(quick.uapi, "get_status", lambda ifname: state["status"])
    monkeypatch.setattr(quick.uapi, "set_config", lambda ifname, lines: state["sent"].append(lines))
    return quick, state


def test_set_obfuscation_sends_the_uapi_key(daemon):
    quick, state = daemon
    quick.set_peers("wg0", [(P1, "obfuscation", "lwo")])
    quick.set_peers("wg0", [(P1, "obfuscation", None)])
    assert state["sent"] == [[f"public_key={P1.hex()}", "update_only=true", "wgpy_obfuscation=lwo"],
                             [f"public_key={P1.hex()}", "update_only=true", "wgpy_obfuscation="]]
    for lines in state["sent"]:  # what the daemon's parser takes
        assert isinstance(uapi.parse_set(lines).peers[0].ops[-1], uapi.SetObfuscation)
    # A bridged peer may drop its bridge and take LWO in the same command.
    quick.set_peers("wg0", [(P2, "bridge", None), (P2, "obfuscation", "lwo")])
    assert state["sent"][-1][-1] == "wgpy_obfuscation=lwo"


@pytest.mark.parametrize("changes, message", [
    ([(P2, "obfuscation", "lwo")], "obfuscation lwo with a bridge"),
    ([(P1, "obfuscation", "lwo"), (P1, "bridge", "udp2tcp://192.0.2.9:443")], "obfuscation lwo with a bridge"),
    ([(P1, "obfuscation", "lwo"), (P1, "via", P2)], "obfuscation lwo with via"),
    ([(bytes(32), "obfuscation", "lwo")], "wg0 has no peer"),
])
def test_set_obfuscation_refused_sends_nothing(daemon, changes, message):
    quick, state = daemon
    with pytest.raises(quick.UpError, match=message):
        quick.set_peers("wg0", changes)
    assert state["sent"] == []


def test_set_obfuscation_refused_on_a_peer_with_a_fallback_list(daemon):
    quick, state = daemon
    state["status"].peers[0].fallback = ["direct", "lwo"]
    with pytest.raises(quick.UpError, match=r"chooses its way itself \(fallback: direct, lwo\)"):
        quick.set_peers("wg0", [(P1, "obfuscation", "off")])
    assert state["sent"] == []


def test_set_obfuscation_on_wireguard_go_says_why(daemon, monkeypatch):
    quick, state = daemon

    def refuse(ifname, lines):
        raise uapi.ControlError("wg0: the daemon refused the settings (errno=-22)")

    monkeypatch.setattr(quick.uapi, "set_config", refuse)
    with pytest.raises(quick.UpError, match="obfuscation need wgpy-daemon; wireguard-go has none of them"):
        quick.set_peers("wg0", [(P1, "obfuscation", "lwo")])
