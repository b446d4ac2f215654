"""
Running transfers side by side: the fair slot limiter, a group of
coroutines, a job several tasks wait for, and the thread-pool seam (with
its lane, for jobs that must run in order).
"""

from collections import OrderedDict, deque

from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure


def pool_runner(reactor, pool, start=None):
    """
    C{run(f, *args)}: call C{f} in C{pool} (a
    L{twisted.python.threadpool.ThreadPool}); a Deferred fires with its
    result on the reactor thread.  C{start()} is called before the first
    job (default: C{pool.start}).  Once the pool is stopped it fails at
    once (Twisted's pool would drop the call and the Deferred never fire).
    """

    def run(f, *args):
        if pool.joined:
            return defer.fail(RuntimeError("the stager is closed"))
        if not pool.started:
            (start or pool.start)()
        return deferToThreadPool(reactor, pool, f, *args)

    return run


def run_inline(f, *args):
    """The C{run} of tests: call C{f} now, on this thread."""
    return defer.maybeDeferred(f, *args)


class Lane:
    """
    C{lane(f, *args)}: run C{f} through C{run} (the thread seam) after the
    jobs given to this lane before it have finished, whatever their
    outcome: one job at a time, in the order asked.  Returns a Deferred of
    its result.
    """

    def __init__(self, run):
        self._run = run
        self._tail = defer.succeed(None)

    def __call__(self, f, *args):
        result = Deferred()

        def start(_):
            done = Deferred()

            def finished(outcome):
                done.callback(None)
                return outcome

            self._run(f, *args).addBoth(finished).chainDeferred(result)
            return done

        self._tail.addCallback(start)
        return result


def mirror(d):
    """
    A new Deferred with C{d}'s result; cancelling it leaves C{d} alone.  The
    result is handed over: C{d}'s own callbacks added later get None.
    """
    m = Deferred()

    def fire(result):
        if not m.called:
            if isinstance(result, Failure):
                m.errback(result)
            else:
                m.callback(result)
        return None

    d.addBoth(fire)
    return m


class FairLimiter:
    """
    At most C{limit} slots in use; a freed slot goes to the waiting key
    (task) holding the fewest, oldest first among equals.
    """

    def __init__(self, limit):
        self.limit = limit
        self.active = 0
        self.held = {}
        self._waiting = OrderedDict()  # key -> deque of Deferreds

    def acquire(self, key):
        if self.active < self.limit and not self._waiting:
            self._grant(key)
            return defer.succeed(None)
        d = Deferred(lambda d: self._forget(key, d))
        self._waiting.setdefault(key, deque()).append(d)
        return d

    def release(self, key):
        self.active -= 1
        left = self.held[key] - 1
        if left:
            self.held[key] = left
        else:
            del self.held[key]
        self._dispatch()

    def waiting(self, key=None):
        if key is None:
            return sum(len(q) for q in self._waiting.values())
        return len(self._waiting.get(key, ()))

    def _grant(self, key):
        self.active += 1
        self.held[key] = self.held.get(key, 0) + 1

    def _forget(self, key, d):
        queue = self._waiting.get(key)
        if queue is not None and d in queue:
            queue.remove(d)
            if not queue:
                del self._waiting[key]

    def _dispatch(self):
        while self.active < self.limit and self._waiting:
            key = min(self._waiting, key=lambda k: self.held.get(k, 0))
            queue = self._waiting[key]
            d = queue.popleft()
            if queue:
                self._waiting.move_to_end(key)
            else:
                del self._waiting[key]
            self._grant(key)
            d.callback(None)


async def gather(coroutines, fail_fast):
    """
    Run C{coroutines} side by side; once all have finished, return their
    results in order, or raise the first failure.  With C{fail_fast}, that
    first failure cancels the others (it is raised once they have cleaned
    up).  Cancelling the call cancels them all, waits for them to clean up,
    and raises L{CancelledError}.
    """
    ds = [Deferred.fromCoroutine(c) for c in coroutines]
    first = []

    def failed(failure):
        if not failure.check(CancelledError) and not first:
            first.append(failure)
            if fail_fast:
                cancel_all()
        return failure

    def cancel_all(_=None):
        for d in ds:
            if not d.called:
                d.cancel()

    for d in ds:
        d.addErrback(failed)
    everything = defer.DeferredList(ds, consumeErrors=True)
    cancelled = False
    while not everything.called:
        # Cancelling this wait cancels every job; the wait goes on until
        # each of them has finished cleaning up.
        waiter = Deferred(cancel_all)
        everything.addBoth(lambda result, w=waiter: (w.called or w.callback(None), result)[1])
        try:
            await waiter
        except CancelledError:
            cancelled = True
    results = everything.result
    if cancelled:
        raise CancelledError()
    if first:
        first[0].raiseException()
    if not all(ok for ok, _ in results):  # only cancellations are left
        raise CancelledError()
    return [value for _, value in results]


class Shared:
    """
    One job (a coroutine) whose result several waiters share.  It is
    cancelled only when every waiter has gone.  C{after(result)} runs once
    every waiter present at the end has been given the result; C{before()}
    once the job is over or abandoned (to forget it).
    """

    def __init__(self, coroutine, after=None, before=None):
        self.finished = False
        self.result = None
        self.after = after
        self.before = before
        self.uri = None
        self._waiters = []
        self._d = Deferred.fromCoroutine(coroutine)
        self._d.addBoth(self._done)

    def wait(self):
        if self.finished:
            if isinstance(self.result, Failure):
                return defer.fail(self.result)
            return defer.succeed(self.result)
        d = Deferred(self._leave)
        self._waiters.append(d)
        return d

    def _leave(self, d):
        if d in self._waiters:
            self._waiters.remove(d)
        if not self._waiters and not self.finished:
            # Forget it now: whoever comes next starts afresh instead of
            # waiting for this one to finish cleaning up.
            self._forget()
            self._d.cancel()

    def _forget(self):
        before, self.before = self.before, None
        if before is not None:
            before()

    def _done(self, result):
        self.finished = True
        self.result = result
        self._forget()
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if isinstance(result, Failure):
                w.errback(result)
            else:
                w.callback(result)
        if self.after is not None and not isinstance(result, Failure):
            self.after(result)
        return None
