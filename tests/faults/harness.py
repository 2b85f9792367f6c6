"""The fault-injection harness: node processes append while faults are injected; then check.

`run(url, faults=...)` starts `nodes` node processes (node.py) appending to a few spaces for
`duration` seconds, while a fault loop injects the named faults, restarts killed nodes under new
ids, and finally checks the log against the recorded history with `shard_sql.history.check`.
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

from shard_sql import LeaseRegistry
from shard_sql.history import Report, check, load
from shard_sql.urls import open_store

NODE = Path(__file__).with_name("node.py")
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
) -> tuple[Report, Counter[str]]:
    """Run the nodes with faults; return the checker's report and the faults injected."""
    store = open_store(url)
    names = [f"space-{i}" for i in range(spaces)]
    r = Run(url, workdir, names, ttl, no_fence=no_fence)
    r.end = time.monotonic() + duration
    for _ in range(nodes):
        r.start_node()
    registry = LeaseRegistry(store)
    kinds = list(faults)
    try:
        time.sleep(min(2.0, duration / 4))
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
    finally:
        for proc in r.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    ops, grants = load(sorted(workdir.glob("n*.jsonl")))
    logs = {s: store.events(s) for s in names}
    close = getattr(store, "close", None)
    if close is not None:
        close()
    report = check(logs, ops, grants)
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
