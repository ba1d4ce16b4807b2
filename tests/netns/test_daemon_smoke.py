"""wgpy-daemon <-> wgpy-daemon, configured with `wg setconf` only: the smallest real tunnel."""

from __future__ import annotations

import pytest

from .netlab import missing_requirements
from .wg_peers import WgInterface

pytestmark = pytest.mark.netns


def test_two_daemons_ping(netlab):
    reason = missing_requirements(("wg", "ping"), need_tun=True)
    if reason:
        pytest.skip(reason)
    a_ns, b_ns = netlab.netns("a"), netlab.netns("b")
    netlab.veth(a_ns, b_ns, addrs_a=["10.201.0.1/24"], addrs_b=["10.201.0.2/24"])
    a = WgInterface(netlab, a_ns, "wgpy").start()
    b = WgInterface(netlab, b_ns, "wgpy").start()
    a.setconf(listen_port=51820, peers=[b.peer_conf(["10.202.0.2/32"], "10.201.0.2:51821")])
    b.setconf(listen_port=51821, peers=[a.peer_conf(["10.202.0.1/32"])])
    a.address("10.202.0.1/24")
    b.address("10.202.0.2/24")
    r = a_ns.run(["ping", "-c", "3", "-i", "0.2", "-W", "2", "10.202.0.2"], check=False)
    assert r.returncode == 0, r.stdout + r.stderr + a.log() + b.log()
    dump = a.dump()
    peer = dump["peers"][b.keys.public_b64]
    assert dump["listen_port"] == 51820
    assert peer["latest_handshake"] > 0 and peer["rx"] > 0 and peer["tx"] > 0
    assert peer["endpoint"] == "10.201.0.2:51821"
    assert b.dump()["peers"][a.keys.public_b64]["endpoint"] == "10.201.0.1:51820"  # learned
    assert a.keys.private_b64 not in a.log()  # never logged
