"""The orders application's alembic environment: its own models, and shard_sql's tables in the
same database left alone (`include_object`)."""

from __future__ import annotations

import os
from logging.config import fileConfig
from typing import Any

from alembic import context
from orders_app.models import Base
from sqlalchemy import create_engine, pool

from shard_sql.orm import include_object

config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

OPTIONS: dict[str, Any] = {
    "target_metadata": Base.metadata,
    "include_object": include_object,  # never drop or alter shard_sql's tables
    "compare_type": True,
}


def database_url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url")
    return url or os.environ.get("ORDERS_DATABASE_URL", "sqlite:///orders.db")


def run_offline() -> None:
    context.configure(url=database_url(), literal_binds=True, **OPTIONS)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    engine = create_engine(database_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, **OPTIONS)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
