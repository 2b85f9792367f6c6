"""The installed `shard-sql` command, run as a subprocess against SQLite, PostgreSQL and git.

Each subprocess costs a few tenths of a second (SQLAlchemy's import), so every test walks
several commands at once. Every run checks: no traceback on stderr, and a failing run prints
exactly one `shard-sql: error: ...` line.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BIN = Path(sys.executable).parent
SHARD_SQL = shutil.which("shard-sql", path=str(BIN)) or shutil.which("shard-sql")


class Result:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    def lines(self) -> list[Any]:
        return [json.loads(line) for line in self.out.splitlines()]

    def __repr__(self) -> str:
        return f"Result({self.code}, out={self.out[-500:]!r}, err={self.err[-500:]!r})"


def environ(url: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SHARD_SQL_URL", "SHARD_SQL_DEBUG")}
    if url is not None:
        env["SHARD_SQL_URL"] = url
    return env


def shard_sql(
    *args: str,
    url: str | None = None,
    cwd: Path | None = None,
    stdin: str | None = None,
    env_url: str | None = None,
    timeout: float = 60,
) -> Result:
    """Run the installed command; `url` goes to --url, `env_url` to SHARD_SQL_URL."""
    assert SHARD_SQL is not None, "the shard-sql console script is not installed"
    argv = [SHARD_SQL, *args] + (["--url", url] if url is not None else [])
    proc = subprocess.run(
        argv,
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=environ(env_url),
        timeout=timeout,
    )
    r = Result(proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in r.err, r
    if r.code != 0:
        assert r.err.startswith("shard-sql: error: "), r
        assert len(r.err.strip().splitlines()) == 1, r
    return r


def need(module: str) -> None:
    pytest.importorskip(module, reason=f"{module} has not landed yet")


@pytest.fixture(params=["sqlite", "postgresql", "git"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store URL of each kind, empty (PostgreSQL: not migrated yet)."""
    kind: str = request.param
    if kind == "git":
        need("shard_sql.git")
        return f"git+file://{tmp_path}/log.git"
    need("shard_sql.sql")
    if kind == "sqlite":
        return f"sqlite:///{tmp_path}/shard.db"
    url: str = request.getfixturevalue("pg_url")
    return url


def migrated(url: str) -> str:
    if url.startswith("postgresql"):
        import shard_sql

        shard_sql.migrate(url)
    return url


# -- every command on every backend --------------------------------------------------------------


def test_commands(backend: str, tmp_path: Path) -> None:
    url = backend
    r = shard_sql("migrate", url=url)
    assert r.code == 0, r
    r = shard_sql("append", "demo", "page.created", '{"title": "Home"}', url=url)
    assert r.code == 0 and r.out.startswith("demo seq 0: page.created (writer cli-"), r
    r = shard_sql(
        "append",
        "demo",
        "alias.set",
        "-",
        "--intent-id",
        "req-1",
        "--node",
        "ops",
        "--json",
        url=url,
        stdin='{"alias": "index", "ü": [1, 2.5, null]}',
    )
    second = r.lines()[0]
    assert (second["seq"], second["writer"], second["intent_id"]) == (1, "ops", "req-1"), r
    r = shard_sql("append", "other", "t", "{}", "--json", env_url=url)  # SHARD_SQL_URL
    assert r.code == 0, r

    human = url.startswith("sqlite")  # the tables are the same on every backend
    if human:
        r = shard_sql("log", "demo", url=url)
        header, *rows = r.out.splitlines()
        assert header.split()[:2] == ["SEQ", "RECORDED"] and len(rows) == 2, r
        assert '{"title":"Home"}' in rows[0] and "req-1" in rows[1]
    events = shard_sql("log", "demo", "--json", url=url).lines()
    assert [e["seq"] for e in events] == [0, 1]
    assert events[1] == second
    assert events[0]["generation"] < events[1]["generation"]
    r = shard_sql("log", "demo", "--from-seq", "1", "--limit", "1", "--json", url=url)
    assert r.lines() == [second]

    spaces = shard_sql("spaces", "--json", url=url).lines()
    assert [(s["space"], s["head"], s["holder"]) for s in spaces] == [
        ("demo", 2, None),
        ("other", 1, None),
    ]
    if human:
        r = shard_sql("spaces", url=url)
        assert r.out.splitlines()[0].split()[:2] == ["SPACE", "HEAD"], r

    r = shard_sql("lease", "demo", "--json", url=url)
    assert r.lines()[0]["held"] is False, r
    r = shard_sql("lease", "demo", "--revoke", "--json", url=url)
    revoked = r.lines()[0]
    assert revoked["revoked"] is True and revoked["generation"] > second["generation"], r

    report = shard_sql("verify", "--json", url=url).lines()[0]
    assert report["ok"] is True and report["events"] == 3, report
    if human:
        r = shard_sql("verify", url=url)
        assert r.code == 0 and r.out.splitlines()[-1] == "ok: 2 spaces, 3 events, 0 violations"

    dump = tmp_path / "export.jsonl"
    r = shard_sql("export", "--file", str(dump), url=url)
    assert r.code == 0 and "exported 3 events of 2 spaces" in r.out, r
    exported = [json.loads(x) for x in dump.read_text().splitlines()]
    assert exported[:2] == events
    # Importing the store's own export again: everything is already there.
    r = shard_sql("import", "--file", str(dump), "--json", url=url)
    assert r.lines() == [{"imported": 0, "skipped": 3, "spaces": 2}], r


def test_default_store_is_sqlite_in_the_current_directory(tmp_path: Path) -> None:
    """The README's main job: append and read back on ./shard.db, created on first use."""
    need("shard_sql.sql")
    r = shard_sql("append", "demo", "page.created", '{"title": "Home"}', cwd=tmp_path)
    assert r.code == 0, r
    assert (tmp_path / "shard.db").is_file()
    proc = subprocess.run(
        [sys.executable, "-m", "shard_sql", "log", "demo", "--json"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=environ(),
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["payload"] == {"title": "Home"}


# -- log --follow --------------------------------------------------------------------------------


def read_line(proc: subprocess.Popen[str], timeout: float = 20) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "no line from log --follow in time"
    return proc.stdout.readline()


def test_follow_sees_an_append_from_another_process(backend: str) -> None:
    url = migrated(backend)
    assert shard_sql("append", "tail", "t", '{"n": 0}', url=url).code == 0
    assert SHARD_SQL is not None
    proc = subprocess.Popen(
        [SHARD_SQL, "log", "tail", "--follow", "--json", "--interval", "0.2", "--url", url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environ(),
    )
    try:
        assert json.loads(read_line(proc))["payload"] == {"n": 0}
        assert shard_sql("append", "tail", "t", '{"n": 1}', url=url).code == 0
        event = json.loads(read_line(proc))
        assert (event["seq"], event["payload"]) == (1, {"n": 1})
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert out == "" and err == ""


# -- moving a log between backends ---------------------------------------------------------------


def test_export_from_git_imported_into_postgresql(pg_url: str, tmp_path: Path) -> None:
    need("shard_sql.git")
    need("shard_sql.sql")
    git = f"git+file://{tmp_path}/source.git"
    from shard_sql import GitEventStore, LeaseRegistry

    store = GitEventStore(tmp_path / "source.git")
    try:
        registry = LeaseRegistry(store)
        lease = registry.acquire("wiki", "node-a", 60)
        store.append(
            "wiki",
            "page.created",
            {"t": "Home", "n": [1, {"x": None}]},
            expected_seq=0,
            fence=lease,
        )
        store.append("wiki", "alias.set", {"a": "ü"}, expected_seq=1, fence=lease, intent_id="i-1")
        registry.revoke("wiki")
        lease = registry.acquire("wiki", "node-b", 60)
        store.append("wiki", "page.edited", {}, expected_seq=2, fence=lease)
        store.append_many("bulk", [("t", {"i": i}) for i in range(1200)], expected_seq=0)
    finally:
        store.close()
    dump = tmp_path / "git.jsonl"
    assert shard_sql("export", "--file", str(dump), url=git).code == 0
    assert shard_sql("migrate", url=pg_url).code == 0
    r = shard_sql("import", "--file", str(dump), url=pg_url)
    assert r.code == 0 and r.out == "imported 1203 events into 2 spaces\n", r
    # The identical log, read back from PostgreSQL through the command.
    source = [json.loads(line) for line in dump.read_text().splitlines()]
    copied = shard_sql("export", url=pg_url).lines()
    assert copied == source and len(copied) == 1203
    wiki = shard_sql("log", "wiki", "--json", url=pg_url).lines()
    assert [(e["writer"], e["generation"], e["intent_id"]) for e in wiki] == [
        ("node-a", 1, None),
        ("node-a", 1, "i-1"),
        ("node-b", 3, None),
    ]
    assert wiki == [e for e in source if e["space"] == "wiki"]
    assert shard_sql("verify", url=pg_url).code == 0


def test_copy_sqlite_to_git(tmp_path: Path) -> None:
    need("shard_sql.git")
    need("shard_sql.sql")
    sqlite = f"sqlite:///{tmp_path}/a.db"
    import pygit2

    git = str(tmp_path / "plain-path-repo")  # the path of an existing repository selects git
    pygit2.init_repository(git, bare=True)
    for n in range(3):
        assert shard_sql("append", "s", "t", json.dumps({"n": n}), url=sqlite).code == 0
    r = shard_sql("copy", "--to", git, "--json", url=sqlite)
    assert r.lines() == [{"imported": 3, "skipped": 0, "spaces": 1}], r
    assert shard_sql("log", "s", "--json", url=git).lines() == (
        shard_sql("log", "s", "--json", url=sqlite).lines()
    )


# -- leases across processes ---------------------------------------------------------------------


def test_lease_held_by_another_node(pg_url: str) -> None:
    need("shard_sql.sql")
    from shard_sql import LeaseRegistry, SqlEventStore

    url = migrated(pg_url)
    store = SqlEventStore(url)
    try:
        LeaseRegistry(store).acquire("held", "other-node", 60)
        r = shard_sql("lease", "held", url=url)
        assert r.out.splitlines()[1].split()[:3] == ["held", "other-node", "1"], r
        r = shard_sql("append", "held", "t", "{}", "--no-forward", url=url)
        assert r.code == 3 and "space 'held' is held by 'other-node'" in r.err, r
        # Forwarded to a holder that does not serve (or, on a store that cannot forward, refused).
        r = shard_sql("append", "held", "t", "{}", "--timeout", "0.5", "--intent-id", "k1", url=url)
        assert r.code == 3, r
        assert "no holder wrote the append within 0.5s" in r.err or "held by" in r.err, r
        r = shard_sql("lease", "held", "--revoke", url=url)
        assert r.code == 0 and "'other-node' is fenced" in r.out, r
        assert store.head("held") == 0
    finally:
        store.close()


def test_append_forwarded_to_a_live_holder(backend: str) -> None:
    """The command forwards to a holder serving in another process, which writes the event."""
    from shard_sql import AppendAuthority, LeaseRegistry
    from shard_sql.ports import IntentQueue
    from shard_sql.urls import open_store

    url = migrated(backend)
    store = open_store(url)
    try:
        if not isinstance(store, IntentQueue):
            pytest.skip(f"{type(store).__name__} does not forward intents across processes yet")
        node = AppendAuthority("holder", store, LeaseRegistry(store), ttl_seconds=3)
        with node:
            node.acquire("served")
            r = shard_sql("append", "served", "t", '{"via": "cli"}', "--json", url=url)
            assert r.code == 0, r
            event = r.lines()[0]
            assert (event["seq"], event["writer"], event["payload"]) == (
                0,
                "holder",
                {"via": "cli"},
            )
            assert node.holds("served")
    finally:
        getattr(store, "close", lambda: None)()


# -- errors --------------------------------------------------------------------------------------


def test_input_errors(tmp_path: Path) -> None:
    sqlite = f"sqlite:///{tmp_path}/e.db"
    cases = [
        (["append", "s", "t", "{not json"], 2, "PAYLOAD_JSON is not valid JSON"),
        (["append", "s", "t", "[1]"], 2, "PAYLOAD_JSON must be a JSON object, not an array"),
        (["append", "s", "t", '{"x": NaN}'], 2, "NaN is not allowed"),
        (["log"], 2, "the following arguments are required: SPACE"),
        (["frobnicate"], 2, "invalid choice: 'frobnicate'"),
    ]
    for argv, code, message in cases:
        r = shard_sql(*argv, url=sqlite)
        assert r.code == code and message in r.err, (argv, r)
    assert not (tmp_path / "e.db").exists()  # refused before the store was opened


def test_store_errors(tmp_path: Path, pg_url: str) -> None:
    need("shard_sql.sql")
    r = shard_sql("log", "nowhere", url=f"sqlite:///{tmp_path}/u.db")
    assert r.code == 1 and f"no store at sqlite:///{tmp_path}/u.db" in r.err, r
    assert not (tmp_path / "u.db").exists()
    assert shard_sql("migrate", url=f"sqlite:///{tmp_path}/u.db").code == 0
    r = shard_sql("log", "nowhere", url=f"sqlite:///{tmp_path}/u.db")
    assert r.code == 1 and "unknown space 'nowhere'" in r.err, r
    r = shard_sql("spaces", url="postgresql+psycopg://postgres@127.0.0.1:1/nothing")
    assert r.code == 1 and "cannot connect to PostgreSQL" in r.err, r
    r = shard_sql("spaces", url=pg_url)  # not migrated
    assert r.code == 1 and "shard-sql migrate" in r.err, r
    r = shard_sql("spaces", url="nosuchdialect://x/y")
    assert r.code == 2 and "invalid url" in r.err, r
    (tmp_path / "file.db").write_text("not a repository")
    r = shard_sql("spaces", url=str(tmp_path / "file.db"))
    assert r.code == 1 and "is a file, not a git repository" in r.err, r
    assert "sqlite:///" in r.err


def test_not_a_git_repository(tmp_path: Path) -> None:
    need("shard_sql.git")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("hello")
    r = shard_sql("spaces", url=f"git+file://{plain}")
    assert r.code == 1 and "not a git repository" in r.err, r


def test_verify_reports_a_violation(tmp_path: Path) -> None:
    need("shard_sql.sql")
    import dataclasses

    from shard_sql import SqlEventStore
    from shard_sql.validation import pending

    url = f"sqlite:///{tmp_path}/v.db"
    store = SqlEventStore(url)
    try:
        for writer in ("node-a", "node-b"):  # two writers under generation 1
            item = dataclasses.replace(pending("t", {}), writer=writer, generation=1)
            store.write("s", [item], expected_seq=store.head("s"), fence=None, verify_fence=False)
    finally:
        store.close()
    r = shard_sql("verify", url=url)
    assert r.code == 4 and r.err == "shard-sql: error: verify found 1 violation\n", r
    assert "VIOLATION 's' seq 1: [writer] generation 1 written by 'node-b'" in r.out


def on_a_terminal(*argv: str) -> tuple[subprocess.CompletedProcess[bytes], bytes]:
    """Run the command with stderr on a pseudo-terminal; what it drew there."""
    import pty

    assert SHARD_SQL is not None
    primary, secondary = pty.openpty()
    try:
        proc = subprocess.run(
            [SHARD_SQL, *argv],
            stdout=subprocess.PIPE,
            stderr=secondary,
            env=environ(),
            timeout=60,
        )
        os.close(secondary)
        drawn = b""
        while select.select([primary], [], [], 0.5)[0]:
            try:
                chunk = os.read(primary, 65536)
            except OSError:
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        os.close(primary)
    return proc, drawn


def test_progress_on_a_terminal_and_a_closed_pipe(tmp_path: Path) -> None:
    """Export and import draw a bar on a terminal's stderr (never on stdout), with a total and
    a percentage; `| head` ends quietly."""
    need("shard_sql.sql")
    from shard_sql import SqlEventStore

    url = f"sqlite:///{tmp_path}/p.db"
    store = SqlEventStore(url)
    try:
        store.append_many("s", [("t", {"i": i}) for i in range(3000)], expected_seq=0)
    finally:
        store.close()
    dump = str(tmp_path / "x.jsonl")
    proc, drawn = on_a_terminal("export", "--url", url, "--file", dump)
    assert proc.returncode == 0
    assert b"export" in drawn and b"100%" in drawn and b"3000/3000" in drawn
    assert proc.stdout.decode().startswith("exported 3000 events")
    proc, drawn = on_a_terminal("import", "--url", f"sqlite:///{tmp_path}/q.db", "--file", dump)
    assert proc.returncode == 0 and proc.stdout.decode() == "imported 3000 events into 1 space\n"
    size = f"{os.path.getsize(dump) / 1000:.1f}/{os.path.getsize(dump) / 1000:.1f} kB".encode()
    assert b"import" in drawn and b"100%" in drawn and size in drawn, drawn
    # Piped: no bar at all.
    r = shard_sql("export", "s", "--file", str(tmp_path / "y.jsonl"), url=url)
    assert r.code == 0 and r.err == ""

    # The reader goes away after one line: no traceback, no message, exit 141.
    with subprocess.Popen(
        [SHARD_SQL, "log", "s", "--json", "--url", url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=environ(),
    ) as head:
        assert head.stdout is not None and head.stderr is not None
        assert json.loads(head.stdout.readline())["seq"] == 0
        head.stdout.close()
        err = head.stderr.read()
        head.wait(timeout=60)
    assert head.returncode == 141 and err == b""


def test_after_copy_or_import_the_next_grant_is_newer_than_the_log(
    backend: str, tmp_path: Path
) -> None:
    """A copied log keeps its generations; the target's leases must not go back below them
    (else the next append breaks the generation rule that verify checks) (issue 13, item 1)."""
    source = f"sqlite:///{tmp_path}/source.db"
    for space in ("copied", "imported"):
        for n in range(3):  # each CLI append is a grant of its own: generations 1, 2, 3
            assert shard_sql("append", space, "t", json.dumps({"n": n}), url=source).code == 0
    assert shard_sql("lease", "copied", "--revoke", url=source).code == 0  # the record: 4
    target = migrated(backend)
    assert shard_sql("copy", "copied", "--to", target, url=source).code == 0
    dump = tmp_path / "imported.jsonl"
    assert shard_sql("export", "imported", "--file", str(dump), url=source).code == 0
    assert shard_sql("import", "--file", str(dump), url=target).code == 0
    for space in ("copied", "imported"):
        r = shard_sql("append", space, "t", "{}", "--json", url=target)
        assert r.code == 0 and r.lines()[0]["generation"] > 3, r
    r = shard_sql("verify", url=target)
    assert r.code == 0, r
