"""Key encodings shared by the CLI, configs and the UAPI: base64 (as `wg` prints) and hex (UAPI)."""

from __future__ import annotations

import base64
import binascii
import os
import re

from .noise.crypto import KEY_LEN, clamp, public_key

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")

__all__ = ["KeyError_", "decode_base64_key", "encode_base64_key", "generate_private_key", "generate_psk", "public_key"]


class KeyError_(ValueError):
    """A key string that is not 32 bytes in the expected encoding."""


def encode_base64_key(key: bytes) -> str:
    return base64.b64encode(key).decode("ascii")


def decode_base64_key(text: str) -> bytes:
    """Decode a 44-character base64 key (wg's key_from_base64: exact length, '=' padding)."""
    if len(text) != 44 or text[43] != "=" or text[42] == "=":
        raise KeyError_("Key is not the correct length or format")
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise KeyError_("Key is not the correct length or format") from None
    # wg refuses non-canonical encodings (unused low bits set in the last character).
    if len(key) != KEY_LEN or base64.b64encode(key).decode("ascii") != text:
        raise KeyError_("Key is not the correct length or format")
    return key


def decode_hex_key(text: str) -> bytes:
    """Decode a 64-character hex key as the UAPI sends it."""
    if len(text) != 64 or not _HEX64.fullmatch(text):
        raise KeyError_("key is not 64 hex characters")
    return bytes.fromhex(text)


def generate_private_key() -> bytes:
    return clamp(os.urandom(KEY_LEN))


def generate_psk() -> bytes:
    return os.urandom(KEY_LEN)
