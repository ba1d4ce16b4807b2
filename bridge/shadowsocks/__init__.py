"""Shadowsocks, sans-IO: the codec a bridge needs to carry WireGuard datagrams (and TCP streams)
through a Shadowsocks server. No sockets, no clock reads: callers pass `now` in.

    address      SOCKS5-style target/source addresses
    cipher       methods, EVP_BytesToKey / HKDF-SHA1 / BLAKE3 keys, AEAD-2017 UDP packets
    stream       TCP streams, AEAD-2017 and 2022 (TcpEncryptor / TcpDecryptor)
    udp2022      Shadowsocks 2022 UDP sessions (Udp2022Client / Udp2022Server)
    salt_filter  a server's count-bounded, memory-bounded memory of salts (replay defence)
    uri          SIP002 ss:// URIs
    errors       ShadowsocksError and its subclasses: untrusted bytes raise ProtocolError only
"""

from .address import Address, encode_address, parse_address
from .cipher import (
    METHODS,
    Cipher,
    Method,
    aead_subkey,
    decode_psk,
    evp_bytes_to_key,
    get_method,
    hkdf_sha1,
    session_subkey_2022,
)
from .errors import (
    AuthenticationError,
    ConfigError,
    ProtocolError,
    ReplayError,
    ShadowsocksError,
    UsageError,
)
from .salt_filter import SaltFilter
from .stream import TcpDecryptor, TcpEncryptor
from .udp2022 import ClientPacket, Udp2022Client, Udp2022Server
from .uri import ServerConfig, UriError, format_uri, parse_uri

__all__ = [
    "Address", "encode_address", "parse_address",
    "METHODS", "Cipher", "Method", "aead_subkey", "decode_psk", "evp_bytes_to_key", "get_method",
    "hkdf_sha1", "session_subkey_2022",
    "AuthenticationError", "ConfigError", "ProtocolError", "ReplayError", "ShadowsocksError",
    "UsageError",
    "SaltFilter",
    "TcpDecryptor", "TcpEncryptor",
    "ClientPacket", "Udp2022Client", "Udp2022Server",
    "ServerConfig", "UriError", "format_uri", "parse_uri",
]
