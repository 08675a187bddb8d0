"""Human durations on the command line: 30s, 5m, 1h, 7d, 1m30s, 250ms, or plain seconds.

One parser for every command (hub, trainer, bench)."""

from __future__ import annotations

import argparse
import re

_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|[dhms])")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Seconds in `text` (zero allowed); argparse.ArgumentTypeError names the accepted forms."""
    value = text.strip().lower()
    try:
        seconds = float(value)
    except ValueError:
        parts = _PART.findall(value)
        if not parts or "".join(n + u for n, u in parts) != value:
            raise argparse.ArgumentTypeError(
                f"invalid duration {text!r}; use e.g. 30s, 5m, 1h, 7d, 1m30s or plain seconds"
            ) from None
        seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    if not 0 <= seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"a duration must be finite and not negative: {text!r}")
    return seconds


def positive_duration(text: str) -> float:
    """Like parse_duration, for things that must take some time (a run, a pause)."""
    seconds = parse_duration(text)
    if seconds == 0:
        raise argparse.ArgumentTypeError(f"duration must be positive, got {text!r}")
    return seconds
