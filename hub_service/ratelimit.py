"""Rate limits: a token bucket (steady rate, bounded burst) per agent, in a table of bounded
size; and log lines that a flood of the same event cannot multiply."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict


class TokenBucket:
    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._stamp = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def take(self) -> bool:
        """Spend one token if there is one; refills continuously at `rate` per second."""
        self._refill()
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False

    def wait(self) -> float:
        """Seconds until the next token."""
        self._refill()
        return max(0.0, (1 - self._tokens) / self.rate)


class BucketTable:
    """One bucket per agent, for at most `size` agents: the least recently used is dropped
    first, so memory does not grow with every agent id ever seen. An agent whose bucket was
    dropped starts again from a full burst; with `size` above the live agents, only agents
    idle longest lose theirs, and an idle agent's bucket has refilled anyway."""

    def __init__(self, rate: float, burst: float, size: int) -> None:
        self.rate = rate
        self.burst = burst
        self._size = size
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def get(self, agent_id: str) -> TokenBucket:
        bucket = self._buckets.get(agent_id)
        if bucket is None:
            bucket = self._buckets[agent_id] = TokenBucket(self.rate, self.burst)
            if len(self._buckets) > self._size:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(agent_id)
        return bucket


class ThrottledLog:
    """One warning per `interval` seconds at most, counting the occurrences it stood for:
    what a client can trigger at will must not grow the log at its will."""

    def __init__(self, logger: logging.Logger, interval: float) -> None:
        self._logger = logger
        self._lines = TokenBucket(1 / interval, 1)
        self._unreported = 0

    def warning(self, message: str, *args: object) -> None:
        """`message` is formatted with the count of occurrences first, then `args`."""
        self._unreported += 1
        if self._lines.take():
            self._logger.warning(message, self._unreported, *args)
            self._unreported = 0
