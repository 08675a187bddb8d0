"""Which store a database URL names: `memory://` the in-memory store (an ephemeral hub),
anything else a SQLAlchemy URL for the SQL store (SQLite, PostgreSQL)."""

from __future__ import annotations

import uuid

from .config import HubConfig
from .memory_store import MemoryStore
from .sql_store import SqlStore
from .sql_write import SharedLog
from .state import HubStore

MEMORY_URL = "memory://"


def make_store(database_url: str, config: HubConfig | None = None) -> HubStore:
    """A store for `database_url`, not yet opened, with `config`'s store settings."""
    config = config or HubConfig()
    if database_url.startswith("memory:"):
        if database_url != MEMORY_URL:
            raise ValueError(
                f"database URL {database_url!r}: the in-memory store is {MEMORY_URL!r}, "
                "with nothing after it"
            )
        if config.replica:
            raise ValueError("replica mode needs PostgreSQL: an in-memory hub is one process")
        return MemoryStore(config.policy)
    return SqlStore(
        database_url,
        writer=config.writer,
        policy=config.policy,
        busy_timeout=config.sqlite_busy_timeout,
        commit_timeout=config.commit_timeout,
        auto_upgrade=config.auto_upgrade,
        shared=SharedLog(uuid.uuid4().hex[:12], config.replica_lock_idle_timeout)
        if config.replica
        else None,
    )
