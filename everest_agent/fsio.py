"""
File-system work off the reactor thread.

Opening, writing, syncing, listing or removing files can stall for seconds
on a busy or networked file system (NFS, Lustre).  The reactor must never
wait for that: a stall longer than the ping timeout drops the session, and
every stall delays every other task.  So every blocking file operation of
the agent (except the journals' appends, which have their group commit)
goes through one object providing L{IFileIO}:

    d = files.run(os.makedirs, path, exist_ok=True)   # Deferred of the result

and work that a reactor turn asks for many times (the directories of a
burst of new tasks, the exit-code files of one scheduler poll) goes through
a L{IFileIO.batch}, so the whole burst costs one hop to a thread:

    make_dir = files.batch(make_task_dir)   # once
    d = make_dir(path)                      # per task; one hop per turn

Three providers:

  - L{ThreadedFileIO}: the agent's.  A small thread pool of its own,
    started and stopped with the agent's service tree, through
    C{deferToThreadPool}.
  - L{InlineFileIO}: for tests; runs each call at once, in the caller's
    thread, and returns an already fired Deferred.
  - L{StallingFileIO}: for tests; each call runs only after a stall
    (C{delay} seconds of a fake clock, or until L{StallingFileIO.release}),
    as on a file system that hangs.  It tells tests whether blocking work
    is being done outside it (L{StallingFileIO.inside}).
"""

import threading

from twisted.application.service import Service
from twisted.internet import defer, threads
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import Interface, implementer


class IFileIO(Interface):
    """Where the agent's blocking file-system work runs."""

    def run(f, *args, **kwargs):
        """
        Call C{f(*args, **kwargs)} away from the reactor thread.

        @return: a Deferred firing, in the reactor thread, with its result
            or its exception.
        """

    def batch(f):
        """
        A function C{call(item)} returning a Deferred of C{f(item)}, where
        every item asked for in the same reactor turn goes to the thread in
        one hop, one C{f(item)} after another; an exception fails only its
        own item's Deferred.
        """


class _Batch:
    """The items of one reactor turn, run by one L{IFileIO.run} call."""

    def __init__(self, files, f, later):
        self._files = files
        self._f = f
        self._later = later  # callLater-like, or None to run every call at once
        self._items = []
        self._waiting = []
        self._call = None

    def __call__(self, item):
        d = defer.Deferred()
        self._items.append(item)
        self._waiting.append(d)
        if self._later is None:
            self._flush()
        elif self._call is None:
            self._call = self._later(0, self._flush)
        return d

    def _flush(self):
        self._call = None
        items, self._items = self._items, []
        waiting, self._waiting = self._waiting, []
        f = self._f

        def all_of_them():
            results = []
            for item in items:
                try:
                    results.append((True, f(item)))
                except BaseException:
                    results.append((False, Failure()))
            return results

        def done(results):
            for d, (ok, value) in zip(waiting, results):
                (d.callback if ok else d.errback)(value)

        def failed(failure):
            for d in waiting:
                d.errback(failure)

        self._files.run(all_of_them).addCallbacks(done, failed)


@implementer(IFileIO)
class ThreadedFileIO(Service):
    """
    The agent's file-system threads: a pool of C{threads} of its own (so a
    hung file system cannot take the reactor's default pool, used for DNS,
    with it).  A service: its threads start and stop with the agent.
    Work asked for before the start waits for it.
    """

    def __init__(self, reactor, threads=4, name="everest-files"):
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=0, maxthreads=threads, name=name)

    def run(self, f, *args, **kwargs):
        return threads.deferToThreadPool(self._reactor, self._pool, f, *args, **kwargs)

    def batch(self, f):
        return _Batch(self, f, self._reactor.callLater)

    def startService(self):
        super().startService()
        self._pool.start()
        # Whatever happens to the graceful stop, no thread may keep the
        # process alive.
        self._trigger = self._reactor.addSystemEventTrigger("after", "shutdown", self._stop_pool)

    def stopService(self):
        super().stopService()
        self._stop_pool()

    def _stop_pool(self):
        if self._pool.started:
            self._pool.stop()


@implementer(IFileIO)
class InlineFileIO:
    """For tests: every call runs at once, in the caller's thread."""

    def __init__(self):
        self.calls = 0

    def run(self, f, *args, **kwargs):
        self.calls += 1
        return defer.maybeDeferred(f, *args, **kwargs)

    def batch(self, f):
        return _Batch(self, f, None)


@implementer(IFileIO)
class StallingFileIO:
    """
    For tests: a file system that hangs.  Each call runs C{delay} seconds
    (of C{clock}) after it was asked for, or, with C{delay=None}, only when
    the test calls L{release}.  Batches gather the items of one turn as the
    agent's do (with C{clock.callLater(0)}).

    @ivar inside: True while a call runs; a test can wrap the blocking
        functions it cares about to check they only ever run here.
    @ivar pending: how many calls are stalled now.
    """

    def __init__(self, clock, delay=2.0):
        self.clock = clock
        self.delay = delay
        self.inside = False
        self.calls = 0
        self._held = []

    @property
    def pending(self):
        return len(self._held)

    def run(self, f, *args, **kwargs):
        self.calls += 1
        d = defer.Deferred()
        entry = (d, f, args, kwargs)
        self._held.append(entry)
        if self.delay is not None:
            self.clock.callLater(self.delay, self._do, entry)
        return d

    def batch(self, f):
        return _Batch(self, f, self.clock.callLater)

    def release(self):
        """Run every stalled call now (those they ask for stall in turn)."""
        for entry in list(self._held):
            self._do(entry)

    def _do(self, entry):
        if entry not in self._held:
            return
        self._held.remove(entry)
        d, f, args, kwargs = entry
        self.inside = True
        try:
            result = f(*args, **kwargs)
        except BaseException:
            result = Failure()
        finally:
            self.inside = False
        (d.errback if isinstance(result, Failure) else d.callback)(result)


def reactor_thread_guard(files):
    """
    For tests: a decorator for a blocking function, which fails the call
    (with AssertionError) unless it runs inside C{files} (a
    L{StallingFileIO}) or in a thread other than the one that made it.
    """
    home = threading.get_ident()

    def wrap(f):
        def guarded(*args, **kwargs):
            if not files.inside and threading.get_ident() == home:
                raise AssertionError(f"{getattr(f, '__name__', f)} called on the reactor thread")
            return f(*args, **kwargs)

        return guarded

    return wrap
