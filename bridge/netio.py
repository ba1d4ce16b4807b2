"""Socket and command-line helpers shared by the bridge carriers (udp2tcp, ss_local, serve):
non-blocking stream writes, name resolution, exit codes (drop counters are transport.base.Drops). Address text is
transport/address.py's."""

from __future__ import annotations

import errno
import socket
import sys

import trio

from transport.address import format_address

Address = tuple[str, int]


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
