"""Automatic fallback between transports (`Bridge = direct, udp2tcp://...`, bridge/fallback.py)
with real processes, in the kill switch's lab (tests/netns/test_killswitch.py):

    client (wgpy up) --veth-- router (blocks what the test says) --veth-- server

The server is a wgpy-daemon with `wgpy bridge serve` (udp-over-tcp) in front of its port. The
router drops every UDP datagram from the client (a network that blocks UDP outright): the client
ends up on udp2tcp by itself and pings flow; the block is lifted: it returns to direct later.
The kill switch is on, so the test also sees its allowed set follow the way in use. The times
are printed (`FALLBACK |` lines) for the notes; the bounds asserted are the design's (15 s per
blocked way, the earlier way tried again 30 s after the later one worked) plus slack.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from .test_killswitch import PORT, S4, TUN_S, UDP2TCP_PORT, WGPY, Lab, _needs_tools, nft  # noqa: F401
from .test_lwo import DPI_RULES, dropped, set_lwo
from .traffic import wait_for_ping

pytestmark = pytest.mark.netns


@pytest.fixture
def lab(netlab) -> Lab:
    return Lab(netlab)


def in_use(lab: Lab) -> str:
    out = lab.wgpy("show", lab.ifname).stdout
    line = next((ln for ln in out.splitlines() if "ways:" in ln), "")
    return line.rsplit("(in use: ", 1)[-1].rstrip(")") if line else ""


def wait_in_use(lab: Lab, want: str, timeout: float) -> float:
    start = time.monotonic()
    while not in_use(lab).startswith(want):
        assert time.monotonic() - start < timeout, (in_use(lab), lab.log())
        time.sleep(0.5)
    return time.monotonic() - start


def test_udp_blocked_falls_back_to_udp2tcp_and_returns_to_direct(lab):
    server = lab.s.popen([WGPY, "bridge", "serve", "--listen", f"udp2tcp://0.0.0.0:{UDP2TCP_PORT}",
                          "--allow", f"127.0.0.1:{PORT}"])
    deadline = time.monotonic() + 10
    while "ready" not in server.output():
        assert server.poll() is None and time.monotonic() < deadline, server.output()
        time.sleep(0.05)
    nft(lab.r, f'table inet censor {{\n  chain block {{\n    type filter hook forward priority 0;\n'
               f'    iifname "{lab.r_link}" meta l4proto udp counter drop\n  }}\n}}\n')
    start = time.monotonic()
    lab.up(lab.config(endpoint=S4, peer_extra=f"Bridge = direct, udp2tcp://{S4}:{UDP2TCP_PORT}\n"))
    assert in_use(lab) in ("direct", f"udp2tcp://{S4}:{UDP2TCP_PORT}")
    took = wait_for_ping(lab.c, TUN_S, 40)
    assert took is not None, lab.log()
    found = time.monotonic() - start
    assert in_use(lab) == f"udp2tcp://{S4}:{UDP2TCP_PORT}"
    lab.wait_hops({(S4, "tcp", UDP2TCP_PORT)})  # the kill switch allows exactly the way in use
    print(f"\nFALLBACK | UDP blocked | direct -> udp2tcp | traffic after {found:.1f} s")
    assert found < 30
    blocked = lab.r.run(["nft", "list", "table", "inet", "censor"]).stdout
    assert "packets 0 " not in blocked  # the censor really dropped the direct attempts

    lab.r.run(["nft", "delete", "table", "inet", "censor"])
    back = wait_in_use(lab, "direct", 75)
    assert wait_for_ping(lab.c, TUN_S, 15) is not None, lab.log()
    lab.wait_hops({(S4, "udp", PORT)})
    print(f"FALLBACK | UDP unblocked | udp2tcp -> direct | after {back:.1f} s")


def test_wireguard_dpi_falls_back_to_lwo(lab):
    """A router that drops UDP starting with a WireGuard message type and three zero bytes (the
    DPI rule of tests/netns/test_lwo.py): `Bridge = direct, lwo` ends on LWO by itself. The
    server has the client's peer as LWO (`wgpy_obfuscation=lwo`), as a server offering LWO would."""
    set_lwo(lab.server, SimpleNamespace(keys=lab.client_keys), "lwo")  # the client's peer on the server
    nft(lab.r, DPI_RULES)
    start = time.monotonic()
    lab.up(lab.config(endpoint=S4, extra="", peer_extra="Bridge = direct, lwo\n"))
    took = wait_for_ping(lab.c, TUN_S, 40)
    assert took is not None, lab.log()
    found = time.monotonic() - start
    assert in_use(lab) == "lwo"
    assert dropped(lab.r) > 0  # the plain attempts were seen and dropped
    print(f"\nFALLBACK | WireGuard DPI | direct -> lwo | traffic after {found:.1f} s")
    assert found < 30
    # The DPI rule goes: the server answers the direct probe plainly (as it was sent), so the
    # client returns to direct and stays there.
    lab.r.run(["nft", "delete", "table", "inet", "wgpy_test_dpi"])
    back = wait_in_use(lab, "direct", 75)
    assert wait_for_ping(lab.c, TUN_S, 15) is not None, lab.log()
    time.sleep(16)  # longer than a way takes to fail
    assert in_use(lab) == "direct", lab.log()
    print(f"FALLBACK | WireGuard DPI lifted | lwo -> direct | after {back:.1f} s")
