"""Hub addresses as gRPC targets: one address as given, several as one channel that gRPC
itself fails over across.

The client never loops over addresses. A list of IP literals becomes gRPC's `ipv4:`/`ipv6:`
target (its static resolver), a name with several records is gRPC's `dns:` resolver's, and the
channel's `pick_first` policy, with `shuffleAddressList`, connects to one of them at random and,
when that connection is lost or refused, to the next: the client's reconnect (which resumes by
seq and resends unanswered messages) simply lands on another replica.

A list of host names is refused: gRPC's Python API cannot register a resolver, so accepting
one would mean resolving the names ourselves, once, and freezing what they said (a replica that
moved would be lost until the client restarts). A name whose records list the replicas is what
gRPC's own resolver keeps up to date: `dns:///hubs.internal:50051`.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Any, Final

# More addresses than any deployment of replicas on one database has; a list past it is a
# mistake (or hostile), not a hub.
MAX_ADDRESSES: Final = 64
_LIST_SCHEMES: Final = ("ipv4:", "ipv6:")
# Connect to one address, chosen at random per channel, so many clients spread over the
# replicas with one connection each (round_robin would hold one to every replica).
_SPREAD_POLICY: Final = [{"pick_first": {"shuffleAddressList": True}}]


@dataclass(frozen=True)
class HubTarget:
    """What a channel is opened to. `target` is handed to gRPC; `several` says it may name
    more than one hub (a list, or a `dns:` name), whose channel spreads and fails over."""

    target: str
    several: bool

    def channel_options(self) -> list[tuple[str, int]]:
        """Options a channel to several hubs needs beside its service config: its own
        subchannels, or every client of a process would share the first one connected (gRPC's
        global pool; pick_first takes a subchannel already connected), all on one replica."""
        return [("grpc.use_local_subchannel_pool", 1)] if self.several else []

    def service_config(self, config: dict[str, Any]) -> str:
        """`config` (the client's method configs) with the spreading policy for several hubs."""
        if self.several:
            config = {"loadBalancingConfig": _SPREAD_POLICY, **config}
        return json.dumps(config)


def parse_hub_target(text: str) -> HubTarget:
    """`host:port` (any single gRPC target, passed on unchanged), `dns:///name:port` (every
    record of the name), or several IP addresses `10.0.0.1:50051,10.0.0.2:50051` (also
    `[::1]:50051,[::1]:50052`, or gRPC's own `ipv4:`/`ipv6:` form). Raises ValueError with
    the reason for anything else."""
    stripped = text.strip()
    if not stripped:
        raise ValueError("the hub address is empty")
    scheme = next((s for s in _LIST_SCHEMES if stripped.startswith(s)), None)
    if scheme is None and "," not in stripped:
        return HubTarget(stripped, several=stripped.startswith("dns:"))
    if scheme is None and stripped.startswith("dns:"):
        raise ValueError(
            f"{text!r}: dns: takes one name; give it a name with one record per replica"
        )
    body = stripped[len(scheme) :] if scheme else stripped
    elements = [e.strip() for e in body.split(",")]
    if len(elements) > MAX_ADDRESSES:
        raise ValueError(f"{len(elements)} hub addresses; at most {MAX_ADDRESSES}")
    addresses = [_ip_address(e, text) for e in elements]
    families = {a.version for a, _ in addresses}
    if len(families) > 1:
        raise ValueError(
            f"{text!r} mixes IPv4 and IPv6 addresses; gRPC takes a list of one family "
            "(or give a DNS name with records of both)"
        )
    (family,) = families
    if scheme is not None and scheme != f"ipv{family}:":
        raise ValueError(f"{text!r}: {scheme} with IPv{family} addresses")
    rendered = [f"[{a}]:{p}" if a.version == 6 else f"{a}:{p}" for a, p in addresses]
    duplicate = next((r for i, r in enumerate(rendered) if r in rendered[:i]), None)
    if duplicate is not None:
        raise ValueError(f"{text!r} names {duplicate} twice")
    return HubTarget(f"ipv{family}:" + ",".join(rendered), several=len(rendered) > 1)


def _ip_address(
    element: str, text: str
) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    if not element:
        raise ValueError(f"{text!r} has an empty address (two commas, or one at an end)")
    host, colon, port_text = element.rpartition(":")
    if not colon or not host:
        raise ValueError(f"{element!r} in {text!r} has no port: write HOST:PORT")
    bracketed = host.startswith("[") and host.endswith("]")
    try:
        address = ipaddress.ip_address(host[1:-1] if bracketed else host)
    except ValueError:
        raise ValueError(
            f"{element!r} in {text!r} is not an IP address: a list of hubs takes IP "
            "addresses (gRPC resolves no list of names); for names, give one DNS name with a "
            "record per replica, dns:///NAME:PORT"
        ) from None
    if "%" in host:
        # gRPC's ipv6: list would need the zone percent-encoded (%25), and fails to resolve
        # it otherwise: its calls hang until their deadline.
        raise ValueError(
            f"{element!r} in {text!r}: a list of hubs takes no IPv6 zone id (%...); give "
            "one address alone, or a global address"
        )
    if address.version == 6 and not bracketed:
        raise ValueError(
            f"{element!r} in {text!r}: write an IPv6 address in brackets, [{host}]:PORT"
        )
    if address.version == 4 and bracketed:
        raise ValueError(f"{element!r} in {text!r}: brackets are for IPv6 addresses")
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{element!r} in {text!r}: the port must be 1 to 65535")
    return address, int(port_text)
