"""The fault-injection suite: node processes append (directly and forwarded) to a few spaces
while holders are SIGKILLed and SIGSTOPped past their TTL, PostgreSQL connections are killed and
the server restarted, SQLite's write lock is contended and git lock files go stale, forwarders
are SIGKILLed (maybe just after handing an append to a holder's socket) and holders' hand-off
sockets deleted; the history checker then proves the log kept every promise. On every backend a
feed consumer (`Subscription`, two copies) follows the feed meanwhile, killed and paused too: it
must see every event once, in order, its checkpoint never moving back.

The PostgreSQL restart runs under CI=true (or SHARD_SQL_FAULT_RESTART=1): elsewhere other test
runs may share the server. Each run is `exclusive` (conftest): the other xdist worker waits
meanwhile (the restart drops every connection to the server; with the other worker's tests
beside it, the git run's consumer once fell a minute behind: the runs count on the two cores).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from faults.backends import git_stale_lock, pg_restart, pg_terminate, sqlite_lock
from faults.harness import (
    SUMMARY,
    Fault,
    delete_endpoint,
    describe,
    env_flag,
    kill_consumer,
    kill_forwarder,
    kill_holder,
    pause_consumer,
    pause_holder,
    run,
)

pytestmark = [pytest.mark.slow, pytest.mark.exclusive]

DURATION = float(os.environ.get("SHARD_SQL_FAULT_SECONDS", "18"))


def _run(
    backend: str,
    url: str,
    workdir: Path,
    faults: dict[str, Fault],
    consumers: int = 0,
    duration: float = DURATION,
    fault_every: float = 1.5,
) -> None:
    report, injected = run(
        url,
        workdir,
        faults=faults,
        consumers=consumers,
        duration=duration,
        fault_every=fault_every,
    )
    line = describe(backend, report, injected)
    SUMMARY.append(line)
    assert report.ok, line + "\n" + "\n".join(report.violations[:20])
    assert report.outcomes["ok"] > 50, line
    if consumers:
        assert report.consumed >= report.outcomes["ok"], line
    for kind in faults:
        assert injected[kind] > 0, f"{kind} was never injected: {line}"


def test_faults_sqlite(tmp_path: Path) -> None:
    """With a feed consumer (two copies taking turns) killed and paused too."""
    faults = {
        "kill_holder": kill_holder,
        "pause_holder": pause_holder,
        "sqlite_lock": sqlite_lock,
        "kill_consumer": kill_consumer,
        "pause_consumer": pause_consumer,
        "kill_forwarder": kill_forwarder,
        "delete_endpoint": delete_endpoint,
    }
    url = f"sqlite:///{tmp_path}/faults.db"
    _run("sqlite", url, tmp_path, faults, 2, duration=max(DURATION, 30), fault_every=1.0)


def test_faults_postgresql(tmp_path: Path, pg_migrated_url: str) -> None:
    """With a feed consumer killed and paused too; every connection is terminated now and then
    (the consumers', their listeners' and the stores' feed notifiers' among them)."""
    faults: dict[str, Fault] = {
        "kill_holder": kill_holder,
        "pause_holder": pause_holder,
        "pg_terminate": pg_terminate,
        "kill_consumer": kill_consumer,
        "pause_consumer": pause_consumer,
        "kill_forwarder": kill_forwarder,
        "delete_endpoint": delete_endpoint,
    }
    if env_flag("CI") or env_flag("SHARD_SQL_FAULT_RESTART"):
        faults["pg_restart"] = pg_restart
    url = pg_migrated_url
    _run("postgresql", url, tmp_path, faults, 2, duration=max(DURATION, 30), fault_every=1.0)


def test_faults_git(tmp_path: Path) -> None:
    """With a feed consumer (two copies taking turns) killed and paused too."""
    faults = {
        "kill_holder": kill_holder,
        "pause_holder": pause_holder,
        "stale_lock": git_stale_lock,
        "kill_consumer": kill_consumer,
        "pause_consumer": pause_consumer,
        "kill_forwarder": kill_forwarder,
        "delete_endpoint": delete_endpoint,
    }
    # Seven kinds of fault, two of them 1-1.6 s long: a longer run, faults closer together.
    url = f"git+file://{tmp_path}/log.git"
    _run("git", url, tmp_path, faults, 2, duration=max(DURATION, 30), fault_every=1.0)


def test_checker_catches_unfenced_nodes(tmp_path: Path) -> None:
    """The self-test: the same run with fencing switched off in the nodes must be caught."""
    report, injected = run(
        f"sqlite:///{tmp_path}/unfenced.db",
        tmp_path,
        faults={"pause_holder": pause_holder},
        duration=8,
        no_fence=True,
    )
    SUMMARY.append(describe("sqlite, fencing off (must be caught)", report, injected))
    assert not report.ok
    assert any("generation" in v for v in report.violations)
