"""`make demo`: a whole wgpy tunnel on one machine, narrated.

Two network namespaces joined by a veth stand for two hosts. Each gets generated keys and a
wg-quick style config; `wgpy up` brings the tunnel up in each, ping and a TCP transfer go through
it, `wgpy show` shows it, `wgpy down` takes it away. Everything is removed at the end, also on
failure or Ctrl-C. Needs root (namespaces, TUN).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .keys import encode_base64_key, generate_private_key, public_key

WGPY = str(Path(sys.executable).with_name("wgpy"))


def say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def sh(argv: list[str], *, check: bool = True, show: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    if show:
        print("  $ " + " ".join(argv), flush=True)
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    out = (r.stdout + r.stderr).rstrip()
    if show and out:
        print("\n".join("    " + line for line in out.splitlines()), flush=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` exited {r.returncode}")
    return r


def main() -> int:
    if os.geteuid() != 0:
        print("make demo needs root (it creates network namespaces and TUN devices).", file=sys.stderr)
        return 1
    tag = secrets.token_hex(2)
    ns = {"alice": f"wgpydemo-{tag}-alice", "bob": f"wgpydemo-{tag}-bob"}
    ifn = {"alice": f"wgdemo{tag}a", "bob": f"wgdemo{tag}b"}
    under = {"alice": "192.168.77.1", "bob": "192.168.77.2"}
    inner = {"alice": ("10.77.0.1", "fd77::1"), "bob": ("10.77.0.2", "fd77::2")}
    tmp = tempfile.mkdtemp(prefix="wgpy-demo-")
    os.chmod(tmp, 0o700)
    up = []
    try:
        say("Two network namespaces stand for two hosts, joined by a virtual Ethernet cable")
        for who in ("alice", "bob"):
            sh(["ip", "netns", "add", ns[who]])
            sh(["ip", "-n", ns[who], "link", "set", "lo", "up"], show=False)
        sh(["ip", "-n", ns["alice"], "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", ns["bob"]])
        for who in ("alice", "bob"):
            sh(["ip", "-n", ns[who], "addr", "add", f"{under[who]}/24", "dev", "eth0"])
            sh(["ip", "-n", ns[who], "link", "set", "eth0", "up"])

        say("Keys: `wgpy genkey`, the same format as `wg genkey`")
        keys = {who: generate_private_key() for who in ("alice", "bob")}
        for who in ("alice", "bob"):
            print(f"    {who}: public key {encode_base64_key(public_key(keys[who]))}")

        say("wg-quick style configs (the same files wg-quick reads)")
        paths = {}
        for who, other, port in (("alice", "bob", 51820), ("bob", "alice", 51821)):
            v4, v6 = inner[who]
            ov4, ov6 = inner[other]
            text = (
                "[Interface]\n"
                f"PrivateKey = {encode_base64_key(keys[who])}\n"
                f"ListenPort = {port}\n"
                f"Address = {v4}/24, {v6}/64\n\n"
                "[Peer]\n"
                f"PublicKey = {encode_base64_key(public_key(keys[other]))}\n"
                f"AllowedIPs = {ov4}/32, {ov6}/128\n"
                f"Endpoint = {under[other]}:{51821 if who == 'alice' else 51820}\n"
            )
            paths[who] = os.path.join(tmp, f"{ifn[who]}.conf")
            fd = os.open(paths[who], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            print(f"    {paths[who]}:")
            print("\n".join("      " + (line if not line.startswith("PrivateKey") else "PrivateKey = (hidden)")
                            for line in text.splitlines()))

        say("`wgpy up` in each namespace: daemon, keys, addresses, MTU, routes")
        for who in ("alice", "bob"):
            sh(["ip", "netns", "exec", ns[who], WGPY, "up", paths[who]])
            up.append(who)

        say("Ping through the tunnel, IPv4 and IPv6 inside")
        sh(["ip", "netns", "exec", ns["alice"], "ping", "-c", "3", "-i", "0.2", "-W", "2", inner["bob"][0]])
        sh(["ip", "netns", "exec", ns["alice"], "ping", "-6", "-c", "3", "-i", "0.2", "-W", "2", inner["bob"][1]])

        say("A short TCP transfer through the tunnel")
        _transfer(ns["alice"], ns["bob"], inner["bob"][0])

        say("`wgpy show`: handshake and transfer counters")
        sh(["ip", "netns", "exec", ns["alice"], WGPY, "show", ifn["alice"]])

        say("`wgpy down` in each namespace: everything `up` added is removed")
        for who in ("alice", "bob"):
            sh(["ip", "netns", "exec", ns[who], WGPY, "down", paths[who]])
            up.remove(who)
        left = sh(["ip", "-n", ns["alice"], "-brief", "link"], show=False).stdout
        print(f"    links left in alice's namespace: {', '.join(l.split()[0] for l in left.splitlines())}")
        say("Done: a working WireGuard tunnel with no kernel module, and a clean host.")
        return 0
    except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
        print(f"\nmake demo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        for who in up:
            subprocess.run(["ip", "netns", "exec", ns[who], WGPY, "down", paths[who]], capture_output=True)
        for name in ns.values():
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        for who in ifn.values():
            for leftover in (f"/var/run/wireguard/{who}.sock", f"/run/wgpy/{who}.json"):
                if os.path.exists(leftover):
                    os.unlink(leftover)
        shutil.rmtree(tmp, ignore_errors=True)


def _transfer(client_ns: str, server_ns: str, addr: str) -> None:
    if shutil.which("iperf3"):
        srv = subprocess.Popen(["ip", "netns", "exec", server_ns, "iperf3", "-s", "-1", "-B", addr],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(100):
                if ":5201 " in sh(["ip", "netns", "exec", server_ns, "ss", "-Hltn"], show=False).stdout:
                    break
                time.sleep(0.05)
            r = sh(["ip", "netns", "exec", client_ns, "iperf3", "-c", addr, "-t", "2", "-f", "m"], show=False)
            lines = [ln for ln in r.stdout.splitlines() if "sender" in ln or "receiver" in ln]
            print("  $ iperf3 -c " + addr + " -t 2")
            print("\n".join("    " + ln.strip() for ln in lines))
        finally:
            srv.terminate()
            srv.wait(5)
    else:
        print("    (iperf3 not installed: skipping the transfer)")


if __name__ == "__main__":
    sys.exit(main())
