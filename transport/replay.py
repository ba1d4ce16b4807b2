"""Sliding replay window for datagram counters (RFC 6479, as in the kernel and wireguard-go).

Shared by WireGuard transport data (tunnel.noise) and Shadowsocks 2022 UDP packet ids
(bridge.shadowsocks.udp2022). A ring of 128 64-bit words: the window accepts counters up to 8128 behind the highest seen. Call
`check_and_update` only after the packet authenticated, so forged counters cannot move the window.
"""

from __future__ import annotations

_BLOCK_BITS_LOG = 6
_BLOCK_BITS = 1 << _BLOCK_BITS_LOG  # 64
RING_BLOCKS = 128
_RING_MASK = RING_BLOCKS - 1
WINDOW_SIZE = (RING_BLOCKS - 1) * _BLOCK_BITS  # 8128
_EMPTY_RING = (0,) * RING_BLOCKS
NO_LIMIT = 1 << 64  # counters are u64: callers with a protocol limit pass it


class ReplayFilter:
    __slots__ = ("last", "_ring")

    def __init__(self) -> None:
        self.last = 0
        self._ring = [0] * RING_BLOCKS

    def reset(self) -> None:
        self.last = 0
        self._ring[:] = _EMPTY_RING

    def check_and_update(self, counter: int, limit: int = NO_LIMIT) -> bool:
        """True if `counter` is new (and records it); False for a replay, a counter too old for
        the window, or one at or past `limit`."""
        if counter >= limit:
            return False
        ring = self._ring
        block = counter >> _BLOCK_BITS_LOG
        last = self.last
        if counter > last:
            current = last >> _BLOCK_BITS_LOG
            if block != current:
                # The window slides: blocks it enters are cleared (all of them after a big jump).
                if block - current >= RING_BLOCKS:
                    ring[:] = _EMPTY_RING
                else:
                    for i in range(current + 1, block + 1):
                        ring[i & _RING_MASK] = 0
            self.last = counter
        elif last - counter > WINDOW_SIZE:
            return False
        idx = block & _RING_MASK
        bit = 1 << (counter & (_BLOCK_BITS - 1))
        old = ring[idx]
        if old & bit:
            return False
        ring[idx] = old | bit
        return True

    def accept_run(self, first: int, last: int) -> None:
        """Record counters `first`..`last` (inclusive), all above the highest seen: the state that
        check_and_update for each of them in order would leave (every one of them True), set
        a block at a time. For a receiver that accepts a run of in-order counters with one
        comparison each and records them once (tunnel.noise.device)."""
        if not self.last < first <= last:
            raise ValueError("a run starts above the highest counter seen and is not empty")
        ring = self._ring
        block = last >> _BLOCK_BITS_LOG
        current = self.last >> _BLOCK_BITS_LOG
        if block != current:  # the slide check_and_update(last) makes
            if block - current >= RING_BLOCKS:
                ring[:] = _EMPTY_RING
            else:
                for i in range(current + 1, block + 1):
                    ring[i & _RING_MASK] = 0
        self.last = last
        # Bits of the run within the window's blocks; older ones were slid over on the way.
        lo = max(first, (block - _RING_MASK) << _BLOCK_BITS_LOG)
        top = _BLOCK_BITS - 1
        for b in range(lo >> _BLOCK_BITS_LOG, block + 1):
            start = lo & top if b == lo >> _BLOCK_BITS_LOG else 0
            end = last & top if b == block else top
            ring[b & _RING_MASK] |= ((1 << (end - start + 1)) - 1) << start
