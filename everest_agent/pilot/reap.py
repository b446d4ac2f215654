"""
C{python -m everest_agent.pilot.reap PILOT_ID}: run by a pilot's job script
after the pilot's worker has exited, however it exited.

A task runs in a session of its own (the local handler's wrapper), so when
the worker dies (C{kill -9}, out of memory) its tasks are re-parented and a
scheduler that tracks a job by its process tree no longer sees them: they
would outlive the job.  This finds the wrappers of that pilot's tasks (the
local handler's mark in their command line, the pilot's id in their
environment) and kills their process groups, so the job ends clean and no
task runs on without a pilot to report it.  The agent reports them as it
reports any task of a lost pilot.
"""

import os
import signal
import sys

from everest_agent.handlers.local import MARK


def pilot_tasks(pilot_id, proc="/proc"):
    """Pids of the task wrappers started by pilot C{pilot_id} that still run."""
    wanted = f"EVEREST_PILOT_ID={pilot_id}".encode()
    found = []
    for name in os.listdir(proc):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(os.path.join(proc, name, "cmdline"), "rb") as f:
                argv = f.read().split(b"\0")
            if len(argv) < 4 or argv[1] != b"-c" or argv[3] != MARK.encode():
                continue
            with open(os.path.join(proc, name, "environ"), "rb") as f:
                if wanted not in f.read().split(b"\0"):
                    continue
        except OSError:
            continue
        found.append(int(name))
    return found


def reap(pilot_id, proc="/proc"):
    """Kill the process group of each of the pilot's task wrappers; @return: how many."""
    mine = os.getpgid(0)
    count = 0
    for pid in pilot_tasks(pilot_id, proc):
        try:
            group = os.getpgid(pid)
            if group != mine:
                os.killpg(group, signal.SIGKILL)
                count += 1
        except ProcessLookupError:
            pass
    return count


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not argv[0]:
        print("usage: python -m everest_agent.pilot.reap PILOT_ID", file=sys.stderr)
        return 2
    count = reap(argv[0])
    if count:
        print(f"everest pilot {argv[0]}: killed {count} tasks its worker left", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
