"""`kernelhub-bench hot-spots --by-module`: each busy sample of a py-spy raw profile is charged
to the innermost hub module on its stack and to the layer its leaf frame runs in."""

from __future__ import annotations

from pathlib import Path

from kernelhub_bench.report import breakdown

THREAD = "thread (0x7F00) (MainThread)"
PROFILE = "\n".join(
    [
        # connection.py writing: the leaf is grpc's Cython -> connection.py / grpc
        f"{THREAD};main (hub_service/cli.py:262);Handle._run (asyncio/events.py:80);"
        "_send (hub_service/connection.py:10);"
        "write (grpc/_cython/_cygrpc/aio/call.pyx.pxi:5) 6",
        # the router calling into connection.py's own code: charged to connection.py
        f"{THREAD};route (hub_service/router.py:20);offer (hub_service/connection.py:30) 2",
        # the router serializing
        f"{THREAD};route (hub_service/router.py:21);"
        "SerializeToString (google/protobuf/message.py:1) 1",
        # the event loop's own work, under the hub's entry point that runs the loop
        f"{THREAD};main (hub_service/cli.py:262);run (asyncio/base_events.py:1);"
        "BaseEventLoop._run_once (asyncio/base_events.py:1922);"
        "_get_loop (asyncio/mixins.py:13) 1",
        # waiting: not busy, left out
        f"{THREAD};select (selectors.py:1);EpollSelector.select (selectors.py:468) 90",
        "garbage line",
    ]
)


def test_samples_are_charged_to_the_innermost_hub_module_and_the_leaf_layer(
    tmp_path: Path,
) -> None:
    path = tmp_path / "hub.txt"
    path.write_text(PROFILE + "\n")
    result = breakdown(path)
    assert result["busy_samples"] == 10
    assert dict(map(tuple, result["by_module"])) == {
        "connection.py": 0.8,
        "router.py": 0.1,
        "(the event loop itself)": 0.1,
    }
    assert dict(map(tuple, result["by_layer"])) == {
        "grpc": 0.6,
        "hub code": 0.2,
        "protobuf": 0.1,
        "asyncio": 0.1,
    }
    assert ["connection.py -> grpc", 0.6] in result["by_module_and_layer"]
    assert ["router.py -> protobuf", 0.1] in result["by_module_and_layer"]


def test_a_profile_without_busy_samples_has_no_shares(tmp_path: Path) -> None:
    path = tmp_path / "idle.txt"
    path.write_text(f"{THREAD};EpollSelector.select (selectors.py:468) 50\n")
    assert breakdown(path) == {
        "busy_samples": 0,
        "by_module": [],
        "by_layer": [],
        "by_module_and_layer": [],
    }
