"""Interop: our sans-IO Shadowsocks codec (bridge.shadowsocks) against the real shadowsocks-libev
ss-server, for every AEAD-2017 method, UDP relay and TCP.

Layout (both namespaces made by the test; the root namespace is never touched):

    namespace "sscli"                      namespace "sssrv"
    veth 10.205.0.1/24, fd00:205::1/64 <-> veth 10.205.0.2/24, fd00:205::2/64
    our UDP/TCP sockets (setns)            ss-server -s 10.205.0.2 -p 838x -m METHOD -u (one each)
                                           echo servers (threads of this process): UDP and TCP on
                                           127.0.0.1:7007, UDP on [::1]:7007

Client side we speak Shadowsocks ourselves: seal_udp(echo, payload) to ss-server, which relays to
the echo and sends back salt || AEAD(echo address || payload); TcpEncryptor/TcpDecryptor over a
TCP connection to ss-server, first payload carrying the echo address.
"""

from __future__ import annotations

import base64
import os
import select
import socket
import time
from dataclasses import dataclass
from typing import Iterator

import pytest

from bridge.shadowsocks import Address, Cipher, TcpDecryptor, TcpEncryptor

from .traffic import tcp_echo, udp_echo
from .netlab import Namespace, NetLab, missing_requirements

pytestmark = pytest.mark.netns

CLI_V4, SRV_V4 = "10.205.0.1", "10.205.0.2"
CLI_V6, SRV_V6 = "fd00:205::1", "fd00:205::2"
ECHO_PORT = 7007
PASSWORD = "wgpy-interop-Pa55"
METHODS_2017 = ("chacha20-ietf-poly1305", "aes-256-gcm", "aes-128-gcm")
STEP = 3.0  # seconds for any one exchange
VETH_MTU = 1500


@dataclass
class Server:
    method: str
    port: int
    cipher: Cipher


@dataclass
class Lab:
    lab: NetLab
    cli: Namespace
    srv: Namespace
    servers: dict[str, Server]


# ---------------------------------------------------------------- echo servers (threads)


# The lab closes these sockets before it runs the deferred stop: the loops end on either.


def _start_echoes(lab: NetLab, ns: Namespace) -> None:
    for addr in (("127.0.0.1", ECHO_PORT), ("::1", ECHO_PORT)):
        udp_echo(lab, ns, addr)
    tcp_echo(lab, ns, ("127.0.0.1", ECHO_PORT))


# ---------------------------------------------------------------- the lab


@pytest.fixture(scope="module")
def sslab() -> Iterator[Lab]:
    reason = missing_requirements(("ip", "ss-server"))
    if reason:
        pytest.skip(reason)
    lab = NetLab()
    try:
        cli, srv = lab.netns("sscli"), lab.netns("sssrv")
        lab.veth(cli, srv, addrs_a=[f"{CLI_V4}/24", f"{CLI_V6}/64"],
                 addrs_b=[f"{SRV_V4}/24", f"{SRV_V6}/64"])
        _start_echoes(lab, srv)
        servers: dict[str, Server] = {}
        for i, method in enumerate(METHODS_2017):
            port = 8388 + i
            srv.popen(["ss-server", "-s", SRV_V4, "-p", str(port), "-k", PASSWORD,
                       "-m", method, "-u", "-v"])
            servers[method] = Server(method, port, Cipher(method, PASSWORD))
        # one more with a raw key (ss-server --key BASE64): no password derivation at all
        raw = bytes(range(1, 33))
        srv.popen(["ss-server", "-s", SRV_V4, "-p", "8398", "--key", base64.b64encode(raw).decode(),
                   "-m", "aes-256-gcm", "-u", "-v"])
        servers["raw-key"] = Server("aes-256-gcm", 8398, Cipher("aes-256-gcm", key=raw))
        yield Lab(lab, cli, srv, servers)
    finally:
        lab.close()


def udp_socket(lab: Lab) -> socket.socket:
    sock = lab.cli.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((CLI_V4, 0))
    return sock


def recv_or_none(sock: socket.socket, timeout: float) -> tuple[bytes, tuple] | None:
    r, _, _ = select.select([sock], [], [], timeout)
    return sock.recvfrom(65535) if r else None


def udp_exchange(lab: Lab, server: Server, sock: socket.socket, target: tuple, payload: bytes,
                 retry_until: float | None = None) -> tuple[Address, bytes]:
    """Send one sealed datagram, return the opened reply. Until `retry_until` (monotonic) a lost
    one is sent again (a fresh packet each time: ss-server may still be starting)."""
    while True:
        sock.sendto(server.cipher.seal_udp(target, payload), (SRV_V4, server.port))
        got = recv_or_none(sock, 0.2 if retry_until else STEP)
        if got is not None:
            data, src = got
            assert src == (SRV_V4, server.port)
            return server.cipher.open_udp(data)
        if retry_until is None or time.monotonic() > retry_until:
            logs = "\n".join(p.output()[-2000:] for p in lab.lab.processes)
            pytest.fail(f"no UDP reply from ss-server ({server.method}, port {server.port})\n{logs}")


@pytest.fixture(scope="module")
def warm(sslab: Lab) -> Lab:
    """Every ss-server answered one datagram (they start in parallel)."""
    deadline = time.monotonic() + 10
    for server in sslab.servers.values():
        sock = udp_socket(sslab)
        udp_exchange(sslab, server, sock, ("127.0.0.1", ECHO_PORT), b"warm-up", retry_until=deadline)
        sock.close()
    return sslab


# ---------------------------------------------------------------- UDP


@pytest.mark.parametrize("name", [*METHODS_2017, "raw-key"])
def test_udp_echo_through_ss_server(warm: Lab, name: str) -> None:
    server = warm.servers[name]
    sock = udp_socket(warm)
    target = ("127.0.0.1", ECHO_PORT)
    biggest = VETH_MTU - 28 - server.cipher.udp_overhead(target)  # what fits the 1500-byte path
    for payload in (b"hello", b"\x00", os.urandom(1300), os.urandom(biggest)):
        address, data = udp_exchange(warm, server, sock, target, payload)
        assert address == Address("127.0.0.1", ECHO_PORT)
        assert data == payload


def test_udp_reply_larger_than_the_path_is_dropped(warm: Lab) -> None:
    """ss-server sets DF on its UDP sockets: a reply one byte over the path MTU is not
    fragmented but dropped (EMSGSIZE), so a bridge must size the tunnel MTU by udp_overhead."""
    server = warm.servers["chacha20-ietf-poly1305"]
    sock = udp_socket(warm)
    target = ("127.0.0.1", ECHO_PORT)
    too_big = VETH_MTU - 28 - server.cipher.udp_overhead(target) + 1
    sock.sendto(server.cipher.seal_udp(target, os.urandom(too_big)), (SRV_V4, server.port))
    assert recv_or_none(sock, 0.4) is None
    assert udp_exchange(warm, server, sock, target, b"small")[1] == b"small"


def test_udp_ipv6_target(warm: Lab) -> None:
    server = warm.servers["chacha20-ietf-poly1305"]
    sock = udp_socket(warm)
    address, data = udp_exchange(warm, server, sock, ("::1", ECHO_PORT), b"over v6")
    assert (address, data) == (Address("::1", ECHO_PORT), b"over v6")


def test_udp_replayed_and_tampered_packets_get_no_reply(warm: Lab) -> None:
    """libev drops a repeated salt (its ping-pong Bloom filter) and anything that fails
    authentication, silently; a fresh packet still goes through afterwards."""
    server = warm.servers["aes-256-gcm"]
    sock = udp_socket(warm)
    packet = server.cipher.seal_udp(("127.0.0.1", ECHO_PORT), b"once")
    sock.sendto(packet, (SRV_V4, server.port))
    got = recv_or_none(sock, STEP)
    assert got is not None and server.cipher.open_udp(got[0])[1] == b"once"
    sock.sendto(packet, (SRV_V4, server.port))
    tampered = bytearray(server.cipher.seal_udp(("127.0.0.1", ECHO_PORT), b"tampered"))
    tampered[-1] ^= 1
    sock.sendto(bytes(tampered), (SRV_V4, server.port))
    assert recv_or_none(sock, 0.4) is None
    address, data = udp_exchange(warm, server, sock, ("127.0.0.1", ECHO_PORT), b"still here")
    assert data == b"still here"


# ---------------------------------------------------------------- TCP


def tcp_connect(lab: Lab, port: int) -> socket.socket:
    deadline = time.monotonic() + 5
    while True:
        sock = lab.cli.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(STEP)
        try:
            sock.connect((SRV_V4, port))
            return sock
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def read_plaintext(sock: socket.socket, dec: TcpDecryptor, want: int) -> bytes:
    got = bytearray()
    while len(got) < want:
        data = sock.recv(65536)
        if not data:
            dec.feed_eof()
            break
        for piece in dec.feed(data):
            got += piece
    return bytes(got)


@pytest.mark.parametrize("name", [*METHODS_2017, "raw-key"])
def test_tcp_echo_through_ss_server(warm: Lab, name: str) -> None:
    server = warm.servers[name]
    sock = tcp_connect(warm, server.port)
    with sock:
        enc = TcpEncryptor(server.cipher, ("127.0.0.1", ECHO_PORT))
        dec = TcpDecryptor(server.cipher)
        first = enc.encrypt(b"hello")
        # the first bytes in awkward pieces: the salt split, the first chunk split
        for piece in (first[:7], first[7:40], first[40:]):
            sock.sendall(piece)
            time.sleep(0.01)
        assert read_plaintext(sock, dec, 5) == b"hello"
        big = os.urandom(3 * 0x3FFF + 1234)  # several full chunks and a partial one
        sock.sendall(enc.encrypt(big))
        assert read_plaintext(sock, dec, len(big)) == big
        sock.shutdown(socket.SHUT_WR)
        assert read_plaintext(sock, dec, 1) == b""  # clean end between chunks
