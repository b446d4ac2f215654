"""
Running tasks as processes on this machine.

Each task runs detached from the agent, in a session (and process group) of
its own, through a small shell wrapper::

    /bin/sh -c WRAPPER everest-task TASK_DIR COMMAND

started with C{posix_spawn} and C{POSIX_SPAWN_SETSID}, standard input from
C{/dev/null} and standard output and error onto the files C{stdout} and
C{stderr} (their bytes never pass through the agent), which the agent
opens empty through a descriptor of the task directory, never through a
link an earlier run of the same task id left: a regular file of one link
there is truncated, anything else replaced by a fresh file
(L{everest_agent.spares.open_output}).  The
wrapper C{cd}s to the task directory (given as descriptor 3), marks in
C{.everest/exitcode} that the command is beginning
(L{jobscript.started_writer}), runs COMMAND in a
subshell (a fork of the wrapper, not a second shell to load: the wrapper's
C{$1}/C{$2} are cleared first), and as its last act writes the command's
exit status to C{.everest/exitcode} and exits with it.  One C{exec} and one
file per task beyond C{sh -c COMMAND} alone; none in a task directory used
again, whose files are all there already.

The agent is the wrapper's parent and learns its end from Twisted's own
SIGCHLD handling (L{twisted.internet.process.registerReapProcessHandler}),
with the exit status in hand, without reading any file.

So a task outlives the agent: after a restart, L{LocalTaskHandler.reattach}
finds the process again by the pid recorded as its job id (its command line,
which names the task directory, tells the task's wrapper from an unrelated
process that got the same pid), watches it until it ends, and reads the
real exit status from the file.  The directory C{.everest} is made (or a
used-again directory's idle one renamed into place, L{everest_agent.spares})
just before the spawn, so an agent that stopped before recording the job id can
tell whether it started the job: no directory, no job; else the wrapper's
command line finds it running, or its exit-code file tells how it ended, or
that its command never began (the agent was killed between readying the
directory and the spawn: the task is started then, not lost)
(which is also why the agent need not wait for the disk before a spawn: see
L{ITaskHandler.durable_jobs}).  A cancel or an exceeded C{timeLimit}
sends SIGTERM to the whole process group, then SIGKILL after C{kill_grace}
seconds if anything in the group is still alive.
"""

import os
import signal

from twisted.internet import defer, process
from twisted.logger import Logger
from zope.interface import implementer

from everest_agent import jobscript, paths, spares
from everest_agent.fsio import InlineFileIO
from everest_agent.interfaces import IJob, ITaskHandler, JobLost, JobNeverStarted, JobResult

SHELL = "/bin/sh"
#: Marks the wrapper in a process listing: argv is [sh, -c, WRAPPER, MARK, dir, command].
MARK = "everest-task"

# Only shell built-ins after the command, so nothing can fail to start
# between the command's end and its status reaching the disk.
_WRAPPER = (
    # The task directory comes as descriptor 3, opened and checked by the
    # agent ($1 only names it for a process listing): no path is resolved
    # again between the agent's check and the cd.
    'cd -P /proc/self/fd/3 && exec 3<&- || exit 126; '
    # From here a restart that finds no wrapper and no status knows the
    # command began (jobscript.read_exit_status).
    f'{jobscript.started_writer()}; '
    '(c=$2; set --; eval "$c"); '
    "s=$?; "
    f'{jobscript.exit_code_writer("s")}; '
    'exit "$s"'
)

#: Seconds between checks on tasks found again after a restart (they are
#: not the agent's children, so their end cannot be waited for), and on its
#: own children, as a safety net under SIGCHLD (L{LocalJob.check}).
POLL_INTERVAL = 0.5


def _signal_name(number):
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def group_alive(pgid):
    """
    Whether process group C{pgid} has a live member.  Zombies do not count:
    an orphan killed with its group is reaped by init, which may take its
    time (or, in some containers, never do it).
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    for name in os.listdir("/proc"):
        fields = _stat_fields(name) if name.isdigit() else None
        if fields and int(fields[2]) == pgid and fields[0] != b"Z":
            return True
    return False


def group_gone(pgid):
    """
    Whether process group C{pgid} has no member left, zombies included (one
    signal system call: no file is read, so it may run on the reactor
    thread; a group that only looks alive is taken for alive).
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _signal_group(pid, sig):
    """Signal the process group led by C{pid}, or just C{pid} if it has none yet."""
    try:
        os.killpg(pid, sig)
        return
    except ProcessLookupError:
        pass
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _stat_fields(pid):
    """
    The fields of C{/proc/<pid>/stat} after the command name (the state
    first, then ppid, pgrp, ...), or None if there is no such process.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    return stat[stat.rindex(b")") + 2:].split()


def process_start(pid):
    """
    When process C{pid} started, in clock ticks since boot (field 22 of
    C{/proc/<pid>/stat}), or None if there is no such process (or it is a
    zombie: it has ended).
    """
    fields = _stat_fields(pid)
    if fields is None or fields[0] == b"Z":
        return None
    return int(fields[19])


def _find_wrapper(directory):
    """The pid of a live wrapper running in C{directory}, searched in /proc."""
    for name in os.listdir("/proc"):
        if name.isdigit() and _is_wrapper(int(name), directory):
            return int(name)
    return None


def describe_exit(exit_code):
    """A task's failure reason for a non-zero exit status."""
    reason = f"exit code {exit_code}"
    if 128 < exit_code < 128 + 65:
        reason += f" (the shell's code for a command killed by signal {exit_code - 128}, {_signal_name(exit_code - 128)})"
    return reason


class _LocalJobBase:
    """
    What a task's job does whatever watches its end: limits, kills, results.

    @ivar leftover: set when the job ends: whether processes of the task's
        group outlived its wrapper (a command's C{&} left running).  Such a
        task's directory is never used again (L{everest_agent.spares}): they
        may still write to its files or through their working directory.
    """

    log = Logger()
    batch = False
    leftover = False

    def __init__(self, request, clock, kill_grace, files=None):
        self.request = request
        self._clock = clock
        self._files = files if files is not None else InlineFileIO()  # for /proc and the exit-code file
        self._grace = kill_grace
        self.pid = None
        self.job_id = None
        self.running = defer.succeed(None)
        self.result = defer.Deferred()
        self._why_killed = None  # "canceled" or "timeout" once we kill it
        self._limit_call = None
        self._kill_call = None
        self._ended = False
        self._status = None  # (exit code, signal) of the wrapper, when the agent saw it end
        self._await_call = None

    def _started(self, pid, elapsed=0.0):
        self.pid = pid
        self.job_id = str(pid)
        limit = self.request.time_limit
        if limit:
            self._limit_call = self._clock.callLater(max(0.0, limit - elapsed), self._terminate, "timeout")

    def cancel(self):
        self._terminate("canceled")

    def _terminate(self, why):
        self._cancel_limit()
        if self._why_killed is not None or self.result.called or self.pid is None:
            return
        self._why_killed = why
        self.log.info(
            "Stopping task {task_id} (pid {pid}): {why}",
            task_id=self.request.task_id, pid=self.pid, why=why,
        )
        _signal_group(self.pid, signal.SIGTERM)
        self._kill_call = self._clock.callLater(self._grace, self._kill)

    def _kill(self):
        self._kill_call = None
        self._files.run(group_alive, self.pid).addCallback(self._killing)

    def _killing(self, alive):
        if alive:
            self.log.info(
                "Task {task_id} outlived its grace period; sending SIGKILL to its group",
                task_id=self.request.task_id,
            )
            _signal_group(self.pid, signal.SIGKILL)
        if self._ended:
            self._finish()

    def _cancel_limit(self):
        if self._limit_call is not None and self._limit_call.active():
            self._limit_call.cancel()
        self._limit_call = None

    def _leader_ended(self):
        self._ended = True
        self._cancel_limit()
        if self._kill_call is not None:
            # The leader is gone; wait for the rest of its group to follow,
            # and SIGKILL it when the grace period is over.
            self._await_group()
            return
        self._finish()

    def _await_group(self):
        self._await_call = None
        if self._kill_call is None:
            return  # _kill() has finished the job
        self._files.run(group_alive, self.pid).addCallback(self._group_seen)

    def _group_seen(self, alive):
        if self._kill_call is None:
            return  # _kill() has finished the job meanwhile
        if alive:
            self._await_call = self._clock.callLater(0.05, self._await_group)
            return
        self._kill_call.cancel()
        self._kill_call = None
        self._finish()

    def _finish(self):
        if self._await_call is not None and self._await_call.active():
            self._await_call.cancel()
        self._await_call = None
        if self.result.called:
            return
        if self.pid:
            self.leftover = not group_gone(self.pid)
        status = self._status
        if status is not None and status[0] is not None:
            # The wrapper exits with the status it recorded (or 126 when it
            # could not enter the directory, and then recorded nothing).
            self._decide(status[0])
        elif not self._reading:
            self._reading = True
            self._files.run(_recorded_exit_code, self.request.directory).addCallback(self._decide)

    _reading = False

    def _decide(self, recorded):
        if self.result.called:
            return
        status = self._status
        exit_code = recorded
        sig = status[1] if status is not None else None
        if self._why_killed == "canceled":
            result = JobResult(exit_code, "canceled", canceled=True)
        elif self._why_killed == "timeout":
            result = JobResult(exit_code, f"time limit of {self.request.time_limit:g} s exceeded")
        elif recorded is None and sig is not None:
            result = JobResult(None, f"killed by signal {sig} ({_signal_name(sig)})")
        elif recorded is None and status is None:
            result = JobResult(None, "the task ended while the agent was away, leaving no exit status (killed?)")
        elif exit_code:
            result = JobResult(exit_code, describe_exit(exit_code))
        else:
            result = JobResult(0)
        self.result.callback(result)


@implementer(IJob)
class LocalJob(_LocalJobBase):
    """
    A task the agent started: its end is reaped by Twisted's SIGCHLD
    handling, which calls L{reapProcess} (and L{processEnded} at once if
    the wrapper has already ended when it is registered).
    """

    def watch(self, pid):
        self._started(pid)
        process.registerReapProcessHandler(pid, self)

    def reapProcess(self):
        """Reap the wrapper if it has ended.  @return: True if it had."""
        if self._ended:
            return False
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = self.pid, None  # reaped by someone else: status unknown
        if not pid:
            return False
        if process.reapProcessHandlers.get(pid) is self:
            process.unregisterReapProcessHandler(pid, self)
        self.processEnded(status)
        return True

    def check(self):
        """
        Called by the handler's poll: the wrapper's end is noticed even if
        its SIGCHLD never reached the reactor (a reactor restarted without
        its SIGCHLD handling, another library's handler).
        """
        if self.reapProcess():
            # Usually SIGCHLD was only a moment behind, so not worth a warning.
            self.log.debug("Task {task_id}: its end was found by polling before SIGCHLD",
                           task_id=self.request.task_id)

    def processEnded(self, status):
        if status is not None:
            if os.WIFSIGNALED(status):
                self._status = (None, os.WTERMSIG(status))
            else:
                self._status = (os.waitstatus_to_exitcode(status), None)
        self._leader_ended()


@implementer(IJob)
class ReattachedJob(_LocalJobBase):
    """A task found again after a restart: its end is seen by polling."""

    def __init__(self, request, clock, kill_grace, pid, start, elapsed, files=None):
        super().__init__(request, clock, kill_grace, files)
        self._start = start  # tells the wrapper from a later process with its pid
        self._started(pid, elapsed)
        self._start_of = self._files.batch(process_start)
        self._checking = []  # Deferreds waiting for the lookup under way

    _close_watch = None

    def _terminate(self, why):
        super()._terminate(why)
        self._watch_closely()

    def _watch_closely(self):
        # While it is being stopped, look for its end more often than the
        # handler's poll does, so a cancel is reported promptly.
        self._close_watch = None

        def again(ended):
            if not ended and not self.result.called:
                self._close_watch = self._clock.callLater(0.05, self._watch_closely)

        self.check().addCallback(again)

    def _finish(self):
        if self._close_watch is not None and self._close_watch.active():
            self._close_watch.cancel()
        self._close_watch = None
        super()._finish()

    def check(self):
        """
        Called by the handler's poll.  Its process is looked up in /proc in
        the file-system threads (with the other jobs' of the same poll).

        @return: a Deferred firing with True once the job has ended.
        """
        if self._ended:
            return defer.succeed(True)
        waiting = defer.Deferred()
        self._checking.append(waiting)
        if len(self._checking) == 1:  # else a lookup is under way: its answer is this one's too
            self._start_of(self.pid).addCallback(self._seen)
        return waiting

    def _seen(self, start):
        ended = self._ended_now(start)
        waiting, self._checking = self._checking, []
        for d in waiting:
            d.callback(ended)

    def _ended_now(self, start):
        if self._ended:
            return True
        if start != self._start:
            self._leader_ended()
            return True
        return False


@implementer(ITaskHandler)
class LocalTaskHandler:
    log = Logger()
    name = "local"
    #: Tasks end with this machine (see L{ITaskHandler.durable_jobs}).
    durable_jobs = False

    def __init__(self, reactor, slots, kill_grace=10.0, environ=None):
        self._reactor = reactor
        self.slots = slots
        self.kill_grace = kill_grace
        self._environ = dict(os.environ if environ is None else environ)
        self._watched = set()  # running jobs, checked every POLL_INTERVAL
        self._poll = None
        self._fds_checked = False
        self.use_files(InlineFileIO())

    def use_files(self, files):
        """
        Do the handler's blocking work (each spawn, with the opening of the
        task's files before it, L{_open_and_spawn}; /proc lookups; exit-code
        files) through C{files}, an L{everest_agent.fsio.IFileIO}: the agent
        passes its file-system threads; the default runs it inline.  The
        spawns of one reactor turn go in one hop.
        """
        self.files = files
        self._spawn = files.batch(_open_and_spawn)

    @classmethod
    def from_config(cls, config, reactor):
        return cls(reactor, config.agent.max_tasks, config.agent.kill_grace)

    def slots_needed(self, requirements):
        nodes = requirements.get("nodes", 1)
        if nodes != 1:
            raise ValueError(f"the task needs {nodes} nodes; the local handler runs on one")
        cores = requirements.get("coresPerNode", 1)
        if cores > self.slots:
            raise ValueError(f"the task needs {cores} cores; this agent has {self.slots} slots")
        return cores

    def submit(self, request):
        environment = dict(self._environ)
        environment.update(request.environment)
        job = LocalJob(request, self._reactor, self.kill_grace, self.files)
        first = not self._fds_checked
        self._fds_checked = True

        def spawned(pid):
            job.watch(pid)
            if not job.result.called:
                self._watch(job)
            return job

        def failed(f):
            f.trap(OSError, ValueError)
            e = f.value
            raise RuntimeError(f"cannot start the task: {getattr(e, 'strerror', None) or e}")

        return self._spawn((request.directory, request.command, environment, first)).addCallbacks(spawned, failed)

    def reattach(self, request, job_id):
        """
        Find a task's process after a restart: by the pid in C{job_id}, or
        (when the job id never reached the disk) by the wrapper's command
        line; either way only a live process whose command line
        is this task's wrapper counts.  A task that ended meanwhile reports
        the exit status its wrapper wrote.
        """
        # /proc and the task directory are looked at in the file-system threads.
        return self.files.run(_find_task, request.directory, job_id).addCallback(self._found, request)

    def _found(self, found, request):
        pid, start, age = found
        if pid is None:
            return self._ended_while_away(request)
        job = ReattachedJob(request, self._reactor, self.kill_grace, pid, start, age, self.files)
        self.log.info("Task {task_id} found again: pid {pid}", task_id=request.task_id, pid=pid)
        self._watch(job)
        return job

    def _ended_while_away(self, request):
        def read(status):
            exit_code, began = status
            if exit_code is None and not began:
                # The agent readied the directory and stopped before the
                # spawn (or the wrapper died before its command began).
                raise JobNeverStarted("the task's command never began (the agent stopped first)")
            if exit_code is None:
                raise JobLost("the task ended while the agent was away, leaving no exit status (killed?)")
            job = ReattachedJob(request, self._reactor, self.kill_grace, 0, 0, 0.0, self.files)
            job._cancel_limit()
            job._leader_ended()
            return job

        def damaged(f):
            f.trap(ValueError, OSError)
            raise JobLost(f"the task's exit status file is damaged: {f.value}")

        return self.files.run(jobscript.read_exit_status, request.directory).addCallbacks(read, damaged)

    def _watch(self, job):
        self._watched.add(job)
        job.result.addBoth(self._unwatch, job)
        if self._poll is None:
            self._poll = self._reactor.callLater(POLL_INTERVAL, self._check_watched)

    def _unwatch(self, result, job):
        self._watched.discard(job)
        if not self._watched and self._poll is not None:
            self._poll.cancel()
            self._poll = None
        return result

    def _check_watched(self):
        self._poll = None
        for job in list(self._watched):
            job.check()
        if self._watched and self._poll is None:
            self._poll = self._reactor.callLater(POLL_INTERVAL, self._check_watched)

    def resource_info(self):
        return defer.succeed({})


def _open_and_spawn(item):
    """
    Open what a task's wrapper needs (L{spares.open_for_spawn}: its
    C{.everest} in place, which says a job was started there) and start the
    wrapper right after, in one go (blocking, in the file-system threads).
    C{item} is C{(directory, command, environment, first)}; the first spawn
    of the agent also makes inherited descriptors close-on-exec.

    The two stay together: a restarted agent takes a C{.everest} with no
    live wrapper and no exit status for a job that was killed, so nothing
    may come between making it and the spawn (the fault table's kill storm
    found the task failed, never run, when the spawn waited a reactor turn
    behind it).

    @return: the wrapper's pid.
    """
    directory, command, environment, first = item
    if first:
        _close_inherited_fds()
    return _spawn_wrapper(spares.open_for_spawn(directory), directory, command, environment)


def _spawn_wrapper(fds, directory, command, environment):
    """
    Start a task's wrapper with the descriptors L{spares.open_for_spawn}
    made (C{[directory, stdout, stderr]}), and close them.

    @return: the wrapper's pid.
    """
    try:
        return os.posix_spawn(
            SHELL,
            [SHELL, "-c", _WRAPPER, MARK, directory, command],
            environment,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, fds[1], 1),
                (os.POSIX_SPAWN_DUP2, fds[2], 2),
                (os.POSIX_SPAWN_DUP2, fds[0], 3),
            ],
            setsid=True,
            setsigdef=_DEFAULT_SIGNALS,
        )
    finally:
        for fd in fds:
            os.close(fd)


def _find_task(directory, job_id):
    """
    Look for a task's live wrapper after a restart (blocking: /proc and the
    task directory).

    @return: C{(pid, start ticks, age in seconds)}, or C{(None, None,
        None)} if it is not running.
    @raise JobLost: if C{job_id} is not a pid.
    @raise JobNeverStarted: if no job was ever started for the task.
    """
    pid = start = None
    if job_id:
        # "<pid>", or "<pid>:<start ticks>" as older versions recorded it.
        pid_text, _, start_text = job_id.partition(":")
        if not pid_text.isdigit():
            raise JobLost(f"the task's recorded job id {job_id!r} is not a pid")
        pid = int(pid_text)
        start = process_start(pid)
        if start is None or not _is_wrapper(pid, directory) or start_text not in ("", str(start)):
            pid = None  # ended (or the pid now belongs to another process)
    elif not os.path.isdir(os.path.join(directory, jobscript.STATE_DIR)):
        # Made just before every spawn: without it, nothing was started.
        raise JobNeverStarted("the task was never started (the agent stopped first)")
    else:
        candidate = _find_wrapper(directory)
        if candidate is not None and _is_wrapper(candidate, directory):
            pid, start = candidate, process_start(candidate)
    if pid is None:
        return None, None, None
    return pid, start, _age(start)


def _recorded_exit_code(directory):
    """The exit status in a task's exit-code file, or None if none is readable (blocking)."""
    try:
        return jobscript.read_exit_code(directory)
    except (ValueError, OSError):
        return None


#: Every signal a task starts with at its default action, whatever the agent
#: does with it (Python ignores SIGPIPE, nohup SIGHUP): posix_spawn resets
#: them in the child; handlers are reset by exec anyway.
_DEFAULT_SIGNALS = frozenset(
    sig for sig in signal.valid_signals()
    if 0 < sig < signal.NSIG and sig not in (signal.SIGKILL, signal.SIGSTOP)
)


def _close_inherited_fds():
    """
    Mark every descriptor the agent inherited (from systemd, a shell, a test
    harness) close-on-exec, so tasks get only their three.  Descriptors the
    agent opens itself are close-on-exec already (PEP 446), so this is done
    once, before the first spawn, instead of listing descriptors per task.
    """
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            try:
                if os.get_inheritable(fd):
                    os.set_inheritable(fd, False)
            except OSError:
                pass


def _is_wrapper(pid, directory):
    """
    Whether C{pid} is the live wrapper of the task in C{directory}: its
    command line names the task directory, and it leads its process group
    (the subshell that runs the command is a fork of the wrapper, with the
    same command line, but not a group leader).
    """
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    if (b"\0" + MARK.encode() + b"\0" + os.fsencode(directory) + b"\0") not in cmdline:
        return False
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != b"Z" and int(fields[2]) == pid


def _age(start_ticks):
    """Seconds since a process started, from its start time in clock ticks."""
    try:
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError):
        return 0.0
