"""The trio engine: a TUN device, UDP sockets and a UAPI socket around the sans-IO core.

Tasks (one trio thread; the core is called synchronously, so it needs no locks):

    tun reader      TUN --batch--> Device.outbound --> UDP send
    udp reader x2   UDP --batch--> Device.inbound  --> TUN write, UDP send
    carriers        one per bridged peer (bridge/carrier.py): its datagrams leave through a
                    Shadowsocks or udp-over-tcp client; replies enter Device.inbound the same way
    timers          sleep until Device.next_deadline() (or a config change) --> Device.tick --> UDP send
    uapi server     /var/run/wireguard/IFNAME.sock: get/set through tunnel.uapi
    link watcher    rtnetlink: exit when the link is deleted, follow MTU changes
    socket watcher  exit when the UAPI socket file is removed

Each reader waits for readiness once, then drains what is there with non-blocking calls (up to
BATCH) and hands the whole batch to the core before waiting again.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import time
from collections import Counter
from dataclasses import dataclass

import trio

from bridge.carrier import BridgedEndpoint, Carrier, open_carrier
from bridge.spec import BridgeSpec

from . import netlink, uapi
from .noise import Device
from .tun import Tun
from .udp import UdpSockets

log = logging.getLogger("wgpy")

BATCH = 128
SOCKET_DIR = "/var/run/wireguard"
UAPI_IDLE_TIMEOUT = 30.0  # a client that sends nothing for this long is disconnected
UAPI_MAX_CONNECTIONS = 32
UAPI_READ_SIZE = 65536


class Engine:
    """One WireGuard interface. Implements uapi.InterfaceSettings (listen port, fwmark, bridges)."""

    def __init__(self, ifname: str, *, socket_dir: str = SOCKET_DIR, mtu: int = 1420) -> None:
        self.ifname = ifname
        self.socket_dir = socket_dir
        self.socket_path = os.path.join(socket_dir, f"{ifname}.sock")
        self.tun = Tun(ifname, mtu)
        self.ifindex = self.tun.ifindex
        self.device = Device(None, wall_offset=0.0, mtu=self.tun.mtu)
        self.udp = UdpSockets()
        self.io_drops: Counter[str] = Counter()
        self._listen_port = 0
        self._nursery: trio.Nursery | None = None
        self._udp_scope: trio.CancelScope | None = None
        self._wake = trio.Event()
        self._sleeping_until = float("inf")  # the deadline the timer task waits for
        self._uapi_sock: trio.socket.SocketType | None = None
        self._socket_ino: tuple[int, int] | None = None
        self._uapi_clients = 0
        # Bridged peers by public key; their carriers by number (a BridgedEndpoint's `carrier`).
        self.bridges: dict[bytes, _Bridge] = {}
        self._carrier_by_id: dict[int, Carrier] = {}
        self._next_carrier = 1
        self.exit_reason = ""
        self.stopped = trio.Event()

    # ------------------------------------------------------------ uapi.InterfaceSettings

    @property
    def listen_port(self) -> int:
        return self.udp.port

    @property
    def fwmark(self) -> int:
        return self.udp.fwmark

    def set_listen_port(self, port: int) -> None:
        if self.udp.sockets and port == self._listen_port and port != 0:
            return
        self._restart_udp(port)
        self._listen_port = port

    def set_fwmark(self, mark: int) -> None:
        self.udp.set_fwmark(mark)
        for carrier in self._carrier_by_id.values():
            try:
                carrier.set_fwmark(mark)
            except OSError as exc:  # the socket is being replaced; the new one gets the mark
                log.warning("%s: bridge %s: fwmark: %s", self.ifname, carrier.spec.redacted(), exc)

    def set_endpoint(self, peer, endpoint: tuple[str, int]) -> None:
        bridged = self._bridge_of(peer)
        if bridged is not None:
            bridged.placeholder_endpoint = False
            endpoint = bridged.carrier.endpoint(endpoint)
        peer.endpoint = endpoint

    def set_bridge(self, peer, bridge: BridgeSpec | None) -> None:
        old = self.bridges.get(peer.public_key)
        if old is not None and old.peer is peer and old.carrier.spec == bridge:
            return  # the same bridge again: keep the carrier (and a 2022 session) running
        target = _server_view(peer.endpoint)
        if old is not None:  # ours, or left by a peer of the same key removed in this request
            self._stop_bridge(peer.public_key)
        if bridge is None:
            peer.endpoint = None if old is not None and old.placeholder_endpoint else target
            peer.roaming = True
            return
        ident = self._next_carrier
        self._next_carrier += 1
        carrier = open_carrier(bridge, ident, self._from_bridge, self.udp.fwmark)
        self.bridges[peer.public_key] = _Bridge(carrier, peer, placeholder_endpoint=target is None)
        self._carrier_by_id[ident] = carrier
        # Shadowsocks needs a target; udp2tcp's server has its own, so any endpoint will do.
        peer.endpoint = carrier.endpoint(target) if target is not None or bridge.kind == "udp2tcp" else None
        peer.roaming = False
        log.info("%s: a peer now goes through bridge %s", self.ifname, bridge.redacted())
        if self._nursery is not None:
            self._nursery.start_soon(carrier.run)

    def extension_lines(self, peer) -> list[str]:
        bridged = self._bridge_of(peer)
        if bridged is None:
            return []
        st = bridged.carrier.statistics()
        return [f"wgpy_bridge={st['bridge']}", f"wgpy_bridge_connected={int(st['connected'])}",
                f"wgpy_bridge_tx_packets={st['sent']}", f"wgpy_bridge_rx_packets={st['received']}",
                f"wgpy_bridge_dropped={st['dropped']}"]

    def _bridge_of(self, peer) -> _Bridge | None:
        bridged = self.bridges.get(peer.public_key)
        return bridged if bridged is not None and bridged.peer is peer else None

    def _stop_bridge(self, public_key: bytes) -> None:
        carrier = self.bridges.pop(public_key).carrier
        carrier.scope.cancel()
        del self._carrier_by_id[carrier.ident]

    def forget_removed_peers(self) -> None:
        """After a set request: stop the carriers of peers that were removed (or removed and
        added again without their bridge)."""
        for pk, bridged in list(self.bridges.items()):
            if self.device.peers.get(pk) is not bridged.peer:
                log.info("%s: bridge %s stopped: its peer is gone", self.ifname, bridged.carrier.spec.redacted())
                self._stop_bridge(pk)

    # ------------------------------------------------------------ lifecycle

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve until the link or the socket file goes away, or the caller cancels."""
        self.device.wall_offset = time.time() - trio.current_time()
        listener = self._open_uapi_socket()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._restart_udp(0)
                nursery.start_soon(self._tun_reader)
                nursery.start_soon(self._timers)
                nursery.start_soon(self._uapi_server, listener)
                nursery.start_soon(self._link_watcher)
                nursery.start_soon(self._socket_watcher)
                for carrier in self._carrier_by_id.values():
                    nursery.start_soon(carrier.run)
                log.info("%s: up (listening on UDP port %d)", self.ifname, self.udp.port)
                task_status.started()
        finally:
            self._nursery = None
            self.close()
            self.stopped.set()

    def stop(self, reason: str) -> None:
        if not self.exit_reason:
            self.exit_reason = reason
            log.info("%s: shutting down: %s", self.ifname, reason)
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def close(self) -> None:
        for pk in list(self.bridges):
            self._stop_bridge(pk)
        self.udp.close()
        if self._uapi_sock is not None:
            self._uapi_sock.close()
            self._uapi_sock = None
        try:
            st = os.lstat(self.socket_path)
            if self._socket_ino == (st.st_dev, st.st_ino):
                os.unlink(self.socket_path)
        except OSError:
            pass
        self.tun.close()

    # ------------------------------------------------------------ UDP

    def _restart_udp(self, port: int) -> None:
        """Bind new sockets (raises OSError, leaving the old ones serving), then move the
        readers over."""
        old = self.udp.sockets
        for s in old:
            trio.lowlevel.notify_closing(s)
        if self._udp_scope is not None:
            self._udp_scope.cancel()
        try:
            self.udp.bind(port)
        except OSError:
            if old:
                self._start_udp_readers()
            raise
        self._start_udp_readers()

    def _start_udp_readers(self) -> None:
        if self._nursery is None:
            return
        scope = trio.CancelScope()
        self._udp_scope = scope
        self._nursery.start_soon(self._udp_generation, list(self.udp.sockets), scope)

    async def _udp_generation(self, socks: list[socket.socket], scope: trio.CancelScope) -> None:
        """The readers of one binding; a rebind cancels `scope` and starts the next one."""
        with scope:
            async with trio.open_nursery() as nursery:
                for sock in socks:
                    nursery.start_soon(self._udp_reader, sock)

    async def _udp_reader(self, sock: socket.socket) -> None:
        udp = self.udp
        try:
            while True:
                await trio.lowlevel.wait_readable(sock)
                batch = udp.recv_batch(sock, BATCH)
                if not batch:
                    continue
                to_net = self._inbound(batch)
                if to_net:
                    await self._send(to_net)
        except (trio.ClosedResourceError, OSError) as exc:
            if not isinstance(exc, trio.ClosedResourceError) and exc.errno != errno.EBADF:
                raise

    def _inbound(self, batch) -> list:
        """One batch of received datagrams through the core: packets to the TUN, and what the
        core answers (returned, for the caller to send)."""
        result = self.device.inbound(batch, trio.current_time())
        self._reschedule_timers()
        tun = self.tun
        for packet in result.to_tun:
            try:
                tun.write(packet)
            except BlockingIOError:
                self.io_drops["tun write queue full"] += 1
            except OSError as exc:
                self.io_drops[f"tun write: {errno.errorcode.get(exc.errno, exc.errno)}"] += 1
        return result.to_net

    def _from_bridge(self, batch) -> None:
        """A carrier's received datagrams (called synchronously by its receive task)."""
        to_net = self._inbound(batch)
        if to_net:
            blocked = self._send_now(to_net)
            if blocked:  # this path cannot wait: a full socket loses them, as UDP may
                self.io_drops["udp send: socket full"] += len(blocked)

    def _send_now(self, datagrams) -> list:
        """Send what can go without waiting; returns the (data, endpoint, socket) that would block.
        A bridged peer's datagrams go to its carrier, which never blocks."""
        udp = self.udp
        carriers = self._carrier_by_id
        blocked = []
        for data, endpoint in datagrams:
            if type(endpoint) is BridgedEndpoint:
                carrier = carriers.get(endpoint.carrier)
                if carrier is None:
                    self.io_drops["bridge removed"] += 1
                else:
                    carrier.send(data, endpoint)
                continue
            sock = udp.socket_for(endpoint)
            if sock is None:
                self.io_drops["no socket for endpoint family"] += 1
                continue
            try:
                sock.sendto(data, endpoint)
            except BlockingIOError:
                blocked.append((data, endpoint, sock))
            except OSError as exc:
                # Unreachable networks, EPERM from a firewall, EMSGSIZE: count, never stop.
                self.io_drops[f"udp send: {errno.errorcode.get(exc.errno, exc.errno)}"] += 1
        return blocked

    async def _send(self, datagrams) -> None:
        for data, endpoint, sock in self._send_now(datagrams):
            try:
                await trio.lowlevel.wait_writable(sock)
                sock.sendto(data, endpoint)
            except (OSError, trio.ClosedResourceError) as exc:
                self.io_drops[f"udp send: {exc}"] += 1

    # ------------------------------------------------------------ TUN and timers

    async def _tun_reader(self) -> None:
        device, tun = self.device, self.tun
        while True:
            await trio.lowlevel.wait_readable(tun.fd)
            try:
                batch = tun.read_batch(BATCH)
            except OSError as exc:
                self.stop(f"TUN read failed: {exc.strerror}")
                return
            if batch:
                out = device.outbound(batch, trio.current_time())
                self._reschedule_timers()
                if out:
                    await self._send(out)

    def wake_timers(self) -> None:
        self._wake.set()

    def _reschedule_timers(self) -> None:
        """After a batch: traffic arms timers (retries, keepalives, rekeys); wake the timer task
        if one is now due earlier than what it sleeps for."""
        deadline = self.device.next_deadline()
        if deadline is not None and deadline < self._sleeping_until:
            self._wake.set()

    async def _timers(self) -> None:
        device = self.device
        while True:
            deadline = device.next_deadline()
            if deadline is None:
                deadline = trio.current_time() + 3600
            self._sleeping_until = deadline
            with trio.move_on_at(deadline):
                await self._wake.wait()
            self._sleeping_until = float("-inf")  # awake: no need to be woken
            self._wake = trio.Event()
            out = device.tick(trio.current_time())
            if out:
                await self._send(out)

    # ------------------------------------------------------------ UAPI

    def _open_uapi_socket(self) -> trio.socket.SocketType:
        os.makedirs(self.socket_dir, mode=0o755, exist_ok=True)
        try:
            st = os.lstat(self.socket_path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise OSError(errno.EEXIST, f"{self.socket_path} exists and is not a socket")
            # A stale socket from a dead daemon is replaced; a live one means the name is taken.
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(self.socket_path)
            except OSError:
                os.unlink(self.socket_path)
            else:
                raise OSError(errno.EADDRINUSE, f"{self.socket_path} is in use by another daemon")
            finally:
                probe.close()
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o077)
        try:
            raw.bind(self.socket_path)
        except OSError:
            raw.close()
            raise
        finally:
            os.umask(old_umask)
        os.chmod(self.socket_path, 0o700)
        raw.listen(16)
        sock = trio.socket.from_stdlib_socket(raw)
        st = os.lstat(self.socket_path)
        self._socket_ino = (st.st_dev, st.st_ino)
        self._uapi_sock = sock
        return sock

    async def _uapi_server(self, listener) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                conn, _ = await listener.accept()
                if self._uapi_clients >= UAPI_MAX_CONNECTIONS:
                    log.warning("%s: UAPI: too many connections, refusing one", self.ifname)
                    conn.close()
                    continue
                nursery.start_soon(self._uapi_client, conn)

    async def _uapi_client(self, conn) -> None:
        self._uapi_clients += 1
        reader = uapi.RequestReader()
        try:
            with conn:
                while True:
                    with trio.move_on_after(UAPI_IDLE_TIMEOUT) as idle:
                        data = await conn.recv(UAPI_READ_SIZE)
                    if idle.cancelled_caught:
                        log.info("%s: UAPI: idle client disconnected", self.ifname)
                        return
                    if not data:
                        return
                    try:
                        requests, error = reader.feed(data), None
                    except uapi.UapiError as exc:
                        # Answer what was complete before the violation, then the errno, then close.
                        requests, error = exc.requests, exc
                    for request in requests:
                        reply = uapi.handle(request, self.device, self, on_error=self._uapi_refused)
                        if request[0] == "set":
                            self.forget_removed_peers()
                            self.wake_timers()
                        await conn.send(reply.encode())
                    if error is not None:
                        log.info("%s: UAPI: protocol error: %s", self.ifname, error.message)
                        await conn.send(f"errno=-{error.errno}\n\n".encode())
                        return
        except OSError:
            return  # the client went away mid-reply
        finally:
            self._uapi_clients -= 1

    def _uapi_refused(self, exc: uapi.UapiError) -> None:
        # The message names the line and the problem, never a key's value.
        log.info("%s: UAPI: request refused (errno %d): %s", self.ifname, exc.errno, exc.message)

    # ------------------------------------------------------------ watchers

    async def _link_watcher(self) -> None:
        try:
            mon = netlink.open_link_monitor()
        except OSError as exc:
            log.error("%s: cannot watch links (%s); deletion of the link will not stop the daemon",
                      self.ifname, exc.strerror)
            return
        with mon:
            # The link may have gone between creating it and subscribing.
            if not os.path.exists(f"/sys/class/net/{self.ifname}"):
                self.stop("interface deleted")
                return
            while True:
                await trio.lowlevel.wait_readable(mon)
                while True:
                    try:
                        data = mon.recv(65536)
                    except BlockingIOError:
                        break
                    except OSError as exc:
                        if exc.errno == errno.ENOBUFS:  # missed events: re-check the link
                            if not os.path.exists(f"/sys/class/net/{self.ifname}"):
                                self.stop("interface deleted")
                            continue
                        raise
                    for ev in netlink.parse_link_events(data):
                        if ev.ifindex != self.ifindex:
                            continue
                        if ev.deleted:
                            self.stop("interface deleted")
                            return
                        if ev.mtu and ev.mtu != self.device.mtu:
                            log.info("%s: MTU %d", self.ifname, ev.mtu)
                            self.device.mtu = ev.mtu

    async def _socket_watcher(self) -> None:
        while True:
            await trio.sleep(0.5)
            try:
                st = os.lstat(self.socket_path)
                gone = (st.st_dev, st.st_ino) != self._socket_ino
            except FileNotFoundError:
                gone = True
            if gone:
                self.stop("UAPI socket removed")
                return

    def statistics(self) -> dict:
        return {
            "drops": dict(self.device.drops),
            "io_drops": dict(self.io_drops),
            "events": dict(self.device.stats),
            "bridges": [c.statistics() for c in self._carrier_by_id.values()],
        }


@dataclass
class _Bridge:
    """A bridged peer: its carrier, and what the engine remembers about the peer."""

    carrier: Carrier
    peer: object  # the Peer object (a peer removed and added again is another one)
    placeholder_endpoint: bool  # it had no endpoint of its own (udp2tcp then uses the server's)


def _server_view(endpoint) -> tuple[str, int] | None:
    """A peer's endpoint without the bridge: (host, port) as the bridge server sees it."""
    if endpoint is None:
        return None
    return (endpoint[0], endpoint[1])
