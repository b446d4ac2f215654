"""
N trivial tasks on the real Grid Engine: through the agent's SGE handler
against a plain qsub loop (the baseline, measured in the same run), as a
ratio, with the scheduler commands the handler ran per poll cycle.

    python benchmarks/sge.py [-n 20] [--runs 3] [--bin /opt/gridengine/bin]

Needs the Grid Engine of .ci/setup-sge.sh.  Prints the machine load with
every figure.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

from twisted.internet import defer, task

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from everest_agent.handlers.command import run_command  # noqa: E402
from everest_agent.handlers.sge import SgeTaskHandler  # noqa: E402
from everest_agent.interfaces import JobRequest  # noqa: E402


def load():
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


def baseline(sge_bin, n, base):
    """qsub n trivial jobs, then wait until qstat lists none of them."""
    started = time.monotonic()
    ids = []
    for i in range(n):
        out = subprocess.run([os.path.join(sge_bin, "qsub"), "-terse", "-b", "y", "-j", "y", "-o", "/dev/null",
                              "-N", f"bench{i}", "-wd", base, "true"], capture_output=True, text=True, check=True)
        ids.append(out.stdout.strip())
    while True:
        listed = subprocess.run([os.path.join(sge_bin, "qstat"), "-xml"], capture_output=True, text=True).stdout
        if not any(f"<JB_job_number>{i}</JB_job_number>" in listed for i in ids):
            return time.monotonic() - started
        time.sleep(0.2)


async def through_agent(reactor, sge_bin, n, base, poll_interval):
    counted = []

    def run(reactor, argv, **kwargs):
        counted.append(os.path.basename(argv[0]))
        return run_command(reactor, argv, **kwargs)

    handler = SgeTaskHandler(reactor, command_dir=sge_bin, poll_interval=poll_interval, run=run, max_submit=16)
    handler.startService()
    started = reactor.seconds()
    requests = []
    for i in range(n):
        task_id = f"b{i}-{uuid.uuid4().hex[:8]}"
        directory = os.path.join(base, task_id)
        os.makedirs(directory)
        requests.append(JobRequest(task_id, directory, "true", {}, {}))
    jobs = await defer.gatherResults([handler.submit(r) for r in requests])
    submits = len(counted)
    await defer.gatherResults([job.result for job in jobs])
    elapsed = reactor.seconds() - started
    await handler.stopService()
    per_poll = (len(counted) - submits) / max(1, handler.polls)
    return elapsed, per_poll, handler.polls


async def main(reactor, argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--bin", default=os.environ.get("SGE_BIN", "/opt/gridengine/bin"))
    parser.add_argument("--poll-interval", type=float, default=1.0)
    args = parser.parse_args(argv)
    plain, agent, per_poll = [], [], []
    for run_number in range(args.runs):
        with tempfile.TemporaryDirectory() as base:
            plain.append(baseline(args.bin, args.n, base))
            elapsed, commands, polls = await through_agent(reactor, args.bin, args.n, base, args.poll_interval)
            agent.append(elapsed)
            per_poll.append(commands)
        print(f"run {run_number + 1}: qsub loop {plain[-1]:.2f} s, agent {agent[-1]:.2f} s, "
              f"{commands:.2f} commands per poll over {polls} polls (load {load()})")
    p, a = statistics.median(plain), statistics.median(agent)
    print(f"median of {args.runs}, {args.n} trivial tasks: qsub loop {p:.2f} s, agent {a:.2f} s, "
          f"ratio agent/loop {a / p:.2f}; scheduler commands per poll {statistics.median(per_poll):.2f} "
          f"(load {load()})")


if __name__ == "__main__":
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, sys.argv[1:])))
