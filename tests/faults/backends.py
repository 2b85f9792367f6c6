"""Backend-specific faults: PostgreSQL connections killed and the server restarted, SQLite lock
contention, a stale git lock file."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import time
from pathlib import Path

import psycopg

from faults.harness import Run
from shard_sql import LeaseRegistry


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def pg_terminate(run: Run, registry: LeaseRegistry) -> bool:
    """Kill every other connection to the run's database, wherever it is (mid-commit too)."""
    with psycopg.connect(_libpq(run.url), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
    return bool(rows)


def pg_restart(run: Run, registry: LeaseRegistry) -> bool:
    """Restart the PostgreSQL server (once a run): every connection drops, writes in flight fail."""
    if run.faults["pg_restart"]:
        return False
    version = sorted(os.listdir("/etc/postgresql"))[0]
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart", "-m", "fast"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    for _ in range(60):
        ok = subprocess.run(["pg_isready", "-q", "-h", "127.0.0.1"], check=False).returncode == 0
        if ok:
            break
        time.sleep(0.5)
    return True


def sqlite_lock(run: Run, registry: LeaseRegistry) -> bool:
    """Another process holds the SQLite write lock for a while: writers wait, none fails."""
    path = run.url.removeprefix("sqlite:///")
    script = (
        "import sqlite3, sys, time\n"
        "c = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)\n"
        "c.execute('BEGIN IMMEDIATE'); time.sleep(0.6); c.execute('ROLLBACK')\n"
    )
    import sys

    subprocess.run([sys.executable, "-c", script, path], check=True, timeout=60)
    return True


def git_stale_lock(run: Run, registry: LeaseRegistry) -> bool:
    """A lock file on the feed ref that is no dead shard_sql writer's (a killed git's), left for
    a while, then cleared by an operator: every write waits for it."""
    from shard_sql.git.layout import FEED
    from shard_sql.urls import git_path

    gitdir = git_path(run.url)
    if (gitdir / ".git").is_dir():
        gitdir = gitdir / ".git"
    lock = Path(gitdir, FEED + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    time.sleep(1.0)
    lock.unlink()
    return True


__all__ = ["git_stale_lock", "pg_restart", "pg_terminate", "sqlite3", "sqlite_lock"]
