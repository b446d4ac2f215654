#!/usr/bin/env python3
"""
How does the agent do on a real SLURM, against plain sbatch, with many jobs?

One run measures, on the SLURM this machine talks to (``sinfo`` must work):

1. N trivial tasks (``true``) end to end, the plain way and through the
   agent, in the same run:

   - plain: a loop of ``sbatch --parsable --wrap=true`` (one after the other,
     as a shell loop would), then ``squeue -h --name=<the batch's name>``
     every ``--plain-poll`` seconds (0.25) until none of the batch is pending,
     running or completing.  The clock runs from the first sbatch to that
     empty squeue.  Polling that often makes this baseline close to what
     SLURM itself can do: the ratio below charges the agent for everything
     else, its own ``poll_interval`` included;
   - agent: the reference platform in this process submits the N tasks at
     once to a real agent, a separate process started the way users start it
     (``twistd -n everest-agent --config agent.ini``, ``[handler] type =
     slurm``, ``max_tasks`` = N so that every task is in flight, fsync on).
     The clock runs from the first submit to the platform holding DONE for
     every task (timestamped in the callback that records the state, so no
     HTTP round trip or polling by the benchmark is counted).

   It prints both times, tasks/s each, and the ratio agent time / plain time.
   The plain run goes first, so the agent's run finds SLURM holding the plain
   run's finished jobs (for ``MinJobAge``), which if anything handicaps the
   agent; ``--agent-first`` swaps the order.  On a small, busy machine the
   ratio moved between 0.9 and 1.5 from one run to the next (other load,
   SLURM's state): run both orders before reading much into it.

2. The scheduler commands the agent ran per poll cycle, which must not grow
   beyond one status command per chunk of ``chunk_size`` job ids.  The agent
   finds ``sbatch``, ``squeue``, ``sacct``, ``scancel`` and ``sinfo`` first
   in a directory of wrapper scripts on its ``PATH``; each wrapper runs the
   real command and then appends one line (start and end time, exit status,
   arguments) to a log.  Status queries (``squeue ... -j id,id,...``) are
   grouped into poll cycles (a cycle asks about each active job once; calls
   less than half a ``poll_interval`` apart belong to the same cycle); for
   each cycle the log gives the number of job ids asked about, of squeue and
   sacct calls, and how long it took, and the time from one cycle's start to
   the next.  It also shows how many sbatch the agent had in flight and the
   ``sinfo`` calls of its resource reports.  The plain run goes through the
   same wrappers, so both pay the same (~2 ms per call) for the logging.

3. For every task, the delay from the job's end to its DONE report: the job
   ends when its script writes ``.everest/exitcode`` in the task directory
   (that file's mtime); DONE is both the time the agent put in the report
   (``info["time"]``) and the time the platform received it.  p50, p99 and
   max are compared with ``poll_interval + 1 s``.

Run from the project's root (as a user that may submit jobs)::

    python benchmarks/slurm.py                       # 1000 tasks, poll 2 s: ~2-3 minutes on 2 cores
    python benchmarks/slurm.py --tasks 200 --poll-interval 1 --json slurm.json --keep

Jobs are found again for cleanup by their working directory (everything
lives in one temporary directory): whatever is left in the queue at the end,
or after Ctrl-C, is canceled with ``scancel``; other users' jobs are never
touched, but other jobs in the queue share its slots and make the figures
noisy (the header says how many there were).  Nothing here is a test: it
prints figures; the exit status is 0 unless something did not work (a task
not DONE, a job left behind, errors in the agent's log, or an item out of
bounds).
"""

import argparse
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from twisted.internet import defer, task, threads
from twisted.internet.protocol import ProcessProtocol

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from everest_agent import protocol as P  # noqa: E402
from everest_agent.handlers.slurm import SlurmTaskHandler  # noqa: E402

TOKEN = "benchmark-token-0123456789abcdef"
COMMANDS = ("sbatch", "squeue", "sacct", "scancel", "sinfo")
INTERRUPTED = [False]  # set when a signal stopped the run


class BenchmarkError(Exception):
    """Something needed for the measurement did not work; the message says what."""


# -- small helpers -----------------------------------------------------------------


def percentile(values, p):
    """Nearest-rank percentile of C{values} (0 < p <= 100)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), int(-(-p * len(ordered) // 100))))
    return ordered[rank - 1]


def mean(values):
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def write_private(path, text, mode=0o600):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def run(argv, env=None, timeout=60):
    """Run a command, return C{(rc, stdout, stderr)}; never raises for a failing command."""
    try:
        p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return -1, "", str(e)
    return p.returncode, p.stdout, p.stderr


def sleep(reactor, seconds):
    return task.deferLater(reactor, seconds, lambda: None)


class Out:
    def __init__(self, stream):
        self.stream = stream
        self.results = {}
        self.problems = []

    def line(self, text=""):
        self.stream.write(text + "\n")
        self.stream.flush()

    def problem(self, text):
        self.problems.append(text)
        self.line(f"   PROBLEM: {text}")


# -- SLURM ---------------------------------------------------------------------------


def slurm_facts(partition):
    """What the header says about the cluster; raises if SLURM does not answer."""
    rc, out, err = run(["sinfo", "-h", "-o", "%P|%a|%D|%C"] + (["-p", partition] if partition else []))
    if rc != 0 or not out.strip():
        raise BenchmarkError(f"sinfo does not work (rc {rc}): {err.strip() or out.strip()}; "
                             "is a SLURM controller running? (.ci/setup-slurm.sh)")
    rows = [line.split("|") for line in out.split("\n") if line.count("|") == 3]
    chosen = [r for r in rows if r[0].rstrip("*") == partition] if partition else \
        [r for r in rows if r[0].endswith("*")] or rows[:1]
    facts = {"partition": chosen[0][0].rstrip("*") if chosen else partition or "?",
             "cpus": chosen[0][3] if chosen else "?"}
    rc, out, _ = run(["sinfo", "--version"])
    facts["version"] = out.strip() if rc == 0 else "?"
    rc, out, _ = run(["scontrol", "show", "partition", facts["partition"]])
    facts["oversubscribe"] = next((w.split("=", 1)[1] for w in out.split() if w.startswith("OverSubscribe=")), "?")
    rc, out, _ = run(["scontrol", "show", "config"])
    for line in out.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "MinJobAge":
            facts["min_job_age"] = value.strip()
    return facts


def queued_jobs():
    """C{[(job id, working directory)]} of every job squeue lists (pending, running, completing)."""
    rc, out, err = run(["squeue", "-h", "-o", "%i|%Z"])
    if rc != 0:
        raise BenchmarkError(f"squeue failed (rc {rc}): {err.strip()}")
    jobs = []
    for line in out.splitlines():
        job_id, _, workdir = line.partition("|")
        if job_id.strip():
            jobs.append((job_id.strip(), workdir.strip()))
    return jobs


def inside(path, root):
    return (os.path.realpath(path) + os.sep).startswith(os.path.realpath(root) + os.sep)


def cancel_leftovers(root):
    """scancel the jobs still queued whose working directory is inside C{root}; return their ids."""
    try:
        ours = [job_id for job_id, workdir in queued_jobs() if workdir and inside(workdir, root)]
    except BenchmarkError:
        return []
    for start in range(0, len(ours), 500):
        run(["scancel"] + ours[start:start + 500])
    return ours


# -- wrappers that log every scheduler command -------------------------------------


WRAPPER = """#!/bin/bash
# everest-agent benchmarks/slurm.py: run the real {name}, then log the call.
t0=$EPOCHREALTIME
{real} "$@"
rc=$?
printf '%s %s %s %s %s\\n' "$t0" "$EPOCHREALTIME" {name} "$rc" "$*" >>"${{EVEREST_BENCH_LOG:-{default}}}"
exit $rc
"""


class Wrappers:
    """A directory of wrapper scripts for the SLURM commands, and their logs."""

    def __init__(self, directory):
        self.directory = directory
        os.makedirs(directory)
        self.default_log = os.path.join(directory, "unattributed.log")
        for name in COMMANDS:
            real = shutil.which(name)
            if real is None:
                raise BenchmarkError(f"{name} is not on PATH")
            write_private(os.path.join(directory, name),
                          WRAPPER.format(name=name, real=shlex.quote(real),
                                         default=shlex.quote(self.default_log)), 0o755)

    def path(self, name):
        return os.path.join(self.directory, name)

    def env(self, log):
        env = dict(os.environ)
        env["PATH"] = self.directory + os.pathsep + env.get("PATH", os.defpath)
        env["EVEREST_BENCH_LOG"] = log
        return env


class Call:
    __slots__ = ("start", "end", "name", "rc", "args")

    def __init__(self, start, end, name, rc, args):
        self.start, self.end, self.name, self.rc, self.args = start, end, name, rc, args

    @property
    def ids(self):
        """The job ids after C{-j}, or C{[]}."""
        for i, arg in enumerate(self.args[:-1]):
            if arg == "-j":
                return [x for x in self.args[i + 1].split(",") if x]
        return []

    @property
    def kind(self):
        if self.name == "squeue":
            if any(a.startswith("--name") for a in self.args):
                return "squeue-by-name"
            return "squeue-status" if "-j" in self.args else "squeue-other"
        return self.name


def read_calls(path):
    calls = []
    try:
        with open(path, errors="replace") as f:
            lines = f.readlines()
    except FileNotFoundError:
        return calls
    for line in lines:
        parts = line.rstrip("\n").split(" ", 4)
        if len(parts) < 4:
            continue
        try:
            start, end = float(parts[0].replace(",", ".")), float(parts[1].replace(",", "."))
            rc = int(parts[3])
        except ValueError:
            continue
        calls.append(Call(start, end, parts[2], rc, parts[4].split(" ") if len(parts) > 4 else []))
    calls.sort(key=lambda c: c.start)
    return calls


def poll_cycles(calls, poll_interval, chunk_size):
    """
    Group the status queries (and the sacct calls that follow them) into
    poll cycles.  A call opens a new cycle if it starts more than half a
    poll interval after the previous status call ended, or if it asks about
    a job the current cycle asked about already (a cycle asks about each
    active job once; polls may follow each other at once when one takes
    longer than the poll interval).
    """
    cycles = []
    gap = poll_interval / 2.0
    for call in calls:
        kind = call.kind
        if kind == "squeue-status":
            ids = call.ids
            if (not cycles or call.start - cycles[-1]["last_status_end"] > gap
                    or not cycles[-1]["ids"].isdisjoint(ids)):
                cycles.append({"start": call.start, "end": call.end, "last_status_end": call.end,
                               "squeue": 0, "sacct": 0, "ids": set(), "jobs": 0, "failed": 0})
            c = cycles[-1]
            c["squeue"] += 1
            c["ids"].update(ids)
            c["jobs"] += len(ids)
            c["failed"] += call.rc != 0
            c["last_status_end"] = call.end
            c["end"] = max(c["end"], call.end)
        elif kind == "sacct" and cycles and call.start - cycles[-1]["last_status_end"] <= gap:
            cycles[-1]["sacct"] += 1
            cycles[-1]["end"] = max(cycles[-1]["end"], call.end)
    for c in cycles:
        c["distinct"] = len(c["ids"])
        c["expected"] = math.ceil(c["jobs"] / chunk_size) if c["jobs"] else 0
        c["duration"] = c["end"] - c["start"]
        del c["ids"]
    return cycles


# -- 1a. the plain baseline ----------------------------------------------------------


def plain_run(count, root, wrappers, poll, partition, timeout, stop):
    """
    C{count} x C{sbatch --parsable --wrap=true} one after the other, then
    squeue every C{poll} seconds until none is left.  Blocking: run it in a
    thread; it gives up when the C{threading.Event} C{stop} is set.
    """
    directory = os.path.join(root, "plain")
    os.makedirs(directory)
    log = os.path.join(root, "plain-commands.log")
    env = wrappers.env(log)
    name = f"everest-bench-plain-{os.getpid()}"
    argv = [wrappers.path("sbatch"), "--parsable", f"--job-name={name}", f"--chdir={directory}",
            f"--output={os.path.join(directory, 'slurm-%j.out')}"]
    if partition:
        argv.append(f"--partition={partition}")
    argv.append("--wrap=true")
    ids = []
    wall0 = time.time()
    start = time.perf_counter()
    for _ in range(count):
        if stop.is_set():
            raise BenchmarkError("interrupted")
        rc, out, err = run(argv, env=env)
        if rc != 0:
            raise BenchmarkError(f"sbatch failed (rc {rc}) after {len(ids)} jobs: {err.strip()}")
        ids.append(out.strip().splitlines()[-1].split(";")[0])
    submitted = time.perf_counter() - start
    squeue = [wrappers.path("squeue"), "-h", f"--name={name}", "-o", "%i"]
    polls = 0
    while True:
        rc, out, err = run(squeue, env=env)
        polls += 1
        if rc == 0 and not out.strip():
            break
        if time.perf_counter() - start > timeout:
            raise BenchmarkError(f"plain run: jobs still queued after {timeout:g} s")
        if stop.wait(poll):
            raise BenchmarkError("interrupted")
    elapsed = time.perf_counter() - start
    # What SLURM says about them (the completion log, 1 s resolution).
    states, last_end = {}, None
    rc, out, _ = run(["sacct", "--completion", "-n", "-P", "-X", "-o", "JobID,State,End", "-j", ",".join(ids)])
    if rc == 0:
        wanted = set(ids)
        for line in out.splitlines():
            parts = line.split("|")
            if len(parts) == 3 and parts[0] in wanted:
                states[parts[1]] = states.get(parts[1], 0) + 1
                try:
                    end = time.mktime(time.strptime(parts[2], "%Y-%m-%dT%H:%M:%S"))
                except ValueError:
                    continue
                last_end = end if last_end is None else max(last_end, end)
    return {
        "seconds": elapsed,
        "per_s": count / elapsed,
        "submit_loop_s": submitted,
        "squeue_polls": polls,
        "sacct_states": states,
        "last_end_after_s": (last_end - wall0) if last_end is not None else None,
        "commands": len(read_calls(log)),
    }


# -- 1b. the agent -----------------------------------------------------------------------


class Waiter(ProcessProtocol):
    def __init__(self):
        self.ended = defer.Deferred()

    def processEnded(self, reason):
        self.ended.callback(getattr(reason.value, "exitCode", None))


class AgentProcess:
    def __init__(self, reactor, root, url, wrappers, args):
        self.reactor = reactor
        self.root = root
        self.work_dir = os.path.join(root, "agent", "tasks")
        self.state_dir = os.path.join(root, "agent", "state")
        self.log_file = os.path.join(root, "agent.log")
        self.output_file = os.path.join(root, "agent.out")
        self.commands_log = os.path.join(root, "agent-commands.log")
        self.env = wrappers.env(self.commands_log)
        self.env["PYTHONPATH"] = ROOT + os.pathsep + self.env.get("PYTHONPATH", "")
        token_file = write_private(os.path.join(root, "token"), TOKEN + "\n")
        handler = (
            "[handler]\n"
            "type = slurm\n"
            f"poll_interval = {args.poll_interval:g}\n"
            f"max_submit = {args.max_submit}\n"
        )
        if args.partition:
            handler += f"partition = {args.partition}\n"
        self.ini = write_private(
            os.path.join(root, "agent.ini"),
            "[platform]\n"
            f"url = {url}\n"
            f"token_file = {token_file}\n"
            "reconnect_initial_delay = 0.2\n"
            "reconnect_max_delay = 2\n"
            "[agent]\n"
            f"work_dir = {self.work_dir}\n"
            f"state_dir = {self.state_dir}\n"
            f"max_tasks = {args.max_tasks}\n"
            "kill_grace = 2\n"
            "hostname = benchmark\n" + handler,
        )
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        if not os.path.exists(twistd):
            twistd = shutil.which("twistd") or "twistd"
        self.argv = [twistd, "-n", "--pidfile", os.path.join(root, "agent.pid"), "--logfile", self.log_file,
                     "everest-agent", "--config", self.ini]
        self.waiter = None
        self.pid = None

    def start(self):
        self.waiter = Waiter()
        out = os.open(self.output_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            transport = self.reactor.spawnProcess(
                self.waiter, self.argv[0], self.argv, env=self.env, path=self.root,
                childFDs={0: "w", 1: out, 2: out},
            )
        finally:
            os.close(out)
        self.pid = transport.pid

    @property
    def alive(self):
        return self.waiter is not None and not self.waiter.ended.called

    async def stop(self):
        if not self.alive:
            return
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        timer = self.reactor.callLater(30, self.kill)
        await self.waiter.ended
        if timer.active():
            timer.cancel()

    def kill(self):
        if self.alive:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def log_problems(self):
        """Lines of the agent's log at error or above, and tracebacks."""
        lines = []
        for path in (self.log_file, self.output_file):
            try:
                with open(path, errors="replace") as f:
                    lines += f.readlines()
            except OSError:
                pass
        return [line.rstrip() for line in lines
                if "Traceback" in line or "Unhandled" in line or "#critical" in line or "#error" in line]


async def agent_tasks(reactor, platform, count, timeout):
    """Submit C{count} x C{true} at once; wait for every one to end."""
    received = {}
    done = defer.Deferred()

    def ended(t):
        received[t.task_id] = (time.time(), time.perf_counter())
        if len(received) == count and not done.called:
            done.callback(None)

    wall0, start = time.time(), time.perf_counter()
    ids = []
    for _ in range(count):
        task_id = platform.submit({"command": "true"})
        ids.append(task_id)
        platform.wait_for(task_id).addCallback(ended)
    timer = reactor.callLater(timeout, lambda: done.called or done.errback(
        BenchmarkError(f"agent run: {count - len(received)} of {count} tasks not ended after {timeout:g} s")))
    try:
        await done
    finally:
        if timer.active():
            timer.cancel()
    last = max(p for _, p in received.values())
    return ids, received, wall0, last - start


# -- main ---------------------------------------------------------------------------------


def command_line(argv):
    return " ".join(shlex.quote(a) for a in [sys.executable, os.path.relpath(__file__)] + argv)


class CpuMeter:
    """
    CPU seconds used while a run lasts: the whole machine (C{/proc/stat}),
    SLURM's daemons, this process (with its waited-for children) and,
    optionally, another process (with its waited-for children).
    """

    HZ = os.sysconf("SC_CLK_TCK")

    def __init__(self, pid=None):
        self.pid = pid
        self.before = None

    @staticmethod
    def _machine():
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields) - idle, sum(fields)

    @classmethod
    def _process(cls, pid):
        """(own, children) CPU seconds of a process, or (0, 0) if it is gone."""
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0, 0.0
        return (int(fields[11]) + int(fields[12])) / cls.HZ, (int(fields[13]) + int(fields[14])) / cls.HZ

    @staticmethod
    def _daemons():
        found = {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/comm") as f:
                    comm = f.read().strip()
            except OSError:
                continue
            if comm in ("slurmctld", "slurmd"):
                found.setdefault(comm, []).append(int(name))
        return found

    def _sample(self):
        t = os.times()
        sample = {"machine": self._machine(), "bench": t.user + t.system,
                  "bench_children": t.children_user + t.children_system}
        for comm, pids in self._daemons().items():
            sample[comm] = sum(self._process(pid)[0] for pid in pids)
        if self.pid is not None:
            sample["agent"], sample["agent_children"] = self._process(self.pid)
        return sample

    def start(self):
        self.before = self._sample()

    def stop(self):
        after = self._sample()
        busy = after["machine"][0] - self.before["machine"][0]
        total = after["machine"][1] - self.before["machine"][1]
        used = {"machine_busy": busy / total if total else float("nan")}
        for key, value in after.items():
            if key != "machine" and key in self.before:
                used[key] = value - self.before[key]
        return used


def cpu_line(cpu, agent):
    parts = [f"machine busy {cpu['machine_busy'] * 100:.0f}% of {os.cpu_count()} cores"]
    for key, label in (("slurmctld", "slurmctld"), ("slurmd", "slurmd")):
        if key in cpu:
            parts.append(f"{label} {cpu[key]:.1f} s")
    if agent:
        parts.append(f"agent {cpu.get('agent', 0):.1f} s + its commands {cpu.get('agent_children', 0):.1f} s")
        parts.append(f"platform {cpu['bench']:.1f} s")
    else:
        parts.append(f"sbatch/squeue {cpu['bench_children']:.1f} s")
    return "CPU: " + ", ".join(parts)


async def agent_run(reactor, args, root, wrappers, out, holder):
    """Start the platform and the agent, run the warm-up and the measured tasks, stop both."""
    from everest_agent.platform import Platform, listen

    platform = Platform({TOKEN: "bench"}, reactor, heartbeat=30, files_dir=os.path.join(root, "platform-files"))
    agent = None
    try:
        await listen(platform, reactor, 0)
        agent = holder["agent"] = AgentProcess(reactor, root, platform.ws_url, wrappers, args)
        agent.start()
        connected = platform.wait_connected()
        reactor.callLater(30, lambda: connected.called or connected.errback(
            BenchmarkError(f"the agent did not connect within 30 s; see {agent.log_file}")))
        await connected
        if args.warmup:
            await agent_tasks(reactor, platform, args.warmup, args.timeout)
            await sleep(reactor, args.poll_interval)  # let the warm-up's last poll cycle pass
        out.line(f"agent: {args.tasks} tasks submitted at once to the agent (pid {agent.pid}) ...")
        meter = CpuMeter(agent.pid)
        meter.start()
        ids, received, wall0, seconds = await agent_tasks(reactor, platform, args.tasks, args.timeout)
        wall1 = time.time()
        cpu = meter.stop()
        states = {}
        for task_id in ids:
            t = platform.tasks[task_id]
            key = t.state if t.state != P.DONE or (t.info or {}).get("exitCode") == 0 else "DONE(exit!=0)"
            states[key] = states.get(key, 0) + 1
        # Item 3: job end (exit-code file) -> DONE (agent's time, platform's receipt).
        to_report, to_receipt, missing = [], [], 0
        for task_id in ids:
            path = os.path.join(agent.work_dir, task_id, ".everest", "exitcode")
            try:
                ended = os.stat(path).st_mtime_ns / 1e9
            except OSError:
                missing += 1
                continue
            done = [info for state, info in platform.tasks[task_id].history if state == P.DONE]
            if done and isinstance(done[-1].get("time"), (int, float)):
                to_report.append(done[-1]["time"] - ended)
            to_receipt.append(received[task_id][0] - ended)
        # When the agent had accepted every task, and submitted every job (first report with a jobId).
        accepted, submitted = [], []
        for task_id in ids:
            history = platform.tasks[task_id].history
            times = [info.get("time") for state, info in history if state == P.ACCEPTED]
            if times and isinstance(times[0], (int, float)):
                accepted.append(times[0] - wall0)
            times = [info.get("time") for state, info in history if "jobId" in (info or {})]
            if times and isinstance(times[0], (int, float)):
                submitted.append(times[0] - wall0)
        result = {"seconds": seconds, "per_s": args.tasks / seconds, "states": states, "cpu": cpu,
                  "all_accepted_s": max(accepted) if accepted else None,
                  "all_submitted_s": max(submitted) if submitted else None,
                  "wall0": wall0, "wall1": wall1, "to_report": to_report, "to_receipt": to_receipt,
                  "missing": missing}
        out.line(f"    {seconds:.2f} s, {result['per_s']:.1f} tasks/s; states {states}")
        if accepted and submitted:
            out.line(f"    all ACCEPTED {max(accepted):.2f} s after the first submit, all jobs submitted "
                     f"(a report with their jobId) after {max(submitted):.2f} s")
        out.line(f"    {cpu_line(cpu, True)}")
        return result
    finally:
        # Interrupted (the reactor is stopping): the shutdown trigger killed the agent.
        if not holder.get("interrupted"):
            if agent is not None:
                await agent.stop()
            await platform.close()
        holder["violations"] = list(platform.violations)


async def main(reactor, args, argv):
    from twisted.logger import FilteringLogObserver, LogLevel, LogLevelFilterPredicate
    from twisted.logger import globalLogBeginner, textFileLogObserver

    out = Out(sys.stdout)
    out.line("everest-agent on SLURM (benchmarks/slurm.py); to reproduce:")
    out.line(f"   {command_line(argv)}")
    facts = slurm_facts(args.partition)
    try:
        root = tempfile.mkdtemp(prefix="everest-bench-slurm-", dir=args.dir)
    except OSError as e:
        raise BenchmarkError(f"cannot make a temporary directory: {e}") from None
    others = [j for j, w in queued_jobs() if not (w and inside(w, root))]
    chunk = SlurmTaskHandler.chunk_size
    out.line(f"   {os.cpu_count()} cores; SLURM {facts['version'].split()[-1]}, "
             f"partition {facts['partition']} (CPUs alloc/idle/other/total {facts['cpus']}, "
             f"OverSubscribe={facts['oversubscribe']}), MinJobAge {facts.get('min_job_age', '?')}; "
             f"jobs of others in the queue at the start: {len(others)}")
    out.line(f"   N={args.tasks}, poll_interval={args.poll_interval:g} s, max_submit={args.max_submit}, "
             f"max_tasks={args.max_tasks}, chunk_size={chunk}, {'agent' if args.agent_first else 'plain'} "
             f"run first; work files in {root}\n")
    out.results.update(tasks=args.tasks, poll_interval=args.poll_interval, max_submit=args.max_submit,
                       max_tasks=args.max_tasks, chunk_size=chunk, slurm=facts, other_jobs_at_start=len(others),
                       agent_first=args.agent_first)

    log_file = open(os.path.join(root, "platform.log"), "w")
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(log_file), [LogLevelFilterPredicate(LogLevel.info)])],
        redirectStandardIO=False,
    )
    wrappers = Wrappers(os.path.join(root, "bin"))
    holder = {"agent": None, "violations": []}
    stop_plain = threading.Event()

    def emergency_cleanup():
        # Ctrl-C or SIGTERM: the reactor stops before main's finally runs.
        holder["interrupted"] = INTERRUPTED[0] = True
        stop_plain.set()
        if holder["agent"] is not None:
            holder["agent"].kill()
        canceled = cancel_leftovers(root)
        out.line(f"\ninterrupted: agent killed, {len(canceled)} queued jobs of this run canceled; "
                 f"files left in {root}")

    def run_plain():
        out.line(f"plain: {args.tasks} x sbatch --wrap=true in a loop, then squeue every "
                 f"{args.plain_poll:g} s until none is queued ...")
        meter = CpuMeter()
        meter.start()
        result = plain_run(args.tasks, root, wrappers, args.plain_poll, args.partition, args.timeout, stop_plain)
        result["cpu"] = meter.stop()
        out.line(f"    {result['seconds']:.2f} s, {result['per_s']:.1f} tasks/s (submit loop "
                 f"{result['submit_loop_s']:.2f} s; {result['squeue_polls']} squeue polls; "
                 f"sacct --completion: {result['sacct_states']})")
        out.line(f"    {cpu_line(result['cpu'], False)}")
        return result

    # The plain run blocks, so it runs in a thread: Ctrl-C still stops the
    # reactor, which stops the thread; jobs it submitted meanwhile are
    # canceled once the thread is over (the "after" trigger).
    triggers = [reactor.addSystemEventTrigger("before", "shutdown", emergency_cleanup),
                reactor.addSystemEventTrigger("after", "shutdown", cancel_leftovers, root)]
    plain = None
    try:
        if not args.no_plain and not args.agent_first:
            plain = await threads.deferToThread(run_plain)
        result = await agent_run(reactor, args, root, wrappers, out, holder)
        if not args.no_plain and args.agent_first:
            plain = await threads.deferToThread(run_plain)
    finally:
        if not holder.get("interrupted"):
            left = cancel_leftovers(root)
            for trigger in triggers:
                reactor.removeSystemEventTrigger(trigger)
            log_file.close()
    agent = holder["agent"]
    out.results["plain"] = plain
    out.results["agent"] = {k: v for k, v in result.items() if k not in ("to_report", "to_receipt")}
    seconds, rate, states = result["seconds"], result["per_s"], result["states"]
    wall0, wall1 = result["wall0"], result["wall1"]
    to_report, to_receipt, missing = result["to_report"], result["to_receipt"], result["missing"]
    if states != {P.DONE: args.tasks}:
        out.problem(f"not every task ended DONE with exit code 0: {states}")

    if left:
        out.problem(f"{len(left)} jobs of this run were still queued at the end and were canceled")

    # -- print 1.
    out.line("\n" + "=" * 78)
    out.line(f"1. {args.tasks} x `true`, first submit -> last one over")
    out.line(f"   {'':34} {'seconds':>9} {'tasks/s':>9}")
    if plain:
        out.line(f"   {'plain sbatch loop + squeue':34} {plain['seconds']:9.2f} {plain['per_s']:9.1f}")
    out.line(f"   {'agent (platform sees DONE)':34} {seconds:9.2f} {rate:9.1f}")
    if plain:
        ratio = seconds / plain["seconds"]
        out.results["ratio"] = ratio
        out.line(f"   ratio agent time / plain time: {ratio:.2f}  (rates: agent {rate / plain['per_s']:.2f} x plain)")
        if plain.get("last_end_after_s") is not None:
            out.line(f"   (plain: SLURM's completion log puts the last job's end {plain['last_end_after_s']:.0f} s "
                     "after the first sbatch, to the second)")

    # -- print 2.
    calls = [c for c in read_calls(agent.commands_log) if wall0 - 0.01 <= c.start <= wall1]
    all_calls = read_calls(agent.commands_log)
    cycles = poll_cycles(calls, args.poll_interval, chunk)
    busy = [c for c in cycles if c["jobs"]]
    for c in cycles:
        c.pop("ids", None)
    out.results["cycles"] = cycles
    out.line(f"\n2. scheduler commands per poll cycle during the agent's run (chunk_size {chunk} ids per squeue)")
    if not busy:
        out.problem("no poll cycle found in the command log")
    else:
        top = max(c["jobs"] for c in busy)
        out.line(f"   {len(busy)} poll cycles; most jobs asked about in one cycle: {top}")
        out.line(f"   {'jobs asked':>12} {'cycles':>7} {'squeue/cycle':>13} {'max allowed':>12} "
                 f"{'sacct/cycle':>12} {'cycle time s':>13}")
        out.line(f"   {'':>12} {'':>7} {'max':>6} {'mean':>6} {'ceil(n/chunk)':>13}{'max':>5} {'mean':>6} "
                 f"{'mean':>6} {'max':>6}")
        edges = list(range(0, max(top, 1) + chunk, chunk))
        buckets = [(lo + 1, lo + chunk) for lo in edges[:-1]]
        rows = []
        for lo, hi in buckets:
            sel = [c for c in busy if lo <= c["jobs"] <= hi]
            if sel:
                rows.append((f"{lo}-{hi}", sel))
        rows.append(("all", busy))
        for label, sel in rows:
            out.line(f"   {label:>12} {len(sel):>7} {max(c['squeue'] for c in sel):>6} "
                     f"{mean(c['squeue'] for c in sel):>6.2f} {max(c['expected'] for c in sel):>13}"
                     f"{max(c['sacct'] for c in sel):>5} {mean(c['sacct'] for c in sel):>6.2f} "
                     f"{mean(c['duration'] for c in sel):>6.2f} {max(c['duration'] for c in sel):>6.2f}")
        over = [c for c in busy if c["squeue"] > c["expected"]]
        failed = sum(c["failed"] for c in busy)
        if over:
            out.problem(f"{len(over)} cycles ran more squeue calls than ceil(jobs/chunk_size)")
        if failed:
            out.problem(f"{failed} status queries failed")
        if not over:
            out.line("   ok: never more than one squeue per chunk of ids")
        starts = [c["start"] for c in busy]
        periods = [b - a for a, b in zip(starts, starts[1:])]
        if periods:
            out.line(f"   poll cycle start to next start: mean {mean(periods):.2f} s, max {max(periods):.2f} s "
                     f"(poll_interval {args.poll_interval:g} s)")
    kinds = {}
    for c in all_calls:
        kinds[c.kind] = kinds.get(c.kind, 0) + 1
    window = {}
    for c in calls:
        window[c.kind] = window.get(c.kind, 0) + 1
    out.results["agent_commands"] = {"measured": window, "whole_run": kinds}
    out.line("   commands during the measured run: " + ", ".join(f"{k} {v}" for k, v in sorted(window.items()))
             + f"  (whole agent run with {args.warmup} warm-up tasks: "
             + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())) + ")")
    if window.get("sbatch", 0) != args.tasks:
        out.problem(f"{window.get('sbatch', 0)} sbatch calls for {args.tasks} tasks")
    submits = [c for c in calls if c.kind == "sbatch"]
    if submits:
        span = max(c.end for c in submits) - min(c.start for c in submits)
        edges = sorted([(c.start, 1) for c in submits] + [(c.end, -1) for c in submits])
        level = peak = 0
        for _, step in edges:
            level += step
            peak = max(peak, level)
        busy_time = sum(c.end - c.start for c in submits)
        out.line(f"   sbatch: {len(submits)} in {span:.2f} s ({len(submits) / span if span else 0:.0f}/s), "
                 f"in flight mean {busy_time / span if span else 0:.1f}, max {peak} (max_submit {args.max_submit}); "
                 f"one sbatch p50 {percentile([c.end - c.start for c in submits], 50) * 1000:.0f} ms")
        out.line(f"   sinfo (RESOURCE_STATE, cached for a poll_interval): {window.get('sinfo', 0)} calls, "
                 f"{window.get('sinfo', 0) / max(1, len(busy)):.2f} per poll cycle")
    status_calls = [c for c in calls if c.kind == "squeue-status"]
    if status_calls:
        durations = [c.end - c.start for c in status_calls]
        out.line(f"   one squeue status call: p50 {percentile(durations, 50) * 1000:.0f} ms, "
                 f"max {max(durations) * 1000:.0f} ms")

    # -- print 3.
    bound = args.poll_interval + 1.0
    out.line(f"\n3. job end (mtime of .everest/exitcode) -> DONE, poll_interval {args.poll_interval:g} s, "
             f"bound poll_interval + 1 = {bound:g} s")
    out.line(f"   {'':32} {'p50':>7} {'p99':>7} {'max':>7} {'over bound':>11}")
    figures = {}
    for label, values in (("time in the agent's DONE report", to_report),
                          ("time the platform received it", to_receipt)):
        if not values:
            out.problem(f"no figures for {label}")
            continue
        p50, p99, top = percentile(values, 50), percentile(values, 99), max(values)
        beyond = sum(1 for v in values if v > bound)
        figures[label] = {"p50": p50, "p99": p99, "max": top, "min": min(values), "over_bound": beyond}
        out.line(f"   {label:32} {p50:7.2f} {p99:7.2f} {top:7.2f} {beyond:>11}")
    out.results["end_to_done_s"] = figures
    if missing:
        out.problem(f"{missing} tasks have no exit-code file")
    receipt = figures.get("time the platform received it")
    if receipt and receipt["max"] > bound:
        out.problem(f"{receipt['over_bound']} tasks reported DONE more than {bound:g} s after their job ended")
    elif receipt:
        out.line(f"   ok: every DONE within {bound:g} s of its job's end")

    problems = agent.log_problems()
    if problems:
        out.problem(f"the agent's log has {len(problems)} error lines, e.g.: {problems[0][:200]}")
    if holder["violations"]:
        out.problem(f"the platform saw {len(holder['violations'])} contract violations: {holder['violations'][0]}")
    others_end = [j for j, w in queued_jobs() if not (w and inside(w, root))]
    if others or others_end:
        out.line(f"\n   note: other jobs shared the slots (queued at the start: {len(others)}, at the end: "
                 f"{len(others_end)}); the figures are noisier for it")

    out.results["problems"] = out.problems
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out.results, f, indent=2, default=str)
        out.line(f"results written to {args.json}")
    if args.keep:
        out.line(f"kept {root} (agent.log, agent-commands.log, plain-commands.log, agent/tasks/...)")
    else:
        shutil.rmtree(root, ignore_errors=True)
    if out.problems:
        raise SystemExit(1)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=1000, help="N, tasks in each run (default 1000)")
    parser.add_argument("--poll-interval", type=float, default=2.0,
                        help="the agent's [handler] poll_interval in seconds (default 2)")
    parser.add_argument("--max-submit", type=int, default=16,
                        help="the agent's [handler] max_submit (default 16, the agent's default)")
    parser.add_argument("--max-tasks", type=int,
                        help="the agent's [agent] max_tasks (default: N, so every task is in flight)")
    parser.add_argument("--partition", default="", help="SLURM partition (default: SLURM's default)")
    parser.add_argument("--plain-poll", type=float, default=0.25,
                        help="seconds between the plain run's squeue polls (default 0.25)")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain sbatch run (no ratio)")
    parser.add_argument("--agent-first", action="store_true",
                        help="run the agent before the plain loop (default: after it)")
    parser.add_argument("--warmup", type=int, default=16,
                        help="tasks through the agent before the measured run, not counted (default 16)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds each run may take before the benchmark gives up (default 600)")
    parser.add_argument("--dir", help="where to make the temporary directory (default: $TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, task directories)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    args = parser.parse_args(argv)
    if args.tasks < 1 or args.poll_interval <= 0 or args.max_submit < 1 or args.plain_poll <= 0:
        parser.error("--tasks and --max-submit must be at least 1, --poll-interval and --plain-poll positive")
    if args.max_tasks is None:
        args.max_tasks = max(args.tasks, args.warmup, 1)
    if args.json:
        args.json = os.path.abspath(args.json)
    return args


async def entry(reactor, args, argv):
    try:
        await main(reactor, args, argv)
    except BenchmarkError as e:
        print(f"benchmarks/slurm.py: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    argv = sys.argv[1:]
    arguments = parse_args(argv)
    try:
        task.react(lambda reactor: defer.Deferred.fromCoroutine(entry(reactor, arguments, argv)))
    except SystemExit:
        if INTERRUPTED[0]:
            os._exit(130)  # the suspended coroutine must not run its cleanup again at exit
        raise
