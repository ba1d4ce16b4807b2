"""bridge/carrier.py over loopback: the Shadowsocks transport against a fake server built from the
codec (AEAD-2017 and 2022), and the udp2tcp transport against a fake udp-over-tcp echo server.
They are driven as the engine drives every transport: `run`, then a task per receive function."""

from __future__ import annotations

import base64
import errno
import os
import socket
import time
from types import SimpleNamespace

import pytest
import trio

from bridge import carrier as carrier_mod
from bridge.carrier import ShadowsocksTransport, Udp2TcpTransport, open_bridge
from bridge.shadowsocks import METHODS, Cipher, ServerConfig, Udp2022Client, Udp2022Server, format_uri
from bridge.spec import parse_bridge
from bridge.udp2tcp import FrameDecoder, encode
from transport.base import Endpoint

LOOP = "127.0.0.1"
IDENT = 7
PASSWORD = "carrier-test-password"
ALL_METHODS = list(METHODS)
WG = Endpoint(LOOP, 51820, IDENT)
TIMEOUT = 5


def secret_for(method: str) -> str:
    if METHODS[method].is_2022:
        return base64.b64encode(os.urandom(METHODS[method].key_len)).decode()
    return PASSWORD


async def until(predicate, timeout: float = TIMEOUT) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.001)


class Inbox:
    """A deliver() callback that records every batch."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[bytes, Endpoint]]] = []
        self.items: list[tuple[bytes, Endpoint]] = []
        self._changed = trio.Event()

    def __call__(self, batch) -> None:
        assert isinstance(batch, list) and batch
        self.batches.append(batch)
        self.items.extend(batch)
        self._changed.set()

    async def wait_for(self, n: int, timeout: float = TIMEOUT) -> list:
        with trio.fail_after(timeout):
            while len(self.items) < n:
                self._changed = trio.Event()
                await self._changed.wait()
        return self.items


def open_carrier(spec, ident: int, inbox: Inbox, fwmark: int = 0):
    """A bridge transport as the engine opens one, with what the tests drive it by: a cancel
    scope (the engine's per-transport scope) and the inbox its batches go to."""
    transport = open_bridge(spec, ident, fwmark)
    transport.scope = trio.CancelScope()
    transport.inbox = inbox
    return transport


async def run_transport(transport) -> None:
    """What the engine does with a transport: `run`, and the reader loop on each receive function."""

    async def pump(receive) -> None:
        while True:
            try:
                batch = await receive()
            except trio.ClosedResourceError:
                return
            transport.inbox(batch)

    with transport.scope:
        async with trio.open_nursery() as nursery:
            await nursery.start(transport.run)
            for receive in transport.receivers():
                nursery.start_soon(pump, receive)


class FakeSsServer:
    """A Shadowsocks UDP server reduced to the codec: records (target, payload) of each request
    and, if `reply`, answers from `reply_from` (default: the target) with b"re:" + payload."""

    def __init__(self, method: str, secret: str) -> None:
        self.method = method
        self.secret = secret
        self.cipher = Cipher(method, secret)
        self.server2022 = Udp2022Server(self.cipher) if METHODS[method].is_2022 else None
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.bind((LOOP, 0))
        self.address = self.sock.getsockname()
        self.received: list[tuple[tuple[str, int], bytes]] = []
        self.client: tuple | None = None  # the carrier's address, from its first request
        self.session: bytes | None = None  # 2022: the client's session id
        self.reply = True
        self.reply_from: tuple[str, int] | None = None
        self.scope = trio.CancelScope()  # cancel it to close the server's port
        self._changed = trio.Event()

    def uri(self) -> str:
        return format_uri(ServerConfig(self.method, self.secret, self.address[0], self.address[1]))

    def seal(self, source, payload: bytes) -> bytes:
        if self.server2022 is not None:
            return self.server2022.seal(self.session, source, payload, time.time())
        return self.cipher.seal_udp(source, payload)

    def send_raw(self, packet: bytes) -> None:
        self.sock.sendto(packet, self.client)

    async def wait_for(self, n: int, timeout: float = TIMEOUT) -> list:
        with trio.fail_after(timeout):
            while len(self.received) < n:
                self._changed = trio.Event()
                await self._changed.wait()
        return self.received

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started(self)
        with self.scope, self.sock:
            while True:
                await trio.lowlevel.wait_readable(self.sock)
                try:
                    packet, addr = self.sock.recvfrom(0xFFFF)
                except BlockingIOError:
                    continue
                if self.server2022 is not None:
                    opened = self.server2022.open(packet, time.time())
                    self.session, target, payload = opened.session_id, opened.target, opened.payload
                else:
                    target, payload = self.cipher.open_udp(packet)
                self.client = addr
                self.received.append((tuple(target), payload))
                self._changed.set()
                if self.reply:
                    self.sock.sendto(self.seal(self.reply_from or target, b"re:" + payload), addr)


async def start_ss(nursery, method: str, inbox: Inbox | None = None):
    server = FakeSsServer(method, secret_for(method))
    await nursery.start(server.run)
    inbox = inbox if inbox is not None else Inbox()
    carrier = open_carrier(parse_bridge(server.uri(), numeric=True), IDENT, inbox)
    assert isinstance(carrier, ShadowsocksTransport)
    nursery.start_soon(run_transport, carrier)
    await until(lambda: carrier.connected)
    return server, carrier, inbox


# ---------------------------------------------------------------- Shadowsocks


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("target", [(LOOP, 51820), ("2001:db8::5", 4500)], ids=["v4", "v6"])
async def test_ss_round_trip(method, target):
    async with trio.open_nursery() as nursery:
        server, carrier, inbox = await start_ss(nursery, method)
        endpoint = Endpoint(*target, IDENT)
        payloads = [b"\x01" + bytes(31), os.urandom(148), os.urandom(1420), b"x"]
        for p in payloads:
            carrier.send([(p, endpoint)])
        assert await server.wait_for(len(payloads)) == [(target, p) for p in payloads]
        items = await inbox.wait_for(len(payloads))
        assert items == [(b"re:" + p, endpoint) for p in payloads]
        assert all(type(ep) is Endpoint for _, ep in items)
        stats = carrier.statistics()
        last_reply = stats.pop("last_reply")
        assert stats == {"kind": carrier.kind, "bridge": carrier.spec.redacted(), "connected": True,
                         "sent": len(payloads), "received": len(payloads), "dropped": 0,
                         "drop_reasons": {}}
        assert abs(last_reply - time.time()) < 5
        assert server.secret not in str(stats)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("method", ALL_METHODS)
async def test_ss_reply_endpoint_is_the_packets_source(method):
    """The endpoint delivered is the source address inside the reply (who the server heard from),
    not where we last sent."""
    async with trio.open_nursery() as nursery:
        server, carrier, inbox = await start_ss(nursery, method)
        server.reply_from = ("2001:db8::77", 4242)
        carrier.send([(b"hello", WG)])
        [(target, payload)] = await server.wait_for(1)
        assert (target, payload) == ((LOOP, 51820), b"hello")
        assert await inbox.wait_for(1) == [(b"re:hello", Endpoint("2001:db8::77", 4242, IDENT))]
        server.reply_from = ("198.51.100.3", 1)
        carrier.send([(b"again", WG)])
        await inbox.wait_for(2)
        assert inbox.items[1] == (b"re:again", Endpoint("198.51.100.3", 1, IDENT))
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("method", ALL_METHODS)
async def test_ss_batch_of_replies(method):
    async with trio.open_nursery() as nursery:
        server, carrier, inbox = await start_ss(nursery, method)
        carrier.send([(b"first", WG)])
        await inbox.wait_for(1)
        server.reply = False
        # Several replies waiting at once are read in one wakeup and delivered in order.
        packets = [server.seal((LOOP, 51820), b"r%d" % i) for i in range(20)]
        for packet in packets:
            server.send_raw(packet)
        items = await inbox.wait_for(21)
        assert [p for p, _ in items[1:]] == [b"r%d" % i for i in range(20)]
        assert all(ep == WG for _, ep in items)
        assert carrier.received == 21 and carrier.drops.total == 0
        nursery.cancel_scope.cancel()


def garbage_for(server: FakeSsServer) -> dict[str, bytes]:
    """Datagrams a carrier must drop, by the drop reason it should count."""
    cipher = server.cipher
    m = cipher.method
    wrong = Cipher(m.name, secret_for(m.name) if m.is_2022 else "another password")
    out = {
        "empty": b"",
        "short": b"\x00\x01\x02",
        "random": os.urandom(200),
    }
    if m.is_2022:
        other = Udp2022Server(wrong)
        opened = other.open(Udp2022Client(wrong).seal(("192.0.2.1", 1), b"x", time.time()), time.time())
        out["wrong key"] = other.seal(opened.session_id, ("192.0.2.1", 1), b"forged", time.time())
    else:
        out["wrong key"] = wrong.seal_udp(("192.0.2.1", 1), b"forged")
        salt = cipher.new_salt()
        nonce = bytes(m.nonce_len)
        # Authentic, but the address inside has an unknown type.
        out["bad address"] = salt + cipher.session_aead(salt).encrypt(nonce, b"\x09abcdef", None)
        # Authentic, but the address is cut short.
        out["truncated address"] = salt + cipher.session_aead(salt).encrypt(nonce, b"\x01\x7f\x00", None)
    return out


@pytest.mark.parametrize("method", ALL_METHODS)
async def test_ss_garbage_from_the_server_is_dropped_and_counted(method):
    async with trio.open_nursery() as nursery:
        server, carrier, inbox = await start_ss(nursery, method)
        carrier.send([(b"one", WG)])
        await inbox.wait_for(1)
        server.reply = False
        garbage = garbage_for(server)
        for packet in garbage.values():
            server.send_raw(packet)
        expected = len(garbage)
        if METHODS[method].is_2022:
            # 2022: an authentic reply seen before is a replay.
            replay = server.seal((LOOP, 51820), b"replayed")
            server.send_raw(replay)
            server.send_raw(replay)
            expected += 1
        server.send_raw(server.seal((LOOP, 51820), b"last"))  # loopback keeps the order
        items = await inbox.wait_for(2 + METHODS[method].is_2022)
        wanted = [b"re:one"] + ([b"replayed"] if METHODS[method].is_2022 else []) + [b"last"]
        assert [p for p, _ in items] == wanted
        assert carrier.drops.total == expected
        reasons = carrier.statistics()["drop_reasons"]
        assert sum(reasons.values()) == expected
        assert reasons.get("reply failed authentication", 0) >= 1  # at least the wrong key
        assert set(reasons) <= {"reply failed authentication", "reply malformed", "reply replayed"}
        if METHODS[method].is_2022:
            assert reasons["reply replayed"] == 1
        else:
            assert reasons["reply malformed"] >= 4  # empty, short, bad and truncated address
        assert carrier.received == len(wanted)
        assert carrier.connected  # garbage never stops the carrier
        server.reply = True
        carrier.send([(b"still", WG)])
        await inbox.wait_for(len(wanted) + 1)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("method", ["aes-256-gcm", "2022-blake3-aes-128-gcm"])
async def test_ss_a_reply_counts_only_once_it_authenticates(method):
    """Issue 12, item 14: a socket to the server is not a working bridge. A server with another
    password stays silent or answers with packets we cannot open: no reply yet (last_reply None)
    until one authenticates with our key."""
    async with trio.open_nursery() as nursery:
        server, carrier, inbox = await start_ss(nursery, method)
        server.reply = False  # a server with another password drops what we send
        carrier.send([(b"hello?", WG)])
        await server.wait_for(1)
        for packet in garbage_for(server).values():  # answers sealed with another key, junk
            server.send_raw(packet)
        await until(lambda: carrier.drops.total >= 3)
        assert carrier.connected and carrier.last_reply is None
        assert carrier.statistics()["last_reply"] is None
        before = time.time()
        server.send_raw(server.seal((LOOP, 51820), b"authentic"))
        await inbox.wait_for(1)
        assert carrier.last_reply is not None and before <= carrier.last_reply <= time.time()
        assert carrier.statistics()["last_reply"] == carrier.last_reply
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("method", ["aes-256-gcm", "2022-blake3-aes-128-gcm"])
async def test_ss_send_before_run_is_a_counted_drop(method):
    server = FakeSsServer(method, secret_for(method))
    with server.sock:
        inbox = Inbox()
        carrier = open_carrier(parse_bridge(server.uri()), IDENT, inbox)
        assert not carrier.connected
        carrier.send([(b"too early", WG)])  # never raises
        carrier.send([(b"", WG)])
        assert carrier.drops.total == 2
        assert carrier.sent == 0
        stats = carrier.statistics()
        assert (stats["connected"], stats["sent"], stats["dropped"]) == (False, 0, 2)
        assert stats["drop_reasons"] == {"no socket to the server yet": 2}
        assert inbox.items == []


@pytest.mark.parametrize("method", ["chacha20-ietf-poly1305", "2022-blake3-aes-256-gcm"])
async def test_ss_cancelling_the_scope_stops_run(method):
    async with trio.open_nursery() as nursery:
        server = FakeSsServer(method, secret_for(method))
        await nursery.start(server.run)
        inbox = Inbox()
        carrier = open_carrier(parse_bridge(server.uri()), IDENT, inbox)
        stopped = trio.Event()

        async def run_carrier():
            await run_transport(carrier)
            stopped.set()

        nursery.start_soon(run_carrier)
        await until(lambda: carrier.connected)
        carrier.send([(b"up", WG)])
        await inbox.wait_for(1)
        carrier.scope.cancel()
        with trio.fail_after(TIMEOUT):
            await stopped.wait()  # its tasks returned on their own (the nursery was not cancelled)
        carrier.close()  # what the engine does after cancelling: the socket goes with it
        assert not carrier.connected
        carrier.send([(b"after", WG)])
        assert carrier.drops.reasons["no socket to the server yet"] == 1
        nursery.cancel_scope.cancel()


async def test_ss_cancelled_before_run_returns_at_once():
    server = FakeSsServer("aes-128-gcm", PASSWORD)
    with server.sock:
        carrier = open_carrier(parse_bridge(server.uri()), IDENT, Inbox())
        carrier.scope.cancel()
        with trio.fail_after(TIMEOUT):
            await run_transport(carrier)
        carrier.close()
        assert not carrier.connected
        carrier.send([(b"late", WG)])
        assert carrier.drops.reasons == {"no socket to the server yet": 1}


async def test_ss_closed_server_port_is_counted_not_raised():
    async with trio.open_nursery() as nursery:
        server, carrier, inbox = await start_ss(nursery, "aes-256-gcm")
        carrier.send([(b"ping", WG)])
        await inbox.wait_for(1)
        server.scope.cancel()  # the port closes: ICMP port unreachable from now on
        await until(lambda: server.sock.fileno() == -1)
        with trio.fail_after(TIMEOUT):
            while not any("ECONNREFUSED" in r for r in carrier.drops.reasons):
                carrier.send([(b"lost", WG)])  # never raises
                await trio.sleep(0.001)
        assert set(carrier.drops.reasons) <= {"udp send: ECONNREFUSED", "udp receive: ECONNREFUSED"}
        assert carrier.connected  # the carrier keeps going
        assert len(inbox.items) == 1
        nursery.cancel_scope.cancel()


async def test_ss_run_retries_with_backoff_when_the_socket_cannot_be_opened(monkeypatch):
    async with trio.open_nursery() as nursery:
        server = FakeSsServer("aes-256-gcm", PASSWORD)
        await nursery.start(server.run)
        inbox = Inbox()
        carrier = open_carrier(parse_bridge(server.uri()), IDENT, inbox)
        real_open, attempts, delays = carrier._open, [], []

        def failing_open():
            attempts.append(1)
            if len(attempts) <= 8:
                raise OSError(errno.ENETUNREACH, "Network is unreachable")
            return real_open()

        async def recorded_sleep(seconds):  # the delays asked for, without waiting them
            delays.append(seconds)
            await trio.sleep(0)

        monkeypatch.setattr(carrier, "_open", failing_open)
        monkeypatch.setattr(carrier_mod, "trio", SimpleNamespace(
            sleep=recorded_sleep, lowlevel=trio.lowlevel, CancelScope=trio.CancelScope,
            ClosedResourceError=trio.ClosedResourceError))
        nursery.start_soon(run_transport, carrier)
        await until(lambda: carrier.connected)
        assert len(attempts) == 9
        assert delays == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]  # RETRY_MIN doubling to RETRY_MAX
        carrier.send([(b"finally", WG)])
        assert await inbox.wait_for(1) == [(b"re:finally", WG)]
        nursery.cancel_scope.cancel()


async def test_ss_open_carrier_kind_and_fwmark_zero():
    server = FakeSsServer("aes-256-gcm", PASSWORD)
    with server.sock:
        spec = parse_bridge(server.uri())
        carrier = open_carrier(spec, 3, Inbox())
        assert isinstance(carrier, ShadowsocksTransport)
        assert (carrier.spec, carrier.ident, carrier.fwmark) == (spec, 3, 0)
        assert carrier.endpoint(("192.0.2.1", 9)) == Endpoint("192.0.2.1", 9, 3)
        assert carrier.endpoint(None) is None  # Shadowsocks names a target in every packet


# ---------------------------------------------------------------- udp2tcp


class FakeUdp2TcpServer:
    """A udp-over-tcp server that echoes every datagram as b"echo:" + datagram (or pushes
    `greeting` first, on connect)."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.greeting: bytes | None = None
        self.connections = 0
        self.address: tuple[str, int] | None = None
        self._changed = trio.Event()

    async def wait_for(self, n: int, timeout: float = TIMEOUT) -> list:
        with trio.fail_after(timeout):
            while len(self.received) < n:
                self._changed = trio.Event()
                await self._changed.wait()
        return self.received

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        decoder = FrameDecoder()
        if self.greeting is not None:
            await stream.send_all(encode(self.greeting))
        async for chunk in stream:
            for datagram in decoder.feed(chunk):
                self.received.append(datagram)
                self._changed.set()
                reply = b"echo:" + datagram if len(datagram) < 0xFFFF - 5 else datagram
                await stream.send_all(encode(reply))

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host=LOOP)
        self.address = listeners[0].socket.getsockname()[:2]
        task_status.started(self)
        await trio.serve_listeners(self.handle, listeners)


async def start_udp2tcp(nursery, greeting: bytes | None = None):
    server = FakeUdp2TcpServer()
    server.greeting = greeting
    await nursery.start(server.run)
    inbox = Inbox()
    spec = parse_bridge(f"udp2tcp://{server.address[0]}:{server.address[1]}", numeric=True)
    carrier = open_carrier(spec, IDENT, inbox)
    assert isinstance(carrier, Udp2TcpTransport)
    nursery.start_soon(run_transport, carrier)
    await until(lambda: carrier.connected)
    return server, carrier, inbox


async def test_udp2tcp_round_trip_with_the_endpoint_last_sent_to():
    async with trio.open_nursery() as nursery:
        server, carrier, inbox = await start_udp2tcp(nursery)
        a = Endpoint("192.0.2.1", 51820, IDENT)
        b = Endpoint("2001:db8::2", 443, IDENT)
        carrier.send([(b"one", a)])
        assert await inbox.wait_for(1) == [(b"echo:one", a)]
        carrier.send([(b"two", b)])
        await inbox.wait_for(2)
        assert inbox.items[1] == (b"echo:two", b)
        sizes = [b"", bytes(1), os.urandom(1420), os.urandom(65000), os.urandom(0xFFFF)]
        for d in sizes:
            carrier.send([(d, a)])
        items = await inbox.wait_for(2 + len(sizes))
        assert await server.wait_for(2 + len(sizes)) == [b"one", b"two", *sizes]
        assert [p for p, _ in items[2:]] == [b"echo:" + d if len(d) < 0xFFFF - 5 else d for d in sizes]
        assert all(ep == a for _, ep in items[2:])
        stats = carrier.statistics()
        assert stats["bridge"] == carrier.spec.uri
        assert (stats["connected"], stats["sent"], stats["received"], stats["dropped"]) == (
            True, 2 + len(sizes), 2 + len(sizes), 0)
        assert server.connections == 1
        nursery.cancel_scope.cancel()


async def test_udp2tcp_connected_is_not_a_reply():
    """A TCP connection to the server that never carries a datagram back: no reply yet."""
    async with trio.open_nursery() as nursery:
        server, carrier, inbox = await start_udp2tcp(nursery)
        assert carrier.connected and carrier.statistics()["last_reply"] is None
        carrier.send([(b"ping", WG)])
        await inbox.wait_for(1)
        assert carrier.statistics()["last_reply"] is not None
        nursery.cancel_scope.cancel()


async def test_udp2tcp_reply_before_any_send_comes_from_the_server():
    async with trio.open_nursery() as nursery:
        server, carrier, inbox = await start_udp2tcp(nursery, greeting=b"hello first")
        [(payload, endpoint)] = await inbox.wait_for(1)
        assert payload == b"hello first"
        assert endpoint == Endpoint(server.address[0], server.address[1], IDENT)
        assert type(endpoint) is Endpoint
        nursery.cancel_scope.cancel()


async def test_udp2tcp_send_before_run_is_a_counted_drop():
    inbox = Inbox()
    carrier = open_carrier(parse_bridge("udp2tcp://127.0.0.1:9"), IDENT, inbox)
    assert not carrier.connected
    carrier.send([(b"too early", WG)])  # never raises
    stats = carrier.statistics()
    assert (stats["connected"], stats["sent"], stats["dropped"]) == (False, 0, 1)
    assert inbox.items == []


async def test_udp2tcp_cancelling_the_scope_stops_run():
    async with trio.open_nursery() as nursery:
        server = FakeUdp2TcpServer()
        await nursery.start(server.run)
        carrier = open_carrier(parse_bridge(f"udp2tcp://{LOOP}:{server.address[1]}"), IDENT, Inbox())
        stopped = trio.Event()

        async def run_carrier():
            await run_transport(carrier)
            stopped.set()

        nursery.start_soon(run_carrier)
        await until(lambda: carrier.connected)
        carrier.scope.cancel()
        with trio.fail_after(TIMEOUT):
            await stopped.wait()
        assert not carrier.connected
        nursery.cancel_scope.cancel()


async def test_udp2tcp_send_never_raises_even_for_an_oversized_datagram():
    """Carriers never raise out of send (bridge/carrier.py): an engine with MTU 65535 hands
    WireGuard datagrams of up to 65535 + 32 bytes, which the u16 framing cannot carry."""
    async with trio.open_nursery() as nursery:
        server, carrier, inbox = await start_udp2tcp(nursery)
        carrier.send([(bytes(0xFFFF + 32), WG)])  # must be dropped and counted
        assert carrier.statistics()["dropped"] == 1
        carrier.send([(b"next", WG)])
        assert await inbox.wait_for(1) == [(b"echo:next", WG)]
        nursery.cancel_scope.cancel()


async def test_ss_reopen_replaces_the_socket_and_traffic_goes_on():
    """After the host changes networks the connected socket's source address is dead (sends fail
    with EINVAL/EADDRNOTAVAIL/ENETUNREACH): the carrier opens a new socket and carries on."""
    async with trio.open_nursery() as nursery:
        server, carrier, inbox = await start_ss(nursery, "aes-256-gcm")
        carrier.send([(b"before", WG)])
        await inbox.wait_for(1)
        old = carrier._sock
        carrier.reopen("test")
        assert not carrier.connected
        carrier.send([(b"lost", WG)])  # no socket for a moment: a counted drop
        assert carrier.drops.reasons == {"no socket to the server yet": 1}
        await until(lambda: carrier.connected)
        assert carrier._sock is not old and old.fileno() == -1
        carrier.send([(b"after", WG)])
        assert (await inbox.wait_for(2))[1] == (b"re:after", WG)
        nursery.cancel_scope.cancel()


async def test_ss_send_error_that_means_a_dead_source_address_reopens(monkeypatch):
    async with trio.open_nursery() as nursery:
        server, carrier, inbox = await start_ss(nursery, "aes-256-gcm")

        class DeadSource:
            def __init__(self, sock):
                self.sock = sock

            def send(self, data):
                raise OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address")

            def __getattr__(self, name):
                return getattr(self.sock, name)

        real = carrier._sock
        carrier._sock = DeadSource(real)
        carrier.send([(b"x", WG)])
        assert carrier.drops.reasons == {"udp send: EADDRNOTAVAIL": 1}
        assert not carrier.connected
        await until(lambda: carrier.connected)
        carrier.send([(b"y", WG)])
        assert (await inbox.wait_for(1)) == [(b"re:y", WG)]
        nursery.cancel_scope.cancel()


class _FullAfter:
    """A socket whose send buffer fills after `room` datagrams (then would block)."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.packets: list[bytes] = []

    def send(self, packet: bytes) -> int:
        if len(self.packets) >= self.room:
            raise BlockingIOError(errno.EAGAIN, "full")
        self.packets.append(packet)
        return len(packet)

    def sendmsg(self, packets: list[bytes], ancillary) -> int:
        """A GSO send: all of it fits, or none (as in the kernel)."""
        if len(self.packets) + len(packets) > self.room:
            raise BlockingIOError(errno.EAGAIN, "full")
        self.packets += packets
        return sum(map(len, packets))


@pytest.mark.parametrize("gso", [True, False], ids=["gso", "plain"])
@pytest.mark.parametrize("method", ["aes-128-gcm", "2022-blake3-aes-128-gcm"])
def test_ss_send_returns_what_would_block_for_the_engine_to_offer_again(method, gso):
    """The transport back-pressure rule: a full socket is not a drop; the unsent tail comes back
    in order, and sending it later (a 2022 packet id is spent on the refused one) works. With
    GSO, the first three (one size) leave in one send, the last two (another) would block."""
    spec = parse_bridge(format_uri(ServerConfig(method, secret_for(method), LOOP, 8388)))
    carrier = open_bridge(spec, IDENT)
    carrier._gso.enabled = gso
    sock = _FullAfter(room=3)
    carrier._sock = sock
    batch = [(b"d%d" % i, WG) for i in range(3)] + [(b"dd%d" % i, WG) for i in range(3, 5)]
    rest = carrier.send(batch)
    assert rest == batch[3:] and carrier.sent == 3 and carrier.drops.total == 0
    sock.room = 10
    assert carrier.send(rest) == [] and carrier.sent == 5
    opener = Udp2022Server(carrier.cipher) if METHODS[method].is_2022 else None
    payloads = [(opener.open(p, time.time()).payload if opener is not None else carrier.cipher.open_udp(p)[1])
                for p in sock.packets]
    assert payloads == [d for d, _ in batch]
    carrier._sock = None


async def test_udp2tcp_send_returns_what_would_block_and_wait_writable_waits_for_the_drain():
    """udp2tcp under the same back-pressure rule: once its send buffer is half full, `send`
    hands the rest back instead of dropping it, and `wait_writable` returns once the server
    reads again."""
    paused = trio.Event()
    reading = trio.Event()
    received = []

    async def slow_server(stream: trio.SocketStream) -> None:
        decoder = FrameDecoder()
        paused.set()
        await reading.wait()
        async for chunk in stream:
            received.extend(decoder.feed(chunk))

    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host=LOOP)
        address = listeners[0].socket.getsockname()[:2]
        nursery.start_soon(trio.serve_listeners, slow_server, listeners)
        carrier = open_carrier(parse_bridge(f"udp2tcp://{LOOP}:{address[1]}"), IDENT, Inbox())
        carrier.client.max_pending = 256 * 1024
        nursery.start_soon(run_transport, carrier)
        await until(lambda: carrier.connected)
        await paused.wait()
        datagram = bytes(1400)
        batch = [(datagram, WG)] * 64
        sent = 0
        with trio.fail_after(TIMEOUT):
            while True:
                rest = carrier.send(batch)
                sent += len(batch) - len(rest)
                if rest:
                    break
                await trio.sleep(0)
        assert carrier.client.would_block
        assert carrier.statistics()["dropped"] == 0  # handed back, not dropped
        total = sent + len(rest)
        reading.set()
        with trio.fail_after(TIMEOUT):
            await carrier.wait_writable()
            while rest:
                rest = carrier.send(rest)
                await carrier.wait_writable()
            while len(received) < total:
                await trio.sleep(0.01)
        assert len(received) == total
        assert carrier.statistics()["dropped"] == 0
        nursery.cancel_scope.cancel()
