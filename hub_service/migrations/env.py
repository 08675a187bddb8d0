"""Alembic's entry point for kernelhub: migrations run on the connection `schema.upgrade`
hands over (config.attributes["connection"]), never on a URL of their own."""

from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel

from hub_service import models  # noqa: F401  (the tables, for autogenerate)

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=SQLModel.metadata,
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copy
)
with context.begin_transaction():
    context.run_migrations()
