"""
Running short external commands (C{sbatch}, C{squeue}, C{qstat}...) without
blocking the reactor.

L{run_command} collects a command's standard output and error and its exit
status, and gives up after a timeout: then it kills the command's whole
process group (a wrapper such as SLURM's C{qsub} may have children of its
own) and fails with L{CommandTimeout}.  A non-zero exit status is not an
error here; the caller decides what it means (L{check} turns it into a
L{CommandError}).
"""

import os
import shutil
import signal

from twisted.internet import defer, error, protocol
from twisted.logger import Logger

log = Logger()

#: A C{setsid} program that runs a command as the leader of a new session
#: (and so of a new process group) without forking, when there is one.
_SETSID = next((p for p in ("/usr/bin/setsid", "/bin/setsid") if os.access(p, os.X_OK)), None)


class CommandError(Exception):
    """
    A command could not be run, was killed by a signal, or (from L{check})
    exited with a non-zero status.

    @ivar argv: the command.
    @ivar code: its exit status, or None.
    @ivar err: what it wrote to standard error (text).
    """

    def __init__(self, argv, message, code=None, err=""):
        self.argv = list(argv)
        self.code = code
        self.err = err
        Exception.__init__(self, message)

    @classmethod
    def from_exit(cls, argv, code, err):
        name = os.path.basename(argv[0]) if argv else "command"
        detail = " ".join(err.split())
        if len(detail) > 500:
            detail = detail[:500] + "..."
        message = f"{name} exited with status {code}"
        if detail:
            message += f": {detail}"
        return cls(argv, message, code, err)


class CommandTimeout(CommandError):
    """A command did not finish within its timeout and was killed."""


def command_name(argv):
    return os.path.basename(argv[0]) if argv else "command"


def find_executable(name, env):
    """
    The absolute path of program C{name}, looked up in C{env}'s C{PATH} when
    it has no slash, or None.
    """
    if "/" in name:
        return name if os.access(name, os.X_OK) and not os.path.isdir(name) else None
    return shutil.which(name, path=env.get("PATH", os.defpath))


class _Collector(protocol.ProcessProtocol):
    def __init__(self, stdin):
        self.stdin = stdin
        self.out = []
        self.err = []
        self.ended = defer.Deferred()

    def connectionMade(self):
        if self.stdin is not None:
            self.transport.write(self.stdin)
        self.transport.closeStdin()

    def outReceived(self, data):
        self.out.append(data)

    def errReceived(self, data):
        self.err.append(data)

    def processEnded(self, reason):
        self.ended.callback(reason.value)


def run_command(reactor, argv, stdin=None, timeout=60.0, env=None, path=None):
    """
    Run C{argv} and collect its output.

    @param reactor: provides C{spawnProcess} and C{callLater}.
    @param argv: the command and its arguments (C{str}); C{argv[0]} is
        looked up in C{env}'s C{PATH} unless it holds a slash.
    @param stdin: C{bytes} or C{str} to feed to the command's standard
        input (then closed), or None for an empty one.
    @param timeout: seconds; after that the command's process group is
        killed with SIGKILL.
    @param env: the command's whole environment (default: the agent's).
    @param path: working directory (default: the agent's).
    @return: a Deferred firing with C{(out, err, code)}, C{out}/C{err} as
        C{str} (UTF-8, undecodable bytes replaced) and C{code} the exit
        status, or failing with L{CommandTimeout}, or L{CommandError} if the
        program does not exist or was killed by a signal.
    """
    argv = [str(a) for a in argv]
    env = dict(os.environ if env is None else env)
    executable = find_executable(argv[0], env)
    if executable is None:
        return defer.fail(
            CommandError(argv, f"{argv[0]}: command not found (PATH={env.get('PATH', '')})")
        )
    if isinstance(stdin, str):
        stdin = stdin.encode("utf-8")
    collector = _Collector(stdin)
    if _SETSID is not None:
        spawn_argv = [_SETSID, executable] + argv[1:]
    else:
        spawn_argv = [executable] + argv[1:]
    try:
        transport = reactor.spawnProcess(
            collector, spawn_argv[0], spawn_argv, env=env, path=path
        )
    except OSError as e:
        return defer.fail(CommandError(argv, f"{argv[0]}: cannot run it: {e}"))

    result = defer.Deferred()
    timed_out = []

    def expire():
        timed_out.append(True)
        _kill_group(transport)
        if not result.called:
            result.errback(
                CommandTimeout(argv, f"{command_name(argv)} did not finish within {timeout:g} s; killed it")
            )

    timer = reactor.callLater(timeout, expire)

    def ended(reason):
        if timer.active():
            timer.cancel()
        if result.called:
            return
        out = b"".join(collector.out).decode("utf-8", "replace")
        err = b"".join(collector.err).decode("utf-8", "replace")
        if isinstance(reason, error.ProcessTerminated) and reason.exitCode is None:
            result.errback(
                CommandError(
                    argv,
                    f"{command_name(argv)} was killed by signal {reason.signal}",
                    None,
                    err,
                )
            )
        else:
            code = getattr(reason, "exitCode", 0) or 0
            result.callback((out, err, code))

    collector.ended.addCallback(ended)
    return result


def _kill_group(transport):
    # Only a real child started through setsid leads its own process group;
    # never signal a group by the pid of a test double.
    pid = getattr(transport, "pid", None)
    if _SETSID is not None and _is_real_process(transport) and isinstance(pid, int) and pid > 1:
        try:
            os.killpg(pid, signal.SIGKILL)
            return
        except OSError:
            pass
    try:
        transport.signalProcess("KILL")
    except (error.ProcessExitedAlready, OSError):
        pass


def _is_real_process(transport):
    try:
        from twisted.internet.process import Process
    except ImportError:  # not POSIX
        return False
    return isinstance(transport, Process)


def check(argv, result):
    """
    Turn a non-zero exit status from L{run_command} into a L{CommandError}.

    @return: C{(out, err)}.
    """
    out, err, code = result
    if code != 0:
        raise CommandError.from_exit(argv, code, err)
    return out, err
