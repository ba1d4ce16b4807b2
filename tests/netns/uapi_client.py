"""A raw client for the UAPI socket (/var/run/wireguard/IFNAME.sock), for tests that must send
what `wg` never would: malformed lines, half requests, garbage bytes.

    with UapiClient(path) as c:
        c.send(b"set=1\\nlisten_port=abc\\n\\n")
        reply = c.reply()            # Reply(data=b"errno=-22\\n\\n", closed=False)
        assert reply.errno == -22

UNIX socket paths live in the file system, not in a network namespace: the test process can
talk to a daemon running inside any lab namespace.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass


@dataclass
class Reply:
    data: bytes  # everything read (up to and including the first empty line)
    closed: bool  # the daemon closed the connection (EOF or reset) before or after replying
    timed_out: bool = False  # neither a complete reply nor a close within the timeout

    @property
    def complete(self) -> bool:
        return b"\n\n" in self.data

    @property
    def errno(self) -> int | None:
        """The value of the reply's errno= line (None when there is none)."""
        for line in self.data.decode("latin-1").splitlines():
            if line.startswith("errno="):
                try:
                    return int(line[len("errno="):])
                except ValueError:
                    return None
        return None

    def pairs(self) -> list[tuple[str, str]]:
        """The reply's key=value lines, in order."""
        out = []
        for line in self.data.decode("latin-1").split("\n\n", 1)[0].splitlines():
            k, _, v = line.partition("=")
            out.append((k, v))
        return out


class UapiClient:
    def __init__(self, path: str, timeout: float = 3.0) -> None:
        self.path = path
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        # A full listen backlog makes a non-blocking connect fail with EAGAIN (a blocking one,
        # as `wg` does, waits): retry until the timeout.
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock.connect(path)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    self.sock.close()
                    raise
                time.sleep(0.005)
            except OSError:
                self.sock.close()
                raise
        self._pending = b""

    def __enter__(self) -> "UapiClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self, timeout: float | None = None) -> Reply:
        """Read one reply: up to the first empty line, or until the daemon closes, or until
        `timeout` (default: the client's) passes."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        buf = self._pending
        while b"\n\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                self._pending = b""
                return Reply(buf, closed=False, timed_out=True)
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                continue
            except (ConnectionResetError, BrokenPipeError):
                self._pending = b""
                return Reply(buf, closed=True)
            if not chunk:
                self._pending = b""
                return Reply(buf, closed=True)
            buf += chunk
        end = buf.index(b"\n\n") + 2
        self._pending = buf[end:]
        return Reply(buf[:end], closed=False)

    def is_closed_by_peer(self, timeout: float = 2.0) -> bool:
        """True when the daemon closes the connection (EOF/reset) within `timeout`; any data
        it sends meanwhile is discarded."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                return False
            except (ConnectionResetError, BrokenPipeError):
                return True
            if not chunk:
                return True

    def request(self, data: bytes, timeout: float | None = None) -> Reply:
        """Send `data` (a whole request, with its empty line) and read the reply. A daemon that
        resets the connection while we still send counts as a close."""
        try:
            self.send(data)
        except (BrokenPipeError, ConnectionResetError):
            return Reply(b"", closed=True)
        return self.reply(timeout)


def request(path: str, data: bytes, timeout: float = 3.0) -> Reply:
    """One request on a fresh connection."""
    with UapiClient(path, timeout) as c:
        return c.request(data)


def get(path: str, timeout: float = 3.0) -> Reply:
    return request(path, b"get=1\n\n", timeout)
