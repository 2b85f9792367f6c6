"""The infrastructure factory: one shard_sql store per factory, named by `SHARD_SQL_URL`."""

from __future__ import annotations

import threading
import weakref
from typing import TypeVar, cast

from eventsourcing.persistence import (
    AggregateRecorder,
    ApplicationRecorder,
    InfrastructureFactory,
    OperationalError,
    ProcessRecorder,
)
from eventsourcing.utils import Environment, EnvType, resolve_topic, strtobool

from shard_sql.eventsourcing._mapping import translated
from shard_sql.eventsourcing._recorders import (
    ShardSqlAggregateRecorder,
    ShardSqlApplicationRecorder,
    ShardSqlProcessRecorder,
    ShardSqlTrackingRecorder,
)
from shard_sql.memory import InMemoryEventStore
from shard_sql.ports import FeedStore
from shard_sql.urls import default_url, open_store

_R = TypeVar("_R", bound=type)

_memory: weakref.WeakValueDictionary[str, InMemoryEventStore] = weakref.WeakValueDictionary()
_memory_lock = threading.Lock()


def memory_store(url: str) -> InMemoryEventStore:
    """The process's memory store of that name (`memory:` or `memory://NAME`): factories with
    the same URL share it, as they would a database; it goes when no factory holds it."""
    name = url.removeprefix("memory:").removeprefix("//")
    with _memory_lock:
        store = _memory.get(name)
        if store is None:
            store = _memory[name] = InMemoryEventStore()
        return store


class ShardSqlFactory(InfrastructureFactory[ShardSqlTrackingRecorder]):
    """`PERSISTENCE_MODULE=shard_sql.eventsourcing`.

    Reads (each also as `<APPLICATION NAME>_<KEY>`): `SHARD_SQL_URL` (a SQLAlchemy URL,
    `git+file:///path` or a path, `memory:` or `memory://NAME`; default: the environment's
    `SHARD_SQL_URL`, else `sqlite:///shard.db`), `CREATE_TABLE` (default yes: migrate the
    database to shard_sql's schema when opened) and `ORIGINATOR_ID_TYPE` (`uuid`, the default,
    or `text`: the type of ids in notifications).
    """

    SHARD_SQL_URL = "SHARD_SQL_URL"
    CREATE_TABLE = "CREATE_TABLE"
    ORIGINATOR_ID_TYPE = "ORIGINATOR_ID_TYPE"

    aggregate_recorder_class = ShardSqlAggregateRecorder
    application_recorder_class = ShardSqlApplicationRecorder
    tracking_recorder_class = ShardSqlTrackingRecorder
    process_recorder_class = ShardSqlProcessRecorder

    def __init__(self, env: Environment | EnvType | None):
        super().__init__(env)
        self.url = self.env.get(self.SHARD_SQL_URL) or default_url()
        id_type = self.env.get(self.ORIGINATOR_ID_TYPE, "uuid").lower()
        if id_type not in ("uuid", "text"):
            raise OSError(f"{self.ORIGINATOR_ID_TYPE} must be 'uuid' or 'text', not {id_type!r}")
        self.uuid_ids = id_type == "uuid"
        self._owned = not self.url.startswith("memory:")
        if not self._owned:
            self.store: FeedStore = memory_store(self.url)
            return
        migrate = strtobool(self.env.get(self.CREATE_TABLE) or "yes")
        with translated():
            store = open_store(self.url, migrate=migrate)
        if not isinstance(store, FeedStore):
            store.close()
            raise OperationalError(f"{type(store).__name__} keeps no feed: it cannot back this")
        self.store = store

    def _prefix(self) -> str:
        return f"{self.env.name}." if self.env.name else ""

    def aggregate_recorder(self, purpose: str = "events") -> AggregateRecorder:
        return self.aggregate_recorder_class(
            self.store, prefix=self._prefix(), purpose=purpose, uuid_ids=self.uuid_ids
        )

    def application_recorder(self) -> ApplicationRecorder:
        cls = self._class(self.APPLICATION_RECORDER_TOPIC, self.application_recorder_class)
        return cls(self.store, prefix=self._prefix(), uuid_ids=self.uuid_ids)

    def tracking_recorder(
        self, tracking_recorder_class: type[ShardSqlTrackingRecorder] | None = None
    ) -> ShardSqlTrackingRecorder:
        cls = tracking_recorder_class or self._class(
            self.TRACKING_RECORDER_TOPIC, self.tracking_recorder_class
        )
        return cls(self.store, prefix=self._prefix(), uuid_ids=self.uuid_ids)

    def process_recorder(self) -> ProcessRecorder:
        cls = self._class(self.PROCESS_RECORDER_TOPIC, self.process_recorder_class)
        return cls(self.store, prefix=self._prefix(), uuid_ids=self.uuid_ids)

    def _class(self, key: str, default: _R) -> _R:
        """A recorder class named by a topic in the environment: a subclass of the default."""
        topic = self.env.get(key)
        if not topic:
            return default
        cls = resolve_topic(topic)
        if not (isinstance(cls, type) and issubclass(cls, default)):
            raise OSError(f"{key}: {topic!r} is not a subclass of {default.__qualname__}")
        return cast(_R, cls)

    def close(self) -> None:
        if self._owned:
            close = getattr(self.store, "close", None)
            if close is not None:
                close()
