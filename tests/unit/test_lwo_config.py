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
