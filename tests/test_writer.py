"""The writer process: commits in a child process, on SQLite and PostgreSQL; a child that
dies or wedges is replaced without losing or doubling a commit; it never outlives its store."""

from __future__ import annotations

import os
import pickle
import signal
from collections.abc import AsyncIterator

import grpc
import psutil
import pytest

from generated.kernelhub.v1 import hub_pb2 as pb
from hub_service import commands as cmd
from hub_service.commands import Outcome
from hub_service.errors import HubError
from hub_service.store import SqlStore

from .conftest import WAIT, os_component, pattern


def share(message_id: str) -> cmd.ShareArtifact:
    artifact = pb.Artifact(kind=pb.ARTIFACT_KIND_PATTERN, pattern=pattern(message_id))
    return cmd.ShareArtifact("AI_Node_1", message_id, artifact)


def gone(pid: int) -> bool:
    """Waits (bounded) for the process to exit; True once it has."""
    try:
        psutil.Process(pid).wait(WAIT)
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:
        return False
    return True


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[SqlStore]:
    s = SqlStore(store_url, writer="process", commit_timeout=2.0)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


def child_pid(store: SqlStore) -> int:
    assert store.writer_process is not None
    pid = store.writer_process.pid
    assert pid is not None and pid != os.getpid()
    return pid


async def test_commits_run_in_the_child_and_the_parent_reads_them(store: SqlStore) -> None:
    assert psutil.Process(child_pid(store)).is_running()
    first, second = await store.commit([share("m1"), share("m2")])
    assert isinstance(first, Outcome) and isinstance(second, Outcome)
    assert (first.seq, second.seq) == (1, 2)
    assert first.events[0].event.artifact_shared.pattern.pattern_id == "m1"
    (again,) = await store.commit([share("m1")])
    assert isinstance(again, Outcome) and again.duplicate and again.seq == 1
    page = await store.events_for("AI_Node_2", 0, 10)
    assert [e.artifact_shared.pattern.pattern_id for e in page] == ["m1", "m2"]


async def test_a_refused_command_comes_back_as_its_own_error(store: SqlStore) -> None:
    unknown = cmd.DeliverFeature(
        "AI_Node_1",
        "d1",
        pb.DeliverFeature(request_id="feat_missing", component=os_component()),
    )
    refused, fine = await store.commit([unknown, share("m1")])
    assert isinstance(refused, HubError)
    assert refused.code == grpc.StatusCode.NOT_FOUND
    assert "feat_missing" in refused.message
    assert isinstance(fine, Outcome) and fine.seq == 1


def test_errors_survive_the_pipe() -> None:
    error = HubError(grpc.StatusCode.INVALID_ARGUMENT, "bad", [("pattern.name", "empty")])
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.code, copy.message, copy.violations) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "bad",
        [("pattern.name", "empty")],
    )


async def test_a_killed_child_is_replaced_and_the_log_goes_on(store: SqlStore) -> None:
    (before,) = await store.commit([share("m1")])
    pid = child_pid(store)
    os.kill(pid, signal.SIGKILL)
    # Waited for without running the loop: the parent has not seen the pipe close, and the
    # fork server may not have reported the exit yet; the send then fails and is redone.
    assert gone(pid)
    (after,) = await store.commit([share("m2")])  # a new child, reading the head again
    assert isinstance(before, Outcome) and isinstance(after, Outcome)
    assert after.seq == before.seq + 1
    assert child_pid(store) != pid
    assert store.writer_process is not None and store.writer_process.starts == 2


async def test_a_wedged_child_times_out_is_replaced_and_the_resend_commits_once(
    store: SqlStore,
) -> None:
    await store.commit([share("m1")])
    pid = child_pid(store)
    os.kill(pid, signal.SIGSTOP)  # alive, but answers nothing
    (timed_out,) = await store.commit([share("m2")])
    assert isinstance(timed_out, HubError)
    assert timed_out.code == grpc.StatusCode.UNAVAILABLE
    assert "did not answer" in timed_out.message
    assert gone(pid), "the wedged child is killed, not left behind"
    resent, again = await store.commit([share("m2"), share("m2")])
    assert isinstance(resent, Outcome) and isinstance(again, Outcome)
    assert resent.seq == 2 and again.duplicate and again.seq == 2
    page = await store.events_for("AI_Node_2", 0, 10)
    assert [e.seq for e in page] == [1, 2]


async def test_closing_the_store_ends_the_child(store_url: str) -> None:
    store = SqlStore(store_url, writer="process")
    await store.open()
    pid = child_pid(store)
    await store.close()
    assert gone(pid)


def test_an_unknown_writer_is_refused() -> None:
    with pytest.raises(ValueError, match="'thread' or 'process'"):
        SqlStore("sqlite://", writer="fiber")
