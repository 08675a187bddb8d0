"""The soak command in miniature: trainers through a hub that is SIGKILLed and restarted,
with nothing lost and nothing duplicated. `kernelhub-bench soak` runs the long version."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path


async def test_soak_loses_and_duplicates_nothing_through_a_hub_crash(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kernelhub_bench",
        "soak",
        "--trainers",
        "20",
        "--duration",
        "12s",
        "--rate",
        "2",
        "--restart-every",
        "6s",
        "--sample-every",
        "3s",
        "--json",
        str(out),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 240)
    assert process.returncode == 0, stdout.decode()[-2000:] + stderr.decode()[-2000:]
    result = json.loads(out.read_text())
    assert result["ok"] and result["lost"] == 0 and result["duplicated"] == 0
    assert result["hub_restarts"] == 1
    assert result["shared"] > 0 and result["delivered"] >= result["shared"] * 19
    # At the start, at the end, and (however loaded the machine) in between or after the restart.
    assert len(result["rss_mib"]) >= 3, "RSS is sampled over time"
    assert result["rss_mib"][0][0] == 0.0 and result["rss_mib"][-1][0] >= 12.0
    assert "soak OK" in stdout.decode()
