"""examples/orders, an application embedding shard_sql, on SQLite and PostgreSQL: its alembic
(with include_object) plans nothing about shard_sql's tables; an order and its event commit
together and roll back together; it reads the events through shard_sql.orm."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from sqlalchemy import create_engine, func, inspect, select
from sqlalchemy.orm import Session

from shard_sql.orm import TABLES
from shard_sql.sql import check_schema

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "orders"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, sqlite_url: str) -> str:
    if request.param == "sqlite":
        return sqlite_url
    pg: str = request.getfixturevalue("pg_url")
    return pg


@pytest.fixture
def app(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(EXAMPLE))
    import orders_app.app

    return orders_app.app


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    """A copy of the example, where autogenerate may write a revision."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.db")
    return Path(shutil.copytree(EXAMPLE, tmp_path / "orders", ignore=ignore))


def alembic(app_dir: Path, url: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "alembic", "-x", f"url={url}", *args],
        cwd=app_dir,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"alembic {args}: {proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def table_names(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_the_hosts_alembic_plans_nothing_about_shard_sqls_tables(
    url: str, app: ModuleType, app_dir: Path
) -> None:
    engine, store = app.start(url)  # shard_sql's tables first: the case that used to drop them
    store.close()
    engine.dispose()
    alembic(app_dir, url, "upgrade", "head")
    assert {"orders", "alembic_version"} | TABLES <= table_names(url)
    assert "No new upgrade operations detected" in alembic(app_dir, url, "check")

    alembic(app_dir, url, "revision", "--autogenerate", "-m", "probe")
    [probe] = (app_dir / "migrations" / "versions").glob("*probe.py")
    body = probe.read_text()
    assert not any(name in body for name in TABLES)
    upgrade = body.partition("def upgrade() -> None:")[2].partition("def downgrade")[0]
    downgrade = body.partition("def downgrade() -> None:")[2]
    for steps in (upgrade, downgrade):
        code = [line.strip() for line in steps.splitlines() if line.strip()[:1] not in ("", "#")]
        assert code == ["pass"], body
    alembic(app_dir, url, "upgrade", "head")  # the empty revision runs
    assert check_schema(url)  # shard_sql's tables untouched


def test_an_order_and_its_event_commit_and_roll_back_together(url: str, app: ModuleType) -> None:
    from orders_app.models import Base, Order

    engine, store = app.start(url)
    try:
        Base.metadata.create_all(engine)  # (the example's alembic does it in the other test)
        with Session(engine) as session, session.begin():
            order = app.place_order(session, store, "book", 2)
            order_id = order.id
        assert [e.type for e in store.events(app.order_space(order_id))] == ["order.placed"]

        class Refused(Exception):
            pass

        with pytest.raises(Refused), Session(engine) as session, session.begin():
            refused_id = app.place_order(session, store, "pen", 1).id
            raise Refused
        assert store.events(app.order_space(refused_id)) == []
        assert app.order_space(refused_id) not in store.spaces()
        with Session(engine) as session:
            assert session.scalar(select(func.count()).select_from(Order)) == 1
            # The host reads the log through shard_sql.orm.
            assert app.history(session, order_id) == [
                ("order.placed", {"item": "book", "quantity": 2})
            ]
            assert app.history(session, refused_id) == []
    finally:
        store.close()
        engine.dispose()


@pytest.fixture(autouse=True)
def _forget_the_example() -> Iterator[None]:
    yield
    for name in [m for m in sys.modules if m == "orders_app" or m.startswith("orders_app.")]:
        del sys.modules[name]
