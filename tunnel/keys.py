"""Keys: generating them, and base64 as `wg` prints them (the UAPI's hex is tunnel/grammar.py's)."""

from __future__ import annotations

import base64
import binascii
import os

from .noise.crypto import KEY_LEN, clamp, public_key

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


def generate_private_key() -> bytes:
    return clamp(os.urandom(KEY_LEN))


def generate_psk() -> bytes:
    return os.urandom(KEY_LEN)
