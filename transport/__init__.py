"""How WireGuard datagrams travel: the one seam between the engine and every way out.

    transport.base     Endpoint, Transport (the interface), Drops          sans-IO
    transport.replay   sliding replay window (WireGuard and Shadowsocks 2022 counters)  sans-IO
    transport.address  the host:port grammar every part of wgpy writes and reads        sans-IO
    transport.udp      plain UDP, IPv4 and IPv6 on one port                            trio
    transport.memory   in-memory doubles: a TUN, transports, a lossy link              trio

This package is a leaf: it imports nothing from `tunnel` or `bridge`, and importing it (or its
sans-IO modules) loads no trio and opens no socket. `tunnel` (the engine, the core) and `bridge`
(Shadowsocks, udp-over-tcp) both build on it; neither is imported here.
"""
