"""The daemon's log under `wgpy up` / `wgpy down` with LOG_LEVEL=verbose (issue 12, items 14-15):
the first line does not pass off the random start port as the interface's, handshakes are logged
as wireguard-go logs them (peer(AbCd…wxYz), never a key), and a normal `down` is an
"interface deleted" stop, not "TUN read failed"."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import time

import pytest

from .netlab import missing_requirements, unique_ifname
from .test_quick import WGPY, two_hosts, write_conf
from .wg_peers import Keys

pytestmark = pytest.mark.netns


def test_verbose_log_of_up_and_down(netlab):
    reason = missing_requirements(("wg", "ping"), need_tun=True)
    if reason:
        pytest.skip(reason)
    a, _ = two_hosts(netlab)
    ifname = unique_ifname("wgl")
    log_path = f"/var/log/wgpy/{ifname}.log"
    netlab.defer(lambda: os.path.exists(log_path) and os.unlink(log_path))
    key, peer = Keys(), Keys()
    path = write_conf(netlab, ifname, f"""[Interface]
PrivateKey = {key.private_b64}
ListenPort = 51999
Address = 10.77.0.1/24

[Peer]
PublicKey = {peer.public_b64}
AllowedIPs = 10.77.0.2/32
Endpoint = 10.210.0.2:51821
""")
    env = dict(os.environ, LOG_LEVEL="verbose")
    for verb in ("up", "down"):
        if verb == "down":
            a.run(["ping", "-c", "1", "-W", "1", "10.77.0.2"], check=False)  # a handshake attempt
        r = subprocess.run(a.exec_argv([WGPY, verb, path]), env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 5
    while "stopped" not in (open(log_path).read() if os.path.exists(log_path) else ""):
        assert time.monotonic() < deadline, "the daemon did not log its stop"
        time.sleep(0.05)
    lines = open(log_path).read().splitlines()
    first = lines[0]
    m = re.search(r"listening on UDP port (\d+)(.*)$", first)
    assert m, first
    assert m.group(1) == "51999" or "random until a listen port is configured" in m.group(2), first
    ports = [re.search(r"listening on UDP port (\d+)$", line) for line in lines]
    assert [p.group(1) for p in ports if p] == ["51999"], lines  # the port it keeps, named plainly
    text = "\n".join(lines)
    short = f"peer({peer.public_b64[:4]}…{peer.public_b64[39:43]})"
    assert f"{short} - sending handshake initiation" in text, text
    assert "shutting down: interface deleted" in text and "TUN read failed" not in text, text
    private = base64.b64decode(key.private_b64)
    assert key.private_b64 not in text and private.hex() not in text
