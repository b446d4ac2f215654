"""
Making a task's directory, and retiring it once retention lets it go.

Both are blocking file-system work on directories a task controls, so
neither runs on the reactor thread.  They run often: once each per task, so
in a sweep of short tasks hundreds of times a second.  Two providers of
L{ITaskDirs} do the same work (L{everest_agent.dirworker.make_task_dir} and
L{everest_agent.dirworker.retire_task_dir}, with one
L{everest_agent.spares.SpareDirs}):

  - L{ThreadTaskDirs}: in the agent's file-system threads
    (L{everest_agent.fsio}), those of one reactor turn in one hop.  Used by
    tests, and by the agent when its directory process is gone.
  - L{ProcessTaskDirs}: the agent's.  In a child process of its own
    (L{everest_agent.dirworker}), spoken to over a Unix socket.  Each of
    those calls is a handful of system calls, and each system call made in
    a thread of the agent hands Python's interpreter lock to the reactor
    thread and back: measured on a burst of trivial tasks, those handovers
    (futex calls and the context switches behind them) cost the agent
    about a fifth of its CPU.  In a process of their own the same calls
    cost the agent one line of JSON each way, and run beside it on another
    core.  If the process cannot start, or dies, the agent says so in its
    log and goes on with L{ThreadTaskDirs}: the calls it had not answered
    are made again there (a call may so be made twice: a directory made
    already is only checked, one retired already is gone).

A local task's spawn stays in the agent's file-system threads
(L{everest_agent.handlers.local}): its process must be the agent's child,
and the C{.everest} it makes just before says a job was started, so the
two must not be a reactor turn apart.
"""

import json
import os
import socket
import sys

from twisted.application.service import Service
from twisted.internet import defer, error, protocol
from twisted.logger import Logger, LogLevel
from zope.interface import Attribute, Interface, implementer

import everest_agent
from everest_agent.dirworker import decode_error, make_task_dir, retire_task_dir
from everest_agent.spares import SpareDirs


class ITaskDirs(Interface):
    """Where task directories are made and retired."""

    taken = Attribute("How many new task directories were spares used again.")
    given = Attribute("How many retired directories were emptied to be used again.")

    def make(path):
        """
        Make (or check) the task directory C{path} (in C{work_dir}).

        @return: a Deferred firing with None once it exists, or failing
            with the C{OSError} or L{everest_agent.paths.PathEscape} that
            prevented it.
        """

    def retire(name, reuse):
        """
        Take task directory C{name} of C{work_dir} away: emptied to be used
        again if C{reuse} and spares are wanted, else removed.

        @return: a Deferred firing with True if there was one.
        """


# -- in the agent's threads --------------------------------------------------------


@implementer(ITaskDirs)
class ThreadTaskDirs:
    """L{ITaskDirs} in an L{everest_agent.fsio.IFileIO} (the agent's file-system threads)."""

    log = Logger()

    def __init__(self, work_dir, files):
        self.work_dir = work_dir
        self.spares = SpareDirs(work_dir)
        self._make = files.batch(self._make_one)
        self._retire = files.batch(self._retire_one)

    @property
    def taken(self):
        return self.spares.taken

    @property
    def given(self):
        return self.spares.given

    def make(self, path):
        return self._make(path)

    def retire(self, name, reuse):
        return self._retire((name, reuse))

    def _make_one(self, path):
        work_dir, name = os.path.split(path)
        make_task_dir(work_dir, name, self.spares, self.log)

    def _retire_one(self, item):
        name, reuse = item
        return retire_task_dir(self.work_dir, name, self.spares, reuse)


# -- in a process of their own ---------------------------------------------------------


class _Watch(protocol.ProcessProtocol):
    """The directory process itself: what it says on stdout or stderr, and its end."""

    def __init__(self, owner):
        self._owner = owner

    def childDataReceived(self, fd, data):
        self._owner.child_said(data)

    def processEnded(self, reason):
        self._owner.gone(reason)


class _Channel(protocol.Protocol):
    """The agent's end of the socket to the directory process: lines of JSON."""

    def __init__(self, owner):
        self._owner = owner
        self._buffer = b""

    def dataReceived(self, data):
        lines = (self._buffer + data).split(b"\n")
        self._buffer = lines.pop()
        for line in lines:
            self._owner.answered(line)

    def connectionLost(self, reason):
        self._owner.gone(reason)


@implementer(ITaskDirs)
class ProcessTaskDirs(Service):
    """
    L{ITaskDirs} in a child process (C{python -m everest_agent.dirworker
    WORK_DIR}, its standard input a Unix socket to the agent), started and
    stopped with the agent's service tree; before it is started, calls
    wait for it.

    @param fallback: the L{ThreadTaskDirs} that takes over if the process
        cannot start or ends unasked.
    """

    log = Logger()
    #: Seconds the process has to finish what it was asked at stop.
    STOP_TIMEOUT = 30.0
    #: Seconds a killed process has to end before the agent stops without
    #: it (one stuck in a hung file system ends only when its call does).
    KILL_WAIT = 5.0

    def __init__(self, reactor, work_dir, fallback, python=None):
        self._reactor = reactor
        self.work_dir = work_dir
        self._fallback = fallback
        self._python = python or sys.executable
        self._process = None
        self._channel = None
        self._alive = 0  # of the process and its socket: both end before it is gone
        self._failed = False
        self._stopping = None  # Deferred of the process's end, while stopping
        self._next = 0
        self._pending = {}  # request id -> (op, args, Deferred)
        self._before_start = []  # lines asked for before the process exists
        self._taken = self._given = 0
        self.calls = 0

    @property
    def taken(self):
        return self._taken + self._fallback.taken

    @property
    def given(self):
        return self._given + self._fallback.given

    @property
    def in_process(self):
        """Whether the calls go to the child process (False once it failed)."""
        return not self._failed

    def make(self, path):
        work_dir, name = os.path.split(path)
        return self._ask("make", {"work_dir": work_dir, "name": name})

    def retire(self, name, reuse):
        return self._ask("retire", {"work_dir": self.work_dir, "name": name, "reuse": bool(reuse)})

    # -- requests and answers -----------------------------------------------------

    def _ask(self, op, args):
        if self._failed:
            return self._in_threads(op, args)
        self.calls += 1
        self._next += 1
        d = defer.Deferred()
        self._pending[self._next] = (op, args, d)
        line = json.dumps(dict(args, id=self._next, op=op), separators=(",", ":")).encode() + b"\n"
        if self._channel is None:
            self._before_start.append(line)
        else:
            self._channel.transport.write(line)
        return d

    def _in_threads(self, op, args):
        if op == "make":
            return self._fallback.make(os.path.join(args["work_dir"], args["name"]))
        return self._fallback.retire(args["name"], args["reuse"])

    def answered(self, line):
        try:
            answer = json.loads(line)
            entry = self._pending.pop(answer["id"])
        except (ValueError, KeyError, TypeError, AttributeError):
            # Nothing it says can be trusted now: it is ended, and what it
            # was asked goes to the threads (so no call waits forever).
            self.log.error("The directory process answered something unreadable: {line!r}; ending it",
                           line=line[:200])
            self._end_it()
            return
        self._taken = answer.get("taken", self._taken)
        self._given = answer.get("given", self._given)
        for level, text, fields in answer.get("log", ()):
            self.log.emit(LogLevel.levelWithName(level), text, **fields)
        d = entry[2]
        if "error" in answer:
            d.errback(decode_error(answer["error"]))
        else:
            d.callback(answer.get("ok"))

    def child_said(self, data):
        self.log.warn("The directory process says: {text}", text=data.decode("utf-8", "replace").rstrip())

    def gone(self, reason):
        """The process, or its socket, has ended (once each)."""
        self._alive -= 1
        if self._alive > 0:
            return
        self._process = self._channel = None
        if self._stopping is not None:
            stopping, self._stopping = self._stopping, None
            self._take_over()  # (nothing, unless it was killed at the timeout)
            stopping.callback(None)
        elif not self.running:
            self._failed = True  # it ended after the agent gave up waiting for it
        else:
            self.use_threads(f"the directory process ended ({reason.getErrorMessage()})")

    def use_threads(self, why):
        """
        Go on in the threads (the fallback) for the rest of this run: called
        when the process is gone, or before the start when it is not wanted
        (tests).  What it did not answer is asked there.
        """
        if not self._failed:
            self.log.error("{why}: task directories are made and retired in the agent's threads "
                           "from now on", why=why)
        self._take_over()

    def _take_over(self):
        self._failed = True
        self._before_start = []
        pending, self._pending = self._pending, {}
        for op, args, d in pending.values():
            self._in_threads(op, args).chainDeferred(d)

    # -- the service ------------------------------------------------------------------

    def startService(self):
        super().startService()
        if self._failed:
            return
        env = dict(os.environ, PYTHONPATH=everest_agent.pythonpath(os.environ))
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._process = self._reactor.spawnProcess(
                _Watch(self), self._python, [self._python, "-m", "everest_agent.dirworker", self.work_dir],
                env=env, childFDs={0: theirs.fileno(), 1: "r", 2: "r"},
            )
        except OSError as e:
            ours.close()
            self.use_threads(f"cannot start the directory process ({e})")
            return
        finally:
            theirs.close()
        channel = _Channel(self)
        factory = protocol.Factory()
        factory.buildProtocol = lambda addr: channel
        self._reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX, factory)
        ours.close()  # (adopted: the reactor has a descriptor of its own)
        self._channel = channel
        self._alive = 2
        lines, self._before_start = self._before_start, []
        if lines:
            channel.transport.write(b"".join(lines))

    def stopService(self):
        super().stopService()
        if self._channel is None:
            return None
        # The process answers everything it was asked, then ends.
        self._stopping = defer.Deferred()
        self._channel.transport.loseWriteConnection()
        timer = self._reactor.callLater(self.STOP_TIMEOUT, self._kill)
        stopping = self._stopping

        def ended(result):
            if timer.active():
                timer.cancel()
            return result

        return stopping.addBoth(ended)

    def _kill(self):
        if self._process is not None:
            self.log.warn("The directory process did not end in {timeout:g} s; killing it",
                          timeout=self.STOP_TIMEOUT)
            self._end_it()
            self._reactor.callLater(self.KILL_WAIT, self._give_up)

    def _give_up(self):
        if self._stopping is None:
            return
        self.log.error("The directory process does not end (a hung file system?); the agent stops "
                       "without it: what it was not done with is done again at the next start")
        stopping, self._stopping = self._stopping, None
        stopping.callback(None)

    def _end_it(self):
        if self._process is not None:
            try:
                self._process.signalProcess("KILL")
            except error.ProcessExitedAlready:
                pass
