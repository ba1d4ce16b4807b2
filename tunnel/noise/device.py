"""The device-level protocol object: our key, many peers, batches in and batches out.

    outbound(ip_packets, now)      -> [(datagram, endpoint), ...]
    inbound([(datagram, src)], now) -> Inbound(to_tun=[ip_packet, ...], to_net=[(datagram, endpoint), ...])
    tick(now)                      -> [(datagram, endpoint), ...]
    next_deadline()                -> when tick() next has something to do

No sockets, no trio, no clock reads: `now` is a monotonic time in seconds supplied by the caller,
and Unix time (for TAI64N and `wg show`) is `now + wall_offset`. A datagram that fails any check is
dropped and counted in `drops` by reason; nothing off the wire raises out of these calls, and only
authenticated messages change protocol state.

A peer's endpoint changes in two ways only: configuration (`set_endpoint`, `add_peer`) and the
roaming rule (`_authenticated_from`), which every authenticated message goes through. Timer rules
live in `PeerTimers`: the device reports events to it and carries out the actions `due` returns.
"""

from __future__ import annotations

import heapq
import ipaddress
import itertools
import os
import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable

from transport.base import Datagram, Endpoint

from . import crypto
from .allowedips import AllowedIPs, Network
from .constants import (
    DEFAULT_MTU,
    HANDSHAKE_LOAD_THRESHOLD,
    HANDSHAKES_PER_BATCH,
    INITIATION_SIZE,
    MAX_TIMER_HANDSHAKES,
    MSG_COOKIE_REPLY,
    MSG_INITIATION,
    MSG_RESPONSE,
    MSG_TRANSPORT,
    REJECT_AFTER_MESSAGES,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
    REKEY_ON_RECEIVE_AGE,
    REKEY_TIMEOUT,
    REKEY_TIMEOUT_JITTER_MAX,
    RESPONSE_SIZE,
    COOKIE_REPLY_SIZE,
    STAGED_QUEUE_SIZE,
    TRANSPORT_MIN_SIZE,
    UNDER_LOAD_AFTER_TIME,
)
from .cookie import CookieChecker
from .events import EVENTS_PER_SECOND, Event, Kind
from .handshake import (
    HandshakeError,
    Identity,
    consume_initiation,
    consume_response,
    create_initiation,
    create_response,
    derive_transport_keys,
)
from .messages import COOKIE_RECEIVER, INIT_SENDER, RESP_RECEIVER, RESP_SENDER, TRANSPORT_HEADER, u32
from .peer import Peer
from .ratelimit import RateLimiter, source_key
from .session import Keypair
from .timers import Action

_NONCE = crypto._NONCE  # "<4xQ": the transport nonce
_IPV4_HEADER = struct.Struct("!BxH8x4s")  # version/IHL, total length, source address
# A receiver index that names no keypair, in Device.inbound's per-batch key cache.
_NO_KEYPAIR = (None, None, 0, None)
_ZEROS = tuple(bytes(n) for n in range(16))  # every padding there is (less than 16 bytes)


class _Run:
    """The receive state of one keypair within a Device.inbound batch: the in-order run of
    counters accepted but not yet recorded in its replay filter ([first, next)), and whether
    the keypair still awaits confirmation."""

    __slots__ = ("next", "first", "keypair", "unconfirmed")

    def __init__(self, keypair: Keypair) -> None:
        # An unconfirmed keypair takes the full check (and the confirmation) for every
        # datagram: no counter equals -1.
        self.unconfirmed = keypair is keypair.peer.keypairs.next
        self.first = keypair.replay.last + 1
        self.next = -1 if self.unconfirmed else self.first
        self.keypair = keypair

    def check(self, counter: int) -> bool:
        """A counter out of the run's order: record the run, then the full replay check."""
        replay = self.keypair.replay
        if self.next > self.first:
            replay.accept_run(self.first, self.next - 1)
        fresh = replay.check_and_update(counter)
        self.first = replay.last + 1
        self.next = -1 if self.unconfirmed else self.first
        return fresh

    def record(self) -> None:
        if self.next > self.first:
            self.keypair.replay.accept_run(self.first, self.next - 1)
            self.first = self.next


def _record_runs(keys: dict[int, tuple]) -> None:
    """Record the in-order runs Device.inbound accepted in their keypairs' replay filters."""
    for entry in keys.values():
        if entry[3] is not None:
            entry[3].record()


class Drop:
    """Reasons a datagram or packet is dropped (keys of `Device.drops`)."""

    SHORT = "short datagram"
    BAD_TYPE = "unknown message type"
    BAD_SIZE = "bad handshake message size"
    NO_KEY = "no private key"
    MAC1 = "invalid mac1"
    HANDSHAKE_BUDGET = "handshake budget of the batch spent"
    COOKIE_SENT = "under load: cookie reply sent"
    RATELIMIT = "under load: rate limited"
    BAD_INITIATION = "initiation rejected"
    BAD_RESPONSE = "response rejected"
    BAD_COOKIE = "cookie reply rejected"
    UNKNOWN_INDEX = "unknown receiver index"
    EXPIRED_KEYPAIR = "keypair expired"
    DECRYPT = "transport authentication failed"
    REPLAY = "replayed counter"
    BAD_INNER = "invalid inner packet"
    SOURCE_NOT_ALLOWED = "inner source not in peer's allowed ips"
    BAD_OUTBOUND = "invalid outbound packet"
    NO_ROUTE = "no peer for destination"
    NO_ENDPOINT = "peer has no endpoint"
    STAGED_FULL = "staged queue full"
    GAVE_UP = "handshake gave up: staged packets flushed"
    KEYS_ZEROED = "keys zeroed: staged packets flushed"


@dataclass
class Inbound:
    to_tun: list[bytes] = field(default_factory=list)
    to_net: list[Datagram] = field(default_factory=list)


def _source_bytes(src: Endpoint) -> bytes:
    """The bytes a cookie is bound to: the source's packed IP || port, as wireguard-go (not the
    transport: the peer's mac2 covers what it was told, the address). A source that is not an
    (IP, port), which no transport produces, gets a stable encoding of itself instead."""
    try:
        host, port = src[0], src[1]
        return ipaddress.ip_address(host).packed + int(port).to_bytes(2, "big")
    except (TypeError, ValueError, LookupError, OverflowError):
        return repr(src).encode()


def _source_host(src: Endpoint) -> str:
    """The rate limiter's key: the source's host, an IPv6 one by its /64 (ratelimit.source_key;
    every port shares one bucket). Never raises: anything else gets a stable key of its own."""
    try:
        host = src[0]
    except (TypeError, LookupError, KeyError):
        return repr(src)
    return source_key(host) if isinstance(host, str) else repr(host)


def _padded_length(n: int, mtu: int) -> int:
    """Plaintext length after zero padding: a multiple of 16, never past the MTU
    (wireguard-go calculatePaddingSize)."""
    last_unit = n
    if n > mtu:
        last_unit %= mtu
    padded = (last_unit + 15) & ~15
    if padded > mtu:
        padded = mtu
    return n - last_unit + padded


class Device:
    def __init__(
        self,
        private_key: bytes | None = None,
        *,
        wall_offset: float,
        mtu: int = DEFAULT_MTU,
        rng: Callable[[int], bytes] = os.urandom,
        handshake_load_threshold: int = HANDSHAKE_LOAD_THRESHOLD,
        handshakes_per_batch: int = HANDSHAKES_PER_BATCH,
        staged_queue_size: int = STAGED_QUEUE_SIZE,
    ) -> None:
        self.wall_offset = wall_offset
        self.mtu = mtu  # (also empties the padding cache)
        self._rng = rng
        self.handshake_load_threshold = handshake_load_threshold
        self.handshakes_per_batch = handshakes_per_batch
        self.staged_queue_size = staged_queue_size
        self.identity: Identity | None = None
        self.cookie_checker: CookieChecker | None = None
        self.peers: dict[bytes, Peer] = {}
        # The timers' schedule, so that no call walks every peer: a heap of (deadline, n, peer),
        # the deadline each peer is scheduled at (heap entries that differ are stale), the peers
        # whose timers changed since (PeerTimers.on_change), and those with a keepalive asked
        # for by configuration.
        self._heap: list[tuple[float, int, Peer]] = []
        self._scheduled: dict[Peer, float] = {}
        self._dirty: set[Peer] = set()
        self._keepalive_wanted: set[Peer] = set()
        self._heap_seq = itertools.count()
        self.allowed_ips: AllowedIPs[Peer] = AllowedIPs()
        # Our receiver indices: a Peer (its handshake in progress) or a Keypair.
        self._index: dict[int, Peer | Keypair] = {}
        self.ratelimiter = RateLimiter()
        self.drops: Counter[str] = Counter()
        self.stats: Counter[str] = Counter()
        self._load_window_start = float("-inf")
        self._load_count = 0
        self._under_load_until = float("-inf")
        # Handshake events for the I/O layer to log (tunnel/noise/events.py): None records
        # nothing; a list collects them until the caller drains it.
        self.events: list[Event] | None = None
        self._events_window = float("-inf")
        self._events_in_window = 0
        self._events_suppressed = 0
        if private_key is not None:
            self.set_private_key(private_key)

    # ------------------------------------------------------------------ configuration

    @property
    def mtu(self) -> int:
        """The TUN's MTU: sealed packets are padded up to a multiple of 16 but never past it."""
        return self._mtu

    @mtu.setter
    def mtu(self, mtu: int) -> None:
        self._mtu = mtu
        # Plaintext length -> its zero padding under this MTU, worked out once per length (a
        # tunnel's packets come in few lengths); at most one entry per length up to 64 KiB.
        self._pads: dict[int, bytes] = {}

    @property
    def public_key(self) -> bytes | None:
        return self.identity.public if self.identity else None

    def set_private_key(self, private_key: bytes | None) -> None:
        """Change our static key. Peers keep their configuration; their sessions and handshakes
        (made under the old key) end, and a peer whose public key is our new one is removed."""
        if private_key is not None and self.identity is not None and crypto.constant_time_eq(
            private_key, self.identity.private
        ):
            return
        self.identity = Identity(private_key) if private_key is not None else None
        self.cookie_checker = CookieChecker(self.identity.public, self._rng) if self.identity else None
        if self.identity is not None and self.identity.public in self.peers:
            self.remove_peer(self.identity.public)
        for peer in self.peers.values():
            peer.handshake.set_identity(self.identity)
            self._clear_handshake(peer)
            for kp in peer.keypairs.all():
                kp.send_counter = REJECT_AFTER_MESSAGES  # can still receive, never send again

    def add_peer(
        self,
        public_key: bytes,
        *,
        preshared_key: bytes | None = None,
        endpoint: Endpoint | None = None,
        allowed_ips: Iterable[Network | str] = (),
        persistent_keepalive: int = 0,
    ) -> Peer:
        if len(public_key) != 32:
            raise ValueError("a public key is 32 bytes")
        if public_key in self.peers:
            raise ValueError("peer already exists")
        if self.identity is not None and crypto.constant_time_eq(public_key, self.identity.public):
            raise ValueError("a peer cannot have our own public key")
        peer = Peer(self.identity, public_key, preshared_key or bytes(32), self._jitter)
        self.peers[public_key] = peer
        dirty = self._dirty
        peer.timers.on_change = lambda: dirty.add(peer)
        self.set_endpoint(peer, endpoint)
        for net in allowed_ips:
            self.add_allowed_ip(peer, net)
        self.set_persistent_keepalive(peer, persistent_keepalive)
        return peer

    def remove_peer(self, public_key: bytes) -> None:
        peer = self.peers.pop(public_key, None)
        if peer is None:
            return
        self.allowed_ips.remove_value(peer)
        self._zero_peer(peer)
        peer.timers.stop()
        self._keepalive_wanted.discard(peer)

    def set_carries(self, peer: Peer, addresses: Iterable[bytes]) -> None:
        """Packed IP addresses of the nested hops reached through `peer` (multihop: the exit
        relay's endpoint, whose datagrams come back inside this peer's tunnel). Packets from them
        are accepted from `peer` even outside its allowed IPs; nothing else changes."""
        peer.carries = frozenset(addresses)

    def set_endpoint(self, peer: Peer, endpoint: Endpoint | None, *, pinned: bool = False,
                     via: int | None = None) -> None:
        """Where `peer` is (None: unknown until it sends to us). Unpinned, the peer roams: it moves
        to the source of each authenticated packet from it. `pinned` keeps it at `endpoint`
        whatever the source, and answers its handshakes there (a peer reached through a bridge:
        a packet that arrives some other way must not move our replies off that path). Setting
        it again unpinned lets it roam again. `via` (unpinned only): the peer roams, but its
        address only: whatever transport a packet came in by, the peer stays on transport `via`
        (an LWO peer: the address of its datagrams on the UDP port, their format ours to choose)."""
        peer.endpoint = endpoint
        peer.pinned = pinned
        peer.roam_via = None if pinned else via

    def set_preshared_key(self, peer: Peer, preshared_key: bytes | None) -> None:
        key = preshared_key or bytes(32)
        if len(key) != 32:
            raise ValueError("a preshared key is 32 bytes")
        peer.handshake.preshared_key = key

    def set_persistent_keepalive(self, peer: Peer, seconds: int) -> None:
        if not 0 <= seconds <= 65535:
            raise ValueError("persistent keepalive is 0..65535 seconds")
        was = peer.timers.persistent_keepalive
        peer.timers.set_persistent_keepalive(seconds)
        if seconds and seconds != was:
            # As wireguard-go: turning it on sends a keepalive now (starting a handshake).
            peer.keepalive_requested = True
            self._keepalive_wanted.add(peer)

    def add_allowed_ip(self, peer: Peer, net: Network | str) -> None:
        if isinstance(net, str):
            net = ipaddress.ip_network(net, strict=False)
        self.allowed_ips.insert(net, peer)

    def remove_allowed_ip(self, peer: Peer, net: Network | str) -> None:
        if isinstance(net, str):
            net = ipaddress.ip_network(net, strict=False)
        if self.allowed_ips.lookup_exact(net) is peer:
            self.allowed_ips.remove(net)

    def clear_allowed_ips(self, peer: Peer) -> None:
        self.allowed_ips.remove_value(peer)

    # ------------------------------------------------------------------ helpers

    def _event(self, now: float, kind: str, peer: Peer | None = None, source: Endpoint | None = None,
               value: int = 0) -> None:
        """Record a handshake event if anyone collects them, at most EVENTS_PER_SECOND a second."""
        events = self.events
        if events is None:
            return
        if now - self._events_window >= 1.0:
            self._events_window = now
            self._events_in_window = 0
            if self._events_suppressed:
                events.append(Event(Kind.SUPPRESSED, value=self._events_suppressed))
                self._events_suppressed = 0
        if self._events_in_window >= EVENTS_PER_SECOND:
            self._events_suppressed += 1
            return
        self._events_in_window += 1
        events.append(Event(kind, peer.public_key if peer is not None else None, source, value))

    def _jitter(self) -> float:
        return int.from_bytes(self._rng(4), "little") / 2**32 * REKEY_TIMEOUT_JITTER_MAX

    def _new_index(self, owner: Peer | Keypair) -> int:
        while True:
            idx = int.from_bytes(self._rng(4), "little")
            if idx and idx not in self._index:
                self._index[idx] = owner
                return idx

    def _drop_index(self, idx: int, owner: Peer | Keypair) -> None:
        if idx and self._index.get(idx) is owner:
            del self._index[idx]

    def _clear_handshake(self, peer: Peer) -> None:
        self._drop_index(peer.handshake.local_index, peer)
        peer.handshake.clear()

    def _retire(self, keypairs: Iterable[Keypair]) -> None:
        for kp in keypairs:
            self._drop_index(kp.local_index, kp)

    def _zero_peer(self, peer: Peer) -> None:
        self._retire(peer.keypairs.clear())
        self._clear_handshake(peer)

    def _begin_session(self, peer: Peer, now: float) -> Keypair:
        hs = peer.handshake
        send_key, recv_key, initiator = derive_transport_keys(hs)
        kp = Keypair(peer, send_key, recv_key, initiator, hs.local_index, hs.remote_index, now)
        self._index[hs.local_index] = kp  # the handshake's index now names the keypair
        hs.local_index = 0
        self._retire(peer.keypairs.install(kp))
        peer.timers.session_derived(now)
        if self.events is not None:
            self._event(now, Kind.KEYPAIR_CREATED, peer, value=kp.local_index)
        return kp

    def _authenticated_from(self, peer: Peer, src: Endpoint) -> Endpoint | None:
        """The endpoint rule, applied to every authenticated message from `peer` (initiation,
        response, transport data) received from `src`: a roaming peer moves to `src`, a pinned
        one stays. Returns where an answer goes: the endpoint (None: pinned and unknown)."""
        if not peer.pinned:
            via = peer.roam_via
            peer.endpoint = src if via is None or src[2] == via else Endpoint(src[0], src[1], via)
        return peer.endpoint

    def _handshake_complete(self, peer: Peer, now: float) -> None:
        peer.timers.handshake_complete(now)
        peer.last_handshake_wall = now + self.wall_offset
        self.stats["handshakes completed"] += 1
        if self.events is not None:
            self._event(now, Kind.HANDSHAKE_COMPLETED, peer)

    def under_load(self, now: float) -> bool:
        return now < self._under_load_until

    def _note_handshake_load(self, count: int, now: float) -> bool:
        if now - self._load_window_start >= UNDER_LOAD_AFTER_TIME:
            self._load_window_start = now
            self._load_count = 0
        self._load_count += count
        if self._load_count >= self.handshake_load_threshold:
            self._under_load_until = now + UNDER_LOAD_AFTER_TIME
        return now < self._under_load_until

    # ------------------------------------------------------------------ sending

    def initiate(self, peer: Peer, now: float) -> list[Datagram]:
        """Start a new handshake with `peer` now, as data would (a caller that changed how the
        peer is reached tests the new way at once; the session in use stays until a new one
        replaces it). At most one initiation per REKEY_TIMEOUT, as always."""
        out: list[Datagram] = []
        self._send_initiation(peer, now, out, is_retry=False)
        return out

    def _send_initiation(self, peer: Peer, now: float, out: list[Datagram], is_retry: bool) -> None:
        timers = peer.timers
        hs = peer.handshake
        if not is_retry:
            timers.handshake_requested(now)
        if hs.last_sent_handshake is not None and now - hs.last_sent_handshake < REKEY_TIMEOUT:
            return  # rate limited: at most one initiation per REKEY_TIMEOUT
        if self.identity is None:
            self.drops[Drop.NO_KEY] += 1
            return
        if peer.endpoint is None:
            self.drops[Drop.NO_ENDPOINT] += 1
            return
        self._drop_index(hs.local_index, peer)
        index = self._new_index(peer)
        try:
            msg = create_initiation(self.identity, hs, index, self._rng(32), now + self.wall_offset)
        except HandshakeError:
            self._drop_index(index, peer)
            hs.local_index = 0
            self.stats["initiation impossible (bad peer key)"] += 1
            return
        hs.last_sent_handshake = now
        peer.cookie.add_macs(msg, now)
        timers.any_authenticated_packet_traversal(now)
        timers.any_authenticated_packet_sent(now)
        out.append((bytes(msg), peer.endpoint))
        peer.tx_bytes += INITIATION_SIZE
        peer.initiations_sent += 1
        self.stats["initiations sent"] += 1
        timers.handshake_initiated(now)
        if self.events is not None:
            self._event(now, Kind.INITIATION_SENT, peer)

    def _seal(self, peer: Peer, kp: Keypair, packets: list[bytes], now: float, out: list[Datagram]) -> None:
        """Encrypt `packets` in order under `kp` and queue them for `peer.endpoint`."""
        endpoint = peer.endpoint
        if endpoint is None:
            self.drops[Drop.NO_ENDPOINT] += len(packets)
            return
        seal = kp.send.encrypt
        nonce = _NONCE.pack
        header = TRANSPORT_HEADER.pack
        ridx = kp.remote_index
        first = kp.send_counter
        counter = first + len(packets)
        pads = self._pads
        msgs: list[bytes] = []
        append = msgs.append
        for ctr, pkt in zip(range(first, counter), packets):
            pad = pads.get(len(pkt))
            if pad is None:
                n = len(pkt)
                pad = pads[n] = _ZEROS[_padded_length(n, self._mtu) - n]
            if pad:
                pkt += pad
            append(header(MSG_TRANSPORT, ridx, ctr) + seal(nonce(ctr), pkt, None))
        # Datagram tuples and the byte count are built in C, off the per-packet loop.
        out.extend(zip(msgs, itertools.repeat(endpoint)))
        kp.send_counter = counter
        peer.tx_bytes += sum(map(len, msgs))
        peer.timers.transport_sent(now, any(packets))  # data, not only keepalives (b"")
        # keep key fresh (sending side)
        if counter > REKEY_AFTER_MESSAGES or (kp.is_initiator and now - kp.created > REKEY_AFTER_TIME):
            self._send_initiation(peer, now, out, is_retry=False)

    def _stage(self, peer: Peer, packets: Iterable[bytes]) -> None:
        staged = peer.staged
        limit = self.staged_queue_size
        for pkt in packets:
            if len(staged) >= limit:
                staged.popleft()
                self.drops[Drop.STAGED_FULL] += 1
            staged.append(pkt)

    def _send_staged(self, peer: Peer, now: float, out: list[Datagram]) -> None:
        if not peer.staged:
            return
        kp = peer.keypairs.current
        if kp is None or not kp.can_send(now, len(peer.staged)):
            self._send_initiation(peer, now, out, is_retry=False)
            return
        packets = list(peer.staged)
        peer.staged.clear()
        self._seal(peer, kp, packets, now, out)

    def _send_keepalive(self, peer: Peer, now: float, out: list[Datagram]) -> None:
        if not peer.staged:
            peer.staged.append(b"")
        self._send_staged(peer, now, out)

    def outbound(self, packets: Iterable[bytes], now: float) -> list[Datagram]:
        """IP packets read from the TUN -> datagrams to send. Routing is a probe of the
        remembered lookups (AllowedIPs.routes); each peer's packets are sealed together under
        one keypair."""
        out: list[Datagram] = []
        if self.identity is None:
            n = len(packets) if isinstance(packets, list) else sum(1 for _ in packets)
            self.drops[Drop.NO_KEY] += n
            return out
        by_peer: dict[Peer, list[bytes]] = {}
        routes = self.allowed_ips.routes
        lookup = self.allowed_ips.lookup
        for pkt in packets:
            if len(pkt) >= 20 and pkt[0] >> 4 == 4:
                dst = pkt[16:20]
            elif len(pkt) >= 40 and pkt[0] >> 4 == 6:
                dst = pkt[24:40]
            else:
                self.drops[Drop.BAD_OUTBOUND] += 1
                continue
            peer = routes.get(dst, False)
            if peer is False:
                peer = lookup(dst)
            if peer is None:
                self.drops[Drop.NO_ROUTE] += 1
                continue
            group = by_peer.get(peer)
            if group is None:
                by_peer[peer] = [pkt]
            else:
                group.append(pkt)
        for peer, group in by_peer.items():
            self._send_packets(peer, group, now, out)
        return out

    def outbound_to(self, peer: Peer, packets: list[bytes], now: float) -> list[Datagram]:
        """IP packets for `peer` whatever their destination (a nested hop's datagrams, wrapped
        in IP/UDP, travel inside the entry peer): sealed, or staged while a handshake runs."""
        out: list[Datagram] = []
        if self.identity is None:
            self.drops[Drop.NO_KEY] += len(packets)
            return out
        if self.peers.get(peer.public_key) is not peer:
            self.drops[Drop.NO_ROUTE] += len(packets)  # removed meanwhile
            return out
        self._send_packets(peer, packets, now, out)
        return out

    def _send_packets(self, peer: Peer, packets: list[bytes], now: float, out: list[Datagram]) -> None:
        kp = peer.keypairs.current
        if not peer.staged and kp is not None and kp.can_send(now, len(packets)):
            self._seal(peer, kp, packets, now, out)
        else:
            self._stage(peer, packets)
            self._send_staged(peer, now, out)

    # ------------------------------------------------------------------ receiving

    def inbound(self, datagrams: Iterable[tuple[bytes, Endpoint]], now: float) -> Inbound:
        """Datagrams read from the network, with their sources -> IP packets for the TUN and
        datagrams to send (handshake responses, cookie replies, keepalives, flushed queues)."""
        result = Inbound()
        if not isinstance(datagrams, list):
            datagrams = list(datagrams)
        # Initiations and responses are screened in one pass over the batch (size and mac1, then
        # the batch's budget; only those passing size and mac1 count toward "under load") when
        # the first message that is not transport data comes up: none was acted on before it,
        # so the verdicts and the load decision are those of the whole batch, and a batch of
        # transport data only (the common case) pays nothing for it.
        screened = False
        verdict = None
        under_load = False

        touched: dict[Peer, bool] = {}  # peer -> data (not only keepalives) received
        # The source of each peer's latest authenticated transport datagram, not yet given to
        # the endpoint rule: it runs once per peer, before anything reads or moves an endpoint
        # (a handshake, a key confirmation, the end of the batch), so the result is as if it
        # ran per datagram.
        sources: dict[Peer, Endpoint] = {}
        # Key selection once per receiver index per batch (a relay's batch interleaves peers):
        # receiver -> (its peer, decrypt, counter limit, _Run), all None but the limit when the
        # index names no keypair. The limit is REJECT_AFTER_MESSAGES, or 0 when the index names
        # no live keypair, so one comparison screens all three (the reason is sorted out
        # after). Only a handshake message or a key confirmation changes what an index names:
        # both empty it, after _record_runs.
        # The replay check's fast path: a counter arriving in order (the next above the highest
        # seen) is accepted with one comparison, into a run that ReplayFilter.accept_run
        # records at once when the batch ends or another counter comes (_Run.check).
        keys: dict[int, tuple] = {}
        last_index = -1
        peer: Peer | None = None
        decrypt = run = None
        limit = 0
        index = self._index
        drops = self.drops
        nonce = _NONCE.pack
        unpack_header = TRANSPORT_HEADER.unpack_from
        unpack_v4 = _IPV4_HEADER.unpack_from
        reject_after = REJECT_AFTER_MESSAGES
        routes = self.allowed_ips.routes
        to_tun = result.to_tun
        append = to_tun.append
        for data, src in datagrams:
            n = len(data)
            if n >= TRANSPORT_MIN_SIZE:
                # One unpack both frames transport data (type 4, reserved zero: the first u32
                # is 4) and reads its header; anything else takes the general checks below.
                mword, receiver, counter = unpack_header(data, 0)
            else:
                mword = -1
            if mword != MSG_TRANSPORT:
                if n < 4:
                    drops[Drop.SHORT] += 1
                    continue
                mtype = data[0]
                if data[1] or data[2] or data[3] or not MSG_INITIATION <= mtype <= MSG_TRANSPORT:
                    drops[Drop.BAD_TYPE] += 1
                    continue
                if mtype == MSG_TRANSPORT:  # shorter than a keepalive
                    drops[Drop.SHORT] += 1
                    continue
                if not screened:
                    screened = True
                    handshakes = [
                        d for d, _ in datagrams
                        if len(d) >= 4 and (d[0] == MSG_INITIATION or d[0] == MSG_RESPONSE)
                        and not (d[1] or d[2] or d[3])
                    ]
                    if handshakes:
                        verdicts, n_valid = self._screen_handshakes(handshakes)
                        verdict = iter(verdicts).__next__
                        under_load = self._note_handshake_load(n_valid, now) if n_valid else self.under_load(now)
                    else:
                        under_load = self.under_load(now)
                if mtype != MSG_COOKIE_REPLY:
                    reason = verdict()  # screened above, in the same order
                    if reason is not None:
                        drops[reason] += 1
                        if reason is Drop.MAC1 and self.events is not None:
                            self._event(now, Kind.INVALID_MAC1, source=src)
                        continue
                if sources:
                    self._apply_sources(sources)
                _record_runs(keys)
                self._handshake_message(mtype, data, src, now, under_load, result.to_net)
                # A handshake may have replaced keypairs: forget the cached ones.
                last_index = -1
                keys.clear()
                continue

            # ---- transport data
            if receiver != last_index:
                last_index = receiver
                entry = keys.get(receiver)
                if entry is None:
                    owner = index.get(receiver)
                    if isinstance(owner, Keypair):
                        entry = (owner.peer, owner.recv.decrypt, reject_after if owner.can_receive(now) else 0,
                                 _Run(owner))
                    else:
                        entry = _NO_KEYPAIR
                    keys[receiver] = entry
                peer, decrypt, limit, run = entry
            if counter >= limit:
                if run is None:
                    drops[Drop.UNKNOWN_INDEX] += 1
                elif not limit:
                    drops[Drop.EXPIRED_KEYPAIR] += 1
                else:
                    drops[Drop.REPLAY] += 1
                continue
            try:
                # A sliced copy of the ciphertext costs less than a memoryview of it at MTU sizes.
                plaintext = decrypt(nonce(counter), data[16:], None)
            except crypto.InvalidTag:
                drops[Drop.DECRYPT] += 1
                continue
            if counter == run.next:
                run.next = counter + 1
                sources[peer] = src  # authenticated from here on
            else:
                if not run.check(counter):
                    drops[Drop.REPLAY] += 1
                    continue
                # Authenticated from here on.
                sources[peer] = src
                if run.unconfirmed:  # (all its datagrams take run.check)
                    _record_runs(keys)
                    self._authenticated_from(peer, src)  # the staged packets go where it now is
                    self._retire([r] if (r := peer.keypairs.confirm(run.keypair)) else [])
                    self._handshake_complete(peer, now)
                    self._send_staged(peer, now, result.to_net)
                    # The confirmation retired a keypair and moved this one: select keys afresh.
                    last_index = -1
                    keys.clear()
            peer.rx_bytes += n
            plen = n - 32
            if not plen:
                if peer not in touched:
                    touched[peer] = False
                self.stats["keepalives received"] += 1
                continue
            touched[peer] = True

            if plen >= 20:
                # One unpack reads an IPv4 header's version, length and source.
                vihl, total, src_addr = unpack_v4(plaintext)
                version = vihl >> 4
                if version == 4:
                    ok = 20 <= total <= plen
                elif version == 6 and plen >= 40:
                    total = 40 + ((plaintext[4] << 8) | plaintext[5])
                    src_addr = plaintext[8:24]
                    ok = total <= plen
                else:
                    ok = False
            else:
                ok = False
            if not ok:
                drops[Drop.BAD_INNER] += 1
                continue
            allowed = routes.get(src_addr, False)
            if allowed is False:
                allowed = self.allowed_ips.lookup(src_addr)
            if allowed is not peer and src_addr not in peer.carries:
                drops[Drop.SOURCE_NOT_ALLOWED] += 1
                continue
            append(plaintext if total == plen else plaintext[:total])

        _record_runs(keys)
        # Endpoints and timer bookkeeping once per peer per batch.
        if sources:
            self._apply_sources(sources)
        for peer, got_data in touched.items():
            peer.timers.transport_received(now, got_data)
            kp = peer.keypairs.current
            if (
                kp is not None
                and kp.is_initiator
                and now - kp.created > REKEY_ON_RECEIVE_AGE
                and peer.timers.last_minute_handshake(now)
            ):
                self._send_initiation(peer, now, result.to_net, is_retry=False)
        return result

    def _apply_sources(self, sources: dict[Peer, Endpoint]) -> None:
        for peer, src in sources.items():
            self._authenticated_from(peer, src)
        sources.clear()

    def _screen_handshakes(self, messages: list[bytes]) -> tuple[list[str | None], int]:
        """For each initiation or response of a batch, in order: None if it goes on, else the
        drop reason (size, no key, mac1, or over the batch's budget); and how many passed size
        and mac1 (the ones that count toward "under load", the over-budget ones included).
        mac1 is checked for all of them, so junk never uses up the budget."""
        verdicts: list[str | None] = []
        checker = self.cookie_checker
        budget = self.handshakes_per_batch
        valid = 0
        for data in messages:
            if len(data) != (INITIATION_SIZE if data[0] == MSG_INITIATION else RESPONSE_SIZE):
                verdicts.append(Drop.BAD_SIZE)
            elif checker is None or self.identity is None:
                verdicts.append(Drop.NO_KEY)
            elif not checker.check_mac1(data):
                verdicts.append(Drop.MAC1)
            else:
                valid += 1
                verdicts.append(None if valid <= budget else Drop.HANDSHAKE_BUDGET)
        return verdicts, valid

    def _handshake_message(
        self, mtype: int, data: bytes, src: Endpoint, now: float, under_load: bool, out: list[Datagram]
    ) -> None:
        """One handshake message. An initiation or response has passed _screen_handshakes
        (size, key, mac1) in this batch."""
        size = len(data)
        if mtype == MSG_COOKIE_REPLY:
            if size != COOKIE_REPLY_SIZE:
                self.drops[Drop.BAD_SIZE] += 1
                return
            owner = self._index.get(u32(data, COOKIE_RECEIVER))
            peer = owner.peer if isinstance(owner, Keypair) else owner
            if peer is None or not peer.cookie.consume_reply(data, now):
                self.drops[Drop.BAD_COOKIE] += 1
                self._event(now, Kind.INVALID_COOKIE, source=src)
                return
            self.stats["cookie replies received"] += 1
            self._event(now, Kind.COOKIE_RECEIVED, peer, src)
            return

        identity, checker = self.identity, self.cookie_checker
        if identity is None or checker is None:  # screened; kept for callers that did not
            self.drops[Drop.NO_KEY] += 1
            return
        if under_load:
            source = _source_bytes(src)
            if not checker.check_mac2(data, source, now):
                sender = u32(data, INIT_SENDER if mtype == MSG_INITIATION else RESP_SENDER)
                out.append((checker.create_reply(data, sender, source, now), src))
                self.drops[Drop.COOKIE_SENT] += 1
                self._event(now, Kind.COOKIE_SENT, source=src)
                return
            if not self.ratelimiter.allow(_source_host(src), now):
                self.drops[Drop.RATELIMIT] += 1
                return

        if mtype == MSG_INITIATION:
            hs = consume_initiation(identity, data, self._find_handshake, now)
            if hs is None:
                self.drops[Drop.BAD_INITIATION] += 1
                self._event(now, Kind.INVALID_INITIATION, source=src)
                return
            peer = self.peers[hs.remote_static]
            self._event(now, Kind.INITIATION_RECEIVED, peer, src)
            dest = self._authenticated_from(peer, src)
            peer.rx_bytes += size
            timers = peer.timers
            timers.any_authenticated_packet_traversal(now)
            timers.any_authenticated_packet_received(now)
            self._drop_index(hs.local_index, peer)
            index = self._new_index(peer)
            try:
                msg = create_response(hs, index, self._rng(32))
            except HandshakeError:
                self._drop_index(index, peer)
                self._clear_handshake(peer)
                self.drops[Drop.BAD_INITIATION] += 1
                self._event(now, Kind.INVALID_INITIATION, source=src)
                return
            peer.cookie.add_macs(msg, now)
            self._begin_session(peer, now)
            # The kernel counts a response as a sent handshake, so we do not initiate over it.
            hs.last_sent_handshake = now
            timers.any_authenticated_packet_traversal(now)
            timers.any_authenticated_packet_sent(now)
            if dest is None:  # pinned to a path with no endpoint yet: nowhere to answer
                self.drops[Drop.NO_ENDPOINT] += 1
                return
            out.append((bytes(msg), dest))
            peer.tx_bytes += RESPONSE_SIZE
            self.stats["responses sent"] += 1
            self._event(now, Kind.RESPONSE_SENT, peer)
            return

        # MSG_RESPONSE
        receiver = u32(data, RESP_RECEIVER)
        owner = self._index.get(receiver)
        if not isinstance(owner, Peer) or owner.handshake.local_index != receiver:
            self.drops[Drop.UNKNOWN_INDEX] += 1
            self._event(now, Kind.INVALID_RESPONSE, source=src)
            return
        peer = owner
        if not consume_response(identity, data, peer.handshake):
            self.drops[Drop.BAD_RESPONSE] += 1
            self._event(now, Kind.INVALID_RESPONSE, source=src)
            return
        self._event(now, Kind.RESPONSE_RECEIVED, peer, src)
        self._authenticated_from(peer, src)
        peer.rx_bytes += size
        timers = peer.timers
        timers.any_authenticated_packet_traversal(now)
        timers.any_authenticated_packet_received(now)
        self._begin_session(peer, now)
        self._handshake_complete(peer, now)
        # Confirm the session at once: queued packets, or a keepalive if there are none.
        self._send_keepalive(peer, now, out)

    def _find_handshake(self, static: bytes):
        peer = self.peers.get(static)
        return peer.handshake if peer is not None else None

    # ------------------------------------------------------------------ timers

    def _reschedule(self) -> None:
        """Put the peers whose timers changed back in the schedule (only those)."""
        dirty = self._dirty
        if not dirty:
            return
        heap, scheduled, seq = self._heap, self._scheduled, self._heap_seq
        for peer in dirty:
            d = peer.timers.next_deadline()
            if d is None:
                scheduled.pop(peer, None)
            elif scheduled.get(peer) != d:
                scheduled[peer] = d
                heapq.heappush(heap, (d, next(seq), peer))
        dirty.clear()
        if len(heap) > 2 * len(scheduled) + 64:  # mostly stale entries: rebuild
            self._heap = [(d, next(seq), peer) for peer, d in scheduled.items()]
            heapq.heapify(self._heap)

    def next_deadline(self) -> float | None:
        """The earliest time tick() has work (None: nothing scheduled). A pending keepalive
        request from configuration makes it 'now' (returned as -inf). Cost: the peers whose
        timers changed since the last call, not the number of peers."""
        if self._keepalive_wanted:
            return float("-inf")
        self._reschedule()
        heap, scheduled = self._heap, self._scheduled
        while heap:
            d, _, peer = heap[0]
            if scheduled.get(peer) == d:
                return d
            heapq.heappop(heap)
        return None

    def _due_peers(self, now: float) -> list[Peer]:
        self._reschedule()
        heap, scheduled = self._heap, self._scheduled
        due = []
        while heap and heap[0][0] <= now:
            d, _, peer = heapq.heappop(heap)
            if scheduled.get(peer) == d:
                del scheduled[peer]
                due.append(peer)
        return due

    def tick(self, now: float) -> list[Datagram]:
        """Run every timer that is due at `now`; returns the datagrams to send."""
        out: list[Datagram] = []
        wanted = [p for p in self._keepalive_wanted if self.peers.get(p.public_key) is p]
        self._keepalive_wanted.clear()
        for peer in wanted:
            if peer.keepalive_requested:
                peer.keepalive_requested = False
                self._send_keepalive(peer, now, out)
        for peer in self._due_peers(now):
            self._dirty.add(peer)  # what is left or armed again goes back in the schedule
            if self.peers.get(peer.public_key) is not peer:
                continue
            for action in peer.timers.due(now):
                if action is Action.SEND_KEEPALIVE:
                    self._send_keepalive(peer, now, out)
                elif action is Action.SEND_INITIATION_RETRY:
                    self._event(now, Kind.RETRY, peer, value=peer.timers.handshake_attempts + 1)
                    self._send_initiation(peer, now, out, is_retry=True)
                elif action is Action.SEND_INITIATION:
                    self._event(now, Kind.STOPPED_HEARING, peer)
                    self._send_initiation(peer, now, out, is_retry=False)
                elif action is Action.GIVE_UP:
                    self.drops[Drop.GAVE_UP] += len(peer.staged)
                    peer.staged.clear()
                    self.stats["handshake attempts given up"] += 1
                    self._event(now, Kind.GAVE_UP, peer, value=MAX_TIMER_HANDSHAKES + 2)
                elif action is Action.ZERO_KEYS:
                    self._zero_peer(peer)
                    self.drops[Drop.KEYS_ZEROED] += len(peer.staged)
                    peer.staged.clear()
                    self.stats["key material zeroed"] += 1
                    self._event(now, Kind.KEYS_ZEROED, peer)
        return out
