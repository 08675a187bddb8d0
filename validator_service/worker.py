"""The validator's loop: claim a component from the hub (waiting a bounded time), build and
test it, submit the verdict, take the next. Talks to the hub only through the contract."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import grpc

from generated.kernelhub.v1 import hub_pb2 as pb
from generated.kernelhub.v1 import hub_pb2_grpc

from .builder import Builder

log = logging.getLogger(__name__)

CLAIM_WAIT = 10.0  # seconds one ClaimValidation waits for work (the hub allows up to 30)
CALL_SLACK = 10.0  # beyond the wait, for the call's own deadline
SUBMIT_ATTEMPTS = 5  # a verdict is resent on UNAVAILABLE (the hub answers a resend as the first)
RETRY_BACKOFF = (0.2, 2.0)  # first and largest pause between attempts, seconds
SUBMIT_MARGIN = 5.0  # seconds before a lease ends that its verdict is sent at the latest
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


@dataclass
class Counts:
    validated: int = 0
    by_state: dict[str, int] = field(default_factory=dict)
    refused: int = 0  # verdicts the hub refused (the lease expired)

    def add(self, state: int) -> None:
        self.validated += 1
        name = pb.ValidationState.Name(state)  # type: ignore[arg-type]
        self.by_state[name] = self.by_state.get(name, 0) + 1


class Validator:
    def __init__(self, target: str, token: str, builder: Builder, name: str = "validator") -> None:
        self.target = target
        self.name = name
        self.builder = builder
        self._metadata = (("authorization", f"Bearer {token}"),)
        self.counts = Counts()

    async def run(self, stop: asyncio.Event, limit: int = 0) -> Counts:
        """Until `stop` is set (or `limit` verdicts, if given)."""
        await self.builder.start()
        backoff = RETRY_BACKOFF[0]
        async with grpc.aio.insecure_channel(self.target) as channel:
            stub = hub_pb2_grpc.HubServiceStub(channel)
            while not stop.is_set() and not (limit and self.counts.validated >= limit):
                try:
                    await self._one(stub, stop)
                    backoff = RETRY_BACKOFF[0]
                except grpc.aio.AioRpcError as error:
                    if error.code() not in RETRYABLE:
                        raise  # e.g. PERMISSION_DENIED: not a validator's token
                    log.info("%s: hub unavailable (%s), retrying", self.name, error.details())
                    await _pause(stop, backoff)
                    backoff = min(backoff * 2, RETRY_BACKOFF[1])
        return self.counts

    async def _one(self, stub: hub_pb2_grpc.HubServiceStub, stop: asyncio.Event) -> None:
        claim = asyncio.ensure_future(
            stub.ClaimValidation(
                pb.ClaimValidationRequest(wait_seconds=CLAIM_WAIT),
                metadata=self._metadata,
                timeout=CLAIM_WAIT + CALL_SLACK,
            )
        )
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({claim, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if not claim.done():
            claim.cancel()  # stopping: a lease it took (if any) expires and goes to another
            return
        response: pb.ClaimValidationResponse = claim.result()
        if not response.HasField("lease"):
            return
        lease = response.lease
        artifact = lease.artifact
        # The lease's end on this clock, less the time a verdict takes to reach the hub.
        left = lease.expire_time.ToDatetime(tzinfo=UTC) - datetime.now(UTC)
        deadline = time.monotonic() + left.total_seconds() - SUBMIT_MARGIN
        try:
            verdict = await self.builder.validate(artifact, deadline)
        except Exception as exc:  # the validator failed, not the component
            log.exception("%s: validating %s failed", self.name, artifact.artifact_id)
            verdict = pb.ValidationVerdict(
                state=pb.VALIDATION_STATE_ERROR,
                diagnostics=f"the validator failed: {type(exc).__name__}: {exc}"[:4000],
                sandboxed=self.builder.sandbox.enabled,
            )
        await self._submit(stub, lease.lease_id, verdict)

    async def _submit(
        self, stub: hub_pb2_grpc.HubServiceStub, lease_id: str, verdict: pb.ValidationVerdict
    ) -> None:
        request = pb.SubmitVerdictRequest(lease_id=lease_id, verdict=verdict)
        pause = RETRY_BACKOFF[0]
        for attempt in range(SUBMIT_ATTEMPTS):
            try:
                await stub.SubmitVerdict(request, metadata=self._metadata, timeout=30)
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    self.counts.refused += 1
                    log.warning("%s: verdict refused: %s", self.name, error.details())
                    return
                if error.code() not in RETRYABLE or attempt == SUBMIT_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(pause)  # a backoff before a resend, not a wait on a race
                pause = min(pause * 2, RETRY_BACKOFF[1])
                continue
            self.counts.add(verdict.state)
            log.info(
                "%s: %s %s (%d/%d tests)",
                self.name,
                lease_id.split(":", 1)[0],
                pb.ValidationState.Name(verdict.state),
                verdict.tests_passed,
                verdict.tests_run,
            )
            return


async def _pause(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
