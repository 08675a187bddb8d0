"""`CpuMeter` splits the server's CPU between its main thread, its other threads and its child
processes: a server that burns a fixed amount of work in one of the three is charged there."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kernelhub_bench.load import CpuMeter

# Says it is ready, waits for a line, does a fixed amount of work where it is told (its main
# thread, another thread, a child process), says so, and waits for a line to exit.
SERVER = """
import multiprocessing, sys, threading

def burn():
    total = 0
    for i in range(3_000_000):
        total += i * i
    return total

def child(burned, leave):
    burn()
    burned.set()
    leave.wait(60)  # alive until the meter has read it

if __name__ == "__main__":
    where = sys.argv[1]
    context = multiprocessing.get_context("fork")
    burned, leave = context.Event(), context.Event()
    print("ready", flush=True)  # started: what it did so far is not what is measured
    sys.stdin.readline()
    if where == "main":
        burn()
    elif where == "thread":
        worker = threading.Thread(target=burn)
        worker.start()
        worker.join()
    else:
        process = context.Process(target=child, args=(burned, leave))
        process.start()
        burned.wait(60)
    print("done", flush=True)
    sys.stdin.readline()
    leave.set()
    if where == "child":
        process.join(60)
"""

BUCKETS = {
    "main": "server_main_thread_cores",
    "thread": "server_other_threads_cores",
    "child": "server_children_cores",
}


@pytest.mark.skipif(sys.platform != "linux", reason="the child's fork start is Linux's")
@pytest.mark.parametrize("where", sorted(BUCKETS))
def test_the_server_cpu_is_charged_to_where_it_was_spent(where: str) -> None:
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, where],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdin is not None and server.stdout is not None
    try:
        assert server.stdout.readline() == "ready\n"
        meter = CpuMeter(server.pid)
        meter.start()
        server.stdin.write("go\n")
        server.stdin.flush()
        assert server.stdout.readline() == "done\n"
        cpu = meter.stop()
        server.stdin.write("leave\n")
        server.stdin.flush()
        spent = cpu[BUCKETS[where]]
        others = sum(cpu[key] for key in BUCKETS.values() if key != BUCKETS[where])
        assert spent > 0
        assert spent > 5 * others, cpu
        assert cpu["server_cores"] == pytest.approx(spent + others, abs=0.002)
        assert server.wait(timeout=60) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
