"""Rewrite the README's configuration table from the settings model (hub_service/settings.py).

`python scripts/settings_table.py` rewrites the block between the two marker comments;
`--check` exits 1 if the README's block is stale (tests/test_settings.py runs it).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import readme_block  # noqa: E402  (this folder, first on sys.path when run as a script)

from hub_service.settings import (  # noqa: E402 (the repository root first on the path)
    DURATIONS,
    FLAG_ALIASES,
    GROUPS,
    HubSettings,
    env_name,
    flag_name,
    group_of,
)

START = (
    "<!-- settings-table:start (made by scripts/settings_table.py; edit the model, not this) -->"
)
END = "<!-- settings-table:end -->"


def _default(name: str) -> str:
    value = HubSettings.model_fields[name].default
    if isinstance(value, float):
        value = f"{value:g}"
    return f"`{value}`" if value not in ("", None) else "none"


def table() -> str:
    """One row per setting, grouped as the model groups them."""
    rows = [
        "| group | variable | flag | default | meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    for group in GROUPS:
        for name, field in HubSettings.model_fields.items():
            if group_of(name) != group:
                continue
            flag = " / ".join(f"`{f}`" for f in (flag_name(name), *FLAG_ALIASES.get(name, ())))
            if name == "database_url":
                flag += " / `--db PATH`"
            unit = " (seconds)" if name in DURATIONS else ""
            meaning = str(field.description).replace("|", "\\|")
            rows.append(
                f"| {group} | `{env_name(name)}`{unit} | {flag} | {_default(name)} | {meaning} |"
            )
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(readme_block.main("configuration table", START, END, table))
