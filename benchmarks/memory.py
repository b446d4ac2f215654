#!/usr/bin/env python3
"""
Memory and disk the agent's task registry holds for the scenarios of
issue 11, item 8, measured as the resident set size (RSS) of a process.

1. ``finished``: 600 tasks with ~1 MiB specs run and finish (their reports
   not acknowledged yet, so the registry must remember all of them);
2. ``queued``: 300 tasks with 11 inline inputs of 64 KiB each, staged in
   and waiting for a slot (one slot, held by a task that never ends);
3. ``burst``: ``--burst`` tasks (default 10,000) without inputs submitted at
   once, 100 a reactor turn, with 4 slots held by tasks that never end: all
   accepted and waiting.  Also prints the CPU time of the submits and their
   reports per 1,000 tasks.  ``before`` here is the same code with every
   task given a worker (and a directory) at accept time, as before tasks
   waited in the pool's line.

Each scenario runs in a fresh child process: an agent core without a
network (TaskManager, Sender, Outbox, TaskRegistry on a simulated clock,
fake handler and stager, fsync off) in a temporary state directory.  The
child prints its RSS growth (VmRSS after the scenario, after a gc, minus
VmRSS before it), the bytes of live Python objects allocated meanwhile
(tracemalloc: what the RSS holds beyond the allocator's own free lists) and
the size of ``tasks.jsonl``.

``before`` is the baseline in the same run: the same code with the
registry's bounds switched off (finished records keep their spec; inline
data stays in memory; compaction only after forgets), which is how the
registry behaved before them.  Medians over ``--runs`` runs (default 3),
with the machine's load average.

Run from the project's root::

    python benchmarks/memory.py
    python benchmarks/memory.py --runs 5 --only queued
"""

import argparse
import base64
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20


def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _switch_bounds_off():
    from everest_agent import registry

    registry.small_record = lambda record: record
    registry._drop_inline_data = lambda spec: 0
    registry.TaskRegistry._dropped = lambda self, weight: None


def _workers_for_all():
    from everest_agent.manager import TaskManager

    TaskManager._waits_light = lambda self, record: 0


def child(scenario, variant, burst=10000):
    sys.path.insert(0, ROOT)
    if variant == "before":
        _workers_for_all() if scenario == "burst" else _switch_bounds_off()
    from twisted.internet.task import Clock
    from twisted.logger import globalLogBeginner

    # As under twistd: logging has begun (else the log's start-up buffer
    # keeps the last 64 Ki events, and the workers they name, alive).
    globalLogBeginner.beginLoggingTo([lambda event: None], redirectStandardIO=False)

    from everest_agent.manager import TaskManager
    from everest_agent.outbox import Outbox
    from everest_agent.registry import TaskRegistry
    from everest_agent.sender import Sender
    from everest_agent.testing import FakeSession, FakeStager, FakeTaskHandler

    state_dir = tempfile.mkdtemp(prefix="everest-memory-")
    clock = Clock()
    outbox = Outbox(state_dir, clock, fsync=False)
    outbox.load()
    registry = TaskRegistry(state_dir, clock, fsync=False)
    registry.load()
    sender = Sender(outbox, clock, wallclock=lambda: 1000.0)
    handler = FakeTaskHandler()
    slots = {"queued": 1, "burst": 4}.get(scenario, 1000)
    manager = TaskManager(registry, sender, handler, FakeStager(), os.path.join(state_dir, "work"),
                          slots, wallclock=clock.seconds)
    sender.welcomed(FakeSession(), 0)
    manager.startService()

    def pump():
        for _ in range(5):
            clock.advance(0)

    gc.collect()
    import tracemalloc

    import time

    if scenario != "burst":
        tracemalloc.start()
    start = rss()
    cpu = time.process_time()
    if scenario == "burst":
        for n in range(4):
            manager.submit(f"blocker{n}", {"command": "sleep forever"})
        pump()
        for n in range(burst):
            manager.submit(f"b{n:07d}", {"command": "true"})
            if n % 100 == 99:
                clock.advance(0)
        pump()
        sender.ack(outbox.last_seq)
    elif scenario == "finished":
        for n in range(600):
            # ~1 MiB: a long command line and a big environment.
            spec = {"command": f"run {n} " + "a" * (760 << 10), "environment": {"BIG": "b" * (250 << 10)}}
            manager.submit(f"f{n}", spec)
            pump()
            handler.jobs.pop(f"f{n}").finish(0)  # (a real handler keeps no finished job)
            pump()
    else:
        manager.submit("blocker", {"command": "sleep forever"})
        pump()
        for n in range(300):
            inputs = [{"path": f"in{i}", "data": base64.b64encode(os.urandom(48 << 10)).decode()}
                      for i in range(11)]  # 11 x 64 KiB of base64
            manager.submit(f"q{n}", {"command": "true", "inputs": inputs})
            pump()
    pump()
    cpu = time.process_time() - cpu
    gc.collect()
    grown = rss() - start
    if scenario == "burst":
        tracemalloc.start()  # (not while submitting: it would dwarf what it measures)
        live = 0
    else:
        live = tracemalloc.get_traced_memory()[0]
    size = os.path.getsize(os.path.join(state_dir, "tasks.jsonl"))
    states = {}
    for record in registry.records.values():
        states[record.get("state")] = states.get(record.get("state"), 0) + 1
    print(json.dumps({"rss": grown, "live": live, "journal": size, "states": states, "cpu": cpu}))


def measure(scenario, variant, burst):
    out = subprocess.run([sys.executable, __file__, "--child", scenario, variant, str(burst)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", choices=("finished", "queued", "burst"))
    parser.add_argument("--burst", type=int, default=10000, help="tasks submitted at once in the burst scenario")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} "
          f"(1, 5, 15 min), {os.cpu_count()} CPUs; medians of {args.runs} runs")
    for scenario in ("finished", "queued", "burst") if not args.only else (args.only,):
        figures = {}
        for variant in ("before", "after"):
            runs = [measure(scenario, variant, args.burst) for _ in range(args.runs)]
            figures[variant] = {
                "rss": statistics.median(r["rss"] for r in runs),
                "live": statistics.median(r["live"] for r in runs),
                "journal": statistics.median(r["journal"] for r in runs),
                "states": runs[0]["states"],
                "cpu": statistics.median(r["cpu"] for r in runs),
            }
        b, a = figures["before"], figures["after"]
        print(f"{scenario}: tasks by state {a['states']}")
        if scenario == "burst":
            per = 1000 / args.burst
            print(f"  per 1,000 tasks: RSS before {b['rss'] * per / MiB:.2f} MiB, after {a['rss'] * per / MiB:.2f} MiB; "
                  f"CPU before {b['cpu'] * per * 1000:.0f} ms, after {a['cpu'] * per * 1000:.0f} ms "
                  f"(after/before {a['cpu'] / b['cpu']:.3f})")
        for what in ("rss", "live", "journal"):
            if scenario == "burst" and what == "live":
                continue
            ratio = a[what] / b[what] if b[what] else float("nan")
            label = {"rss": "RSS growth", "live": "live objects", "journal": "tasks.jsonl"}[what]
            print(f"  {label:12s} before {b[what] / MiB:8.1f} MiB   after {a[what] / MiB:8.1f} MiB   "
                  f"after/before {ratio:.3f}")
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
