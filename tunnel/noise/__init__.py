"""The sans-IO WireGuard protocol core: no sockets, no trio, no clock reads."""

from .device import Device, Drop, Inbound
from .peer import Peer

__all__ = ["Device", "Drop", "Inbound", "Peer"]
