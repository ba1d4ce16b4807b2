"""SIP002 `ss://` URIs (shadowsocks-org sip002.md).

    ss://BASE64URL(method:password)@host:port[/][?plugin=...][#tag]     AEAD-2017 (as formatted)
    ss://PERCENT(method):PERCENT(password)@host:port[/][?plugin=...][#tag]   2022 (MUST), any method
    ss://BASE64(method:password@host:port)[#tag]                         legacy, parsed only

host:port is transport/address.py's grammar (IPv6 hosts in brackets). Parsing accepts base64url with or without padding (also "%3D" padding
and the standard alphabet, as written by some clients), ignores unknown query parameters, and
checks what it returns: a supported method, a usable password (2022: a base64 PSK of the right
length), a host, a port in 1..65535. Every error is a UriError whose message names the part that is
wrong and quotes nothing from the URI, so never the password (nor the user info encoding it).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, quote, unquote

from transport.address import AddressError, canonical_host, format_address, split_host_port

from .cipher import METHODS, Cipher, decode_psk, get_method
from .errors import ConfigError

_B64_CHARS = re.compile(r"[A-Za-z0-9+/_-]*\Z")


class UriError(ConfigError):
    """An ss:// URI that cannot be used."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """A Shadowsocks server as a URI describes it. The password is left out of repr()."""

    method: str
    password: str = field(repr=False)
    host: str
    port: int
    plugin: str | None = None
    tag: str | None = None

    def cipher(self) -> Cipher:
        return Cipher(self.method, self.password)

    def to_uri(self) -> str:
        return format_uri(self)


def _b64decode_lenient(text: str) -> bytes | None:
    text = text.rstrip("=")
    if not _B64_CHARS.match(text) or len(text) % 4 == 1:
        return None
    text = text.replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None


def _server_address(hostport: str) -> tuple[str, int]:
    """host:port as transport/address.py reads it; an IP address in its canonical text. A name
    ending in a numeric label is taken as written, as other Shadowsocks clients take it."""
    try:
        host, port = split_host_port(hostport, numeric_last_label_is_ipv4=False)
    except AddressError as exc:  # quotes nothing from the URI
        raise UriError(f"ss URI: {exc}") from None
    return canonical_host(host), port


def _check_credentials(method: str, password: str) -> tuple[str, str]:
    try:
        m = get_method(method)
    except ConfigError:
        # not echoed: a password typed where the method goes would end up in the message
        raise UriError(f"ss URI: unsupported method (supported: {', '.join(METHODS)})") from None
    if m.is_2022:
        try:
            decode_psk(password, m.key_len)
        except ConfigError as exc:
            raise UriError(f"ss URI: {exc}") from None
    elif not password:
        raise UriError("ss URI: the password is empty")
    return m.name, password


def _split_userinfo(userinfo: str) -> tuple[str, str]:
    """(method, password) from the user info, plain or base64url."""
    if ":" in userinfo:
        method_text, _, password_text = userinfo.partition(":")
        method, password = unquote(method_text, errors="strict"), unquote(password_text, errors="strict")
        return method, password
    raw = _b64decode_lenient(unquote(userinfo))
    if raw is None:
        raise UriError("ss URI: the user info is neither method:password nor base64url of it")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UriError("ss URI: the base64 user info is not UTF-8 text") from None
    method, sep, password = text.partition(":")
    if not sep:
        raise UriError("ss URI: the base64 user info has no ':' between method and password")
    return method, password


def parse_uri(uri: str | bytes) -> ServerConfig:
    """A ServerConfig from an ss:// URI. Raises UriError (a ConfigError) and nothing else."""
    if isinstance(uri, (bytes, bytearray)):
        try:
            uri = bytes(uri).decode("utf-8")
        except UnicodeDecodeError:
            raise UriError("ss URI: not UTF-8 text") from None
    if not isinstance(uri, str):
        raise UriError("ss URI: not a string")
    uri = uri.strip()
    if uri[:5].lower() != "ss://":
        raise UriError("ss URI: must start with ss://")
    try:
        return _parse(uri[5:])
    except UnicodeDecodeError:
        raise UriError("ss URI: a percent-escape does not decode to UTF-8") from None


def _parse(rest: str) -> ServerConfig:
    rest, hash_, fragment = rest.partition("#")
    tag = unquote(fragment, errors="strict") if hash_ else None
    end = len(rest)
    for ch in "/?":
        i = rest.find(ch)
        if 0 <= i < end:
            end = i
    authority, tail = rest[:end], rest[end:]
    if tail.startswith("/"):
        tail = tail[1:]
    query = ""
    if tail.startswith("?"):
        query = tail[1:]
    elif tail:
        raise UriError("ss URI: unexpected path after host:port")
    if any(c.isspace() or ord(c) < 0x20 or c == "\x7f" for c in authority):
        raise UriError("ss URI: whitespace or control characters in the authority")
    if "@" not in authority:
        # legacy: ss://BASE64(method:password@host:port)#tag
        raw = _b64decode_lenient(unquote(authority))
        try:
            text = raw.decode("utf-8") if raw is not None else None
        except UnicodeDecodeError:
            text = None
        if text is None or "@" not in text:
            raise UriError("ss URI: missing '@' between the user info and host:port")
        userinfo, _, hostport = text.rpartition("@")
        method, sep, password = userinfo.partition(":")
        if not sep:
            raise UriError("ss URI: the base64 user info has no ':' between method and password")
        if "/" in hostport or "?" in hostport or "#" in hostport:
            raise UriError("ss URI: unexpected characters after host:port in the legacy form")
    else:
        userinfo, _, hostport = authority.rpartition("@")
        if not userinfo:
            raise UriError("ss URI: the user info (method and password) is empty")
        method, password = _split_userinfo(userinfo)
    method, password = _check_credentials(method, password)
    host, port = _server_address(hostport)
    plugin = None
    if query:
        try:
            pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=False,
                              errors="strict", max_num_fields=64)
        except (ValueError, UnicodeDecodeError):
            raise UriError("ss URI: the query is not valid") from None
        for key, value in pairs:
            if key == "plugin":
                plugin = value or None
    return ServerConfig(method, password, host, port, plugin, tag or None)


def format_uri(config: ServerConfig) -> str:
    """The SIP002 URI of `config`: base64url user info for AEAD-2017 methods, percent-encoded
    for 2022 methods (which must not use base64)."""
    method = get_method(config.method)
    if method.is_2022:
        userinfo = quote(method.name, safe="") + ":" + quote(config.password, safe="")
    else:
        raw = f"{method.name}:{config.password}".encode("utf-8")
        userinfo = base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")
    uri = f"ss://{userinfo}@{format_address((config.host, int(config.port)))}"
    if config.plugin:
        uri += "/?plugin=" + quote(config.plugin, safe="")
    if config.tag:
        uri += "#" + quote(config.tag, safe="")
    return uri
