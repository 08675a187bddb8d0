"""The database schema's version: which Alembic revision a database is at, bringing it
to this hub's, and refusing a database newer than this hub understands.

kernelhub 0.1.0 made its tables with `create_all` and kept no version: such a
database (tables, no alembic_version) is revision 0001, and is stamped so.
"""

from __future__ import annotations

import logging
from functools import cache
from importlib.resources import files

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text

log = logging.getLogger(__name__)
# Alembic says at INFO what it does on every start; this module says it once, when it upgrades.
logging.getLogger("alembic").setLevel(logging.WARNING)

BASELINE = "0001"  # the schema of kernelhub 0.1.0, made before migrations
# Serialises hubs upgrading one PostgreSQL database at once (any constant of our own).
_PG_LOCK = 0x6B68_5F73_6368


class SchemaError(RuntimeError):
    """The database's schema is one this hub must not serve as it is."""


def _config(connection: Connection | None = None) -> Config:
    config = Config()
    # Package data: a directory in a source tree and in an installed wheel alike.
    config.set_main_option("script_location", str(files("hub_service") / "migrations"))
    config.attributes["connection"] = connection
    return config


@cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(_config())


def head() -> str:
    """The newest revision this hub knows."""
    revision = _scripts().get_current_head()
    assert revision is not None
    return revision


def _current(connection: Connection) -> str | None:
    revision = MigrationContext.configure(connection).get_current_revision()
    if revision is None and inspect(connection).has_table("event"):
        return BASELINE  # made by 0.1.0's create_all
    return revision


def current(engine: Engine) -> str | None:
    """The database's revision (None: an empty database)."""
    with engine.connect() as connection:
        return _current(connection)


def _check_known(revision: str | None) -> None:
    if revision is not None and revision not in {s.revision for s in _scripts().walk_revisions()}:
        raise SchemaError(
            f"the database is at schema revision {revision}, newer than this hub's "
            f"{head()}: upgrade kernelhub"
        )


def upgrade(engine: Engine) -> str:
    """Bring the database to `head()` (creating it if empty); returns the revision it was at."""
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK})
        was = _current(connection)
        _check_known(was)
        if was != head():
            config = _config(connection)
            if (
                was == BASELINE
                and MigrationContext.configure(connection).get_current_revision() is None
            ):
                command.stamp(config, BASELINE)
            command.upgrade(config, "head")
            log.info("database schema upgraded from %s to %s", was or "empty", head())
    return was or "none"


def ensure(engine: Engine, auto_upgrade: bool) -> None:
    """Make the database one this hub can serve: upgrade it, or (auto_upgrade off) refuse
    a schema other than this hub's, naming the command that upgrades it."""
    if auto_upgrade:
        upgrade(engine)
        return
    revision = current(engine)
    _check_known(revision)
    if revision != head():
        raise SchemaError(
            f"the database is at schema revision {revision or 'none (empty)'}, this hub needs "
            f"{head()}, and automatic upgrade is off: run `kernelhub-hub db upgrade` first"
        )
