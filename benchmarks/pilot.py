#!/usr/bin/env python3
"""
Pilot mode on the real SLURM: how many short tasks a second through a few
batch jobs, against the same tasks through the local handler and against
raw process spawns, all measured in this one run.

1. raw baseline: N x ``/bin/sh -c true`` through ``reactor.spawnProcess``,
   ``concurrency`` at once;
2. the local handler (``max_tasks = concurrency``): N tasks ``true``, first
   submit to last DONE, as the reference platform sees them;
3. pilot mode (``[handler] type = slurm``, ``max_pilots`` pilots of
   ``cores`` cores, ``max_tasks = concurrency``): the same N tasks, timed
   from the first submit (pilots submitted on demand, their start in the
   queue included) and, separately, once the pilots are warm;
4. dispatch latency in a warm pilot, one task at a time: submit -> RUNNING;
5. plain ``sbatch --wrap true``, M jobs submitted and waited for (the
   scheduler's own rate, as benchmarks/slurm.py measures it);
6. B tasks submitted at once in pilot mode: time to every ACCEPTED, the
   agent's peak RSS, and that all complete;
7. scheduler commands: pilot jobs submitted (one sbatch each); the agent's
   and the pilots' CPU seconds per task.

Run from the project's root on a machine with SLURM::

    python benchmarks/pilot.py                      # 20,000 tasks, 100,000 at once
    python benchmarks/pilot.py --tasks 5000 --big 20000 --sbatch 200

It prints figures with their ratios and the machine's load; nothing here is
a test.
"""

import argparse
import glob
import os
import statistics
import subprocess
import sys
import tempfile
import time

from twisted.internet import defer, task

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import throughput as T  # noqa: E402

from everest_agent import protocol as P  # noqa: E402


def load():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


class PilotAgent(T.AgentProcess):
    """The benchmark's agent process, in pilot mode on SLURM."""

    def __init__(self, reactor, root, url, slots, cores, pilots, work_root):
        super().__init__(reactor, root, url, slots, work_root=work_root)
        with open(self.ini) as f:
            text = f.read()
        text = text.replace(
            "[handler]\ntype = local\n",
            "[handler]\ntype = slurm\npoll_interval = 2\n"
            f"[pilot]\nenabled = yes\nmax_pilots = {pilots}\ncores = {cores}\nwalltime = 3600\n"
            "idle_timeout = 600\nlisten = 127.0.0.1:0\nadvertise_address = 127.0.0.1\n",
        )
        T.write_private(self.ini, text)

    def pilot_jobs(self):
        return sorted(glob.glob(os.path.join(self.state_dir, "pilots", "*", "secret")))

    def pilot_workers(self):
        found = []
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if argv[1:3] == [b"-m", b"everest_agent.pilot"] and self.state_dir.encode() in b" ".join(argv):
                found.append(int(name))
        return found

    def cancel_pilots(self):
        ids = []
        for path in glob.glob(os.path.join(self.state_dir, "pilots", "pilots.json")):
            import json

            with open(path) as f:
                ids = [p["jobId"] for p in json.load(f)["pilots"].values() if p.get("jobId")]
        if ids:
            subprocess.run(["scancel", *ids], capture_output=True)


def cpu_of(pids):
    """CPU seconds of C{pids} and their children (an agent's: its directory process too)."""
    pids = list(pids)
    for pid in list(pids):
        pids.extend(T.children_running(pid, "everest_agent.dirworker"))
    total = 0.0
    for pid in pids:
        try:
            user, system, children = T.proc_cpu(pid)
        except OSError:
            continue
        total += user + system + children
    return total


async def sbatch_rate(reactor, count, root):
    """C{count} plain C{sbatch --wrap true} jobs: submitted one after the other, waited for."""
    name = f"evbench{os.getpid()}"
    start = time.perf_counter()
    for _ in range(count):
        subprocess.run(["sbatch", "--parsable", "-J", name, "-o", "/dev/null", "--wrap", "true"],
                       check=True, capture_output=True, cwd=root)
    while True:
        out = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i"], capture_output=True, text=True).stdout
        if not out.strip():
            break
        await T.sleep(reactor, 0.2)
    return count / (time.perf_counter() - start)


async def wait_accepted(platform, ids):
    for task_id in ids:
        await platform.wait_for(task_id, P.ACCEPTED)


async def main(reactor, args):
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from everest_agent import gcpolicy
    from everest_agent.platform import Platform, listen

    gcpolicy.configure()  # this process is the platform's (as everest_agent/platform/tap.py does)
    root = tempfile.mkdtemp(prefix="everest-pilot-bench-")
    work_root = tempfile.mkdtemp(prefix="everest-pilot-tasks-", dir=args.work_dir)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(open(os.path.join(root, "platform.log"), "w"))],
                                     redirectStandardIO=False)
    out = T.Report(sys.stdout)
    c = args.concurrency
    out.line(f"pilot benchmark: nproc {os.cpu_count()}, concurrency {c} ({args.pilots} pilots x {args.cores} cores), "
             f"{args.tasks} tasks, {args.runs} runs; load at start {load()}")
    raw, local, pilot_cold, pilot_warm, p50s, sb = [], [], [], [], [], []
    agent_cpu = pilot_cpu = None
    if args.latency_only:
        await latency_runs(reactor, args, root, work_root, out)
        return
    if args.big_only:
        await big_only(reactor, args, root, work_root, out)
        return
    for run in range(args.runs):
        raw.append(await T.spawn_baseline(reactor, args.tasks, c))
        out.line(f"run {run + 1}: raw spawnProcess x{c}: {raw[-1]:.0f}/s (load {load()})")

        platform = Platform({T.TOKEN: "agent"}, reactor)
        port = await listen(platform, reactor, 0)
        url = f"ws://127.0.0.1:{port.getHost().port}/compute/agent/v1"
        sub = os.path.join(root, f"local{run}")
        os.makedirs(sub)
        agent = T.AgentProcess(reactor, sub, url, c, work_root=os.path.join(work_root, f"l{run}"))
        agent.start()
        await platform.wait_connected()
        seconds, states, _ = await T.run_tasks(platform, args.tasks)
        local.append(args.tasks / seconds)
        out.line(f"run {run + 1}: local handler x{c}: {local[-1]:.0f}/s {states} (load {load()})")
        await agent.stop()
        await port.stopListening()

        platform = Platform({T.TOKEN: "agent"}, reactor)
        port = await listen(platform, reactor, 0)
        url = f"ws://127.0.0.1:{port.getHost().port}/compute/agent/v1"
        sub = os.path.join(root, f"pilot{run}")
        os.makedirs(sub)
        agent = PilotAgent(reactor, sub, url, c, args.cores, args.pilots, os.path.join(work_root, f"p{run}"))
        agent.start()
        try:
            await platform.wait_connected()
            seconds, states, _ = await T.run_tasks(platform, args.tasks)
            pilot_cold.append(args.tasks / seconds)
            a0, p0 = cpu_of([agent.pid]), cpu_of(agent.pilot_workers())
            seconds, states, _ = await T.run_tasks(platform, args.tasks)
            pilot_warm.append(args.tasks / seconds)
            agent_cpu = (cpu_of([agent.pid]) - a0) / args.tasks
            pilot_cpu = (cpu_of(agent.pilot_workers()) - p0) / args.tasks
            out.line(f"run {run + 1}: pilots x{c}: {pilot_cold[-1]:.0f}/s from cold (pilot start included), "
                     f"{pilot_warm[-1]:.0f}/s warm {states}; pilot jobs submitted {len(agent.pilot_jobs())} "
                     f"(load {load()})")
            running, _, bad, _ = await T.latency(reactor, platform, args.samples)
            p50s.append(T.percentile(running, 50))
            out.line(f"run {run + 1}: warm pilot submit->RUNNING p50 {p50s[-1]:.2f} ms, "
                     f"p99 {T.percentile(running, 99):.2f} ms ({len(bad)} bad)")
            if run == args.runs - 1 and args.big:
                await big_burst(platform, agent, args.big, out)
        finally:
            await agent.stop()
            agent.cancel_pilots()
            await port.stopListening()
        if args.sbatch:
            sb.append(await sbatch_rate(reactor, args.sbatch, root))
            out.line(f"run {run + 1}: plain sbatch: {sb[-1]:.1f} jobs/s (load {load()})")

    med = statistics.median
    out.line("")
    out.line(f"medians over {args.runs} runs (load at end {load()}):")
    out.line(f"  raw spawnProcess x{c}      {med(raw):8.0f}/s")
    out.line(f"  local handler x{c}         {med(local):8.0f}/s")
    out.line(f"  pilots warm x{c}           {med(pilot_warm):8.0f}/s  = {med(pilot_warm) / med(local):.2f} of local "
             f"(goal 0.8), {med(pilot_warm) / med(raw):.2f} of raw spawn (goal 0.4)")
    out.line(f"  pilots from cold x{c}      {med(pilot_cold):8.0f}/s  = {med(pilot_cold) / med(local):.2f} of local, "
             f"{med(pilot_cold) / med(raw):.2f} of raw spawn")
    if sb:
        out.line(f"  plain sbatch              {med(sb):8.1f}/s  -> pilots warm are {med(pilot_warm) / med(sb):.0f}x "
                 "(goal 10x)")
    out.line(f"  warm submit->RUNNING p50  {med(p50s):8.2f} ms (goal < 10 ms)")
    if agent_cpu is not None:
        out.line(f"  CPU per task: agent {agent_cpu * 1000:.2f} ms (with its directory process), pilots {pilot_cpu * 1000:.2f} ms "
                 "(pilots: worker and its tasks' wrappers)")


async def big_burst(platform, agent, count, out):
    """
    C{count} tasks C{true} submitted at once: the time until the platform
    holds every C{ACCEPTED}, until every one ended, the agent's peak RSS,
    and the CPU per task of the agent, of the pilots and of this process
    (the platform and the benchmark) over the whole burst.
    """
    ids = []
    a0, p0, own0 = cpu_of([agent.pid]), cpu_of(agent.pilot_workers()), T.own_cpu()
    start = time.perf_counter()
    for _ in range(count):
        ids.append(platform.submit({"command": "true"}))
    submitted = time.perf_counter() - start
    await wait_accepted(platform, ids)
    accepted = time.perf_counter() - start
    rss_accepted = T.proc_status(agent.pid)
    a1, own1 = cpu_of([agent.pid]), T.own_cpu()
    for task_id in ids:
        await platform.wait_for(task_id)
    total = time.perf_counter() - start
    done = sum(1 for t in ids if platform.task(t).state == P.DONE)
    rss = T.proc_status(agent.pid)
    agent_ms = (cpu_of([agent.pid]) - a0) / count * 1000
    pilot_ms = (cpu_of(agent.pilot_workers()) - p0) / count * 1000
    own_ms = (T.own_cpu() - own0) / count * 1000
    out.line(f"{count} at once ({submitted:.1f} s to send): all ACCEPTED in {accepted:.1f} s "
             f"(goal < 30 s; agent CPU {(a1 - a0) / count * 1e6:.0f} us/task, platform+benchmark "
             f"{(own1 - own0) / count * 1e6:.0f} us/task until then), all ended in {total:.1f} s "
             f"({done} DONE), agent RSS {rss_accepted['VmRSS'] / 2**20:.0f} MiB when all ACCEPTED, "
             f"peak {rss['VmHWM'] / 2**20:.0f} MiB (goal < 400 MiB) (load {load()})")
    out.line(f"   CPU per task over the burst: agent {agent_ms:.2f} ms, pilots {pilot_ms:.2f} ms "
             f"(worker and its tasks' wrappers), platform+benchmark {own_ms:.2f} ms")


async def big_only(reactor, args, root, work_root, out):
    """Only the burst of C{args.big} tasks (6.), on warm pilots."""
    from everest_agent.platform import Platform, listen

    platform = Platform({T.TOKEN: "agent"}, reactor)
    port = await listen(platform, reactor, 0)
    url = f"ws://127.0.0.1:{port.getHost().port}/compute/agent/v1"
    sub = os.path.join(root, "big")
    os.makedirs(sub)
    agent = PilotAgent(reactor, sub, url, args.concurrency, args.cores, args.pilots,
                       os.path.join(work_root, "big"))
    agent.start()
    try:
        await platform.wait_connected()
        await T.run_tasks(platform, 4 * args.concurrency)  # the pilots started and warm
        await big_burst(platform, agent, args.big, out)
    finally:
        await agent.stop()
        agent.cancel_pilots()
        await port.stopListening()


async def latency_runs(reactor, args, root, work_root, out):
    """Only the warm dispatch latency (4.), C{args.runs} times, with the CPU per task it costs."""
    from everest_agent.platform import Platform, listen

    p50s, p99s, agent_ms, pilot_ms = [], [], [], []
    for run in range(args.runs):
        platform = Platform({T.TOKEN: "agent"}, reactor)
        port = await listen(platform, reactor, 0)
        url = f"ws://127.0.0.1:{port.getHost().port}/compute/agent/v1"
        sub = os.path.join(root, f"latency{run}")
        os.makedirs(sub)
        agent = PilotAgent(reactor, sub, url, args.concurrency, args.cores, args.pilots,
                           os.path.join(work_root, f"q{run}"))
        agent.start()
        try:
            await platform.wait_connected()
            await T.run_tasks(platform, 4 * args.concurrency)  # the pilots started and warm
            a0, p0 = cpu_of([agent.pid]), cpu_of(agent.pilot_workers())
            running, _, bad, skipped = await T.latency(reactor, platform, args.samples)
            count = len(running) + len(bad) + skipped
            agent_ms.append((cpu_of([agent.pid]) - a0) / count * 1000)
            pilot_ms.append((cpu_of(agent.pilot_workers()) - p0) / count * 1000)
            p50s.append(T.percentile(running, 50))
            p99s.append(T.percentile(running, 99))
            out.line(f"run {run + 1}: warm pilot submit->RUNNING p50 {p50s[-1]:.2f} ms, p99 {p99s[-1]:.2f} ms "
                     f"({len(running)} samples, {len(bad)} bad); CPU per task agent {agent_ms[-1]:.2f} ms, "
                     f"pilots {pilot_ms[-1]:.2f} ms (load {load()})")
        finally:
            await agent.stop()
            agent.cancel_pilots()
            await port.stopListening()
    med = statistics.median
    out.line(f"medians over {args.runs} runs (load at end {load()}): submit->RUNNING p50 {med(p50s):.2f} ms "
             f"(goal < 10 ms), p99 {med(p99s):.2f} ms; CPU per task agent {med(agent_ms):.2f} ms, "
             f"pilots {med(pilot_ms):.2f} ms")


def parse_args(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--pilots", type=int, default=2)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--big", type=int, default=100000, help="tasks submitted at once (0: skip)")
    parser.add_argument("--sbatch", type=int, default=500, help="plain sbatch jobs (0: skip)")
    parser.add_argument("--work-dir", default=getattr(T, "DEFAULT_WORK_DIR", None),
                        help="where task directories go (default: the temporary directory)")
    parser.add_argument("--big-only", action="store_true",
                        help="only the --big tasks submitted at once (6.), on warm pilots")
    parser.add_argument("--latency-only", action="store_true",
                        help="only the warm submit->RUNNING latency, --runs times (with its CPU per task)")
    args = parser.parse_args(argv)
    args.concurrency = args.pilots * args.cores
    return args


if __name__ == "__main__":
    arguments = parse_args()
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, arguments)))
