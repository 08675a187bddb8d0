"""The writer process: commits in a child process, on SQLite and PostgreSQL; a child that
dies or wedges is replaced without losing or doubling a commit; it never outlives its store."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from sqlalchemy import event

from generated.kernelhub.v1 import hub_pb2 as pb
from hub_service import commands as cmd
from hub_service.errors import StatusError
from hub_service.outcomes import Outcome
from hub_service.settings import sqlite_url
from hub_service.sql_store import SqlStore
from hub_service.sql_tx import SqlTx
from hub_service.state import StateTx
from hub_service.testing import TestHub

from .conftest import WAIT, RawTrainer, async_stub, auth, hello, make_config, os_component, pattern


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


@dataclass
class DieAfterCommit(cmd.ShareArtifact):
    """A share whose writer process dies right after committing it, before answering."""

    def apply(self, tx: StateTx) -> Outcome:
        assert isinstance(tx, SqlTx)  # the child commits on SQL
        outcome = super().apply(tx)
        event.listen(tx.session, "after_commit", lambda _session: os._exit(3))
        return outcome


@contextlib.asynccontextmanager
async def process_store(url: str, **options: Any) -> AsyncIterator[SqlStore]:
    s = SqlStore(url, writer="process", **options)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[SqlStore]:
    async with process_store(store_url) as s:
        yield s


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
    assert store.sql_writer._seq == 0, "the parent allocated no seq: the child committed"
    page = await store.events_for("AI_Node_2", 0, 10)
    assert [e.artifact_shared.pattern.pattern_id for e in page] == ["m1", "m2"]


async def test_a_refused_command_comes_back_as_its_own_error(store: SqlStore) -> None:
    unknown = cmd.DeliverFeature(
        "AI_Node_1",
        "d1",
        pb.DeliverFeature(request_id="feat_missing", component=os_component()),
    )
    refused, fine = await store.commit([unknown, share("m1")])
    assert isinstance(refused, StatusError)
    assert refused.code == grpc.StatusCode.NOT_FOUND
    assert "feat_missing" in refused.message
    assert isinstance(fine, Outcome) and fine.seq == 1


def test_errors_survive_the_pipe() -> None:
    error = StatusError(grpc.StatusCode.INVALID_ARGUMENT, "bad", [("pattern.name", "empty")])
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
    store_url: str,
) -> None:
    async with process_store(store_url, commit_timeout=1.0) as store:
        await store.commit([share("m1")])
        pid = child_pid(store)
        os.kill(pid, signal.SIGSTOP)  # alive, but answers nothing
        (timed_out,) = await store.commit([share("m2")])
        assert isinstance(timed_out, StatusError)
        assert timed_out.code == grpc.StatusCode.UNAVAILABLE
        assert "did not answer" in timed_out.message
        assert gone(pid), "the wedged child is killed, not left behind"
        # The replacement starts under its own deadline: a start on a loaded machine can
        # outlast the 1 s that a commit gets.
        assert store.writer_process is not None
        await store.writer_process.start()
        resent, again = await store.commit([share("m2"), share("m2")])
        assert isinstance(resent, Outcome) and isinstance(again, Outcome)
        assert resent.seq == 2 and again.duplicate and again.seq == 2
        page = await store.events_for("AI_Node_2", 0, 10)
        assert [e.seq for e in page] == [1, 2]


async def owing(store: SqlStore, count: int) -> None:
    """Waits (bounded) until the child owes `count` answers: their frames are in its pipe."""
    assert store.writer_process is not None
    deadline = time.monotonic() + WAIT
    while store.writer_process.owed < count:
        assert time.monotonic() < deadline, f"{store.writer_process.owed} of {count} sent"
        await asyncio.sleep(0.01)


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """The child alive but answering nothing, until the block ends."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):  # killed meanwhile
            os.kill(pid, signal.SIGCONT)


async def test_commits_sent_before_the_one_ahead_is_answered_are_answered_in_order(
    store: SqlStore,
) -> None:
    """The group committer sends a batch while the one before it commits: the child takes
    them in the order sent, and each caller gets its own batch's answer."""
    await store.commit([share("m0")])
    with stopped(child_pid(store)):
        pending = [
            asyncio.create_task(store.commit([share(f"m{i}a"), share(f"m{i}b")])) for i in (1, 2, 3)
        ]
        await owing(store, 3)  # all three sent, none answered
    answers = await asyncio.gather(*pending)
    seqs = [[r.seq for r in batch if isinstance(r, Outcome)] for batch in answers]
    assert seqs == [[2, 3], [4, 5], [6, 7]]
    ids = [[r.events[0].event.artifact_shared.pattern.pattern_id for r in b] for b in answers]  # type: ignore[union-attr]
    assert ids == [["m1a", "m1b"], ["m2a", "m2b"], ["m3a", "m3b"]]


async def test_a_caller_that_stops_waiting_leaves_the_pipe_in_step(store: SqlStore) -> None:
    await store.commit([share("m0")])
    with stopped(child_pid(store)):
        abandoned = asyncio.create_task(store.commit([share("m1")]))
        awaited = asyncio.create_task(store.commit([share("m2")]))
        await owing(store, 2)
        abandoned.cancel()
    (second,) = await awaited
    assert isinstance(second, Outcome) and second.seq == 3, "its own answer, not m1's"
    (third,) = await store.commit([share("m3")])
    assert isinstance(third, Outcome) and third.seq == 4
    assert store.writer_process is not None and store.writer_process.starts == 1
    page = await store.events_for("AI_Node_2", 0, 10)
    assert [e.artifact_shared.pattern.pattern_id for e in page] == ["m0", "m1", "m2", "m3"]


async def test_a_child_killed_owing_two_commits_fails_both_and_the_resends_commit_once(
    store: SqlStore,
) -> None:
    await store.commit([share("m0")])
    pid = child_pid(store)
    with stopped(pid):
        owed = [asyncio.create_task(store.commit([share(f"m{i}")])) for i in (1, 2)]
        await owing(store, 2)
        os.kill(pid, signal.SIGKILL)
    for (lost,) in await asyncio.gather(*owed):
        assert isinstance(lost, StatusError) and lost.code == grpc.StatusCode.UNAVAILABLE
        assert "ended mid-commit" in lost.message
    assert gone(pid)
    first, second = await store.commit([share("m1"), share("m2")])  # a new child
    assert isinstance(first, Outcome) and isinstance(second, Outcome)
    assert (first.seq, second.seq) == (2, 3) and not first.duplicate
    assert store.writer_process is not None and store.writer_process.starts == 2
    page = await store.events_for("AI_Node_2", 0, 10)
    assert [e.artifact_shared.pattern.pattern_id for e in page] == ["m0", "m1", "m2"]


async def test_a_large_commit_behind_a_wedged_one_fails_and_the_next_child_starts(
    store_url: str,
) -> None:
    """The large frame waits for room in the wedged child's pipe when the child ahead of it
    is given up: both fail, and nothing of the old pipe is left to trip its successor."""
    async with process_store(store_url, commit_timeout=1.0) as store:
        await store.commit([share("m0")])
        large = [share(f"large{i}") for i in range(12000)]
        ours, theirs = socket.socketpair()
        with ours, theirs:
            room = ours.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) + theirs.getsockopt(
                socket.SOL_SOCKET, socket.SO_RCVBUF
            )
        assert len(pickle.dumps(large)) > 2 * room, "more than the pipe's buffers hold"
        pid = child_pid(store)
        with stopped(pid):
            wedged = asyncio.create_task(store.commit([share("m1")]))
            await owing(store, 1)
            behind = asyncio.create_task(store.commit(large))
            answers = await asyncio.gather(wedged, behind)
        for lost in (answers[0][0], answers[1][0]):
            assert isinstance(lost, StatusError) and lost.code == grpc.StatusCode.UNAVAILABLE
        assert gone(pid)
        assert store.writer_process is not None
        await store.writer_process.start()  # under its own deadline, as in the test above
        (after,) = await store.commit([share("m2")])
        assert isinstance(after, Outcome) and not after.duplicate
        page = await store.events_for("AI_Node_2", 0, 10)
        assert {e.artifact_shared.pattern.pattern_id for e in page} <= {"m0", "m1", "m2"}
        assert page[-1].artifact_shared.pattern.pattern_id == "m2"


async def test_closing_the_store_waits_for_the_answers_owed(store_url: str) -> None:
    store = SqlStore(store_url, writer="process")
    await store.open()
    try:
        await store.commit([share("m0")])
        with stopped(child_pid(store)):
            owed = [asyncio.create_task(store.commit([share(f"m{i}")])) for i in (1, 2)]
            await owing(store, 2)
            closing = asyncio.create_task(store.close())
        await asyncio.wait_for(closing, WAIT)
        # Answered, not failed: the close let the child finish what it had been sent.
        assert [r.seq for (r,) in await asyncio.gather(*owed)] == [2, 3]  # type: ignore[union-attr]
    finally:
        await store.close()  # a second close does nothing


async def test_a_child_dying_after_its_commit_is_unknown_and_the_resend_is_a_duplicate(
    store: SqlStore,
) -> None:
    artifact = share("m1").artifact
    (lost,) = await store.commit([DieAfterCommit("AI_Node_1", "m1", artifact)])
    assert isinstance(lost, StatusError) and lost.code == grpc.StatusCode.UNAVAILABLE
    assert "ended mid-commit" in lost.message
    (resent,) = await store.commit([share("m1")])
    assert isinstance(resent, Outcome) and resent.duplicate and resent.seq == 1
    assert [e.seq for e in await store.events_for("AI_Node_2", 0, 10)] == [1]


async def test_the_fork_server_dying_does_not_cost_the_writer(store: SqlStore) -> None:
    """A SIGTERM to the whole process group (systemd's default) ends the fork server; the
    writer ignores it and must go on serving, not be judged dead and replaced."""
    await store.commit([share("m1")])
    pid = child_pid(store)
    fork_server = psutil.Process(pid).ppid()
    os.kill(fork_server, signal.SIGTERM)
    # Not reaped here (multiprocessing reaps its fork server and starts another when next
    # needed): its end shows in the writer, handed to a new parent.
    deadline = time.monotonic() + WAIT
    while psutil.Process(pid).ppid() == fork_server:
        assert time.monotonic() < deadline, "the fork server ignored SIGTERM"
        await asyncio.sleep(0.05)
    (after,) = await store.commit([share("m2")])
    assert isinstance(after, Outcome) and after.seq == 2
    assert child_pid(store) == pid
    assert store.writer_process is not None and store.writer_process.starts == 1


async def test_a_writer_behind_the_log_reads_the_head_again(store_url: str) -> None:
    """What a replacement writer meets when its predecessor's last commit lands after it
    read the head (PostgreSQL finishes a COMMIT whose client was killed): its seqs collide."""
    store = SqlStore(
        store_url, writer="thread"
    )  # the thread writer: the same commit path, easier to reach
    await store.open()
    try:
        await store.commit([share("m1")])
        store.sql_writer._seq = 0  # as if the head were read before m1 committed
        (after,) = await store.commit([share("m2")])
        assert isinstance(after, Outcome) and after.seq == 2
    finally:
        await store.close()


def test_a_store_left_open_does_not_keep_the_process_from_exiting(tmp_path: Path) -> None:
    script = (
        "import asyncio\n"
        "from hub_service.sql_store import SqlStore\n"
        f"store = SqlStore('sqlite:///{tmp_path / 'open.db'}', writer='process')\n"
        "asyncio.run(store.open())\n"
    )
    ran = subprocess.run([sys.executable, "-c", script], timeout=60, capture_output=True)
    assert ran.returncode == 0, ran.stderr


async def test_closing_the_store_ends_the_child(store_url: str) -> None:
    async with process_store(store_url) as store:
        pid = child_pid(store)
    assert gone(pid)
    (refused,) = await store.commit([share("m1")])
    assert isinstance(refused, StatusError) and refused.code == grpc.StatusCode.UNAVAILABLE
    assert store.writer_process is not None and store.writer_process.pid is None


def test_an_unknown_writer_is_refused() -> None:
    with pytest.raises(ValueError, match="'thread' or 'process'"):
        SqlStore("sqlite://", writer="fiber")


async def test_a_commit_whose_answer_was_lost_still_reaches_the_streams(tmp_path: Path) -> None:
    """A batch answered UNAVAILABLE may have landed: its events were never published, so
    the head understates the log. A live stream and one opened from now before the next
    publish both read the log again, and get the event (no "already level" shortcut)."""
    config = make_config(sqlite_url(tmp_path / "hub.db"), writer="process")
    async with TestHub.in_process(config) as hub:
        tokens = await hub.issue_tokens("AI_Node_1", "AI_Node_2", "AI_Node_3")
        channel = hub.channel()

        async def connect(agent_id: str, **hello_fields: Any) -> RawTrainer:
            call = async_stub(channel).Connect(metadata=auth(tokens[agent_id]))
            await call.write(
                pb.ConnectRequest(message_id="hello", hello=hello(agent_id, **hello_fields))
            )
            return await RawTrainer.welcomed(agent_id, call)

        live = await connect("AI_Node_1")
        lost = DieAfterCommit("AI_Node_3", "m1", share("m1").artifact)
        with pytest.raises(StatusError) as raised:
            await hub.server.committer.submit(lost)
        assert raised.value.code == grpc.StatusCode.UNAVAILABLE
        assert hub.server.router.last_published_seq == 0  # landed, never published
        fresh = await connect("AI_Node_2", skip_history=True)
        for trainer in (live, fresh):
            event = await trainer.event("artifact_shared")
            assert event.seq == 1 and event.sender_id == "AI_Node_3"
