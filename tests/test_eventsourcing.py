"""shard_sql.eventsourcing: eventsourcing's own recorder, factory and application test cases on
every backend (memory, SQLite, PostgreSQL, git), then the mapping and atomicity of writes."""

from __future__ import annotations

import base64
import json
import os
import tempfile
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar
from unittest import TestCase
from uuid import UUID, uuid4

import pytest
from conftest import drop_pg_database, new_pg_database
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event
from eventsourcing.persistence import (
    AggregateRecorder,
    ApplicationRecorder,
    DataError,
    IntegrityError,
    OperationalError,
    ProcessRecorder,
    ProgrammingError,
    StoredEvent,
    Tracking,
    TrackingRecorder,
)
from eventsourcing.system import ProcessApplication, SingleThreadedRunner, System
from eventsourcing.tests import application as es_app
from eventsourcing.tests import persistence as es
from eventsourcing.utils import Environment

from shard_sql import InMemoryEventStore
from shard_sql.eventsourcing import (
    ShardSqlAggregateRecorder,
    ShardSqlApplicationRecorder,
    ShardSqlFactory,
    ShardSqlProcessRecorder,
    ShardSqlTrackingRecorder,
)
from shard_sql.eventsourcing._mapping import _SMALL, payloads, usual_pending
from shard_sql.validation import pending

# -- backends ----------------------------------------------------------------------------------


class _Backend(TestCase):
    """A fresh store per test, named by `self.url`; factories made here are closed after it."""

    __test__ = False  # a mixin: the Test* classes below combine it with a case

    name: ClassVar[str]
    pytestmark: ClassVar[list[pytest.MarkDecorator]] = []

    def setUp(self) -> None:
        self.factories: list[ShardSqlFactory] = []
        self.url = self.new_url()
        super().setUp()

    def tearDown(self) -> None:
        super().tearDown()
        for f in self.factories:
            f.close()
        self.drop_url()

    def new_url(self) -> str:
        raise NotImplementedError

    def drop_url(self) -> None:
        pass

    def factory(self, **env: str) -> ShardSqlFactory:
        f = ShardSqlFactory(Environment(env={"SHARD_SQL_URL": self.url, **env}))
        self.factories.append(f)
        return f


class _Files(_Backend):
    def new_url(self) -> str:
        self.tmp = tempfile.TemporaryDirectory()
        return self.url_in(self.tmp.name)

    def url_in(self, folder: str) -> str:
        raise NotImplementedError

    def drop_url(self) -> None:
        self.tmp.cleanup()


class Memory(_Backend):
    name = "Memory"

    def new_url(self) -> str:
        return f"memory://{uuid4().hex}"


class Sqlite(_Files):
    name = "Sqlite"

    def url_in(self, folder: str) -> str:
        return f"sqlite:///{folder}/es.db"


class Postgres(_Backend):
    name = "Postgres"
    pytestmark: ClassVar[list[pytest.MarkDecorator]] = [pytest.mark.postgres]

    def new_url(self) -> str:
        return new_pg_database()

    def drop_url(self) -> None:
        drop_pg_database(self.url)


class Git(_Files):
    name = "Git"

    def url_in(self, folder: str) -> str:
        return f"git+file://{folder}/repo"


BACKENDS: list[type[_Backend]] = [Memory, Sqlite, Postgres, Git]

# -- eventsourcing's test cases ----------------------------------------------------------------


class _AggregateRecorder(_Backend, es.AggregateRecorderTestCase):
    def create_recorder(self) -> AggregateRecorder:
        return self.factory().aggregate_recorder()


class _SnapshotRecorder(_Backend, es.AggregateRecorderTestCase):
    """The same cases on snapshots' spaces (versions only grow; records may span events)."""

    def create_recorder(self) -> AggregateRecorder:
        return self.factory().aggregate_recorder(purpose="snapshots")


class _ApplicationRecorder(_Backend, es.ApplicationRecorderTestCase[ApplicationRecorder]):
    def create_recorder(self) -> ApplicationRecorder:
        return self.factory().application_recorder()

    def test_insert_subscribe(self) -> None:
        self.optional_test_insert_subscribe()


class _NonInterleaving(_Backend, es.NonInterleavingNotificationIDsBaseCase):
    insert_num = 200

    def create_recorder(self) -> ApplicationRecorder:
        return self.factory().application_recorder()


class _TrackingRecorder(_Backend, es.TrackingRecorderTestCase):
    def create_recorder(self) -> TrackingRecorder:
        return self.factory().tracking_recorder()


class _ProcessRecorder(_Backend, es.ProcessRecorderTestCase):
    def create_recorder(self) -> ProcessRecorder:
        return self.factory().process_recorder()


class MyTrackingRecorder(ShardSqlTrackingRecorder):
    pass


class _Factory(_Backend, es.InfrastructureFactoryTestCase[ShardSqlFactory]):
    def setUp(self) -> None:
        self.factories = []
        self.url = self.new_url()
        self.env = Environment(
            env={"PERSISTENCE_MODULE": "shard_sql.eventsourcing", "SHARD_SQL_URL": self.url}
        )
        es.InfrastructureFactoryTestCase.setUp(self)
        self.factories.append(self.factory)

    def tearDown(self) -> None:
        _Backend.tearDown(self)

    def expected_factory_class(self) -> type[ShardSqlFactory]:
        return ShardSqlFactory

    def expected_aggregate_recorder_class(self) -> type[AggregateRecorder]:
        return ShardSqlAggregateRecorder

    def expected_application_recorder_class(self) -> type[ApplicationRecorder]:
        return ShardSqlApplicationRecorder

    def expected_tracking_recorder_class(self) -> type[TrackingRecorder]:
        return ShardSqlTrackingRecorder

    def tracking_recorder_subclass(self) -> type[TrackingRecorder]:
        return MyTrackingRecorder

    def expected_process_recorder_class(self) -> type[ProcessRecorder]:
        return ShardSqlProcessRecorder


class _InEnviron(_Backend):
    """Applications read `PERSISTENCE_MODULE` and `SHARD_SQL_URL` from os.environ."""

    def setUp(self) -> None:
        super().setUp()
        self._saved = {k: os.environ.get(k) for k in ("PERSISTENCE_MODULE", "SHARD_SQL_URL")}
        os.environ["PERSISTENCE_MODULE"] = "shard_sql.eventsourcing"
        os.environ["SHARD_SQL_URL"] = self.url

    def tearDown(self) -> None:
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        super().tearDown()


class _ExampleApplication(_InEnviron, es_app.ExampleApplicationTestCase):
    expected_factory_topic = "shard_sql.eventsourcing._factory:ShardSqlFactory"


class _Application(_InEnviron, es_app.ApplicationTestCase):
    pass


CASES: list[type[TestCase]] = [
    _AggregateRecorder,
    _SnapshotRecorder,
    _ApplicationRecorder,
    _NonInterleaving,
    _TrackingRecorder,
    _ProcessRecorder,
    _Factory,
    _ExampleApplication,
    _Application,
]

for _backend in BACKENDS:
    for _case in CASES:
        _name = f"Test{_backend.name}{_case.__name__[1:]}"
        globals()[_name] = type(
            _name, (_case, _backend), {"__module__": __name__, "__test__": True}
        )
del _backend, _case, _name

# -- the mapping and atomicity, per backend ----------------------------------------------------


@pytest.fixture(params=["memory", "sqlite", "postgresql", "git"])
def url(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[str]:
    kind = request.param
    if kind == "memory":
        yield f"memory://{uuid4().hex}"
    elif kind == "sqlite":
        yield f"sqlite:///{tmp_path}/es.db"
    elif kind == "git":
        yield f"git+file://{tmp_path}/repo"
    else:
        request.applymarker(pytest.mark.postgres)
        yield request.getfixturevalue("pg_url")


@pytest.fixture
def factory(url: str) -> Iterator[ShardSqlFactory]:
    f = ShardSqlFactory(Environment("Shop", {"SHARD_SQL_URL": url}))
    yield f
    f.close()


def stored(originator_id: UUID, version: int, state: bytes = b"{}", topic: str = "t") -> Any:
    return StoredEvent(originator_id, version, topic, state)


def feed_of(f: ShardSqlFactory) -> list[Any]:
    return list(f.store.feed(0))


@contextmanager
def failing_after(f: ShardSqlFactory, writes: int) -> Iterator[None]:
    """The store's transactions raise after `writes` writes (appends or checkpoint saves): a
    crash between the parts of one insert."""
    store = f.store
    real = store.transaction

    class Boom(RuntimeError):
        pass

    @contextmanager
    def transaction(connection: object | None = None) -> Iterator[Any]:
        with real() as tx:
            done = [0]

            class Counting:
                def __getattr__(self, name: str) -> Any:
                    method = getattr(tx, name)

                    def call(*args: Any, **kwargs: Any) -> Any:
                        if done[0] == writes:
                            raise Boom(f"injected failure after {writes} writes")
                        done[0] += 1
                        return method(*args, **kwargs)

                    return call

            yield Counting()

    store.transaction = transaction  # type: ignore[method-assign]
    try:
        with pytest.raises(Boom):
            yield
    finally:
        del store.transaction


def test_events_of_several_aggregates_are_all_or_nothing(factory: ShardSqlFactory) -> None:
    recorder = factory.application_recorder()
    a, b = uuid4(), uuid4()
    with failing_after(factory, 1):
        recorder.insert_events([stored(a, 1), stored(a, 2), stored(b, 1)])
    assert recorder.select_events(a) == [] and recorder.select_events(b) == []
    assert feed_of(factory) == [] and recorder.max_notification_id() is None
    # A conflict in the second aggregate: the first one's events are not written either.
    recorder.insert_events([stored(b, 1)])
    with pytest.raises(IntegrityError):
        recorder.insert_events([stored(a, 1), stored(b, 1)])
    assert recorder.select_events(a) == [] and len(feed_of(factory)) == 1
    ids = recorder.insert_events([stored(a, 1), stored(b, 2)])
    assert ids is not None and 1 < ids[0] < ids[1]  # rolled-back writes may leave gaps


def test_events_and_their_tracking_record_are_one_transaction(factory: ShardSqlFactory) -> None:
    recorder = factory.process_recorder()
    a, b = uuid4(), uuid4()
    # Crash between the events and the tracking record: neither is written.
    with failing_after(factory, 1):
        recorder.insert_events([stored(a, 1)], tracking=Tracking("Up", 5))
    assert recorder.select_events(a) == [] and recorder.max_tracking_id("Up") is None
    recorder.insert_events([stored(a, 1)], tracking=Tracking("Up", 5))
    # A duplicate tracking record writes no event, and neither does an older one.
    for n in (5, 4):
        with pytest.raises(IntegrityError):
            recorder.insert_events([stored(b, 1)], tracking=Tracking("Up", n))
    assert recorder.select_events(b) == [] and len(feed_of(factory)) == 1
    assert recorder.max_tracking_id("Up") == 5
    assert recorder.max_tracking_id("Other") is None


def test_a_duplicate_tracking_record_under_concurrency_writes_once(
    factory: ShardSqlFactory,
) -> None:
    recorder = factory.process_recorder()
    results: list[str] = []
    start = threading.Barrier(4)

    def process() -> None:
        start.wait()
        try:
            recorder.insert_events([stored(uuid4(), 1)], tracking=Tracking("Up", 1))
            results.append("ok")
        except IntegrityError:
            results.append("dup")

    threads = [threading.Thread(target=process) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["dup", "dup", "dup", "ok"]
    assert len(feed_of(factory)) == 1


def test_a_projection_writes_with_its_tracking_record(factory: ShardSqlFactory) -> None:
    view = factory.tracking_recorder()
    with view.tracking_transaction(Tracking("Up", 1)) as tx:
        tx.append("totals", "total.changed", {"total": 1})
    with pytest.raises(IntegrityError), view.tracking_transaction(Tracking("Up", 1)) as tx:
        tx.append("totals", "total.changed", {"total": 2})
    with pytest.raises(RuntimeError), view.tracking_transaction(Tracking("Up", 2)) as tx:
        tx.append("totals", "total.changed", {"total": 3})
        raise RuntimeError("the projection failed")
    assert [e.payload["total"] for e in factory.store.events("totals")] == [1]
    assert view.max_tracking_id("Up") == 1


def test_states_are_text_or_base64(factory: ShardSqlFactory) -> None:
    recorder = factory.application_recorder()
    a = uuid4()
    plain = json.dumps({"amount": "10.00", "name": "Ann"}, separators=(",", ":")).encode()
    packed = zlib.compress(plain)
    spaced = b'{"amount": 1}'  # not as the transcoder writes JSON: kept byte for byte
    deep = b'{"a":' * 70 + b"1" + b"}" * 70  # deeper than a payload may nest
    nul = b"a\x00b"  # UTF-8, but JSONB holds no NUL
    states = [plain, packed, spaced, deep, nul]
    recorder.insert_events([stored(a, n, state) for n, state in enumerate(states, 1)])
    events = factory.store.events(f"Shop.events:{a}")
    assert [e.type for e in events] == ["t"] * 5
    assert events[0].payload == {"version": 1, "state": plain.decode()}
    assert events[1].payload == {"version": 2, "state_b64": base64.b64encode(packed).decode()}
    assert [e.payload["state"] for e in events[2:4]] == [spaced.decode(), deep.decode()]
    assert events[4].payload == {"version": 5, "state_b64": base64.b64encode(nul).decode()}
    got = [s.state for s in recorder.select_events(a)]
    assert got == [plain, packed, spaced, deep, nul]  # byte for byte, on every backend
    log = recorder.select_notifications(None, 10)
    assert [n.state for n in log if n.originator_id == a] == states


def test_usual_events_are_written_as_the_checked_path_writes_them() -> None:
    """`usual_pending` builds a save's payload and its JSON text without the store's checks:
    each must be what `pending` (the checks every other write goes through) gives, and every
    event it does not vouch for goes through the checks."""
    a = uuid4()
    escapes = '"\\/\b\f\n\r\t\x01\x1f\x7f\x80\u2028\u2029 é ☃ 😀 \ufeff'
    usual = [
        stored(a, 1, b'{"timestamp":{"_type_":"datetime_iso","_data_":"x"},"page":"Home"}'),
        stored(a, 0, b""),
        stored(a, -5, escapes.encode(), topic="app.domain:Page.Edited"),
        stored(a, 2**63 - 1, b"\\u0000 \\\\u0000", topic="é" * 200),
        stored(a, -(2**63) + 1, b"1e+16 -0.0 NaN"),
        stored(a, 7, b"x" * _SMALL),
    ]
    for s in usual:
        built = usual_pending(s)
        assert built is not None, s
        (payload,) = payloads(s, split=False)
        assert built == pending(s.topic, payload), s  # type, text, payload, no intent id
        assert type(built.payload["version"]) is int
    unusual = [
        stored(a, 1, b"a\x00b"),  # NUL: base64
        stored(a, 1, b"\xff"),  # not UTF-8: base64
        stored(a, 1, topic="t" * 201),  # not a type: the topic in the payload
        stored(a, 1, topic="a\tb"),
        stored(a, 1, b"x" * (_SMALL + 1)),  # escapes might not fit: measured
        stored(a, 2**63),  # digits beyond the room the state leaves
        stored(a, True),
    ]
    assert [usual_pending(s) for s in unusual] == [None] * len(unusual)
    # The space's name is checked still: once per recorder for UUID ids, on each write for text.
    bad_app = ShardSqlApplicationRecorder(InMemoryEventStore(), prefix="Bad\u200b.")
    with pytest.raises(DataError, match="space"):
        bad_app.insert_events([stored(a, 1)])
    text_ids = ShardSqlApplicationRecorder(InMemoryEventStore(), uuid_ids=False)
    with pytest.raises(DataError, match="space"):
        text_ids.insert_events([stored("a\tb", 1)])  # type: ignore[arg-type]
    assert text_ids.insert_events([stored("a b", 1)]) == [1]  # type: ignore[arg-type]


def test_events_not_written_by_the_module_are_data_errors(factory: ShardSqlFactory) -> None:
    recorder = factory.application_recorder()
    a, b = uuid4(), uuid4()
    factory.store.append(f"Shop.events:{a}", "t", {"no": "version"}, expected_seq=0)
    factory.store.append(f"Shop.events:{b}", "t", {"version": 1, "state_b64": "!"}, expected_seq=0)
    for originator_id in (a, b):
        with pytest.raises(DataError, match="not an eventsourcing event"):
            recorder.select_events(originator_id)
    with pytest.raises(DataError, match="not an eventsourcing event"):
        recorder.select_notifications(None, 10)


def test_topics_longer_than_a_type(factory: ShardSqlFactory) -> None:
    recorder = factory.application_recorder()
    a = uuid4()
    long_topic = "pkg.module:" + "Nested." * 40 + "Event"
    recorder.insert_events([stored(a, 1, topic=long_topic), stored(a, 2, topic="short")])
    (first, _) = factory.store.events(f"Shop.events:{a}")
    assert len(first.type) == 200 and first.payload["topic"] == long_topic
    assert [s.topic for s in recorder.select_events(a)] == [long_topic, "short"]
    only = recorder.select_notifications(None, 10, topics=[long_topic])
    assert [(n.id, n.topic) for n in only] == [(1, long_topic)]


def test_snapshots_over_the_payload_limit_span_events(factory: ShardSqlFactory) -> None:
    snapshots = factory.aggregate_recorder(purpose="snapshots")
    a = uuid4()
    big = os.urandom(1_500_000)
    snapshots.insert_events([stored(a, 3, b'{"small":1}'), stored(a, 7, big)])
    assert factory.store.head(f"Shop.snapshots:{a}") == 4  # 1 + 3 parts
    (last,) = snapshots.select_events(a, desc=True, limit=1)
    assert (last.originator_version, last.state) == (7, big)
    (before,) = snapshots.select_events(a, desc=True, limit=1, lte=6)
    assert before.originator_version == 3
    assert [s.originator_version for s in snapshots.select_events(a)] == [3, 7]
    # Snapshots grow: an older one after a newer one is refused.
    with pytest.raises(IntegrityError):
        snapshots.insert_events([stored(a, 5)])
    # An event (not a snapshot) over the limit is refused.
    with pytest.raises(DataError):
        factory.application_recorder().insert_events([stored(a, 1, big)])


class Counter(Aggregate):
    count = 0

    @event("Counted")
    def add(self) -> None:
        self.count += 1


def test_snapshots_stay_out_of_the_notification_log(url: str) -> None:
    env = {"PERSISTENCE_MODULE": "shard_sql.eventsourcing", "SHARD_SQL_URL": url}
    app = Application[UUID](env={**env, "IS_SNAPSHOTTING_ENABLED": "y"})
    counter = Counter()
    counter.add()
    app.save(counter)
    app.take_snapshot(counter.id)
    counter.add()
    app.save(counter)
    log = app.notification_log.select(start=1, limit=10)
    assert [n.originator_version for n in log] == [1, 2, 3]
    assert app.recorder.max_notification_id() == log[-1].id
    assert app.repository.get(counter.id).count == 2
    app.close()


class Orders(Application[UUID]):
    pass


class Invoices(Application[UUID]):
    pass


def test_applications_sharing_a_store_keep_their_own_logs(url: str) -> None:
    env = {"PERSISTENCE_MODULE": "shard_sql.eventsourcing", "SHARD_SQL_URL": url}
    orders, invoices = Orders(env=env), Invoices(env=env)
    orders.save(Aggregate())
    invoices.save(Aggregate(), Aggregate())
    orders.save(Aggregate())
    assert [n.id for n in orders.notification_log.select(1, 10)] == [1, 4]
    assert [n.id for n in invoices.notification_log.select(1, 10)] == [2, 3]
    assert orders.recorder.max_notification_id() == 4
    assert invoices.recorder.max_notification_id() == 3
    orders.close()
    invoices.close()


def test_memory_stores_are_shared_by_url() -> None:
    url = f"memory://{uuid4().hex}"
    one = ShardSqlFactory(Environment(env={"SHARD_SQL_URL": url}))
    two = ShardSqlFactory(Environment(env={"SHARD_SQL_URL": url}))
    other = ShardSqlFactory(Environment(env={"SHARD_SQL_URL": "memory://elsewhere"}))
    assert one.store is two.store and one.store is not other.store
    assert isinstance(one.store, InMemoryEventStore)


def test_store_errors_are_eventsourcing_errors(tmp_path: Any) -> None:
    with pytest.raises(OperationalError):
        ShardSqlFactory(
            Environment(env={"SHARD_SQL_URL": "postgresql+psycopg://nobody@127.0.0.1:1/x"})
        )
    with pytest.raises(OSError):
        ShardSqlFactory(Environment(env={"SHARD_SQL_URL": "memory:", "ORIGINATOR_ID_TYPE": "x"}))
    recorder = ShardSqlFactory(Environment(env={"SHARD_SQL_URL": "memory:"})).aggregate_recorder()
    with pytest.raises(DataError):
        recorder.insert_events([StoredEvent("x" * 300, 1, "t", b"")])


@pytest.mark.postgres
def test_an_unmigrated_database_without_create_table(pg_url: str) -> None:
    with pytest.raises(ProgrammingError):
        ShardSqlFactory(Environment(env={"SHARD_SQL_URL": pg_url, "CREATE_TABLE": "no"}))
    ShardSqlFactory(Environment(env={"SHARD_SQL_URL": pg_url})).close()
    ShardSqlFactory(Environment(env={"SHARD_SQL_URL": pg_url, "CREATE_TABLE": "no"})).close()


def test_text_ids(url: str) -> None:
    f = ShardSqlFactory(Environment(env={"SHARD_SQL_URL": url, "ORIGINATOR_ID_TYPE": "text"}))
    recorder = f.application_recorder()
    a = uuid4()
    recorder.insert_events([StoredEvent("order-1", 0, "t", b"{}"), stored(a, 1)])
    assert [n.originator_id for n in recorder.select_notifications(None, 10)] == [
        "order-1",
        str(a),
    ]
    f.close()


class Ticket(Aggregate):
    def __init__(self, title: str) -> None:
        self.title = title


class Tally(Aggregate):
    def __init__(self, ticket_id: UUID) -> None:
        self.ticket_id = ticket_id


class Desk(Application[UUID]):
    pass


class Tallies(ProcessApplication[UUID]):
    def policy(self, domain_event: Any, processing_event: Any) -> None:
        if isinstance(domain_event, Ticket.Created):
            processing_event.collect_events(Tally(domain_event.originator_id))


def test_a_system_processes_each_notification_once(url: str) -> None:
    env = {"PERSISTENCE_MODULE": "shard_sql.eventsourcing", "SHARD_SQL_URL": url}
    system = System(pipes=[[Desk, Tallies]])
    runner: SingleThreadedRunner[UUID] = SingleThreadedRunner(system, env=env)
    runner.start()
    desk, tallies = runner.get(Desk), runner.get(Tallies)
    for n in range(3):
        desk.save(Ticket(f"t{n}"))
    last = desk.recorder.max_notification_id()
    assert tallies.recorder.max_tracking_id("Desk") == last
    assert len(tallies.notification_log.select(1, 10)) == 3
    keep = desk  # a memory store lives while a factory holds it
    runner.stop()
    # Started again on the same store: the tracking record says all is processed.
    runner = SingleThreadedRunner(system, env=env)
    runner.start()
    runner.get(Tallies).pull_and_process("Desk")
    assert len(runner.get(Tallies).notification_log.select(1, 10)) == 3
    runner.get(Desk).save(Ticket("t3"))
    assert len(runner.get(Tallies).notification_log.select(1, 10)) == 4
    runner.stop()
    del keep


def test_a_postgres_save_is_placed_in_its_own_transaction(pg_migrated_url: str) -> None:
    """One aggregate's events are appended and placed by one statement (one commit) when the
    placement's lock is free; when another session holds it, they commit unplaced and the
    recorder places them after the commit (`feed_head`), as before."""
    import psycopg

    f = ShardSqlFactory(Environment("Shop", {"SHARD_SQL_URL": pg_migrated_url}))
    try:
        recorder = f.application_recorder()
        a = uuid4()
        with psycopg.connect(pg_migrated_url.replace("+psycopg", ""), autocommit=True) as other:
            # Placed by the save's own statement: no placement after it, no read of positions.
            after_commit: list[str] = []
            store: Any = f.store
            for name in ("feed_head", "events"):
                real = getattr(store, name)

                def counted(*args: Any, _real: Any = real, _name: str = name, **kw: Any) -> Any:
                    after_commit.append(_name)
                    return _real(*args, **kw)

                setattr(store, name, counted)
            assert recorder.insert_events([stored(a, 1), stored(a, 2)]) == [1, 2]
            assert after_commit == []
            assert [e.position for e in f.store.events(f"Shop.events:{a}")] == [1, 2]

            other.execute("BEGIN")
            other.execute("SELECT pg_advisory_xact_lock(1514554416, 'events'::regclass::oid::int)")
            got: dict[str, Any] = {}

            def save() -> None:
                got["ids"] = recorder.insert_events([stored(a, 3)])

            saver = threading.Thread(target=save)
            saver.start()
            with psycopg.connect(pg_migrated_url.replace("+psycopg", ""), autocommit=True) as look:
                for _ in range(2000):  # until the event is committed, unplaced
                    n = look.execute("SELECT count(*) FROM events WHERE position IS NULL")
                    if n.fetchone() == (1,):
                        break
                    threading.Event().wait(0.005)
                else:
                    raise AssertionError("the event was not committed")
            other.execute("COMMIT")  # the recorder's placement gets the lock
            saver.join(30)
            assert got["ids"] == [3]
            assert after_commit[-2:] == ["feed_head", "events"]  # placed after the commit
            assert [n.id for n in recorder.select_notifications(1, 10)] == [1, 2, 3]
    finally:
        f.close()
