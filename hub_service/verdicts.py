"""The validators' RPCs: a lease on the oldest component waiting for validation (waiting a
bounded time for one), and the verdict on it. Transport-agnostic: a StatusError says what
went wrong, the servicer sends it.

The queue itself is a table (`ValidationJobRow`), changed only by commands through the
group commit, so a restart loses nothing and two validators never hold the same lease.
What waits here in memory is one future per waiting call, woken one per new component.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque

from generated.kernelhub.v1 import hub_pb2 as pb

from . import commands as cmd
from .committer import GroupCommitter
from .config import HubConfig
from .errors import invalid
from .models import utcnow
from .outcomes import Outcome
from .validation import validate_verdict

# A lease's expiry is noticed this long after it passes (clock granularity across processes).
EXPIRY_SLACK = 0.01


class Verdicts:
    def __init__(self, config: HubConfig, committer: GroupCommitter) -> None:
        self._config = config
        self._committer = committer
        self._waiters: deque[asyncio.Future[None]] = deque()
        # Bumped on every new component: a claim that found nothing checks it before it
        # waits, so a component committed between the two is not missed.
        self._generation = 0

    def waiting(self) -> int:
        """Claims waiting for a component now (a gauge: a woken one has left the queue)."""
        return len(self._waiters)

    def notice(self, outcome: Outcome) -> None:
        """A committed outcome (on the loop, in commit order): wake one waiting claim per
        component it queued."""
        for routed in outcome.events:
            event = routed.event
            body = event.WhichOneof("body")
            artifact = (
                event.artifact_shared
                if body == "artifact_shared"
                else event.feature_delivered.artifact
                if body == "feature_delivered"
                else None
            )
            if artifact is None or artifact.validation_state != pb.VALIDATION_STATE_PENDING:
                continue
            self._generation += 1
            while self._waiters:
                waiter = self._waiters.popleft()
                if not waiter.done():
                    waiter.set_result(None)
                    break

    async def claim(
        self, validator_id: str, request: pb.ClaimValidationRequest
    ) -> pb.ClaimValidationResponse:
        wait = request.wait_seconds
        if not math.isfinite(wait) or not 0 <= wait <= self._config.validation_max_wait:
            raise invalid(
                [
                    (
                        "wait_seconds",
                        f"must be between 0 and {self._config.validation_max_wait:g}, got {wait}",
                    )
                ]
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        command = cmd.ClaimValidation(
            validator_id,
            self._config.validation_lease_ttl,
            self._config.validation_max_attempts,
            self._config.validation_max_leases,
        )
        while True:
            generation = self._generation
            outcome = await self._committer.submit(command)
            if outcome.lease:
                return pb.ClaimValidationResponse(
                    lease=pb.ValidationLease.FromString(outcome.lease)
                )
            remaining = deadline - loop.time()
            if remaining <= 0:
                return pb.ClaimValidationResponse()
            if generation != self._generation:
                continue  # a component came while the claim was committing
            timeout = remaining
            if outcome.retry_at is not None:  # a lease expires then
                due = (outcome.retry_at - utcnow()).total_seconds() + EXPIRY_SLACK
                timeout = min(timeout, max(due, EXPIRY_SLACK))
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waiter, timeout)
            finally:
                if not waiter.done():
                    waiter.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)

    async def submit(
        self, validator_id: str, request: pb.SubmitVerdictRequest
    ) -> pb.SubmitVerdictResponse:
        validate_verdict(request, self._config.limits)
        outcome = await self._committer.submit(
            cmd.SubmitVerdict(validator_id, request.lease_id, request.verdict)
        )
        return pb.SubmitVerdictResponse(seq=outcome.seq, artifact_id=outcome.resource_id)
