"""
C{python -m everest_agent.pilot.guard [--grace SECONDS] -- WORKER ARGV...}:
what a pilot's job runs (C{exec}'d by the job command), so that no task
outlives its pilot's job.  Linux only.

A task runs in a session and process group of its own (the local
handler's wrapper, which the worker uses), so when the scheduler ends the
pilot's job (SLURM's C{scancel} or walltime, Grid Engine's C{qdel} or
C{h_rt}: Grid Engine kills the job's process group, SLURM's
C{proctrack/linuxproc} the processes descended from the job) or the
worker alone is killed, the task's processes could run on outside the
job, re-parented to init, with nobody to report them.  The guard:

 - makes itself a child subreaper (C{prctl(PR_SET_CHILD_SUBREAPER)}): a
   process orphaned by the worker's death is re-parented to the guard,
   not to init, and so stays in the job's process tree;
 - starts the worker as its child, with a parent-death signal
   (C{PR_SET_PDEATHSIG}, SIGKILL): the worker never outlives the guard;
 - then leaves the job's process group (C{setpgid(0, 0)}): a group-wide
   SIGKILL from the scheduler kills the worker and the job's shell, not
   the guard.  SIGTERM, SIGINT or SIGHUP to the guard is forwarded to the
   worker as SIGTERM;
 - reaps whatever is re-parented to it while the worker runs (the
   background processes a finished task left);
 - once the worker has ended, however it ended, sends SIGTERM to the
   process group of each of its remaining children (the task wrappers the
   worker left, and whatever they leave in turn), then SIGKILL after
   C{--grace} seconds, reaping them, until it has no child left (or
   L{KILL_WAIT} seconds after the SIGKILL);
 - exits with the worker's status, 128 + the signal's number for a worker
   killed by a signal, so the batch handler sees what happened.

It never signals a group that is not a task's: only the groups of its own
children, read while they are unreaped (a child's pid, and so its group's
id, cannot be reused before the guard reaps it: reaping and signalling
happen in one thread, one after the other), never the job's group or its
own (a child in one of those is signalled alone).  Signals to the guard are
taken with C{sigtimedwait}, not handlers, for the same reason.

A task that finished but left background processes (C{cmd &}) has them
killed when the pilot ends, like the tasks still running.

Where there is no C{prctl} (not Linux) or it fails, the guard says so on
its standard error and C{exec}s the worker: the pilot runs unguarded, as
before.  If the guard leads the job's process group (a job command run by
the job's first process itself), it cannot leave it, and says so; a
group-wide kill then ends it with the worker, and the tasks run on.  So do
they if the guard alone is killed with SIGKILL (its worker dies with it,
by the death signal).

It imports no Twisted: it is started for every pilot job and must start
fast.
"""

import os
import signal
import sys
import time

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

#: Seconds between the SIGTERM and the SIGKILL to what the worker left, by default.
DEFAULT_GRACE = 2.0
#: Seconds the guard waits for its children after the SIGKILL before it
#: gives up on them and exits (a process stuck in the kernel).
KILL_WAIT = 5.0
#: Longest wait between two looks at the guard's children.
POLL = 0.1
#: Signals to the guard that end the worker (forwarded as SIGTERM).
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

USAGE = "usage: python -m everest_agent.pilot.guard [--grace SECONDS] -- WORKER ARGV..."


def _say(text):
    try:
        os.write(2, f"everest pilot guard {os.getpid()}: {text}\n".encode("utf-8", "replace"))
    except OSError:
        pass


def parse_args(argv):
    """
    C{(grace, worker argv)} from the guard's arguments.

    @raise ValueError: if they are not C{[--grace SECONDS] -- WORKER...}.
    """
    grace = DEFAULT_GRACE
    argv = list(argv)
    while argv and argv[0] != "--":
        option = argv.pop(0)
        if option == "--grace" and argv:
            value = argv.pop(0)
        elif option.startswith("--grace="):
            value = option[len("--grace="):]
        else:
            raise ValueError(f"unknown argument {option!r}")
        grace = float(value)
        if not 0 <= grace < float("inf"):
            raise ValueError(f"--grace must be a number of seconds >= 0, not {value!r}")
    if len(argv) < 2:
        raise ValueError("no worker command after --")
    return grace, argv[1:]


def exit_status(wait_status):
    """The shell's exit status for a wait status: the exit code, or 128 + the signal."""
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return os.WEXITSTATUS(wait_status)


def load_prctl():
    """libc's C{prctl} through ctypes, or None where there is none (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


def children(pid):
    """
    The pids of process C{pid}'s children, zombies included: from
    C{/proc/PID/task/PID/children} where the kernel has it, else from every
    C{/proc/*/stat}.  (Either may miss a child born or re-parented during
    the read: the caller looks again.)
    """
    try:
        with open(f"/proc/{pid}/task/{pid}/children", "rb") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        pass
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: split after its last ')'.
        fields = stat[stat.rindex(b")") + 2:].split()
        if int(fields[1]) == pid:
            found.append(int(name))
    return found


class Guard:
    """
    One run of the guard over one worker (L{run}).

    @ivar worker: the worker's pid.
    @ivar status: the worker's wait status, once reaped.
    @ivar job_group: the process group the guard started in (the job's).
    """

    def __init__(self, command, grace, prctl):
        self.command = command
        self.grace = grace
        self.prctl = prctl
        self.pid = os.getpid()
        self.job_group = os.getpgrp()
        self.worker = None
        self.status = None
        self.signals = set(FORWARDED) | {signal.SIGCHLD}

    def run(self):
        """Run the worker to its end, then end what it left; @return: the exit status."""
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, self.signals)
        self.worker = self._start_worker(old_mask)
        self._leave_job_group()
        terminated = False
        while self._reap() and self.status is None:
            info = signal.sigtimedwait(self.signals, 1.0)
            if info is not None and info.si_signo in FORWARDED:
                if not terminated:
                    _say(f"got {signal.Signals(info.si_signo).name}: sending SIGTERM to the worker {self.worker}")
                terminated = True
                # Not reaped yet (only this loop reaps): the pid is still the worker's.
                os.kill(self.worker, signal.SIGTERM)
        self._end_leftovers()
        if self.status is None:  # cannot be (the worker is our child, reaped by us): say it failed
            return 1
        return exit_status(self.status)

    def _start_worker(self, old_mask):
        try:
            pid = os.fork()
        except OSError as e:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            sys.exit(exec_worker(self.command, f"cannot fork the worker: {e.strerror or e}"))
        if pid:
            return pid
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            for sig in (signal.SIGPIPE, signal.SIGXFSZ):  # as Python left them: back to the defaults
                signal.signal(sig, signal.SIG_DFL)
            self.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != self.pid:  # the guard died before the death signal was set
                os._exit(1)
            os.execvp(self.command[0], self.command)
        except BaseException as e:
            _say(f"cannot start the worker {self.command[0]!r}: {e}")
        finally:
            os._exit(127)

    def _leave_job_group(self):
        if self.job_group == self.pid:
            _say("it leads the job's process group and cannot leave it: a kill of the whole group "
                 "ends it with the worker")
            return
        try:
            os.setpgid(0, 0)
        except OSError as e:
            _say(f"cannot leave the job's process group: {e.strerror or e}")
        # Now in a background group of the job's session, if it has a terminal.
        signal.signal(signal.SIGTTOU, signal.SIG_IGN)

    def _reap(self):
        """Reap every child that has ended (noting the worker's status); @return: whether any is left."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return False
            if pid == 0:
                return True
            if pid == self.worker:
                self.status = status

    def _end_leftovers(self):
        """SIGTERM, then SIGKILL after the grace, to the groups of the guard's children, until none is left."""
        spared = {os.getpgrp(), self.job_group, 0, 1}
        sent = set()  # (signal, "group" or "pid", id)
        kill_at = time.monotonic() + self.grace
        give_up_at = None
        reported = False
        while self._reap():
            now = time.monotonic()
            if give_up_at is None and now >= kill_at:
                give_up_at = now + KILL_WAIT
            if give_up_at is not None and now >= give_up_at:
                left = children(self.pid)
                _say(f"{len(left)} processes the worker left did not end after SIGKILL: {left}; exiting")
                return
            sig = signal.SIGTERM if give_up_at is None else signal.SIGKILL
            # Nothing is reaped between this listing and the signals: each pid
            # listed is an unreaped child, and so is its group's id not free
            # for another group.
            targets = []
            for child in children(self.pid):
                try:
                    group = os.getpgid(child)
                except OSError:
                    continue  # (not a child of ours after all)
                target = (sig, "pid", child) if group in spared else (sig, "group", group)
                if target not in sent and target not in targets:
                    targets.append(target)
            if targets and not reported:
                groups = len([t for t in targets if t[1] == "group"])
                alone = len(targets) - groups
                _say(f"the worker ended ({self._describe()}); process groups it left: {groups}"
                     + (f", processes in the job's group: {alone}" if alone else "")
                     + f" (SIGTERM, then SIGKILL after {self.grace:g} s)")
                reported = True
            for target in targets:
                sent.add(target)
                try:
                    if target[1] == "group":
                        os.killpg(target[2], sig)
                    else:
                        os.kill(target[2], sig)
                except OSError:
                    pass
            signal.sigtimedwait(self.signals, POLL)

    def _describe(self):
        if self.status is None:
            return "status unknown"
        if os.WIFSIGNALED(self.status):
            return f"killed by signal {os.WTERMSIG(self.status)}"
        return f"exit code {os.WEXITSTATUS(self.status)}"


def exec_worker(command, why):
    """Run the worker in the guard's place: the pilot goes unguarded."""
    _say(f"{why}; running the worker unguarded")
    try:
        os.execvp(command[0], command)
    except OSError as e:
        _say(f"cannot start the worker {command[0]!r}: {e.strerror or e}")
        return 127


def main(argv=None):
    try:
        grace, command = parse_args(sys.argv[1:] if argv is None else argv)
    except ValueError as e:
        print(f"{USAGE}\n{e}", file=sys.stderr)
        return 2
    prctl = load_prctl()
    if prctl is None:
        return exec_worker(command, "no prctl here (Linux only)")
    if prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        import ctypes

        return exec_worker(command, f"cannot become a child subreaper: {os.strerror(ctypes.get_errno())}")
    return Guard(command, grace, prctl).run()


if __name__ == "__main__":
    sys.exit(main())
