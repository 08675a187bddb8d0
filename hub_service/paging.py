"""Opaque page tokens and page sizes for the List RPCs, and the byte budget that every
response the hub builds keeps to (pages, stream responses, training syncs)."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Iterable
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from .errors import StatusError, invalid

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
# Room a response keeps for what is not an item: a page token, a Welcome, framing.
RESERVED_BYTES = 4096
# Text fields longer than this are left out of a stub (ids are at most 128 characters).
STUB_TEXT_CHARS = 256

Row = TypeVar("Row")
Item = TypeVar("Item", bound=Message)


def page_size(requested: int) -> int:
    if requested < 0:
        raise invalid([("page_size", f"must not be negative, got {requested}")])
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def budget(max_message_bytes: int) -> int:
    """Bytes the items of one response may take, from the configured message size limit."""
    return max(max_message_bytes - RESERVED_BYTES, max_message_bytes // 2)


def entry_bytes(message: Message) -> int:
    """What `message` adds to its parent as one entry of a repeated field: tag, length, body."""
    size = message.ByteSize()
    return size + 2 + (size.bit_length() + 6) // 7


def too_large(what: str, size: int, max_bytes: int) -> StatusError:
    return StatusError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"{what} is {size} bytes, more than the {max_bytes} bytes one response may carry",
    )


def take(
    rows: Iterable[Row],
    decode: Callable[[Row], Item],
    limit: int,
    max_bytes: int | None,
    shrink: Callable[[Item], Item] | None = None,
) -> tuple[list[tuple[Row, Item]], bool]:
    """The first `limit` rows, decoded, ending early once they would exceed `max_bytes`;
    and whether rows remain. Rows are decoded one at a time, so a page never holds more
    than its budget (plus one item). An item too large for any response alone is replaced
    by `shrink(item)` (List pages: its `stub`, so paging always gets past it), or goes
    alone for its reader to replace (the event log: `omitted`)."""
    page: list[tuple[Row, Item]] = []
    used = 0
    for row in rows:
        if len(page) == limit:
            return page, True
        item = decode(row)
        cost = entry_bytes(item)
        if max_bytes is not None and cost > max_bytes and shrink is not None:
            item = shrink(item)
            cost = entry_bytes(item)
        used += cost
        if max_bytes is not None and used > max_bytes and page:
            return page, True
        page.append((row, item))
    return page, False


def stub(item: Item) -> Item:
    """A page's stand-in for `item`, too large for one response: its ids, enums, flags and
    times, without its content, lists and long texts (GetArtifact refuses the whole)."""
    short = type(item)()
    for descriptor, value in item.ListFields():
        if descriptor.is_repeated:
            continue
        if descriptor.message_type is not None:
            if descriptor.message_type.full_name == "google.protobuf.Timestamp":
                getattr(short, descriptor.name).CopyFrom(value)
            continue
        if isinstance(value, str) and len(value) > STUB_TEXT_CHARS:
            continue
        setattr(short, descriptor.name, value)
    return short


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
