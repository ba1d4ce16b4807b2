"""The flood scenario of `wgpy bench`: how much of a tunnel's throughput survives a handshake
flood, wgpy next to wireguard-go.

Two floods, at a fixed rate to side b's WireGuard port from side a's namespace, while iperf3
runs a->b through the tunnel:
- "random": initiations with random content and a valid mac1, what anyone who knows the
  responder's public key (it is public) can make: the responder cannot tell them from real ones
  before the expensive part (a Diffie-Hellman), or, once under load, a cookie reply;
- "replays": one genuine initiation of side a, captured once and sent again and again, which
  goes further (both Diffie-Hellmans, the peer found, then the timestamp rejects it).
The figure is the share of the unflooded throughput (same pair, same round) that is kept.

    python -m bench.flood --to HOST:PORT --public HEX --rate N --seconds S [--replay]
    (the flooder; with --replay it reads side a's private key, hex, from stdin)
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

from tunnel.noise.cookie import CookieGenerator
from tunnel.noise.handshake import Handshake, Identity, create_initiation
from tunnel.noise.messages import MAC1_FROM_END

from .tunnel import pair_lab

INITIATION_SIZE = 148
VARIANTS = 256  # distinct messages cycled through (the mac1 of each is computed once)


def initiations(responder_public: bytes, count: int = VARIANTS) -> list[bytes]:
    """Handshake initiations with random content and a valid mac1 for `responder_public`."""
    gen = CookieGenerator(responder_public)
    out = []
    for _ in range(count):
        msg = bytearray(b"\x01\x00\x00\x00" + os.urandom(INITIATION_SIZE - 4 - MAC1_FROM_END) + bytes(MAC1_FROM_END))
        gen.add_macs(msg, 0.0)
        out.append(bytes(msg))
    return out


def genuine_initiation(private: bytes, responder_public: bytes) -> bytes:
    """A real initiation from the holder of `private` to `responder_public` (mac1 filled in),
    stamped an hour ago: what a recorded one is once its handshake is done, so the responder
    rejects it by its timestamp, after all the work, and never takes it for a new handshake."""
    identity = Identity(private)
    msg = create_initiation(identity, Handshake(identity, responder_public), int.from_bytes(os.urandom(4), "little"),
                            os.urandom(32), time.time() - 3600)
    CookieGenerator(responder_public).add_macs(msg, 0.0)
    return bytes(msg)


def flood(target: tuple[str, int], msgs: list[bytes], rate: int, seconds: float) -> int:
    """Send `rate` of `msgs` per second (cycling) for `seconds`; returns how many were sent."""
    sock = socket.socket(socket.AF_INET6 if ":" in target[0] else socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.connect(target)
    send = sock.send
    sent = 0
    start = time.monotonic()
    slice_ = 0.002  # pace in 2 ms slices
    while (elapsed := time.monotonic() - start) < seconds:
        due = int(rate * elapsed) - sent
        for i in range(max(0, due)):
            try:
                send(msgs[(sent + i) % len(msgs)])
            except (BlockingIOError, ConnectionRefusedError):
                pass
        sent += max(0, due)
        time.sleep(slice_)
    sock.close()
    return sent


def measure(left: str, right: str, seconds: int, rate: int) -> dict[str, float]:
    """a->b Mbit/s through one pair's tunnel: "quiet", "random" and "replays" (floods), and
    "sent": the flood's initiations per second (the slower of the two)."""
    out: dict[str, float] = {}
    with pair_lab(left, right) as (lab, addr):
        out["quiet"], _ = lab.iperf(1, 0, addr, seconds, False)
        public = lab.keys[1][1]
        rates = []
        for kind in ("random", "replays"):
            argv = [sys.executable, "-m", "bench.flood", "--to", "10.231.0.2:51821", "--public", public.hex(),
                    "--rate", str(rate), "--seconds", str(seconds + 1)] + (["--replay"] if kind == "replays" else [])
            flooder = subprocess.Popen(lab.exec(0, *argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=subprocess.DEVNULL, text=True)
            lab.procs.append(flooder)
            if kind == "replays":  # side a's key (a throwaway of this lab) on stdin, never in argv
                flooder.stdin.write(lab.keys[0][0].hex() + "\n")
            flooder.stdin.close()
            time.sleep(0.5)  # the flood is on before the transfer starts
            out[kind], _ = lab.iperf(1, 0, addr, seconds, False)
            flooder.wait(timeout=seconds + 15)
            text = flooder.stdout.read()
            try:
                rates.append(int(text.strip() or 0) / (seconds + 1))
            except ValueError:
                rates.append(0.0)
        out["sent"] = min(rates)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.flood", description="send handshake initiations with a "
                                "valid mac1 to a WireGuard port (benchmarks only: into your own namespaces)")
    p.add_argument("--to", required=True, metavar="HOST:PORT")
    p.add_argument("--public", required=True, metavar="HEX", help="the responder's public key, hex")
    p.add_argument("--rate", type=int, default=50_000, help="initiations per second")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--replay", action="store_true",
                   help="replay one genuine initiation of the key read (hex) from stdin, instead of random ones")
    args = p.parse_args(argv)
    host, _, port = args.to.rpartition(":")
    try:
        public = bytes.fromhex(args.public)
        if len(public) != 32:
            raise ValueError
    except ValueError:
        p.error("--public must be 64 hex characters")
    if args.replay:
        try:
            private = bytes.fromhex(sys.stdin.readline().strip())
            if len(private) != 32:
                raise ValueError
        except ValueError:
            p.error("--replay: stdin must hold a 64-hex-character private key")
        msgs = [genuine_initiation(private, public)]
    else:
        msgs = initiations(public)
    print(flood((host.strip("[]"), int(port)), msgs, args.rate, args.seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
