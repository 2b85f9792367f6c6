"""The orders application: its rows and their events in one database, one transaction.

A web framework calls these from a request (docs/embedding.md shows Flask and FastAPI).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import create_engine, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from orders_app.models import Order
from shard_sql import SqlEventStore, migrate
from shard_sql.orm import EventRecord


def start(url: str) -> tuple[Engine, SqlEventStore]:
    """At application start: one engine for both, shard_sql's migrations run (the app's own
    run with its alembic), the store on the app's engine."""
    engine = create_engine(url, pool_size=10)
    migrate(engine)
    return engine, SqlEventStore(engine)


def order_space(order_id: int) -> str:
    return f"orders/{order_id}"


def place_order(session: Session, store: SqlEventStore, item: str, quantity: int) -> Order:
    """Add an order and its `order.placed` event in the session's transaction: the caller's
    commit writes both, its rollback neither."""
    order = Order(item=item, quantity=quantity)
    session.add(order)
    session.flush()  # the order's id
    with store.transaction(session) as tx:
        tx.append(order_space(order.id), "order.placed", {"item": item, "quantity": quantity})
    return order


def history(session: Session, order_id: int) -> list[tuple[str, dict[str, Any]]]:
    """The order's events, read with the app's own session through shard_sql's models."""
    rows = session.execute(
        select(EventRecord.type, EventRecord.payload)
        .where(EventRecord.space == order_space(order_id))
        .order_by(EventRecord.seq)
    )
    return [(type_, payload) for type_, payload in rows]
