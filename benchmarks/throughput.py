#!/usr/bin/env python3
"""
How close does the agent get to the process-spawn limit, and does it stay
flat with thousands of tasks in flight?

One run measures, on this machine:

0. 50,000 task directories created and removed where the agent's go
   (``--churn``), so that file system is measured as a long-running agent
   leaves it;
1. raw baseline: N trivial ``/bin/sh -c true`` processes through
   ``reactor.spawnProcess``, at most ``slots`` at once, before item 2 and
   again after it;
2. the same N tasks (``{"command": "true"}``) through the reference platform
   and a real agent, from the first submit to the platform holding DONE for
   all of them, and the ratio of that rate to the mean of the baselines;
3. latency on an idle agent, one task at a time: submit -> RUNNING and
   submit -> DONE, as the platform sees them (p50, p99);
4. 10,000 tasks submitted at once (``sleep 1000``, so all but ``slots`` stay
   QUEUED): the agent's RSS and the time until the platform has every
   ACCEPTED; then all are canceled and must end CANCELED, with no task
   process left;
5. the outbox's durability cost: messages/s through L{Outbox} with and
   without fsync, one message per commit and many per commit.

Before items 2-4, 1,500 tasks go through the agent (``--warmup``), so that
it is past its first ``keep_task_dirs`` (1000) and gives new tasks the
emptied directories of old ones (``everest_agent/spares.py``), as it does
through a long sweep; the end of the run says how many it used again.

The state and task directories are on the ordinary disk, as an operator's
are (``--tmpfs`` for both on ``/dev/shm``).  The agent is a separate
process started the way a user starts it
(``twistd -n everest-agent --config agent.ini``, local handler,
``max_tasks = 2 x cores``, fsync on, logging to a file).  The reference
platform runs inside this process: the benchmark calls
L{Platform.submit}/L{Platform.cancel} directly and timestamps the very
callbacks that record each state the agent reports, so the figures hold no
HTTP round trips and no polling delay.  (Through the HTTP API, each submit
would be one HTTP request and every state change would be seen only at the
next poll, which would measure the benchmark instead of the agent.)  The
platform still gets a core of its own: the agent, which does the real work,
runs in another process.

Run from the project's root::

    python benchmarks/throughput.py            # everything, ~1 minute
    python benchmarks/throughput.py --tasks 5000 --json results.json
    python benchmarks/throughput.py --only 1,2 --agent-profile agent.prof

Nothing here is a test: it prints figures and compares them with the goals
of issue 6; the exit status is 0 unless something did not work.
"""

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time

from twisted.internet import defer, task
from twisted.internet.protocol import ProcessProtocol

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from everest_agent import protocol as P  # noqa: E402

TOKEN = "benchmark-token-0123456789abcdef"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

GOALS = {
    "ratio": 0.5,  # item 2 / item 1
    "p50_running_ms": 10.0,
    "rss_mib": 200.0,
    "accepted_s": 10.0,
}


# -- helpers ---------------------------------------------------------------------


def percentile(values, p):
    """Nearest-rank percentile of C{values} (0 < p <= 100)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), int(-(-p * len(ordered) // 100))))
    return ordered[rank - 1]


def sleep(reactor, seconds):
    return task.deferLater(reactor, seconds, lambda: None)


def proc_status(pid):
    """C{{"VmRSS": bytes, "VmHWM": bytes}} of a process."""
    found = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                found[name] = int(rest.split()[0]) * 1024
    return found


def proc_cpu(pid):
    """
    CPU seconds of a process: C{(user, system, children)}, the last being
    the children it has reaped (for the agent: its tasks' wrappers).
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    user, system, child_user, child_system = (int(x) / CLOCK_TICKS for x in fields[11:15])
    return user, system, child_user + child_system


def children_running(pid, marker):
    """Pids of the children of C{pid} whose command line holds C{marker}."""
    from everest_agent.pilot.guard import children

    found = []
    for child in children(pid):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(child)
        except OSError:
            continue
    return found


def agent_cpu(pid):
    """
    C{(user, system, tasks, directory process)} CPU seconds of the agent:
    its own, its reaped children's (its tasks' wrappers), and its directory
    process's (everest_agent/dirworker.py: the task directories' file work).
    """
    user, system, tasks = proc_cpu(pid)
    dirs = 0.0
    for child in children_running(pid, "everest_agent.dirworker"):
        try:
            dirs += sum(proc_cpu(child)[:2])
        except OSError:
            pass
    return user, system, tasks, dirs


#: Where --tmpfs puts the state and task directories.
TMPFS = "/dev/shm"
#: Where they go by default: the ordinary disk (not $TMPDIR, which is a
#: tmpfs on many systems).
DISK = "/var/tmp"


def churn(directory, count):
    """
    Create and remove C{count} task directories (each with C{.everest/} and
    the files C{stdout}, C{stderr}, C{.everest/exitcode}) in C{directory},
    as a long-running agent does, so the file system's allocator is in the
    state users see rather than fresh.

    @return: seconds it took.
    """
    start = time.perf_counter()
    base = os.path.join(directory, "churn")
    os.makedirs(base, exist_ok=True)
    batch = []
    for n in range(count):
        d = os.path.join(base, f"t{n}")
        os.makedirs(os.path.join(d, ".everest"))
        for name in ("stdout", "stderr", ".everest/exitcode"):
            with open(os.path.join(d, name), "w") as f:
                f.write("0\n")
        batch.append(d)
        if len(batch) >= 1000:
            for old in batch:
                shutil.rmtree(old)
            batch = []
    for old in batch:
        shutil.rmtree(old)
    os.rmdir(base)
    return time.perf_counter() - start


def filesystem(path):
    """The type of the file system holding C{path} (from /proc/self/mounts), e.g. ext4 or tmpfs."""
    path = os.path.realpath(path)
    best, kind = "", "unknown"
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                mount = fields[1].replace("\\040", " ")
                if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
                    best, kind = mount, fields[2]
    except OSError:
        pass
    return kind


def machine_cpu():
    """
    C{(busy, total)} CPU seconds of the whole machine since boot, all cores
    (C{/proc/stat}; iowait counts as idle), for the share of the cores a
    phase kept busy.
    """
    with open("/proc/stat") as f:
        fields = [int(x) / CLOCK_TICKS for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


class MachineLoad:
    """The machine's CPU over one phase: C{with MachineLoad() as load: ...}."""

    def __enter__(self):
        self._start = machine_cpu()
        return self

    def __exit__(self, *exc):
        busy0, total0 = self._start
        busy1, total1 = machine_cpu()
        self.busy = busy1 - busy0  # CPU seconds, every process of the machine
        self.share = self.busy / (total1 - total0) if total1 > total0 else float("nan")


def own_cpu():
    t = os.times()
    return t.user + t.system


def processes_in(directory):
    """PIDs of processes whose current directory is inside C{directory}."""
    found = []
    prefix = os.path.realpath(directory) + os.sep
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{name}/cwd")
        except OSError:
            continue
        if (cwd + os.sep).startswith(prefix):
            found.append(int(name))
    return found


def write_private(path, text):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


class Waiter(ProcessProtocol):
    def __init__(self):
        self.ended = defer.Deferred()

    def processEnded(self, reason):
        self.ended.callback(getattr(reason.value, "exitCode", None))


class Report:
    def __init__(self, out):
        self.out = out
        self.results = {}

    def line(self, text=""):
        self.out.write(text + "\n")
        self.out.flush()

    def record(self, key, value):
        self.results[key] = value

    def goal(self, what, ok):
        return f"  [{'ok' if ok else 'MISSED'}: goal {what}]"


# -- 1. raw spawn baseline ---------------------------------------------------------


async def spawn_baseline(reactor, count, concurrency):
    """C{count} x C{/bin/sh -c true} through spawnProcess, C{concurrency} at once."""
    env = dict(os.environ)
    done = defer.Deferred()
    state = {"started": 0, "ended": 0}

    def launch():
        state["started"] += 1
        waiter = Waiter()
        reactor.spawnProcess(waiter, "/bin/sh", ["/bin/sh", "-c", "true"], env=env)
        waiter.ended.addCallback(ended)

    def ended(_):
        state["ended"] += 1
        if state["started"] < count:
            launch()
        elif state["ended"] == count:
            done.callback(None)

    start = time.perf_counter()
    for _ in range(min(concurrency, count)):
        launch()
    await done
    return count / (time.perf_counter() - start)


# -- the agent process -------------------------------------------------------------


class AgentProcess:
    def __init__(self, reactor, root, url, slots, profile=None, extra_ini="", work_root=None):
        self.reactor = reactor
        self.root = root
        self.work_dir = os.path.join(work_root or root, "agent", "tasks")
        self.state_dir = os.path.join(root, "agent", "state")
        self.log_file = os.path.join(root, "agent.log")
        token_file = write_private(os.path.join(root, "token"), TOKEN + "\n")
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
            f"max_tasks = {slots}\n"
            "kill_grace = 2\n"
            "hostname = benchmark\n"
            "[handler]\n"
            "type = local\n" + extra_ini,
        )
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        if not os.path.exists(twistd):
            twistd = shutil.which("twistd") or "twistd"
        self.argv = [twistd, "-n", "--pidfile", os.path.join(root, "agent.pid"),
                     "--logfile", self.log_file]
        if profile:
            self.argv += ["--profile", profile, "--profiler", "cprofile", "--savestats"]
        self.argv += ["everest-agent", "--config", self.ini]
        self.waiter = None
        self.pid = None

    def start(self):
        self.waiter = Waiter()
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        transport = self.reactor.spawnProcess(
            self.waiter, self.argv[0], self.argv, env=env, path=self.root,
            childFDs={0: "w", 1: 1, 2: 2},
        )
        self.pid = transport.pid

    async def stop(self):
        if self.waiter is None or self.waiter.ended.called:
            return
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        timer = self.reactor.callLater(30, lambda: os.kill(self.pid, signal.SIGKILL))
        await self.waiter.ended
        if timer.active():
            timer.cancel()

    def log_value(self, prefix):
        """The number after C{prefix} in the agent's log, or None."""
        try:
            with open(self.log_file, errors="replace") as f:
                for line in f:
                    if prefix in line:
                        return int(line.split(prefix, 1)[1].split(";")[0])
        except (OSError, ValueError):
            pass
        return None

    def log_problems(self):
        """Lines of the agent's log at warn or above, and tracebacks."""
        try:
            with open(self.log_file, errors="replace") as f:
                lines = f.readlines()
        except OSError:
            return []
        return [line.rstrip() for line in lines
                if "Traceback" in line or "Unhandled" in line or "#critical" in line
                or "#error" in line]


# -- 2. end to end -------------------------------------------------------------------


async def run_tasks(platform, count, command="true"):
    """Submit C{count} tasks at once; wait for all to end. @return: (seconds, states)."""
    ends = []
    done = defer.Deferred()
    states = {}
    run_times = []

    def ended(t):
        states[t.state] = states.get(t.state, 0) + 1
        run_time = (t.info or {}).get("runTime")
        if isinstance(run_time, (int, float)):
            run_times.append(run_time)
        ends.append(time.perf_counter())
        if len(ends) == count:
            done.callback(None)

    start = time.perf_counter()
    for _ in range(count):
        task_id = platform.submit({"command": command})
        platform.wait_for(task_id).addCallback(ended)
    await done
    return ends[-1] - start, states, run_times


# -- 3. latency ------------------------------------------------------------------------


async def latency(reactor, platform, samples):
    running, finished, bad, skipped = [], [], [], 0
    for _ in range(samples):
        start = time.perf_counter()
        task_id = platform.submit({"command": "true"})
        seen = {}

        def mark(t, key):
            seen[key] = time.perf_counter()
            return t

        d_running = platform.wait_for(task_id, P.RUNNING).addCallback(mark, "running")
        d_done = platform.wait_for(task_id).addCallback(mark, "done")
        d_running.addErrback(lambda f: None)
        t = await d_done
        await d_running
        if t.state != P.DONE:
            bad.append(f"{t.task_id} {t.states} {(t.info or {}).get('reason')}")
            continue
        if "running" not in seen:
            skipped += 1  # legal (states may be skipped), but no RUNNING time to count
            continue
        running.append((seen["running"] - start) * 1000)
        finished.append((seen["done"] - start) * 1000)
        await sleep(reactor, 0.01)  # let the agent go idle again
    return running, finished, bad, skipped


# -- 4. many tasks in flight -------------------------------------------------------------


#: How py-spy samples: without stopping the process (the figures stay what
#: they are), or EVEREST_BENCH_PY_SPY=native to see C frames (the garbage
#: collector, the JSON encoder) at the price of pausing it at each sample.
PY_SPY_MODE = ["--native"] if os.environ.get("EVEREST_BENCH_PY_SPY") == "native" else ["--nonblocking"]


class BurstProfile:
    """
    Sampling profiles (py-spy, collapsed stacks) of the agent and of this
    process (the platform) while a burst is accepted, and nothing else:
    C{PREFIX-agent.txt} and C{PREFIX-platform.txt}, summarised by
    L{summary} as the functions with the most samples of their own.
    """

    def __init__(self, prefix, pids):
        import subprocess

        self.prefix = prefix
        self.procs = []
        spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
        if not os.path.exists(spy):
            raise SystemExit("--burst-profile needs py-spy (pip install py-spy)")
        for name, pid in pids.items():
            path = f"{prefix}-{name}.txt"
            self.procs.append((name, path, subprocess.Popen(
                [spy, "record", "--pid", str(pid), "--rate", "200", "--format", "raw", *PY_SPY_MODE,
                 "-o", path],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
        time.sleep(1.0)  # py-spy attaches

    def stop(self):
        for _, _, proc in self.procs:
            proc.send_signal(signal.SIGINT)
        for _, _, proc in self.procs:
            proc.wait()

    def summary(self, top=12):
        """Per process: the total of samples and the C{top} (function, share of samples) by own time."""
        result = {}
        for name, path, _ in self.procs:
            own, total = {}, 0
            try:
                with open(path) as f:
                    for line in f:
                        stack, _, count = line.rstrip().rpartition(" ")
                        if not count.isdigit():
                            continue
                        leaf = stack.rsplit(";", 1)[-1]
                        own[leaf] = own.get(leaf, 0) + int(count)
                        total += int(count)
            except OSError:
                continue
            ranked = sorted(own.items(), key=lambda kv: -kv[1])[:top]
            result[name] = (total, [(leaf, n / total) for leaf, n in ranked])
        return result


async def many_queued(reactor, platform, agent, count, profile=None):
    accepted = []
    all_accepted = defer.Deferred()

    def one(_):
        accepted.append(time.perf_counter())
        if len(accepted) == count:
            all_accepted.callback(None)

    spy = BurstProfile(profile, {"agent": agent.pid, "platform": os.getpid()}) if profile else None
    cpu0 = sum(proc_cpu(agent.pid)[:2])
    own0 = own_cpu()
    start = time.perf_counter()
    ids = []
    for _ in range(count):
        task_id = platform.submit({"command": "sleep 1000"})
        ids.append(task_id)
        platform.wait_for(task_id, P.ACCEPTED).addCallbacks(one, lambda f: one(None))
    submitted = time.perf_counter() - start
    await all_accepted
    accept_time = accepted[-1] - start
    cpu_to_accepted = sum(proc_cpu(agent.pid)[:2]) - cpu0
    own_to_accepted = own_cpu() - own0
    if spy is not None:
        spy.stop()
    rss_accepted = proc_status(agent.pid)
    # Let every QUEUED/RUNNING report arrive, then look again.
    await sleep(reactor, 1.0)
    rss_settled = proc_status(agent.pid)
    cpu_accept = sum(proc_cpu(agent.pid)[:2]) - cpu0
    states = {}
    for task_id in ids:
        s = platform.tasks[task_id].state
        states[s] = states.get(s, 0) + 1

    ended = []
    all_ended = defer.Deferred()

    def end(t):
        ended.append(time.perf_counter())
        if len(ended) == count:
            all_ended.callback(None)

    start = time.perf_counter()
    for task_id in ids:
        platform.wait_for(task_id).addCallback(end)
        platform.cancel(task_id)
    await all_ended
    cancel_time = ended[-1] - start
    final = {}
    for task_id in ids:
        s = platform.tasks[task_id].state
        final[s] = final.get(s, 0) + 1
    # The canceled tasks' processes must be gone.
    left = processes_in(agent.work_dir)
    for _ in range(50):
        if not left:
            break
        await sleep(reactor, 0.1)
        left = processes_in(agent.work_dir)
    return {
        "submit_loop_s": submitted,
        "accepted_s": accept_time,
        "agent_cpu_s": cpu_accept,
        "agent_cpu_to_accepted_s": cpu_to_accepted,
        "platform_cpu_to_accepted_s": own_to_accepted,
        "profile": spy.summary() if spy is not None else None,
        "rss_accepted": rss_accepted,
        "rss_settled": rss_settled,
        "states_before_cancel": states,
        "cancel_s": cancel_time,
        "final_states": final,
        "processes_left": left,
    }


# -- 5. outbox -------------------------------------------------------------------------


def _outbox_message(seq, index):
    return [P.TASK_STATE, f"j1-{index}-0", P.DONE, {
        "exitCode": 0, "stageInTime": 0.0, "runTime": 0.0012, "stageOutTime": 0.0,
        "outputs": [], "seq": seq, "time": 1700000000.123456,
    }]


async def outbox_rate(reactor, directory, fsync, count, per_commit):
    from everest_agent.outbox import Outbox

    if os.path.exists(directory):
        shutil.rmtree(directory)
    os.makedirs(directory)
    outbox = Outbox(directory, reactor, fsync=fsync)
    outbox.load()
    start = time.perf_counter()
    index = 0
    while index < count:
        last = None
        for _ in range(min(per_commit, count - index)):
            index += 1
            i = index
            last = outbox.put(lambda seq: _outbox_message(seq, i))[2]
        await last
    elapsed = time.perf_counter() - start
    outbox.stop()
    return count / elapsed


# -- main ------------------------------------------------------------------------------


async def main(reactor, args):
    from twisted.logger import FilteringLogObserver, LogLevel, LogLevelFilterPredicate
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from everest_agent import gcpolicy
    from everest_agent.platform import Platform, listen

    # This process is the platform's: run its collector as the reference
    # platform's own process does (everest_agent/platform/tap.py).
    gcpolicy.configure()
    out = Report(sys.stdout)
    only = set(args.only.split(",")) if args.only else {"1", "2", "3", "4", "5"}
    slots = args.slots
    base = TMPFS if args.tmpfs else (args.dir or DISK)
    root = tempfile.mkdtemp(prefix="everest-bench-", dir=base)
    work_root = tempfile.mkdtemp(prefix="everest-bench-tasks-", dir=args.work_dir) if args.work_dir else root
    log_file = open(os.path.join(root, "platform.log"), "w")
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(log_file),
                              [LogLevelFilterPredicate(LogLevel.info)])],
        redirectStandardIO=False,
    )

    out.line(f"everest-agent throughput benchmark: nproc {os.cpu_count()}, slots (max_tasks) {slots}, "
             f"Python {sys.version.split()[0]}, reactor {reactor.__class__.__name__}")
    out.line(f"work files (state directory, fsync on) in {root} ({filesystem(root)})")
    out.line(f"task directories in {work_root} ({filesystem(work_root)})")
    out.record("task_dir_filesystem", filesystem(work_root))
    if not args.tmpfs and "tmpfs" in (filesystem(root), filesystem(work_root)):
        out.line("   WARNING: a tmpfs without --tmpfs: these figures are not what an operator's disk gives")
    out.record("nproc", os.cpu_count())
    out.record("slots", slots)
    out.line(f"load before: {open('/proc/loadavg').read().strip()}")
    out.record("load_before", open("/proc/loadavg").read().strip())
    baseline = None

    if args.churn and ("2" in only):
        took = churn(work_root, args.churn)
        out.record("churn", {"directories": args.churn, "seconds": took})
        out.line(f"0. {args.churn:,} task directories created and removed first in {work_root} ({took:.1f} s, "
                 f"{took / args.churn * 1e6:,.0f} us each)")

    if "1" in only or "2" in only:
        await spawn_baseline(reactor, min(200, args.tasks), slots)  # warm up
        with MachineLoad() as raw_load:
            baseline = await spawn_baseline(reactor, args.tasks, slots)
        out.record("baseline_per_s", baseline)
        out.record("baseline_machine_cpu_ms", raw_load.busy / args.tasks * 1000)
        out.line(f"1. raw spawnProcess baseline: {args.tasks} x /bin/sh -c true, {slots} at once: "
                 f"{baseline:,.0f} processes/s (before the agent's run); the machine spent "
                 f"{raw_load.busy / args.tasks * 1000:.2f} ms of CPU per process, its cores "
                 f"{raw_load.share:.0%} busy")

    agent = None
    platform = None
    if only & {"2", "3", "4"}:
        platform = Platform({TOKEN: "bench"}, reactor, heartbeat=30,
                            files_dir=os.path.join(root, "platform-files"),
                            state_file=os.path.join(root, "platform-state.json") if args.platform_state else None)
        await listen(platform, reactor, 0)
        agent = AgentProcess(reactor, root, platform.ws_url, slots, profile=args.agent_profile,
                             work_root=work_root)
        agent.start()
        await platform.wait_connected()
        out.line(f"   agent pid {agent.pid} connected to {platform.ws_url}")
        if args.warmup:
            # Past its first keep_task_dirs tasks the agent empties finished
            # tasks' directories and uses them again (spares.py), as it does
            # through a long sweep; the figures are for that steady state.
            seconds, _, _ = await run_tasks(platform, args.warmup)
            out.line(f"   warm-up: {args.warmup} tasks through the agent first ({args.warmup / seconds:,.0f}/s), "
                     f"past its keep_task_dirs (1000): new tasks get used-again directories")

    try:
        if "2" in only:
            (user0, system0, tasks0, dirs0), cpu_own = agent_cpu(agent.pid), own_cpu()
            with MachineLoad() as load:
                seconds, states, run_times = await run_tasks(platform, args.tasks)
            rate = args.tasks / seconds
            user1, system1, tasks1, dirs1 = agent_cpu(agent.pid)
            cpu_own = own_cpu() - cpu_own
            cpu_user, cpu_system = user1 - user0, system1 - system0
            cpu_agent = cpu_user + cpu_system
            out.record("end_to_end_per_s", rate)
            out.record("end_to_end_states", states)
            out.record("end_to_end_agent_cpu_s", cpu_agent)
            out.record("end_to_end_directory_process_cpu_s", dirs1 - dirs0)
            out.record("end_to_end_platform_cpu_s", cpu_own)
            after = await spawn_baseline(reactor, args.tasks, slots)
            out.record("baseline_after_per_s", after)
            baseline = (baseline + after) / 2 if baseline else after
            ratio = rate / baseline if baseline else float("nan")
            out.record("ratio", ratio)
            out.line(f"2. end to end: {args.tasks} tasks submitted at once, all DONE in {seconds:.2f} s: "
                     f"{rate:,.0f} tasks/s; raw spawn after it {after:,.0f}/s; ratio to the mean of "
                     f"the two baselines ({baseline:,.0f}/s): {ratio:.2f}"
                     + out.goal(f">= {GOALS['ratio']}", ratio >= GOALS["ratio"]))
            out.line(f"   states {states}; CPU: agent {cpu_agent:.2f} s "
                     f"({cpu_agent / args.tasks * 1e6:,.0f} us/task: user {cpu_user / args.tasks * 1e6:,.0f}, "
                     f"system {cpu_system / args.tasks * 1e6:,.0f}), its directory process "
                     f"{(dirs1 - dirs0) / args.tasks * 1e6:,.0f} us/task; tasks {(tasks1 - tasks0) / args.tasks * 1e6:,.0f} us/task; "
                     f"platform+benchmark {cpu_own:.2f} s")
            # Where the ratio comes from: item 2 needs this much CPU per
            # task in all, item 1 that much per process, and the cores are
            # only so busy.
            out.record("end_to_end_machine_cpu_ms", load.busy / args.tasks * 1000)
            out.record("end_to_end_machine_busy", load.share)
            out.line(f"   the machine spent {load.busy / args.tasks * 1000:.2f} ms of CPU per task "
                     f"(every process: agent, directory process, tasks, platform), its cores "
                     f"{load.share:.0%} busy")
            slot_ms = slots * seconds / args.tasks * 1000
            run_p50 = percentile(run_times, 50) * 1000
            out.record("slot_cycle_ms", slot_ms)
            out.record("run_time_p50_ms", run_p50)
            out.line(f"   each slot was busy {slot_ms:.1f} ms per task; the task's process ran "
                     f"(runTime, p50) {run_p50:.1f} ms of it")

        if "3" in only:
            running, finished, bad, skipped = await latency(reactor, platform, args.samples)
            p50r, p99r = percentile(running, 50), percentile(running, 99)
            p50d, p99d = percentile(finished, 50), percentile(finished, 99)
            out.record("latency_running_ms", {"p50": p50r, "p99": p99r})
            out.record("latency_done_ms", {"p50": p50d, "p99": p99d})
            out.line(f"3. latency, idle agent, {args.samples} tasks one at a time: "
                     f"submit -> RUNNING p50 {p50r:.2f} ms, p99 {p99r:.2f} ms; "
                     f"submit -> DONE p50 {p50d:.2f} ms, p99 {p99d:.2f} ms"
                     + out.goal(f"p50 RUNNING < {GOALS['p50_running_ms']:g} ms",
                                p50r < GOALS["p50_running_ms"]))
            if skipped:
                out.line(f"   {skipped} tasks went from ACCEPTED to DONE without RUNNING (left out of the figures)")
                out.record("latency_skipped_running", skipped)
            if bad:
                out.line(f"   {len(bad)} tasks did not end DONE, e.g. {bad[0]}")
                out.record("problem", "latency")

        if "4" in only:
            r = await many_queued(reactor, platform, agent, args.queued, profile=args.burst_profile)
            rss = r["rss_settled"]["VmRSS"] / 2**20
            hwm = r["rss_settled"]["VmHWM"] / 2**20
            out.record("queued", {k: v for k, v in r.items()})
            out.line(f"4. {args.queued:,} x 'sleep 1000' submitted at once ({r['submit_loop_s']:.2f} s to send): "
                     f"all ACCEPTED after {r['accepted_s']:.2f} s"
                     + out.goal(f"< {GOALS['accepted_s']:g} s", r["accepted_s"] < GOALS["accepted_s"]))
            out.line(f"   agent RSS {r['rss_accepted']['VmRSS'] / 2**20:.0f} MiB when all ACCEPTED, "
                     f"{rss:.0f} MiB 1 s later (peak {hwm:.0f} MiB)"
                     + out.goal(f"< {GOALS['rss_mib']:g} MiB", hwm < GOALS["rss_mib"]))
            out.line(f"   until all ACCEPTED: agent CPU {r['agent_cpu_to_accepted_s']:.2f} s "
                     f"({r['agent_cpu_to_accepted_s'] / args.queued * 1e6:,.0f} us/task), platform+benchmark "
                     f"CPU {r['platform_cpu_to_accepted_s']:.2f} s "
                     f"({r['platform_cpu_to_accepted_s'] / args.queued * 1e6:,.0f} us/task)")
            out.line(f"   states before cancel {r['states_before_cancel']}; agent CPU {r['agent_cpu_s']:.2f} s "
                     "(until 1 s after all ACCEPTED)")
            for name, (samples, ranked) in (r["profile"] or {}).items():
                out.line(f"   {name} during the burst ({samples} samples), most own time:")
                for leaf, share in ranked:
                    out.line(f"      {share * 100:5.1f} %  {leaf[:150]}")
            ok = r["final_states"] == {P.CANCELED: args.queued} and not r["processes_left"]
            out.line(f"   canceled all in {r['cancel_s']:.2f} s: {r['final_states']}, "
                     f"task processes left: {len(r['processes_left'])}" + ("" if ok else "  [PROBLEM]"))
            if not ok:
                out.record("problem", "cancel")
    finally:
        if agent is not None:
            await agent.stop()
            problems = agent.log_problems()
            used = agent.log_value("Task directories used again: ")
            if used is not None:
                out.line(f"   task directories used again over the whole run (warm-up included): {used}")
                out.record("task_dirs_used_again", used)
            if problems:
                out.line(f"   agent log has {len(problems)} error lines, e.g.: {problems[0][:200]}")
                out.record("agent_log_errors", len(problems))
            if args.agent_profile:
                out.line(f"   agent profile written to {args.agent_profile}")
        if platform is not None:
            if platform.violations:
                out.line(f"   platform saw {len(platform.violations)} contract violations: "
                         f"{platform.violations[0]}")
                out.record("violations", len(platform.violations))
            await platform.close()

    if "5" in only:
        d = os.path.join(root, "outbox")
        rates = {}
        for fsync in (True, False):
            for per_commit in (1, 100):
                rates[(fsync, per_commit)] = await outbox_rate(
                    reactor, d, fsync, args.outbox_messages // (10 if per_commit == 1 else 1), per_commit)
        out.record("outbox_per_s", {f"fsync={k[0]},per_commit={k[1]}": v for k, v in rates.items()})
        out.line("5. outbox (Outbox.put until durable), messages/s:")
        out.line(f"   one message per commit: fsync {rates[(True, 1)]:>10,.0f}   no fsync {rates[(False, 1)]:>10,.0f}")
        out.line(f"   100 messages per commit: fsync {rates[(True, 100)]:>9,.0f}   no fsync {rates[(False, 100)]:>10,.0f}")

    load_after = open("/proc/loadavg").read().strip()
    out.record("load_after", load_after)
    out.line(f"load after: {load_after} (the machine may be shared: other work shows here)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out.results, f, indent=2, default=str)
        out.line(f"results written to {args.json}")
    log_file.close()
    if args.keep:
        out.line(f"kept {root}" + (f" and {work_root}" if work_root != root else ""))
    else:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(work_root, ignore_errors=True)
    if out.results.get("problem") or out.results.get("violations") or out.results.get("agent_log_errors"):
        raise SystemExit(1)


def parse_args(argv=None):
    cpus = os.cpu_count() or 1
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=3000, help="N for items 1 and 2 (default 3000)")
    parser.add_argument("--slots", type=int, default=2 * cpus,
                        help=f"the agent's max_tasks and the baseline's concurrency (default 2 x cores = {2 * cpus})")
    parser.add_argument("--samples", type=int, default=200, help="tasks for the latency figures (default 200)")
    parser.add_argument("--queued", type=int, default=10000, help="tasks submitted at once in item 4 (default 10000)")
    parser.add_argument("--outbox-messages", type=int, default=50000,
                        help="messages for item 5 (a tenth of them one per commit; default 50000)")
    parser.add_argument("--only", help="comma-separated items to run, e.g. 1,2 (default: all)")
    parser.add_argument("--platform-state", action="store_true",
                        help="give the platform a state file (snapshots written before each ACK)")
    parser.add_argument("--agent-profile", metavar="FILE",
                        help="run the agent under cProfile (twistd --profile) and save the stats in FILE")
    parser.add_argument("--burst-profile", metavar="PREFIX",
                        help="item 4: sample the agent and the platform with py-spy while the burst is "
                             "accepted (PREFIX-agent.txt, PREFIX-platform.txt; a summary is printed)")
    parser.add_argument("--dir", help=f"where to make the temporary directory (default: {DISK}, the ordinary disk)")
    parser.add_argument(
        "--work-dir", default=None,
        help="where the agent's task directories go (default: beside the state directory, on the "
             "ordinary disk, as an operator's work_dir and state_dir are)")
    parser.add_argument("--tmpfs", action="store_true",
                        help=f"put the state and task directories on a tmpfs ({TMPFS}) instead")
    parser.add_argument("--churn", type=int, default=50000,
                        help="task directories to create and remove on the task directories' file system "
                             "before item 2 (default 50000; 0 for none)")
    parser.add_argument("--warmup", type=int, default=1500,
                        help="tasks run through the agent before items 2-4, so it is past its first "
                             "keep_task_dirs (1000) and uses directories again, as through a long sweep "
                             "(default 1500; 0 for a cold agent)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, state)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    args = parser.parse_args(argv)
    if args.agent_profile:
        args.agent_profile = os.path.abspath(args.agent_profile)
    return args


if __name__ == "__main__":
    arguments = parse_args()
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, arguments)))
