"""wgpy: userspace WireGuard. `tunnel.noise` is the protocol core; the rest is I/O around it."""

__version__ = "0.1.0"
