"""PostgreSQL's feed notifier (`shard_sql.sql.notifier`) on a stand-in connection: commits while
a wake-up is due cost nothing more, a commit after a send gets one of its own, a failed send is
sent again on a new connection."""

from __future__ import annotations

import threading
import time
from typing import Any

from shard_sql.sql.notifier import FeedNotifier


class CountingEvent(threading.Event):
    def __init__(self) -> None:
        super().__init__()
        self.sets = 0

    def set(self) -> None:
        self.sets += 1
        super().set()


class Result:
    def __init__(self, status: int) -> None:
        self.status = status

    def get_error_message(self, encoding: str) -> str:
        return "refused"


class Connection:
    """A psycopg connection as the notifier uses it: one SET, then `pgconn.exec_`."""

    def __init__(self, sent: list[bytes], gate: threading.Event, fail: list[int]) -> None:
        self.pgconn = self
        self.sent, self.gate, self.fail = sent, gate, fail

    def execute(self, sql: str) -> None:
        pass

    def exec_(self, sql: bytes) -> Result:
        self.gate.wait(10)
        if self.fail:
            self.fail.pop()
            return Result(7)  # FATAL_ERROR
        self.sent.append(sql)
        return Result(2)  # TUPLES_OK

    def close(self) -> None:
        pass


def wait_until(check: Any) -> None:
    deadline = time.monotonic() + 10
    while not check():
        assert time.monotonic() < deadline
        time.sleep(0.001)


def test_commits_while_a_wake_up_is_due_cost_nothing_more() -> None:
    sent: list[bytes] = []
    gate = threading.Event()
    notifier = FeedNotifier(lambda: Connection(sent, gate, []), "test")
    try:
        notifier.poke()  # starts the sender, which then waits in its send for the gate
        sender = notifier._thread
        assert sender is not None
        sender.due = due = CountingEvent()
        wait_until(lambda: not sender.poked)
        for _ in range(1000):
            notifier.poke()
        assert due.sets == 1  # one wake-up due, for all of them
        gate.set()
        wait_until(lambda: len(sent) == 2 and not sender.poked)
        time.sleep(0.01)
        assert len(sent) == 2  # the first commit's, then one for the thousand
        notifier.poke()  # a commit after the last send: a send of its own
        wait_until(lambda: len(sent) == 3)
        assert sent[0] == b"SELECT pg_notify('shard_sql_feed', 'f:')"
    finally:
        notifier.close()


def test_a_failed_send_is_sent_again_on_a_new_connection() -> None:
    sent: list[bytes] = []
    connections: list[Connection] = []
    fail = [1]

    def connect() -> Connection:
        connections.append(Connection(sent, gate, fail))
        return connections[-1]

    gate = threading.Event()
    gate.set()
    notifier = FeedNotifier(connect, "test")
    try:
        notifier.poke()
        wait_until(lambda: len(sent) == 1)
        assert len(connections) == 2
    finally:
        notifier.close()
