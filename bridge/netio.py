"""Socket and command-line helpers shared by the bridge carriers (udp2tcp, ss_local, serve):
non-blocking stream writes, address text, name resolution, drop counters, exit codes."""

from __future__ import annotations

import errno
import socket
import sys
from collections import Counter

import trio

Address = tuple[str, int]


def split_hostport(text: str) -> Address:
    """"H:P" or "[v6]:P" -> (host, port). Raises ValueError naming what is wrong."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def format_address(addr: tuple) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def resolve(addr: Address, type: int, passive: bool = False) -> tuple[int, tuple]:
    flags = socket.AI_PASSIVE if passive else 0
    infos = await trio.socket.getaddrinfo(addr[0], addr[1], type=type, flags=flags)
    if not infos:
        raise OSError(errno.EADDRNOTAVAIL, f"cannot resolve {format_address(addr)}")
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


def errname(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno else type(exc).__name__


async def send_all(sock: socket.socket, data: bytes | bytearray | memoryview) -> None:
    """Write all of `data` to a non-blocking stream socket, waiting for room as needed."""
    view = memoryview(data)
    while view:
        try:
            n = sock.send(view)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            continue
        view = view[n:]


class Drops:
    """Datagrams dropped, counted by reason."""

    def __init__(self) -> None:
        self.reasons: Counter[str] = Counter()

    def add(self, reason: str, n: int = 1) -> None:
        if n:
            self.reasons[reason] += n

    @property
    def total(self) -> int:
        return sum(self.reasons.values())


def leaf_exception(exc: BaseException) -> BaseException:
    """The one exception inside nested single-member exception groups (trio nurseries)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def exit_code(prog: str, exc: BaseException, usage_error: type[BaseException]) -> int | None:
    """A carrier's exit status for an exception out of trio.run: 2 for bad usage, 1 for an OS
    error, each with a one-line message; None when the exception is a bug (re-raise it)."""
    leaf = leaf_exception(exc)
    if isinstance(leaf, usage_error):
        print(f"{prog}: {leaf}", file=sys.stderr)
        return 2
    if isinstance(leaf, OSError):
        print(f"{prog}: {leaf}", file=sys.stderr)
        return 1
    return None
