"""Hardening of the bridge server (issue 12, items 10-13 and the `wgpy bridge --help` of 15), over
loopback: a failed socket() is a drop, probe timing does not depend on what the prober sent, a
recorded stream does not replay later, one source cannot hold every slot, the password can stay
out of the process list. Time is driven (trio's MockClock) wherever the defect is about time."""

from __future__ import annotations

import base64
import errno
import os
import select
import socket
import stat
import time as _time

import pytest
import trio
import trio.testing

from bridge import serve, udp2tcp
from bridge.serve import AllowList, ArgumentError, ShadowsocksServer
from bridge.shadowsocks import Cipher, TcpDecryptor, TcpEncryptor
from bridge.udp2tcp import encode

LOOP = "127.0.0.1"
ATTACKER = "127.0.0.2"  # the whole of 127/8 is loopback on Linux: a second source
PASSWORD = "hardening-test"


# ---------------------------------------------------------------- helpers


def _udp_echo() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((LOOP, 0))
    s.setblocking(False)
    return s


async def _udp_echo_loop(sock: socket.socket) -> None:
    while True:
        await trio.lowlevel.wait_readable(sock)
        try:
            data, src = sock.recvfrom(65535)
        except BlockingIOError:
            continue
        sock.sendto(b"echo:" + data, src)


async def _tcp_echo_loop(listener: socket.socket) -> None:
    async def one(conn: socket.socket) -> None:
        with conn:
            while True:
                await trio.lowlevel.wait_readable(conn)
                try:
                    data = conn.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                conn.sendall(b"echo:" + data)

    async with trio.open_nursery() as nursery:
        while True:
            await trio.lowlevel.wait_readable(listener)
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                continue
            conn.setblocking(False)
            nursery.start_soon(one, conn)


def _tcp_listener() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((LOOP, 0))
    s.listen(64)
    s.setblocking(False)
    return s


async def _connect_from(source: str, addr: tuple) -> trio.SocketStream:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    await sock.bind((source, 0))
    await sock.connect(addr)
    return trio.SocketStream(sock)


async def _until(predicate, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


def _closed(sock: socket.socket) -> bool:
    """Whether the server has closed `sock` (EOF or reset); never blocks."""
    if not select.select([sock], [], [], 0)[0]:
        return False
    try:
        return sock.recv(65536, socket.MSG_PEEK) == b""
    except ConnectionResetError:
        return True
    except BlockingIOError:
        return False


async def _settle() -> None:
    for _ in range(3):
        await trio.testing.wait_all_tasks_blocked(0.01)


# ---------------------------------------------------------------- 10: socket() failures


class _FailingSocketModule:
    """bridge.serve's view of the socket module, whose UDP socket() fails while `armed`."""

    def __init__(self, err: int) -> None:
        self.armed = True
        self.err = err

    def __getattr__(self, name):
        return getattr(socket, name)

    def socket(self, family=socket.AF_INET, type=socket.SOCK_STREAM, *args, **kwargs):
        if self.armed and type & 0xF == socket.SOCK_DGRAM:
            raise OSError(self.err, os.strerror(self.err))
        return socket.socket(family, type, *args, **kwargs)


@pytest.mark.parametrize("err", [errno.EMFILE, errno.EAFNOSUPPORT])
async def test_a_failed_udp_socket_is_a_drop_and_the_server_keeps_serving(monkeypatch, err):
    echo = _udp_echo()
    target = echo.getsockname()
    cipher = Cipher("aes-256-gcm", PASSWORD)
    server = ShadowsocksServer(cipher, LOOP, 0, AllowList([target]))
    server.open()
    fake = _FailingSocketModule(err)
    monkeypatch.setattr(serve, "socket", fake)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_udp_echo_loop, echo)
        nursery.start_soon(server.run)
        client = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await client.bind((LOOP, 0))
        addr = server.udp_sock.getsockname()
        await client.sendto(cipher.seal_udp(target, b"first"), addr)
        name = f"socket {errno.errorcode[err]}"
        await _until(lambda: server.stats.drops[name] == 1)
        fake.armed = False  # descriptors are back: the same listener serves again
        await client.sendto(cipher.seal_udp(target, b"again"), addr)
        with trio.fail_after(5):
            _, reply = cipher.open_udp(await client.recv(65535))
        assert reply == b"echo:again"
        nursery.cancel_scope.cancel()
    echo.close()


def test_caps_fit_the_descriptor_limit():
    big = serve.derive_caps(1 << 20, 2, 1, open_fds=20)
    assert big == serve.Caps(serve.MAX_SESSIONS, serve.MAX_TCP, udp2tcp.MAX_CONNECTIONS)
    for nofile in (32, 64, 256, 1024, 4096):
        for n_ss, n_u2t in ((1, 0), (1, 1), (3, 2), (0, 1)):
            caps = serve.derive_caps(nofile, n_ss, n_u2t, open_fds=10)
            need = n_ss * (caps.udp_sessions + 2 * caps.tcp + 2) + n_u2t * (2 * caps.udp2tcp + 1)
            assert need + 10 + 8 <= nofile or min(caps.udp_sessions, caps.tcp, caps.udp2tcp) == 1
            assert caps.udp_sessions >= 1 and caps.tcp >= 1 and caps.udp2tcp >= 1
    assert serve.fds_wanted(1, 1) > serve.MAX_SESSIONS + 2 * serve.MAX_TCP


def test_the_soft_descriptor_limit_is_raised_towards_the_hard_one():
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 256:
        pytest.skip("hard limit too low to test")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, hard))
        assert serve.raise_nofile_limit(200) == 200
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (200, hard)
        assert serve.raise_nofile_limit(100) == 200  # never lowered
        if hard != resource.RLIM_INFINITY:
            assert serve.raise_nofile_limit(hard + 1000) == hard  # at most the hard limit
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# ---------------------------------------------------------------- 11: probe resistance


def _probe_close_time(nbytes: int, method: str, password: str) -> float:
    """Seconds (driven) from a probe of `nbytes` random bytes to the server closing on it."""

    async def main() -> float:
        clock = trio.lowlevel.current_clock()
        server = ShadowsocksServer(Cipher(method, password), LOOP, 0, AllowList([(LOOP, 9)]))
        server.open()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.run)
            await _settle()
            probe = socket.create_connection(server.tcp_sock.getsockname())
            probe.sendall(os.urandom(nbytes))
            start = trio.current_time()
            try:
                while trio.current_time() - start < 200:
                    await _settle()
                    if _closed(probe):
                        return trio.current_time() - start
                    clock.jump(1.0)
                raise AssertionError("never closed")
            finally:
                probe.close()
                nursery.cancel_scope.cancel()

    return trio.run(main, clock=trio.testing.MockClock())


@pytest.mark.parametrize("method", ["aes-256-gcm", "aes-128-gcm", "2022-blake3-aes-256-gcm"])
def test_failed_streams_close_on_one_schedule_whatever_the_probe_length(method):
    """1 and 31 bytes are less than a salt, 50 completes aes-256-gcm's first chunk, 100 more:
    before the fix the first two were closed after 60 s and the others after 30 s."""
    password = base64.b64encode(bytes(32)).decode() if method.startswith("2022") else PASSWORD
    times = {n: _probe_close_time(n, method, password) for n in (1, 31, 50, 100)}
    assert set(times.values()) == {serve.PROBE_TIMEOUT}, times


def _request(cipher: Cipher, target: tuple, payload: bytes) -> bytes:
    return TcpEncryptor(cipher, target).encrypt(payload)


def test_a_recorded_stream_does_not_replay_ten_minutes_later(monkeypatch):
    """AEAD-2017 streams carry no timestamp: only the salt filter stands between a recording and
    its replay, however much later it comes."""

    class DrivenTime:  # the server's wall clock, following trio's driven one
        def __getattr__(self, name):
            return getattr(_time, name)

        def time(self):
            return 1.7e9 + trio.current_time()

        def monotonic(self):
            return trio.current_time()

    monkeypatch.setattr(serve, "time", DrivenTime())

    async def main() -> None:
        clock = trio.lowlevel.current_clock()
        target = _tcp_listener()
        cipher = Cipher("chacha20-ietf-poly1305", PASSWORD)
        server = ShadowsocksServer(cipher, LOOP, 0, AllowList([target.getsockname()]))
        server.open()
        recorded = _request(cipher, target.getsockname(), b"hello")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_tcp_echo_loop, target)
            nursery.start_soon(server.run)
            addr = server.tcp_sock.getsockname()
            for delay in (0, 600):
                clock.jump(delay)
                conn = socket.create_connection(addr)
                conn.sendall(recorded)
                await _settle()
                conn.close()
                await _settle()
            assert server.stats.tcp_relayed == 1
            assert server.stats.drops["tcp replay"] == 1, server.stats.drops
            nursery.cancel_scope.cancel()
        target.close()

    trio.run(main, clock=trio.testing.MockClock())


# ---------------------------------------------------------------- 12: slowloris, session tables


async def test_udp2tcp_one_source_cannot_hold_every_slot():
    echo = _udp_echo()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_udp_echo_loop, echo)
        server = await nursery.start(lambda task_status: udp2tcp.serve(
            (LOOP, 0), [echo.getsockname()], max_connections=8, task_status=task_status))
        slow = []
        for _ in range(8):  # every slot, each dribbling a header that never completes
            s = await _connect_from(ATTACKER, server.local_address)
            await s.send_all(b"\x10")
            slow.append(s)
        await _until(lambda: server.statistics().accepted == 8)
        legit = await _connect_from(LOOP, server.local_address)
        await legit.send_all(encode(b"hello"))
        with trio.fail_after(5):
            assert await legit.receive_some() == encode(b"echo:hello")
        assert server.slots.count(ATTACKER) <= server.slots.max_per_source < 8
        nursery.cancel_scope.cancel()
    echo.close()


async def test_udp2tcp_idle_timer_is_reset_only_by_complete_frames():
    echo = _udp_echo()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_udp_echo_loop, echo)
        server = await nursery.start(lambda task_status: udp2tcp.serve(
            (LOOP, 0), [echo.getsockname()], idle_timeout=0.5, task_status=task_status))
        s = await _connect_from(ATTACKER, server.local_address)
        await s.send_all(b"\x10\x00")  # a 4096-byte frame, sent a byte every 0.1 s
        start = trio.current_time()
        with trio.move_on_after(3):
            while server.statistics().closed_idle == 0:
                try:
                    await s.send_all(b"x")
                except trio.BrokenResourceError:
                    break
                await trio.sleep(0.1)
        assert server.statistics().closed_idle == 1
        assert trio.current_time() - start < 1.5
        nursery.cancel_scope.cancel()
    echo.close()


async def test_shadowsocks_tcp_one_source_cannot_hold_every_slot(monkeypatch):
    monkeypatch.setattr(serve, "MAX_TCP", 8)
    target = _tcp_listener()
    cipher = Cipher("aes-256-gcm", PASSWORD)
    server = ShadowsocksServer(cipher, LOOP, 0, AllowList([target.getsockname()]))
    server.open()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_tcp_echo_loop, target)
        nursery.start_soon(server.run)
        addr = server.tcp_sock.getsockname()
        slow = []
        for _ in range(8):
            s = await _connect_from(ATTACKER, addr)
            await s.send_all(b"\x01")
            slow.append(s)
        await _until(lambda: server.stats.tcp_accepted == 8)
        legit = await _connect_from(LOOP, addr)
        await legit.send_all(_request(cipher, target.getsockname(), b"hello"))
        dec = TcpDecryptor(cipher)
        got = b""
        with trio.fail_after(5):
            while got != b"echo:hello":
                data = await legit.receive_some()
                assert data, f"closed; drops {dict(server.stats.drops)}"
                got += b"".join(dec.feed(data))
        assert server.tcp_slots.count(ATTACKER) <= server.tcp_slots.max_per_source < 8
        nursery.cancel_scope.cancel()
    target.close()


async def test_full_udp_session_table_evicts_the_least_recently_active():
    echo = _udp_echo()
    target = echo.getsockname()
    cipher = Cipher("aes-256-gcm", PASSWORD)
    server = ShadowsocksServer(cipher, LOOP, 0, AllowList([target]), max_sessions=2)
    server.open()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_udp_echo_loop, echo)
        nursery.start_soon(server.run)
        addr = server.udp_sock.getsockname()
        clients = []
        for _ in range(3):
            c = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            await c.bind((LOOP, 0))
            clients.append(c)

        async def round_trip(c, payload: bytes) -> bytes:
            await c.sendto(cipher.seal_udp(target, payload), addr)
            with trio.fail_after(5):
                return cipher.open_udp(await c.recv(65535))[1]

        assert await round_trip(clients[0], b"a") == b"echo:a"
        assert await round_trip(clients[1], b"b") == b"echo:b"
        assert await round_trip(clients[0], b"a2") == b"echo:a2"  # client 1 is now the oldest
        assert await round_trip(clients[2], b"c") == b"echo:c"  # served, not dropped
        await _until(lambda: server.stats.sessions_evicted == 1)
        assert [k[0] for k in server.sessions] == [clients[0].getsockname(),
                                                   clients[2].getsockname()]
        assert server.stats.drops["too many sessions"] == 0
        nursery.cancel_scope.cancel()
    echo.close()


# ---------------------------------------------------------------- 13: the password off the command line


def _config(tmp_path, text: str, mode: int = 0o600):
    path = tmp_path / "ss.json"
    path.write_text(text)
    path.chmod(mode)
    return str(path)


def test_config_file_in_ss_server_shape(tmp_path, capsys):
    path = _config(tmp_path, '{"server": ["127.0.0.1", "::1"], "server_port": 8388, '
                             '"password": "s3cret", "method": "aes-256-gcm", "mode": "tcp_and_udp"}')
    opts = serve.parse_args(["--config", path], env={})
    assert [(c.method.name, h, p) for c, h, p in opts.ss] == [
        ("aes-256-gcm", "127.0.0.1", 8388), ("aes-256-gcm", "::1", 8388)]
    assert opts.ss[0][0].key == Cipher("aes-256-gcm", "s3cret").key
    assert capsys.readouterr().err == ""  # mode 0600: no warning


def test_config_file_readable_by_everyone_is_warned_about(tmp_path, capsys):
    path = _config(tmp_path, '{"server_port": 8388, "password": "s3cret", "method": '
                             '"aes-128-gcm"}', mode=0o644)
    opts = serve.parse_args([f"--config={path}"], env={})
    assert opts.ss[0][1:] == ("0.0.0.0", 8388)
    err = capsys.readouterr().err
    assert path in err and "chmod 600" in err and "s3cret" not in err


def test_password_from_the_environment(tmp_path):
    opts = serve.parse_args(["--listen", "ss://aes-256-gcm@127.0.0.1:8388"],
                            env={serve.PASSWORD_ENV: "p/a:s@s"})
    assert opts.ss[0][0].key == Cipher("aes-256-gcm", "p/a:s@s").key
    path = _config(tmp_path, '{"server": "127.0.0.1", "server_port": 8388, "method": '
                             '"chacha20-ietf-poly1305"}')
    opts = serve.parse_args(["--config", path], env={serve.PASSWORD_ENV: "from-env"})
    assert opts.ss[0][0].key == Cipher("chacha20-ietf-poly1305", "from-env").key
    with pytest.raises(ArgumentError, match=serve.PASSWORD_ENV):
        serve.parse_args(["--listen", "ss://aes-256-gcm@127.0.0.1:8388"], env={})


@pytest.mark.parametrize("text, expected", [
    ('{"server_port": 8388, "password": "s3cret", ', "not valid JSON: line 1"),
    ('["s3cret"]', "expected a JSON object"),
    ('{"server_port": 8388, "password": "s3cret"}', '"method" is missing'),
    ('{"password": "s3cret", "method": "aes-256-gcm"}', '"server_port" is missing'),
    ('{"server_port": 99999, "password": "s3cret", "method": "aes-256-gcm"}', "1..65535"),
    ('{"server_port": 8388, "method": "aes-256-gcm"}', '"password" is missing'),
    ('{"server_port": 8388, "password": "s3cret", "method": "rc4-md5"}', "unsupported method"),
    ('{"server_port": 8388, "password": "s3cret", "method": "aes-256-gcm", "plugin": "x"}',
     "plugins"),
    ('{"server": 5, "server_port": 8388, "password": "s3cret", "method": "aes-256-gcm"}',
     '"server"'),
])
def test_config_errors_name_the_file_and_the_problem(tmp_path, capsys, text, expected):
    path = _config(tmp_path, text)
    with pytest.raises(ArgumentError) as info:
        serve.parse_args(["--config", path], env={})
    message = str(info.value)
    assert path in message and expected in message and "s3cret" not in message
    assert serve.main(["--config", path]) == 2  # a message, not a traceback
    err = capsys.readouterr().err
    assert "Traceback" not in err and path in err and "s3cret" not in err


def test_missing_config_file(tmp_path, capsys):
    path = str(tmp_path / "nope.json")
    assert serve.main(["--config", path]) == 2
    err = capsys.readouterr().err
    assert f"--config {path}: cannot read it: No such file" in err


def test_config_file_mode_checked_not_content_leaked(tmp_path):
    path = _config(tmp_path, '{"server_port": 8388, "password": "s3cret", "method": "aes-256-gcm"}',
                   mode=0o600)
    assert not os.stat(path).st_mode & stat.S_IROTH


# ---------------------------------------------------------------- 15: wgpy bridge --help


@pytest.mark.parametrize("argv", [["bridge", "--help"], ["bridge", "-h"],
                                  ["bridge", "serve", "--help"]])
def test_bridge_help(capsys, argv):
    from tunnel import cli

    assert cli.main(argv) == 0
    out = capsys.readouterr()
    assert "wgpy bridge serve" in out.out and "unrecognized" not in out.err
