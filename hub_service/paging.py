"""Opaque page tokens and page sizes for the List RPCs."""

from __future__ import annotations

import base64
import binascii

from .errors import invalid

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500


def page_size(requested: int) -> int:
    if requested < 0:
        raise invalid([("page_size", f"must not be negative, got {requested}")])
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def encode(cursor: str) -> str:
    return base64.urlsafe_b64encode(cursor.encode()).decode().rstrip("=")


def decode(token: str) -> str:
    """The cursor inside `token`; "" for the first page."""
    if not token:
        return ""
    try:
        padded = token + "=" * (-len(token) % 4)
        return base64.b64decode(padded, altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise invalid([("page_token", "is not a token this hub issued")]) from None


def decode_int(token: str) -> int | None:
    cursor = decode(token)
    if not cursor:
        return None
    if not (cursor.isascii() and cursor.isdigit()) or int(cursor) >= 2**63:
        raise invalid([("page_token", "is not a token this hub issued")])
    return int(cursor)
