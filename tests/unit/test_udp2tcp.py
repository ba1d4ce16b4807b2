"""udp-over-tcp (Mullvad framing): the sans-IO codec, then client <-> server over loopback."""

from __future__ import annotations

import socket
import struct

import pytest
import trio
from hypothesis import HealthCheck, given, settings, strategies as st

from bridge import udp2tcp
from bridge.udp2tcp import (
    MAX_DATAGRAM,
    DatagramTooLarge,
    FrameDecoder,
    FrameTooLarge,
    ProtocolError,
    Udp2TcpClient,
    Udp2TcpError,
    UsageError,
    encode,
    encode_batch,
)

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LOOP = "127.0.0.1"

# ---------------------------------------------------------------- framing


def test_encode_is_length_prefixed_big_endian():
    assert encode(b"\x01\x02\x03") == b"\x00\x03\x01\x02\x03"  # Mullvad's own ping_pong vector
    assert encode(b"") == b"\x00\x00"
    assert encode(b"x" * 0x1234)[:2] == b"\x12\x34"
    assert encode(b"y" * MAX_DATAGRAM)[:2] == b"\xff\xff"
    assert encode_batch([b"ab", b"", b"c"]) == b"\x00\x02ab\x00\x00\x00\x01c"


def test_encode_rejects_oversized_datagrams():
    with pytest.raises(DatagramTooLarge, match="65536 bytes"):
        encode(bytes(MAX_DATAGRAM + 1))
    with pytest.raises(DatagramTooLarge):
        encode_batch([b"ok", bytes(MAX_DATAGRAM + 1)])
    assert issubclass(DatagramTooLarge, UsageError) and issubclass(UsageError, ValueError)


STREAM_DATAGRAMS = [b"", b"a", bytes(range(256)) * 3, b"", b"\x00\x00", b"tail"]
STREAM = encode_batch(STREAM_DATAGRAMS)


def test_round_trip_in_one_piece():
    assert FrameDecoder().feed(STREAM) == STREAM_DATAGRAMS


def test_fragmentation_at_every_byte_boundary():
    for cut in range(len(STREAM) + 1):
        dec = FrameDecoder()
        out = dec.feed(STREAM[:cut])
        assert dec.buffered < 2 + 768
        out += dec.feed(STREAM[cut:])
        assert out == STREAM_DATAGRAMS, cut
        assert dec.buffered == 0


def test_fragmentation_into_three_pieces_everywhere():
    datagrams = [b"", b"ab", b"", b"cde", b"f" * 20]
    stream = encode_batch(datagrams)
    for i in range(len(stream) + 1):
        for j in range(i, len(stream) + 1):
            dec = FrameDecoder()
            out = dec.feed(stream[:i]) + dec.feed(stream[i:j]) + dec.feed(stream[j:])
            assert out == datagrams, (i, j)


def test_byte_by_byte_and_input_types():
    dec = FrameDecoder()
    out = []
    for i in range(len(STREAM)):
        out += dec.feed(memoryview(bytearray(STREAM[i:i + 1])))
        assert dec.buffered < 2 + 768
    assert out == STREAM_DATAGRAMS


def test_zero_length_frames_are_empty_datagrams():
    assert FrameDecoder().feed(b"\x00\x00" * 5) == [b""] * 5
    assert FrameDecoder(max_datagram=0).feed(b"\x00\x00\x00\x00") == [b"", b""]


def test_oversized_header_raises_and_breaks_the_stream():
    dec = FrameDecoder(max_datagram=1000)
    with pytest.raises(FrameTooLarge) as info:
        dec.feed(encode(b"ok") + b"\x03\xe9")  # 1001
    assert info.value.datagrams == [b"ok"] and info.value.length == 1001 and info.value.limit == 1000
    assert dec.buffered == 0
    with pytest.raises(ProtocolError):
        dec.feed(encode(b"later"))
    # The header split across two feeds is caught as soon as it is complete.
    dec = FrameDecoder(max_datagram=1000)
    assert dec.feed(b"\x03") == []
    with pytest.raises(FrameTooLarge):
        dec.feed(b"\xe9")


def test_decoder_limit_is_validated():
    with pytest.raises(UsageError):
        FrameDecoder(max_datagram=MAX_DATAGRAM + 1)


@SETTINGS
@given(st.lists(st.binary(max_size=300), max_size=12), st.data())
def test_round_trip_under_random_chunking(datagrams, data):
    stream = encode_batch(datagrams)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    dec, out, last = FrameDecoder(), [], 0
    for c in cuts + [len(stream)]:
        out += dec.feed(stream[last:c])
        last = c
    assert out == datagrams and dec.buffered == 0


@SETTINGS
@given(st.lists(st.binary(max_size=400), min_size=1, max_size=10),
       st.sampled_from([0, 1, 2, 255, 300, 1500, MAX_DATAGRAM]))
def test_arbitrary_bytes_raise_only_protocol_errors_and_stay_bounded(chunks, limit):
    dec = FrameDecoder(max_datagram=limit)
    for chunk in chunks:
        try:
            out = dec.feed(chunk)
        except ProtocolError:
            continue
        except Exception as exc:  # pragma: no cover - the property under test
            pytest.fail(f"FrameDecoder raised {exc!r}")
        assert all(len(d) <= limit for d in out)
        assert dec.buffered < 2 + limit


@SETTINGS
@given(st.binary(min_size=2, max_size=20_000))
def test_big_random_input_never_buffers_more_than_one_frame(blob):
    dec = FrameDecoder()
    for i in range(0, len(blob), 4096):
        dec.feed(blob[i:i + 4096])  # the default limit (65535) can never be exceeded
        assert dec.buffered < 2 + MAX_DATAGRAM


def test_hostport_parsing():
    assert udp2tcp.parse_hostport("10.0.0.1:443") == ("10.0.0.1", 443)
    assert udp2tcp.parse_hostport("[::1]:5001") == ("::1", 5001)
    for bad in ("10.0.0.1", ":80", "h:99999", "h:x"):
        with pytest.raises(UsageError):
            udp2tcp.parse_hostport(bad)
    assert issubclass(UsageError, Udp2TcpError)


def test_server_target_selection():
    a, b = ("127.0.0.1", 51820), ("127.0.0.1", 51821)
    assert udp2tcp.Udp2TcpServer((LOOP, 0), [a]).forward == a
    assert udp2tcp.Udp2TcpServer((LOOP, 0), [a, b], forward=b).forward == b
    assert udp2tcp.Udp2TcpServer((LOOP, 0), [("::1", 9)], forward=("0:0::1", 9)).forward == ("0:0::1", 9)
    with pytest.raises(UsageError, match="one fixed target"):
        udp2tcp.Udp2TcpServer((LOOP, 0), [a, b])
    with pytest.raises(UsageError, match="not in the allowed"):
        udp2tcp.Udp2TcpServer((LOOP, 0), [a], forward=b)
    with pytest.raises(UsageError):
        udp2tcp.Udp2TcpServer((LOOP, 0), [])


# ---------------------------------------------------------------- trio, over loopback


async def udp_echo(*, task_status=trio.TASK_STATUS_IGNORED):
    """A UDP echo server on loopback; started value: (address, list of datagrams seen)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    seen: list[bytes] = []
    with sock:
        sock.bind((LOOP, 0))
        task_status.started((sock.getsockname(), seen))
        while True:
            await trio.lowlevel.wait_readable(sock)
            while True:
                try:
                    data, addr = sock.recvfrom(65535)
                except BlockingIOError:
                    break
                seen.append(data)
                sock.sendto(data, addr)


async def start_pair(nursery, **server_kw):
    echo_addr, seen = await nursery.start(udp_echo)
    server = await nursery.start(lambda task_status: udp2tcp.serve(
        (LOOP, 0), [echo_addr], task_status=task_status, **server_kw))
    return server, echo_addr, seen


async def recv_n(client: Udp2TcpClient, n: int, timeout: float = 5.0) -> list[bytes]:
    out = []
    with trio.fail_after(timeout):
        while len(out) < n:
            out.append(await client.receive())
    return out


SIZES = [0, 1, 1400, 65507]


async def test_client_server_relay_sizes_in_order():
    async with trio.open_nursery() as nursery:
        server, _, seen = await start_pair(nursery)
        client = Udp2TcpClient(server.local_address)
        await nursery.start(client.run)
        with trio.fail_after(5):
            await client.wait_connected()
        payloads = [bytes([i % 251]) * n for i, n in enumerate(SIZES)]
        for p in payloads:
            client.send(p)
        assert await recv_n(client, len(payloads)) == payloads
        client.send_batch([b"one", b"", b"three"])
        assert await recv_n(client, 3) == [b"one", b"", b"three"]
        assert seen == payloads + [b"one", b"", b"three"]
        stats = client.statistics()
        assert (stats.sent, stats.received, stats.dropped, stats.reconnects) == (7, 7, 0, 0)
        s = server.statistics()
        assert (s.active, s.accepted, s.to_udp, s.to_tcp, s.dropped) == (1, 1, 7, 7, 0)
        nursery.cancel_scope.cancel()


async def test_reconnect_after_server_closes_idle_connection():
    async with trio.open_nursery() as nursery:
        server, _, _ = await start_pair(nursery, idle_timeout=0.3)
        client = Udp2TcpClient(server.local_address)
        await nursery.start(client.run)
        await client.wait_connected()
        client.send(b"before")
        assert await recv_n(client, 1) == [b"before"]
        # Silence: the server closes the connection (and its UDP socket); the client reconnects.
        with trio.fail_after(5):
            while client.statistics().reconnects < 1 or not client.connected:
                await trio.sleep(0.02)
        assert server.statistics().closed_idle >= 1
        client.send(b"after")
        assert await recv_n(client, 1) == [b"after"]
        nursery.cancel_scope.cancel()


async def test_reconnect_after_connection_reset_and_drops_while_down():
    """A raw framing server that resets the first connection: the client counts what it could
    not send, never blocks, and carries on over the next connection."""
    listener = trio.socket.socket()
    await listener.bind((LOOP, 0))
    listener.listen()
    addr = listener.getsockname()
    second = trio.Event()

    async def raw_server(*, task_status=trio.TASK_STATUS_IGNORED):
        task_status.started()
        conn, _ = await listener.accept()
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()  # RST
        conn, _ = await listener.accept()
        second.set()
        with conn:
            dec = FrameDecoder()
            while True:
                data = await conn.recv(65536)
                if not data:
                    return
                for d in dec.feed(data):
                    await conn.send(encode(d[::-1]))

    async with trio.open_nursery() as nursery:
        await nursery.start(raw_server)
        client = Udp2TcpClient(addr, backoff_min=0.2)
        client.send(b"too early")  # before run: dropped, not blocked
        await nursery.start(client.run)
        with trio.fail_after(5):
            while not (second.is_set() and client.connected):
                if not client.connected:
                    client.send(b"while down")
                await trio.sleep(0.01)
        stats = client.statistics()
        assert stats.dropped >= 2 and stats.drop_reasons["not connected"] >= 2
        # The reset is seen either by connect (SO_ERROR) or by the first read.
        assert stats.reconnects + stats.connect_failures >= 1
        client.send(b"abc")
        assert await recv_n(client, 1) == [b"cba"]
        nursery.cancel_scope.cancel()
    listener.close()


async def test_send_never_blocks_on_a_stalled_server_and_keeps_the_stream_whole():
    """The server reads nothing: the kernel buffers fill, then the user-space buffer (bounded by
    max_pending), then datagrams drop. When the server reads again, every datagram the client
    counted as sent arrives intact: no frame was cut."""
    listener = trio.socket.socket()
    await listener.bind((LOOP, 0))
    listener.listen()
    async with trio.open_nursery() as nursery:
        client = Udp2TcpClient(listener.getsockname(), max_pending=64 * 1024)
        await nursery.start(client.run)
        conn, _ = await listener.accept()
        await client.wait_connected()
        payload = bytes(range(256)) * 5 + b"x" * 120  # 1400 bytes
        for i in range(40_000):
            client.send(payload)
            if client.statistics().drop_reasons.get("send buffer full"):
                break
        assert client.statistics().drop_reasons.get("send buffer full") == 1, i
        assert len(client._pending) <= 64 * 1024 + len(payload) + 2
        sent = client.statistics().sent
        dec, got = FrameDecoder(), 0
        with trio.fail_after(10):
            while got < sent:
                for d in dec.feed(await conn.recv(1 << 20)):
                    assert d == payload
                    got += 1
        assert got == sent and dec.buffered == 0
        conn.close()
        nursery.cancel_scope.cancel()
    listener.close()


async def test_connect_failures_back_off():
    probe = socket.socket()
    probe.bind((LOOP, 0))
    addr = probe.getsockname()
    probe.close()  # nothing listens there
    client = Udp2TcpClient(addr, backoff_min=0.05, backoff_max=0.2)
    with trio.move_on_after(0.6):
        await client.run()
    failures = client.statistics().connect_failures
    assert 2 <= failures <= 8  # 50, 100, 200, 200 ms... not a busy loop
    assert not client.connected


async def raw_connect(addr) -> trio.SocketStream:
    return await trio.open_tcp_stream(*addr)


async def read_until_eof(stream: trio.SocketStream, timeout: float = 5.0) -> bytes:
    data = b""
    with trio.fail_after(timeout):
        while chunk := await stream.receive_some():
            data += chunk
    return data


async def test_server_zero_length_frame_and_garbage():
    async with trio.open_nursery() as nursery:
        server, _, seen = await start_pair(nursery)
        s = await raw_connect(server.local_address)
        await s.send_all(b"\x00\x00")  # an empty datagram, echoed back as an empty frame
        with trio.fail_after(5):
            assert await s.receive_some() == b"\x00\x00"
        assert seen == [b""]
        # 65508 bytes can never be one IPv4 UDP datagram: a protocol error, the connection closes.
        await s.send_all(encode(b"ok") + b"\xff\xe4")
        await read_until_eof(s)  # (the echo of "ok" may or may not beat the close)
        assert seen == [b"", b"ok"]  # what came before the bad header was still relayed
        with trio.fail_after(5):
            while server.statistics().active:
                await trio.sleep(0.01)
        assert server.statistics().protocol_errors == 1
        nursery.cancel_scope.cancel()


async def test_server_connection_limit_and_eof():
    """Full: the new connection is served and the least recently active one is evicted."""
    async with trio.open_nursery() as nursery:
        server, _, _ = await start_pair(nursery, max_connections=1)
        first = await raw_connect(server.local_address)
        await first.send_all(encode(b"hi"))
        with trio.fail_after(5):
            assert await first.receive_some() == encode(b"hi")
        second = await raw_connect(server.local_address)
        assert await read_until_eof(first) == b""  # evicted to make room
        await second.send_all(encode(b"yo"))
        with trio.fail_after(5):
            assert await second.receive_some() == encode(b"yo")
        st = server.statistics()
        assert st.refused == 0 and st.evicted == 1 and st.active == 1
        await second.send_eof()  # the client's EOF ends the relay
        assert await read_until_eof(second) == b""
        with trio.fail_after(5):
            while server.statistics().active:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()


async def test_server_counts_udp_send_errors_and_keeps_the_connection():
    """The target is not listening: ICMP port unreachable -> ECONNREFUSED on the connected UDP
    socket. Mullvad closes the connection there; we count and go on."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind((LOOP, 0))
    dead = probe.getsockname()
    probe.close()
    async with trio.open_nursery() as nursery:
        server = await nursery.start(lambda task_status: udp2tcp.serve(
            (LOOP, 0), [dead], task_status=task_status))
        s = await raw_connect(server.local_address)
        with trio.fail_after(5):
            while not server.statistics().dropped:
                await s.send_all(encode(b"x"))
                await trio.sleep(0.02)
        st = server.statistics()
        assert st.active == 1
        assert any("ECONNREFUSED" in r for r in st.drop_reasons), st.drop_reasons
        nursery.cancel_scope.cancel()


async def test_local_forwarder_relays_one_local_peer():
    async with trio.open_nursery() as nursery:
        server, _, _ = await start_pair(nursery)
        fwd = await nursery.start(lambda task_status: udp2tcp.run_local_forwarder(
            (LOOP, 0), server.local_address, task_status=task_status))
        await fwd.client.wait_connected()
        app = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        other = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await app.bind((LOOP, 0))
        await other.bind((LOOP, 0))
        with trio.fail_after(5):
            for n in SIZES:
                payload = b"w" * n
                await app.sendto(payload, fwd.local_address)
                data, src = await app.recvfrom(65535)
                assert data == payload and src == fwd.local_address
        await other.sendto(b"not mine", fwd.local_address)  # filtered: only the first peer
        await app.sendto(b"last", fwd.local_address)
        with trio.fail_after(5):
            assert (await app.recvfrom(100))[0] == b"last"
        stats = fwd.statistics()
        assert stats["peer"] == app.getsockname() and stats["client"].received == len(SIZES) + 1
        app.close()
        other.close()
        nursery.cancel_scope.cancel()


def test_oversized_send_is_a_usage_error():
    client = Udp2TcpClient((LOOP, 9))
    with pytest.raises(DatagramTooLarge):
        client.send(bytes(MAX_DATAGRAM + 1))
    client.send(b"x")
    assert client.statistics().drop_reasons == {"not connected": 1}


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        udp2tcp.main(["server", "--listen", "nope", "--forward", "127.0.0.1:1"])
    assert udp2tcp.main(["server", "--listen", "127.0.0.1:0", "--forward", "127.0.0.1:1",
                         "--allow", "127.0.0.1:2"]) == 2
    assert "not in the allowed" in capsys.readouterr().err
