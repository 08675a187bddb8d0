"""Responses as protobuf wire bytes: what many streams send alike is serialized once.

Protobuf's wire format lets a message be the concatenation of its fields' encodings, and
of a repeated field's entries. An event goes to every stream entitled to it, a presence
change to every agent that follows presence: each is encoded once as a field entry
(`EventWires`, `Entry.wire`), and a stream's response is the rest of it serialized with
those entries appended, so no stream re-encodes what another already did. Handlers may
write such bytes: `passthrough` serializes messages and leaves bytes as they are.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from generated.kernelhub.v1 import hub_pb2 as pb

_WIRE_LENGTH_DELIMITED = 2
_PRESENCE_FIELD = pb.ConnectResponse.DESCRIPTOR.fields_by_name["presence"].number
_EVENTS_FIELD = pb.ConnectResponse.DESCRIPTOR.fields_by_name["events"].number
# Bytes of event encodings kept: every stream a live event goes to writes it within a few
# lingers (a window of recent events, not a history: memory the hub holds whatever its
# readers do), and replays of recent events find theirs; an event larger than a sixteenth
# of this is encoded each time instead.
EVENT_WIRE_BYTES = 4 * 1024 * 1024
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


def _field(number: int, body: bytes) -> bytes:
    return b"".join([_varint(number << 3 | _WIRE_LENGTH_DELIMITED), _varint(len(body)), body])


def event_entry(event: pb.HubEvent) -> bytes:
    """`event` as one entry of `ConnectResponse.events`."""
    return _field(_EVENTS_FIELD, event.SerializeToString())


class EventWires:
    """Each event's `event_entry`, made once for all the streams that carry it (by seq:
    an event never changes once committed); the newest, up to `max_bytes` in all."""

    def __init__(self, max_bytes: int = EVENT_WIRE_BYTES) -> None:
        self._max_bytes = max_bytes
        self._bytes = 0
        self._wires: OrderedDict[int, bytes] = OrderedDict()

    def of(self, event: pb.HubEvent) -> bytes:
        wire = self._wires.get(event.seq)
        if wire is None:
            wire = event_entry(event)
            if len(wire) > self._max_bytes // 16:
                return wire  # too large to keep (and seldom sent whole)
            self._wires[event.seq] = wire
            self._bytes += len(wire)
            while self._bytes > self._max_bytes:
                self._bytes -= len(self._wires.popitem(last=False)[1])
        return wire


def response(
    head: pb.ConnectResponse,
    events: Iterable[bytes] = (),
    presence: Iterable[bytes] | None = None,
    *,
    roster: bool = False,
    roster_complete: bool = False,
) -> bytes:
    """`head` serialized, then `events` (entries of `events`), then (unless None) a presence
    update of those entries and the roster flags."""
    parts = [head.SerializeToString(), *events]
    if presence is not None:
        flags = [_ROSTER if roster else b"", _ROSTER_COMPLETE if roster_complete else b""]
        parts.append(_field(_PRESENCE_FIELD, b"".join([*flags, *presence])))
    return b"".join(parts)
