"""
Running tasks as processes on this machine.

Each task is C{/bin/sh -c command} in its task directory, started through
C{setsid} so that it leads a process group (and session) of its own: a
cancel or an exceeded C{timeLimit} sends SIGTERM to the whole group, then
SIGKILL after C{kill_grace} seconds if anything in the group is still alive.
Standard output and error are handed to the child as file descriptors of the
files C{stdout} and C{stderr}, so their bytes never pass through the agent.
"""

import os
import signal

from twisted.internet import defer
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from zope.interface import implementer

from everest_agent.interfaces import IJob, ITaskHandler, JobLost, JobResult

SETSID = "/usr/bin/setsid"

# $1 is the task directory, $2 the command: cd there, then become the shell
# that runs the command (exec keeps one process per task).
_LAUNCH = 'cd -- "$1" || exit 126; exec /bin/sh -c "$2"'


def _signal_name(number):
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def _group_alive(pgid):
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


@implementer(IJob)
class LocalJob(ProcessProtocol):
    log = Logger()
    batch = False

    def __init__(self, request, clock, kill_grace):
        self.request = request
        self._clock = clock
        self._grace = kill_grace
        self.job_id = None
        self.pid = None
        self.running = defer.succeed(None)
        self.result = defer.Deferred()
        self._why_killed = None  # "canceled" or "timeout" once we kill it
        self._limit_call = None
        self._kill_call = None
        self._ended = False
        self._status = None

    def connectionMade(self):
        self.pid = self.transport.pid
        self.job_id = str(self.pid)
        limit = self.request.time_limit
        if limit:
            self._limit_call = self._clock.callLater(limit, self._terminate, "timeout")

    def cancel(self):
        self._terminate("canceled")

    def _terminate(self, why):
        if self._limit_call is not None and self._limit_call.active():
            self._limit_call.cancel()
        self._limit_call = None
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
        if _group_alive(self.pid):
            self.log.info(
                "Task {task_id} outlived its grace period; sending SIGKILL to its group",
                task_id=self.request.task_id,
            )
            _signal_group(self.pid, signal.SIGKILL)
        if self._ended:
            self._finish()

    def processEnded(self, reason):
        self._ended = True
        self._status = reason.value
        if self._limit_call is not None and self._limit_call.active():
            self._limit_call.cancel()
        self._limit_call = None
        if self._kill_call is not None:
            # The leader is gone; wait for the rest of its group to follow,
            # and SIGKILL it when the grace period is over.
            self._await_group()
            return
        self._finish()

    def _await_group(self):
        if self._kill_call is None:
            return  # _kill() has finished the job
        if _group_alive(self.pid):
            self._clock.callLater(0.05, self._await_group)
            return
        self._kill_call.cancel()
        self._kill_call = None
        self._finish()

    def _finish(self):
        if self.result.called:
            return
        status = self._status
        exit_code = getattr(status, "exitCode", None)
        sig = getattr(status, "signal", None)
        if self._why_killed == "canceled":
            result = JobResult(exit_code, "canceled", canceled=True)
        elif self._why_killed == "timeout":
            result = JobResult(exit_code, f"time limit of {self.request.time_limit:g} s exceeded")
        elif sig is not None:
            result = JobResult(None, f"killed by signal {sig} ({_signal_name(sig)})")
        elif exit_code:
            result = JobResult(exit_code, f"exit code {exit_code}")
        else:
            result = JobResult(0)
        self.result.callback(result)


@implementer(ITaskHandler)
class LocalTaskHandler:
    log = Logger()
    name = "local"

    def __init__(self, reactor, slots, kill_grace=10.0, environ=None):
        self._reactor = reactor
        self.slots = slots
        self.kill_grace = kill_grace
        self._environ = dict(os.environ if environ is None else environ)

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
        job = LocalJob(request, self._reactor, self.kill_grace)
        fds = []
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
            fds.append(os.open(os.devnull, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)))
            fds.append(os.open(os.path.join(request.directory, "stdout"), flags, 0o644))
            fds.append(os.open(os.path.join(request.directory, "stderr"), flags, 0o644))
            self._reactor.spawnProcess(
                job,
                SETSID,
                [SETSID, "/bin/sh", "-c", _LAUNCH, "everest-task", request.directory, request.command],
                env=environment,
                childFDs={0: fds[0], 1: fds[1], 2: fds[2]},
            )
        except OSError as e:
            return defer.fail(RuntimeError(f"cannot start the task: {e.strerror or e}"))
        finally:
            for fd in fds:
                os.close(fd)
        return defer.succeed(job)

    def reattach(self, request, job_id):
        return defer.fail(
            JobLost("the agent restarted while the task ran; its outcome is unknown")
        )

    def resource_info(self):
        return defer.succeed({})
