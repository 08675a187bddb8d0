"""Responses as protobuf wire bytes: what many streams send alike is serialized once.

Protobuf's wire format lets a message be the concatenation of its fields' encodings, and
of a repeated field's entries. A presence change goes to every agent that follows presence:
encoded once as a `PresenceUpdate` field, a stream's update is the join of the entries it
carries, and its response is the rest serialized with that update appended, so no stream
re-encodes what another already did. Handlers may write such bytes: `passthrough` serializes
messages and leaves bytes as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from generated.kernelhub.v1 import hub_pb2 as pb

_WIRE_LENGTH_DELIMITED = 2
_PRESENCE_FIELD = pb.ConnectResponse.DESCRIPTOR.fields_by_name["presence"].number
_ROSTER = pb.PresenceUpdate(roster=True).SerializeToString()
_ROSTER_COMPLETE = pb.PresenceUpdate(roster_complete=True).SerializeToString()


def passthrough(serialize: Callable[[Any], bytes] | None) -> Callable[[Any], bytes] | None:
    """`serialize`, except that bytes (already serialized) go out as they are."""
    if serialize is None:
        return None

    def serializer(message: Any) -> bytes:
        return message if type(message) is bytes else serialize(message)

    return serializer


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def presence_entry(update: pb.PresenceUpdate) -> bytes:
    """One change's encoding (an update with one online agent, or one offline id)."""
    return update.SerializeToString()


def with_presence(
    response: pb.ConnectResponse,
    entries: Iterable[bytes],
    *,
    roster: bool = False,
    roster_complete: bool = False,
) -> bytes:
    """`response` serialized, with a presence update of `entries` (and the roster flags)."""
    body = b"".join(
        [_ROSTER if roster else b"", _ROSTER_COMPLETE if roster_complete else b"", *entries]
    )
    tag = _varint(_PRESENCE_FIELD << 3 | _WIRE_LENGTH_DELIMITED)
    return b"".join([response.SerializeToString(), tag, _varint(len(body)), body])
