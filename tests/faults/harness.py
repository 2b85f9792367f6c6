"""The fault-injection harness: node processes append while faults are injected; then check.

`run(url, faults=...)` starts `nodes` node processes (node.py) appending to a few spaces for
`duration` seconds, while a fault loop injects the named faults, restarts killed nodes under new
ids, and finally checks the log against the recorded history with `shard_sql.history.check`.
With `consumers=N`, N copies of a feed consumer (consumer.py, a `Subscription` taking turns
through its lease) follow the feed meanwhile; once the nodes are done and the consumer caught
up, `shard_sql.history.check_consumer` checks what it saw. Any store with a feed, by URL.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from faults.consumer import TYPE, projection
from shard_sql import LeaseHeld, LeaseRegistry, ShardSqlError
from shard_sql.handoff import Endpoints
from shard_sql.history import Report, check, check_consumer, load, load_observed
from shard_sql.urls import open_store

NODE = Path(__file__).with_name("node.py")
CONSUMER = Path(__file__).with_name("consumer.py")
CONSUMER_NAME = "faults"
"""The subscription name of the consumer copies (its lease: `subscription:faults`)."""
SUMMARY: list[str] = []
"""One line per run of this session, printed at the end of pytest's report (conftest.py)."""


@dataclass
class Run:
    url: str
    workdir: Path
    spaces: list[str]
    ttl: float
    no_fence: bool = False
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    faults: Counter[str] = field(default_factory=Counter)
    started: int = 0
    duration: float = 0.0
    end: float = 0.0
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    consumers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    consumers_started: int = 0

    def start_consumer(self) -> str:
        self.consumers_started += 1
        node_id = f"c{self.consumers_started}"
        cmd = [
            sys.executable,
            str(CONSUMER),
            self.url,
            CONSUMER_NAME,
            node_id,
            str(self.ttl),
            str(self.workdir / f"{node_id}.jsonl"),
            str(self.workdir / "consumer.stop"),
            str(self.consumers_started),
        ]
        with open(self.workdir / f"{node_id}.err", "wb") as err:
            self.consumers[node_id] = subprocess.Popen(cmd, stderr=err)
        return node_id

    def consumer_proc(self, registry: LeaseRegistry) -> tuple[str, subprocess.Popen[bytes]] | None:
        """The consumer copy holding the subscription's lease, else any running one."""
        cur = registry.current(f"subscription:{CONSUMER_NAME}")
        live = [(n, p) for n, p in self.consumers.items() if p.poll() is None]
        for node_id, proc in live:
            if cur is not None and cur.holder == node_id:
                return node_id, proc
        return self.rng.choice(live) if live else None

    def start_node(self) -> str:
        self.started += 1
        node_id = f"n{self.started}"
        remaining = max(self.end - time.monotonic(), 0.5)
        cmd = [
            sys.executable,
            str(NODE),
            self.url,
            node_id,
            ",".join(self.spaces),
            f"{remaining:.2f}",
            str(self.ttl),
            str(self.workdir / f"{node_id}.jsonl"),
            str(self.started),
        ]
        if self.no_fence:
            cmd.append("--no-fence")
        with open(self.workdir / f"{node_id}.err", "wb") as err:
            self.procs[node_id] = subprocess.Popen(cmd, stderr=err)
        return node_id

    def holder_proc(self, registry: LeaseRegistry) -> tuple[str, subprocess.Popen[bytes]] | None:
        for space in self.rng.sample(self.spaces, len(self.spaces)):
            cur = registry.current(space)
            if cur is not None and cur.holder in self.procs:
                proc = self.procs[cur.holder]
                if proc.poll() is None:
                    return cur.holder, proc
        return None


Fault = Callable[[Run, LeaseRegistry], bool]


def kill_holder(run: Run, registry: LeaseRegistry) -> bool:
    """SIGKILL the holder of a space (wherever it is: mid-transaction, after commit), restart."""
    found = run.holder_proc(registry)
    if found is None:
        return False
    node_id, proc = found
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    del run.procs[node_id]
    run.start_node()
    return True


def pause_holder(run: Run, registry: LeaseRegistry) -> bool:
    """SIGSTOP a holder past its TTL, then SIGCONT: it must find itself fenced."""
    found = run.holder_proc(registry)
    if found is None:
        return False
    _, proc = found
    proc.send_signal(signal.SIGSTOP)
    time.sleep(run.ttl * 1.6)
    proc.send_signal(signal.SIGCONT)
    return True


def kill_forwarder(run: Run, registry: LeaseRegistry) -> bool:
    """SIGKILL a node that holds no space: a forwarder, maybe right after it handed an append
    to a holder's socket (the holder writes it or not; nobody was told)."""
    holders = {lease.holder for s in run.spaces if (lease := registry.current(s)) is not None}
    live = [n for n, p in run.procs.items() if p.poll() is None and n not in holders]
    if not live:
        return False
    node_id = run.rng.choice(live)
    proc = run.procs.pop(node_id)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run.start_node()
    return True


def delete_endpoint(run: Run, registry: LeaseRegistry) -> bool:
    """Delete a holder's hand-off socket file (an operator's cleanup, a tmp reaper): forwarders
    take the durable path until the holder binds it again."""
    found = run.holder_proc(registry)
    store = open_store(run.url)
    try:
        directory = getattr(store, "handoff_dir", lambda: None)()
    finally:
        getattr(store, "close", lambda: None)()
    if found is None or directory is None:
        return False
    try:
        os.unlink(Endpoints(directory).path(found[0]))
    except FileNotFoundError:
        return False
    return True


def kill_consumer(run: Run, registry: LeaseRegistry) -> bool:
    """SIGKILL the consumer copy holding the lease (mid-batch, maybe), start another."""
    found = run.consumer_proc(registry)
    if found is None:
        return False
    node_id, proc = found
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    del run.consumers[node_id]
    run.start_consumer()
    return True


def pause_consumer(run: Run, registry: LeaseRegistry) -> bool:
    """SIGSTOP the consumer copy holding the lease past its TTL, then SIGCONT: another copy takes
    over meanwhile, and the batch the paused one was handling must not be saved."""
    found = run.consumer_proc(registry)
    if found is None:
        return False
    _, proc = found
    proc.send_signal(signal.SIGSTOP)
    time.sleep(run.ttl * 1.6)
    proc.send_signal(signal.SIGCONT)
    return True


def _check_consumer(run: Run, store: Any, names: list[str], report: Report) -> None:
    """Wait until the consumer's checkpoint passed the last node event, stop the copies, and
    check what they saw."""
    deadline = time.monotonic() + 60
    feed = store.feed(types=[TYPE])
    last = feed[-1].position if feed else 0
    while store.checkpoint(CONSUMER_NAME) < last and time.monotonic() < deadline:
        if not any(p.poll() is None for p in run.consumers.values()):
            run.start_consumer()  # every copy died (their errors are checked below)
        time.sleep(0.1)
    (run.workdir / "consumer.stop").touch()
    for node_id, proc in run.consumers.items():
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = None
        if code != 0:
            err = (run.workdir / f"{node_id}.err").read_text()[-2000:]
            report.violations.append(f"consumer {node_id} ended with {code}: {err}")
    seen = store.events(projection(CONSUMER_NAME))
    logs = {s: store.events(s) for s in names}
    observed = load_observed(sorted(run.workdir.glob("c*.jsonl")))
    report.violations += check_consumer(logs, feed, seen, observed)
    report.consumed = sum(len(e.payload.get("events", ())) for e in seen)
    if store.checkpoint(CONSUMER_NAME) < last:
        report.violations.append(f"the consumer never caught up with position {last}")


def _check_leases(store: Any, names: list[str], ttl: float) -> list[str]:
    """Once every process is gone, each lease of the run is granted again within a few TTLs:
    one left locked by a process killed while changing it would stop its space (or the
    consumer) for good, which no history check sees (its appends merely fail)."""
    registry = LeaseRegistry(store)
    violations = []
    for name in names:
        deadline = time.monotonic() + ttl * 3 + 10
        while True:
            try:
                registry.release(registry.acquire(name, "checker", ttl_seconds=ttl))
                break
            except LeaseHeld:
                why = "still held"  # a killed holder's lease, until it expires
            except ShardSqlError as e:
                why = str(e)
            if time.monotonic() >= deadline:
                violations.append(f"the lease of {name} is never granted again: {why}")
                break
            time.sleep(0.1)
    return violations


def run(
    url: str,
    workdir: Path,
    *,
    faults: dict[str, Fault],
    nodes: int = 4,
    spaces: int = 3,
    duration: float = 20.0,
    ttl: float = 1.0,
    fault_every: float = 1.5,
    no_fence: bool = False,
    consumers: int = 0,
) -> tuple[Report, Counter[str]]:
    """Run the nodes (and `consumers` copies of the feed consumer) with faults; return the
    checker's report and the faults injected."""
    store = open_store(url)
    names = [f"space-{i}" for i in range(spaces)]
    r = Run(url, workdir, names, ttl, no_fence=no_fence)
    r.end = time.monotonic() + duration
    for _ in range(nodes):
        r.start_node()
    for _ in range(consumers):
        r.start_consumer()
    registry = LeaseRegistry(store)
    kinds = list(faults)
    try:
        warm_up = min(2.0, duration / 4)
        time.sleep(warm_up)
        # On a loaded machine the nodes take longer to start than the warm-up (the unfenced
        # self-test once ran its whole fault window before any node held a space, and injected
        # nothing): the window opens when one does, and the run ends that much later.
        late = time.monotonic()
        while r.holder_proc(registry) is None and time.monotonic() < late + 60:
            time.sleep(0.05)
        r.end += time.monotonic() - late
        while time.monotonic() < r.end - ttl * 3:
            kind = kinds[r.faults.total() % len(kinds)] if kinds else None
            if kind is not None:
                try:
                    if faults[kind](r, registry):
                        r.faults[kind] += 1
                except Exception as e:
                    r.faults[f"{kind} (not injected: {type(e).__name__})"] += 0
            time.sleep(fault_every * (0.5 + r.rng.random()))
        for proc in r.procs.values():
            try:
                proc.wait(timeout=max(r.end - time.monotonic(), 0) + ttl * 6 + 10)
            except subprocess.TimeoutExpired:
                proc.kill()
        report = Report()
        if consumers:
            _check_consumer(r, store, names, report)
    finally:
        for proc in [*r.procs.values(), *r.consumers.values()]:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    ops, grants = load(sorted(workdir.glob("n*.jsonl")))
    logs = {s: store.events(s) for s in names}
    leases = [*names, f"subscription:{CONSUMER_NAME}"] if consumers else names
    stuck = _check_leases(store, leases, ttl)
    close = getattr(store, "close", None)
    if close is not None:
        close()
    checked = check(logs, ops, grants)
    checked.violations += report.violations + stuck
    checked.consumed = report.consumed
    report = checked
    untranslated = [
        line
        for p in workdir.glob("n*.jsonl")
        for line in p.read_text().splitlines()
        if "UNTRANSLATED" in line
    ]
    report.violations.extend(f"driver error escaped the API: {u}" for u in untranslated[:5])
    return report, r.faults


def describe(backend: str, report: Report, faults: Counter[str]) -> str:
    injected = ", ".join(f"{k} {v}" for k, v in sorted(faults.items())) or "none"
    return f"[{backend}] {report.summary()}; faults injected: {injected}"


def env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0", "false")
