"""Rewrite the README's metrics table from the metric definitions (hub_service/metrics.py).

`python scripts/metrics_table.py` rewrites the block between the two marker comments;
`--check` exits 1 if the README's block is stale (tests/test_metrics.py runs it).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import readme_block  # noqa: E402  (this folder, first on sys.path when run as a script)

from hub_service.metrics import KINDS, LIMITS, OUTCOMES, HubMetrics  # noqa: E402

START = "<!-- metrics-table:start (made by scripts/metrics_table.py; edit metrics.py, not this) -->"
END = "<!-- metrics-table:end -->"
LABEL_VALUES = {
    "kind": "the message's body: " + ", ".join(f"`{k}`" for k in KINDS),
    "outcome": " / ".join(f"`{o}`" for o in OUTCOMES),
    "code": "a gRPC status code name (`INVALID_ARGUMENT`...)",
    "limit": " / ".join(f"`{limit}`" for limit in LIMITS),
    "method": "an RPC of HubService (`ListAgents`...), or `other`",
    "linger": "`stream` / `commit`",
}


def table() -> str:
    rows = ["| metric | type | labels | meaning |", "| --- | --- | --- | --- |"]
    for doc in HubMetrics().docs:
        labels = "; ".join(f"`{label}`: {LABEL_VALUES[label]}" for label in doc.labels) or "none"
        meaning = doc.help.replace("|", "\\|")
        rows.append(f"| `{doc.name}` | {doc.kind} | {labels} | {meaning} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(readme_block.main("metrics table", START, END, table))
