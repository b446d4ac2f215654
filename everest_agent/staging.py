"""
Moving a task's files: inputs in before it runs, outputs out after.

Streaming, in constant memory
    Downloads use treq with C{unbuffered=True}; the body goes to a protocol
    (L{_BodyReceiver}) that only queues the chunks (read 1 MiB at a time
    from the socket, not Twisted's 64 KiB).  Worker threads write them
    (C{pwrite}, about 1 MiB at a time) to a temporary file and, in a second
    lane, feed them to sha256 (only when a C{sha256} is to be checked); both
    release the GIL, so receiving, writing and hashing run in parallel.
    When more than L{HIGH_WATER} bytes are not yet both written and hashed,
    the transport is paused until the backlog is back under L{LOW_WATER}:
    a slow disk slows the download down instead of filling memory (about
    10 MiB per download at most).  The file is renamed into place only
    when it is complete and its size and sha256 are right.  Uploads stream
    from the file through L{_FileProducer}, which reads (C{pread}) and
    hashes 1 MiB blocks in a worker thread, at most L{PREFETCH} ahead of
    the transport, and honours its pause/resume; the C{sha256} reported
    for an output is that of the bytes sent.  Each block is handed to
    C{send()} whole, from the very C{bytes} object that was read and
    hashed, with no copy in between (L{_tune_for_upload}).  L{tune_malloc}
    (glibc) keeps these 1 MiB buffers on malloc's heaps instead of an
    C{mmap}/C{munmap} pair each, which otherwise costs as much CPU as the
    copying.

Watchdogs
    treq's C{timeout} stops at the response headers, so every exchange has
    its own L{_Watchdog}: C{timeout} seconds to connect and get an answer
    (and, for an upload, to get one after the last byte was sent), and
    C{stall_timeout} seconds without a byte moving while a body streams.
    Either ends that attempt as a transient failure.

Retries
    Transient failures (connection refused/reset/lost, timeouts, stalls, HTTP
    408, 425, 429 and 5xx) are retried with exponential backoff and jitter
    (the delay doubles from C{retry_initial_delay} up to C{retry_max_delay},
    and is drawn from its upper half; a C{Retry-After} of a 429/503 is
    honoured up to C{retry_max_delay}).  C{retries} bounds the consecutive
    attempts that made no progress: an attempt that brought new bytes starts
    the count again.  The platform's own file server being unreachable (no
    connection, no answer, or a 502/503/504 from its gateway) does not count
    either: the agent waits for its platform anyway, so those transfers go
    on at C{retry_max_delay} until it is back (or the task is cancelled).
    Any other HTTP status fails the task at once, with a reason naming the
    file and the status.  An interrupted download resumes
    with C{Range: bytes=N-} (and C{If-Range} with the validator of the first
    response) when the server had said C{Accept-Ranges: bytes} and sent a
    C{Content-Length}; a C{200} answer to that starts over.

Content cache
    An input with a C{sha256} is fetched once into the agent's content cache
    (L{everest_agent.cache}) and hard-linked (or, across file systems,
    copied) into every task that needs it; such inputs are read-only in the
    task (0444, 0555 when executable).  Concurrent requests for the same
    content wait for the one download in flight, which is cancelled only if
    every task waiting for it is cancelled.  Inputs I{without} a C{sha256}
    are not cached: they are fetched for each task (see the cache module for
    why).

Limits and fairness
    At most C{max_concurrent} transfers (downloads and uploads together) run
    at once.  When tasks wait for a transfer slot, the next free slot goes to
    the waiting task that holds the fewest slots (oldest first among
    equals), so one task with a thousand inputs cannot starve the others.
    A transfer gives its slot back while it waits to retry.

Disk safety
    Before a download of known C{size}, the free space of the directory it
    goes to (less what other downloads in flight there have claimed) must
    hold it, or the task fails at once.  ENOSPC at any point fails that task
    ("disk full"), removes its partial files, and leaves everything else
    running.

The platform's token goes only to URIs with the platform's own host and
port (L{same_origin}); every other server gets no credentials, and a
redirect to another origin drops the header (Twisted's redirect agent does).
"""

import base64
import errno
import hashlib
import os
import random as _random
from collections import OrderedDict, deque
from contextlib import contextmanager
from urllib.parse import quote, urlsplit, urlunsplit

from treq.client import HTTPClient
from twisted.internet import defer, error as net_error
from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.web import error as web_error
from twisted.web._newclient import RequestTransmissionFailed, ResponseNeverReceived
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    PotentialDataLoss,
    ResponseDone,
    ResponseFailed,
)
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from everest_agent import paths
from everest_agent.cache import ContentCache, sha256_file
from everest_agent.client import trust_root

_DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}

#: Bytes handed to the writer thread at once (fewer if the batch has
#: L{MAX_IOV} chunks already).
BATCH = 1 << 20
MAX_IOV = 256
#: A download's transport is paused above this many bytes not yet on disk...
HIGH_WATER = 8 << 20
#: ...and resumed at or below this many.
LOW_WATER = 4 << 20
#: Uploads read the file in blocks of this size, at most L{PREFETCH} ahead.
READ_SIZE = 1 << 20
PREFETCH = 3
#: Read size on a download's connection (Twisted's default is 64 KiB).
RECV_SIZE = 1 << 20
#: Bodies of responses we do not want are read up to this much, then dropped.
DISCARD_LIMIT = 1 << 20

TRANSIENT_STATUS = frozenset([408, 425, 429]) | frozenset(range(500, 600))


class StagingError(Exception):
    """A transfer failed; the message is the task's failure reason."""


class _Failed(Exception):
    """One attempt (or all of them) failed; C{transient} ones are retried."""

    def __init__(self, message, transient=False, retry_after=None, unreachable=False):
        super().__init__(message)
        self.message = message
        self.transient = transient or unreachable
        self.retry_after = retry_after
        # The server could not be reached at all (no answer, or a gateway
        # saying its backend is down), as opposed to a server that answered.
        self.unreachable = unreachable


def origin(url):
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    return host, parts.port or _DEFAULT_PORTS.get(parts.scheme)


def same_origin(platform_url, uri):
    """Whether C{uri} has the platform URL's host and port."""
    return origin(platform_url) == origin(uri)


def _shown(uri):
    """C{uri} fit for a log or a reason: no credentials, query or fragment."""
    parts = urlsplit(uri)
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


# -- helpers that run in worker threads -----------------------------------------


def _write_all(fd, chunks, offset):
    """Write C{chunks} at C{offset}, all of them."""
    total = sum(len(c) for c in chunks)
    done = 0
    views = chunks
    while done < total:
        n = os.pwritev(fd, views, offset + done) if len(views) > 1 else os.pwrite(fd, views[0], offset + done)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        done += n
        if done < total:
            # Skip what was written, slice the chunk it stopped in.
            rest, skip = [], done
            for c in chunks:
                if skip >= len(c):
                    skip -= len(c)
                    continue
                rest.append(memoryview(c)[skip:] if skip else c)
                skip = 0
            views = rest
    return total


def _read_and_hash(fd, n, offset, digest):
    data = os.pread(fd, n, offset)
    digest.update(data)
    return data


def _hash_all(digest, chunks):
    for c in chunks:
        digest.update(c)


def _copy_file(source, target, mode):
    """Copy C{source} to a new file C{target} (never through a link)."""
    out = paths.create_exclusive(target, 0o600)
    try:
        with open(source, "rb") as src:
            size = os.fstat(src.fileno()).st_size
            offset = 0
            while offset < size:
                try:
                    n = os.copy_file_range(src.fileno(), out, min(size - offset, 1 << 30))
                except (AttributeError, OSError) as e:
                    if isinstance(e, OSError) and e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                        raise
                    n = os.sendfile(out, src.fileno(), None, min(size - offset, 1 << 30))
                if n == 0:
                    break
                offset += n
        os.fchmod(out, mode)
    finally:
        os.close(out)


# -- machinery ------------------------------------------------------------------


_malloc_tuned = False


def tune_malloc(mmap_threshold=4 << 20, trim_threshold=32 << 20):
    """
    Make glibc's malloc serve transfer buffers (1-2 MiB each, thousands per
    GiB) from its heaps instead of a fresh C{mmap} and C{munmap} for each:
    glibc starts with a 128 KiB threshold and only raises it as big blocks
    are freed, so a young process pays a page fault per 4 KiB and a TLB
    shoot-down per buffer, which costs as much CPU as the copy itself.
    Freed memory above C{trim_threshold} is still given back to the system.
    Process-wide, once; a no-op where C{mallopt} is not glibc's.
    """
    global _malloc_tuned
    if _malloc_tuned:
        return
    _malloc_tuned = True
    try:
        import ctypes
        import platform

        if platform.libc_ver()[0] != "glibc":
            return
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, ImportError):
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    mallopt(M_MMAP_THRESHOLD, mmap_threshold)
    mallopt(M_TRIM_THRESHOLD, trim_threshold)


class _Workers:
    """The stager's own thread pool, started on first use."""

    def __init__(self, reactor, size):
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=0, maxthreads=size, name="everest-staging")
        self._trigger = None
        self.stopped = False

    def run(self, f, *args):
        """Run C{f(*args)} in a thread; a Deferred fires with its result."""
        if self.stopped:
            return defer.fail(RuntimeError("the stager is closed"))
        if not self._pool.started:
            self._pool.start()
            self._trigger = self._reactor.addSystemEventTrigger("during", "shutdown", self.stop)
        d = Deferred()

        def done(ok, result):
            self._reactor.callFromThread(d.callback if ok else d.errback, result)

        self._pool.callInThreadWithCallback(done, f, *args)
        return d

    def stop(self):
        self.stopped = True
        if self._trigger is not None:
            try:
                self._reactor.removeSystemEventTrigger(self._trigger)
            except (ValueError, KeyError):
                pass
            self._trigger = None
        if self._pool.started:
            self._pool.stop()


def _mirror(d):
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


class _FairLimiter:
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


class _Watchdog:
    """
    Calls C{on_expire(message)} when C{touch} has not been called for the
    number of seconds given to the current L{watch}.
    """

    def __init__(self, clock, on_expire):
        self._clock = clock
        self.on_expire = on_expire
        self._call = None
        self._last = 0.0
        self._seconds = 0.0
        self._message = ""
        self.expired = None

    def watch(self, seconds, message):
        self.stop()
        self._seconds = seconds
        self._message = message
        self._last = self._clock.seconds()
        self._call = self._clock.callLater(seconds, self._check)

    def touch(self):
        self._last = self._clock.seconds()

    def _check(self):
        self._call = None
        idle = self._clock.seconds() - self._last
        if idle >= self._seconds:
            self.expired = self._message
            self.on_expire(self._message)
        else:
            self._call = self._clock.callLater(self._seconds - idle, self._check)

    def stop(self):
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


class _Group:
    """
    Run coroutines side by side.  L{wait} returns their results once all
    have finished; with C{fail_fast}, the first failure cancels the others
    (and is raised once they have cleaned up).  Cancelling L{wait} cancels
    them all, waits for them, and raises L{CancelledError}.
    """

    def __init__(self, coroutines, fail_fast):
        self.fail_fast = fail_fast
        self.first_error = None
        self.cancelled = False
        self._ds = []
        self._results = []
        self._remaining = 0
        self._waiters = []
        for i, coroutine in enumerate(coroutines):
            self._results.append(None)
            self._remaining += 1
            d = Deferred.fromCoroutine(coroutine)
            self._ds.append(d)
            d.addBoth(self._record, i)

    def _record(self, result, i):
        self._results[i] = result
        self._remaining -= 1
        if isinstance(result, Failure) and not result.check(CancelledError) and self.first_error is None:
            self.first_error = result
            if self.fail_fast:
                self._cancel_all()
        if self._remaining == 0:
            waiters, self._waiters = self._waiters, []
            for w in waiters:
                if not w.called:
                    w.callback(None)
        return None

    def _cancel_all(self):
        for d in self._ds:
            if not d.called:
                d.cancel()

    def _on_cancel(self, _):
        self.cancelled = True
        self._cancel_all()

    async def wait(self):
        while self._remaining:
            w = Deferred(self._on_cancel)
            self._waiters.append(w)
            try:
                await w
            except CancelledError:
                self.cancelled = True
        if self.cancelled:
            raise CancelledError()
        if self.first_error is not None:
            self.first_error.raiseException()
        for result in self._results:
            if isinstance(result, Failure):  # only cancellations are left
                raise CancelledError()
        return self._results


class _Shared:
    """
    One job (a coroutine) whose result several waiters share.  It is
    cancelled only when every waiter has gone.  C{after(result)} runs once
    every waiter present at the end has been given the result.
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


# -- downloads ------------------------------------------------------------------


class _FileWriter:
    """
    Writes a download to a file and hashes it, in worker threads.  The
    reactor thread only queues chunks.  Writing and hashing are two lanes
    that run side by side, each one job at a time and in order, so the file
    and the hash see the bytes in the order they came.
    """

    def __init__(self, fd, workers, hashing=True):
        self.fd = fd
        self._workers = workers
        self.hashing = hashing
        self.hash = hashlib.sha256() if hashing else None
        self.written = 0  # on disk
        self.hashed = 0  # fed to the hash
        self.queued = 0  # handed to write()
        self._batch = []
        self._batch_size = 0
        self._to_write = deque()
        self._to_hash = deque()
        self._writing = False
        self._hashing = False
        self.error = None  # the OSError of a failed write
        self.on_drain = None
        self.on_error = None
        self._idle = []  # callables, run when nothing is queued or running
        self.closed = False

    @property
    def backlog(self):
        """Bytes handed over but not yet both written and hashed."""
        return self.queued - min(self.written, self.hashed)

    def write(self, data):
        self._batch.append(data)
        self._batch_size += len(data)
        self.queued += len(data)
        if self._batch_size >= BATCH or len(self._batch) >= MAX_IOV:
            self._flush()
            self._next()

    def _flush(self):
        if self._batch and self.error is None:
            job = (self._batch, self._batch_size)
            self._to_write.append(job)
            if self.hashing:
                self._to_hash.append(job)
        self._batch = []
        self._batch_size = 0

    def _next(self):
        if self.error is not None:
            self._to_write.clear()
            self._to_hash.clear()
        if not self._writing and self._to_write:
            batch, size = self._to_write.popleft()
            self._writing = True
            self._workers.run(_write_all, self.fd, batch, self.written).addBoth(self._wrote, size)
        if not self._hashing and self._to_hash:
            batch, size = self._to_hash.popleft()
            self._hashing = True
            self._workers.run(_hash_all, self.hash, batch).addBoth(self._hashed, size)
        if not (self._writing or self._hashing or self._to_write or self._to_hash):
            callbacks, self._idle = self._idle, []
            for f in callbacks:
                f()

    def _wrote(self, result, size):
        self._writing = False
        if isinstance(result, Failure):
            if self.error is None:
                self.error = result.value
                if self.on_error is not None:
                    self.on_error(self.error)
        else:
            self.written += size
            if not self.hashing:
                self.hashed = self.written
            self._progress()
        self._next()
        return None

    def _hashed(self, result, size):
        self._hashing = False
        if isinstance(result, Failure):  # not expected; treat like a write error
            if self.error is None:
                self.error = result.value
                if self.on_error is not None:
                    self.on_error(self.error)
        else:
            self.hashed += size
            self._progress()
        self._next()
        return None

    def _progress(self):
        if self.on_drain is not None and self.backlog <= LOW_WATER:
            self.on_drain()

    def _when_idle(self, f):
        self._flush()
        self._idle.append(f)
        self._next()

    def drain(self):
        """A Deferred that fires when everything written so far is on disk
        and hashed (or the writer failed: see L{error})."""
        d = Deferred()
        self._when_idle(lambda: d.called or d.callback(None))
        return d

    async def reset(self):
        """Start the file over (the writer must be idle)."""
        assert not (self._writing or self._hashing or self._to_write or self._to_hash)
        await self._workers.run(os.ftruncate, self.fd, 0)
        self.hash = hashlib.sha256() if self.hashing else None
        self.written = self.hashed = self.queued = 0

    def dispose(self, unlink=None):
        """
        Drop what is queued, then (once no job runs) close the file and
        remove C{unlink}.  This happens even if the returned Deferred is
        cancelled.
        """
        self._batch = []
        self._batch_size = 0
        if self.error is None:
            self.error = CancelledError()
        d = Deferred()

        def finish():
            self._close()
            if unlink is not None:
                _remove(unlink)
            if not d.called:
                d.callback(None)

        self._when_idle(finish)
        return d

    def _close(self):
        if not self.closed:
            self.closed = True
            os.close(self.fd)

    async def close(self):
        await self.drain()
        self._close()


class _BodyReceiver(Protocol):
    """
    Receives one response body into a L{_FileWriter}, pausing the transport
    while the disk is behind, with a stall watchdog.  C{done} fires when the
    body is complete (with True, or False when its end was only the
    connection closing), or fails with L{_Failed}.
    """

    def __init__(self, writer, limit, watchdog, stall_timeout):
        self.writer = writer
        self.limit = limit
        self.watchdog = watchdog
        self.stall_timeout = stall_timeout
        self.received = 0
        self.paused = False
        self.finished = False
        self.done = Deferred(self._cancel)

    def connectionMade(self):
        self.writer.on_drain = self._drained
        self.writer.on_error = lambda e: self._abort(_io_failure(e))
        self.watchdog.on_expire = lambda message: self._abort(_Failed(message, transient=True))
        self.watchdog.watch(self.stall_timeout, f"no data for {self.stall_timeout:g} s")

    def dataReceived(self, data):
        if self.finished:
            return
        self.received += len(data)
        self.watchdog.touch()
        if self.limit is not None and self.received > self.limit:
            self._abort(_Failed(f"size mismatch: the server sends more than the {self.limit} bytes expected"))
            return
        self.writer.write(data)
        if not self.paused and self.writer.backlog > HIGH_WATER:
            self.paused = True
            self.transport.pauseProducing()

    def _drained(self):
        if self.paused and not self.finished:
            self.paused = False
            self.transport.resumeProducing()

    def _stop(self):
        self.finished = True
        self.watchdog.stop()
        self.writer.on_drain = None
        self.writer.on_error = None

    def _abort(self, failure):
        if self.finished:
            return
        self._stop()
        self.transport.stopProducing()
        self.done.errback(failure)

    def _cancel(self, d):
        if not self.finished:
            self._stop()
            self.transport.stopProducing()

    def connectionLost(self, reason=None):
        if self.finished:
            return
        self._stop()
        if reason is None or reason.check(ResponseDone):
            self.done.callback(True)
        elif reason.check(PotentialDataLoss):
            self.done.callback(False)
        else:
            self.done.errback(
                _Failed(
                    f"the connection broke off after {self.received} bytes of the body "
                    f"({_describe(reason.value)})",
                    transient=True,
                )
            )


class _Discard(Protocol):
    """Reads a body we do not want (at most L{DISCARD_LIMIT}, then drops it)."""

    def __init__(self, watchdog=None):
        self.received = 0
        self.watchdog = watchdog
        self.done = Deferred(lambda d: self._stop())

    def connectionMade(self):
        if self.watchdog is not None:
            self.watchdog.on_expire = lambda message: self._finish()

    def dataReceived(self, data):
        self.received += len(data)
        if self.watchdog is not None:
            self.watchdog.touch()
        if self.received > DISCARD_LIMIT:
            self._finish()

    def _stop(self):
        if self.watchdog is not None:
            self.watchdog.stop()
        self.transport.stopProducing()

    def _finish(self):
        if not self.done.called:
            self._stop()
            self.done.callback(None)

    def connectionLost(self, reason=None):
        if self.watchdog is not None:
            self.watchdog.stop()
        if not self.done.called:
            self.done.callback(None)


class _RangeState:
    """What one download learned that lets a later attempt resume it."""

    def __init__(self):
        self.resumable = False
        self.validator = None
        self.total = None


# -- uploads --------------------------------------------------------------------


@implementer(IBodyProducer)
class _FileProducer:
    """
    Sends C{length} bytes of the file C{fd} as a request body.  Blocks of
    L{READ_SIZE} are read (C{pread}) and hashed in a worker thread (both
    release the GIL), at most L{PREFETCH} blocks ahead of the transport,
    which can pause and resume us.  So the reading and hashing of one block
    overlap the sending of the previous ones, and C{hash} is that of the
    bytes sent.
    """

    def __init__(self, fd, length, workers, on_start=None, on_progress=None, on_sent=None):
        self.length = length
        self._fd = fd
        self._workers = workers
        self.hash = hashlib.sha256()
        self.sent = 0
        self.error = None
        self._offset = 0
        self._ready = deque()
        self._reading = False
        self._paused = False
        self._stopped = False
        self._consumer = None
        self._finished = None
        self._on_start = on_start
        self._on_progress = on_progress
        self._on_sent = on_sent

    def startProducing(self, consumer):
        self._consumer = consumer
        _tune_for_upload(getattr(consumer, "_consumer", None))
        self._finished = Deferred()
        if self._on_start is not None:
            self._on_start()
        self._pump()
        return self._finished

    def _pump(self):
        while self._ready and not self._paused and not self._stopped:
            chunk = self._ready.popleft()
            self.sent += len(chunk)
            self._consumer.write(chunk)
            if self._on_progress is not None:
                self._on_progress()
        if self._stopped or self._finished.called:
            return
        if self.sent >= self.length and not self._ready:
            if self._on_sent is not None:
                self._on_sent()
            self._finished.callback(None)
            return
        if not self._reading and self._offset < self.length and len(self._ready) < PREFETCH:
            n = min(READ_SIZE, self.length - self._offset)
            self._reading = True
            d = self._workers.run(_read_and_hash, self._fd, n, self._offset, self.hash)
            self._offset += n
            d.addBoth(self._got, n)

    def _got(self, result, n):
        self._reading = False
        if self._stopped:
            return None
        if isinstance(result, Failure):
            self._fail(_io_failure(result.value, "reading"))
        elif len(result) < n:
            self._fail(_Failed("the file shrank while it was being uploaded"))
        else:
            self._ready.append(result)
            self._pump()
        return None

    def _fail(self, failure):
        self.error = failure
        self._stopped = True
        if self._finished is not None and not self._finished.called:
            self._finished.errback(failure)

    def pauseProducing(self):
        self._paused = True

    def resumeProducing(self):
        self._paused = False
        if self._finished is not None:
            self._pump()

    def stopProducing(self):
        self._stopped = True
        self._ready.clear()


def _tune_for_upload(transport):
    """
    Make a TCP transport send an upload's blocks of L{READ_SIZE} the way they
    come, without copying them or slicing them up:

     - it pauses the producer as soon as it holds one block (its
       C{bufferSize} is just below one), and resumes it only once it has
       sent everything; so each block lands in an empty buffer and is sent
       from the very C{bytes} object that was read and hashed.  With room
       for two, Twisted joins the two into one new string before sending
       them: one more copy of both.  The socket's own buffer (several MiB
       on Linux) keeps the connection busy while the next block is handed
       over;
     - it hands a whole block to C{send()} at once instead of 128 KiB
       (C{SEND_LIMIT}, a guard meant for Windows) per turn of the reactor:
       eight times fewer turns, system calls and wake-ups of the receiver.
       When the kernel takes only part of a block, Twisted copies what is
       left before each further try; but then the network, not the CPU, is
       the limit.

    Both stay on the connection when it goes back to the pool; they suit
    any later request (a download sets its own C{bufferSize}).  Anything
    but a socket's own transport (TLS, for one, wraps it in a protocol,
    and writes its records to it) is left alone.
    """
    if not isinstance(transport, FileDescriptor):
        return
    transport.bufferSize = READ_SIZE - 1
    transport.SEND_LIMIT = READ_SIZE


# -- the stager -----------------------------------------------------------------


class Stager:
    """
    Transfers files for tasks over HTTP(S).

    @param reactor: the reactor (network, threads).
    @param clock: what watchdogs and retry delays are timed with (default:
        C{reactor}); tests pass a L{twisted.internet.task.Clock}.
    @param random: a L{random.Random} for the backoff jitter.
    @param cache_dir: the content cache's directory; None (or a
        C{cache_size} of 0) turns the cache off.
    @param malloc_tuning: call L{tune_malloc} (process-wide, glibc only).
    """

    log = Logger()

    def __init__(
        self, reactor, platform_url, token, ca_file=None, timeout=60.0, *,
        stall_timeout=60.0, retries=5, retry_initial_delay=1.0, retry_max_delay=60.0,
        max_concurrent=8, cache_dir=None, cache_size=0, clock=None, random=None,
        context_factory=None, malloc_tuning=True,
    ):
        if malloc_tuning:
            tune_malloc()
        self._reactor = reactor
        self._clock = clock if clock is not None else reactor
        self._random = random if random is not None else _random.Random()
        self._platform_url = platform_url
        self._token = token
        self._timeout = timeout
        self._stall_timeout = stall_timeout
        self._retries = retries
        self._initial_delay = retry_initial_delay
        self._max_delay = retry_max_delay
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = max_concurrent
        if context_factory is None:
            context_factory = BrowserLikePolicyForHTTPS(trustRoot=trust_root(ca_file))
        self._http = HTTPClient(
            Agent(reactor, contextFactory=context_factory, pool=self._pool, connectTimeout=timeout)
        )
        self._workers = _Workers(reactor, max_concurrent + 2)
        self.limiter = _FairLimiter(max_concurrent)
        self._cache_dir = cache_dir if cache_dir and cache_size > 0 else None
        self._cache_size = cache_size
        self._cache = None
        self._cache_failed = False
        self._jobs = {}  # (sha256, executable) -> _Shared fetch or copy into the cache
        self._checks = {}  # Entry -> _Shared verification
        self._reserved = {}  # st_dev -> bytes claimed by downloads in flight
        self.bytes_in = 0
        self.bytes_out = 0
        self.requests = 0

    @classmethod
    def from_config(cls, config, reactor, **kwargs):
        """A stager set up from the agent's configuration (C{[transfer]})."""
        transfer = config.transfer
        work_dir = config.agent.work_dir
        cache_dir = getattr(transfer, "cache_dir", "") or os.path.join(work_dir, ".cache")
        return cls(
            reactor, config.platform.url, config.platform.token,
            ca_file=config.platform.ca_file or None,
            timeout=transfer.timeout,
            stall_timeout=getattr(transfer, "stall_timeout", 60.0),
            retries=getattr(transfer, "retries", 5),
            retry_initial_delay=getattr(transfer, "retry_initial_delay", 1.0),
            retry_max_delay=getattr(transfer, "retry_max_delay", 60.0),
            max_concurrent=getattr(transfer, "max_concurrent", 8),
            cache_dir=cache_dir,
            cache_size=getattr(transfer, "cache_size", 10 << 30),
            **kwargs,
        )

    @property
    def cache(self):
        """The content cache (opened on first use), or None."""
        if self._cache is None and self._cache_dir is not None and not self._cache_failed:
            cache = ContentCache(self._cache_dir, self._cache_size)
            try:
                cache.open()
            except OSError as e:
                self._cache_failed = True
                self.log.error(
                    "Content cache {directory} unusable ({error}); inputs are fetched for every task",
                    directory=self._cache_dir, error=e.strerror or e,
                )
                return None
            self._cache = cache
        return self._cache

    def _headers(self, uri):
        if self._token and same_origin(self._platform_url, uri):
            return {b"Authorization": [b"Bearer " + self._token.encode("ascii")]}
        return {}

    def close(self):
        """Close idle connections and stop the worker threads."""
        d = self._pool.closeCachedConnections()
        self._workers.stop()
        return d

    # -- stage in -------------------------------------------------------------

    async def stage_in(self, task_dir, inputs):
        """Put every input in place, or raise L{StagingError}."""
        planned, seen = [], {}
        for item in inputs:
            try:
                target = paths.input_target(task_dir, item["path"])
            except paths.PathEscape as e:
                raise StagingError(str(e)) from None
            except OSError as e:
                raise StagingError(f"input {item['path']!r}: {e.strerror}") from None
            if target in seen:
                raise StagingError(f"input {item['path']!r}: the same file as input {seen[target]!r}")
            seen[target] = item["path"]
            planned.append((target, item))
        for target, item in planned:
            if "data" in item:
                self._write_inline(target, item)
        downloads = [(t, i) for t, i in planned if "data" not in i]
        if downloads:
            group = _Group([self._input(task_dir, t, i) for t, i in downloads], fail_fast=True)
            await group.wait()

    def _write_inline(self, target, item):
        data = base64.b64decode(item["data"])
        what = f"input {item['path']!r}"
        self._check(what, item, len(data), hashlib.sha256(data).hexdigest())
        tmp = paths.temporary_for(target)
        try:
            fd = paths.create_exclusive(tmp, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                if item.get("executable"):
                    os.fchmod(fd, 0o755)
            finally:
                os.close(fd)
            os.replace(tmp, target)
        except OSError as e:
            _remove(tmp)
            raise StagingError(f"{what}: {_io_failure(e).message}") from None
        except paths.PathEscape as e:
            raise StagingError(f"{what}: {e}") from None

    def _check(self, what, item, size, digest):
        if item.get("size") is not None and size != item["size"]:
            raise StagingError(f"{what}: size mismatch: expected {item['size']} bytes, got {size}")
        if item.get("sha256") and digest != item["sha256"]:
            raise StagingError(f"{what}: checksum mismatch: expected sha256 {item['sha256']}, got {digest}")

    async def _input(self, task_dir, target, item):
        what = f"input {item['path']!r}"
        try:
            if item.get("sha256") and self.cache is not None:
                await self._input_cached(task_dir, target, item)
            else:
                await self._input_direct(task_dir, target, item)
        except _Failed as e:
            raise StagingError(f"{what}: {e.message}") from None

    async def _input_direct(self, key, target, item):
        size = item.get("size")
        tmp = paths.temporary_for(target)
        with self._space(os.path.dirname(target), size):
            await self._download(key, item["uri"], tmp, size, item.get("sha256"), 0o755 if item.get("executable") else 0o644)
        try:
            os.replace(tmp, target)
        except OSError as e:
            _remove(tmp)
            raise _io_failure(e) from None

    @contextmanager
    def _space(self, directory, size, reserve=True):
        """Check (and claim) room for C{size} bytes in C{directory}'s file system."""
        if size is None:
            yield
            return
        try:
            st = os.statvfs(directory)
            dev = os.stat(directory).st_dev
        except OSError as e:
            raise _io_failure(e) from None
        free = st.f_bavail * st.f_frsize - self._reserved.get(dev, 0)
        if size > free:
            raise _Failed(
                f"not enough disk space: {size} bytes needed, {max(free, 0)} available in {directory}"
            )
        if not reserve:
            yield
            return
        self._reserved[dev] = self._reserved.get(dev, 0) + size
        try:
            yield
        finally:
            self._reserved[dev] -= size
            if not self._reserved[dev]:
                del self._reserved[dev]

    def _waits_for(self, uri, failure):
        """
        Whether C{failure} does not count against the retries: the platform
        itself cannot be reached (it is restarting, say).  The agent waits
        for the platform anyway (its connection retries forever), and a task
        whose files cannot reach the platform would not reach it as FAILED
        either; so these transfers keep trying, at the longest delay, until
        the platform is back or the task is cancelled.  A platform that
        answers with an error still fails the transfer after the retries.
        """
        return failure.unreachable and same_origin(self._platform_url, uri)

    def _delay(self, failures, retry_after=None):
        base = min(self._max_delay, self._initial_delay * 2 ** min(failures - 1, 40))
        delay = base * (0.5 + 0.5 * self._random.random())
        if retry_after is not None:
            delay = max(delay, min(retry_after, self._max_delay))
        return delay

    async def _download(self, key, uri, tmp, size, sha256, mode):
        """
        Fetch C{uri} into the new file C{tmp}, with retries.  On success the
        file is complete and verified; on failure it is gone.

        @return: C{(size, sha256 hex)}; the hash only when C{sha256} was
            given (nothing else needs it).
        @raise _Failed: when it cannot be done.
        """
        writer = None
        state = _RangeState()
        failures = counted = attempts = best = 0
        try:
            while True:
                await self.limiter.acquire(key)
                try:
                    if writer is None:
                        try:
                            writer = _FileWriter(
                                paths.create_exclusive(tmp, mode), self._workers, hashing=bool(sha256)
                            )
                        except OSError as e:
                            raise _io_failure(e) from None
                        except paths.PathEscape as e:
                            raise _Failed(str(e)) from None
                    attempts += 1
                    await self._get_once(uri, writer, state, size)
                    break
                except _Failed as e:
                    if not e.transient:
                        raise
                    failure = e
                finally:
                    self.limiter.release(key)
                if writer.written > best:
                    best = writer.written
                    failures = counted = 0
                failures += 1
                if not self._waits_for(uri, failure):
                    counted += 1
                if counted > self._retries:
                    raise _Failed(f"{failure.message} (gave up after {attempts} attempts)")
                delay = self._delay(failures, failure.retry_after)
                self.log.info(
                    "GET {uri}: {reason}; retrying in {delay:.1f} s",
                    uri=_shown(uri), reason=failure.message, delay=delay,
                )
                await deferLater(self._clock, delay)
            length = writer.written
            digest = writer.hash.hexdigest() if writer.hashing else None
            if size is not None and length != size:
                raise _Failed(f"size mismatch: expected {size} bytes, got {length}")
            if sha256 and digest != sha256:
                raise _Failed(f"checksum mismatch: expected sha256 {sha256}, got {digest}")
            await writer.close()
            return length, digest
        except BaseException:
            if writer is not None:
                await writer.dispose(unlink=tmp)
            raise

    async def _get_once(self, uri, writer, state, size):
        """One GET attempt: resume, restart or start the body in C{writer}."""
        headers = self._headers(uri)
        offset = writer.written
        if offset and state.resumable:
            headers[b"Range"] = [f"bytes={offset}-".encode("ascii")]
            if state.validator:
                headers[b"If-Range"] = [state.validator]
        elif offset:
            await writer.reset()
            offset = 0
        exchange = _Exchange(self, "GET", uri, headers)
        try:
            response = await exchange.start()
            code = response.code
            if offset and code == 206:
                start, total = _content_range(response)
                if start != offset or (state.total is not None and total not in (None, state.total)):
                    state.resumable = False
                    await self._drop(response, exchange.watchdog)
                    raise _Failed(f"GET {_shown(uri)}: the server resumed at the wrong place", transient=True)
            elif code == 200:
                if offset:
                    await writer.reset()
                    offset = 0
                state.total = response.length if response.length != UNKNOWN_LENGTH else None
                state.resumable = state.total is not None and b"bytes" in b",".join(
                    response.headers.getRawHeaders(b"accept-ranges", [])
                ).lower()
                state.validator = _validator(response)
                if size is not None and state.total is not None and state.total != size:
                    await self._drop(response, exchange.watchdog)
                    raise _Failed(
                        f"size mismatch: expected {size} bytes, the server sends {state.total}"
                    )
            elif offset and code == 416:
                state.resumable = False
                await self._drop(response, exchange.watchdog)
                raise _Failed(f"GET {_shown(uri)}: the server refused to resume (HTTP 416)", transient=True)
            else:
                await self._refuse(response, "GET", uri, exchange.watchdog)
            if size is not None:
                limit = size - offset
            elif state.total is not None:
                limit = state.total - offset
            else:
                limit = None
            receiver = _BodyReceiver(writer, limit, exchange.watchdog, self._stall_timeout)
            _tune(response)
            response.deliverBody(receiver)
            try:
                complete = await receiver.done
            except _Failed:
                await writer.drain()
                raise
            finally:
                self.bytes_in += receiver.received
            await writer.drain()
            if writer.error is not None:
                raise _io_failure(writer.error)
            if not complete and state.total is not None and writer.written != state.total:
                raise _Failed(f"GET {_shown(uri)}: the body ended early", transient=True)
        finally:
            exchange.watchdog.stop()

    async def _drop(self, response, watchdog=None):
        if watchdog is not None:
            watchdog.watch(self._stall_timeout, f"no data for {self._stall_timeout:g} s")
        receiver = _Discard(watchdog)
        response.deliverBody(receiver)
        await receiver.done

    async def _refuse(self, response, method, uri, watchdog=None):
        """Raise the L{_Failed} for an unwanted status."""
        code = response.code
        phrase = (response.phrase or b"").decode("latin-1").strip()
        retry_after = None
        if code in (429, 503):
            values = response.headers.getRawHeaders(b"retry-after", [])
            if values and values[0].strip().isdigit():
                retry_after = int(values[0].strip())
        await self._drop(response, watchdog)
        raise _Failed(
            f"{method} {_shown(uri)} answered HTTP {code}{' ' + phrase if phrase else ''}",
            transient=code in TRANSIENT_STATUS,
            retry_after=retry_after,
            unreachable=code in (502, 503, 504),
        )

    # -- the content cache ----------------------------------------------------

    async def _input_cached(self, key, target, item):
        cache = self.cache
        digest, executable, size = item["sha256"], bool(item.get("executable")), item.get("size")
        if size is not None:
            directory = os.path.dirname(target)
            try:
                other_fs = os.stat(directory).st_dev != os.stat(cache.directory).st_dev
            except OSError as e:
                raise _io_failure(e) from None
            if other_fs and cache.get(digest, executable) is None:
                with self._space(directory, size, reserve=False):
                    pass
        tried = set()
        while True:
            entry = cache.get(digest, executable)
            if entry is not None:
                if await self._use(entry, target, item):
                    return
                continue
            job = self._jobs.get((digest, executable)) or self._jobs.get((digest, not executable))
            if job is None:
                other = cache.get(digest, not executable)
                if other is not None:
                    job = self._start_job((digest, executable), None, self._variant(other, executable))
                else:
                    job = self._start_job(
                        (digest, executable), item["uri"], self._fetch(key, digest, executable, item)
                    )
            try:
                await job.wait()
            except _Failed:
                if job.uri is None or job.uri == item["uri"] or item["uri"] in tried:
                    raise
                # That download was from another task's URI: try ours.
            tried.add(job.uri)

    def _start_job(self, key, uri, coroutine):
        """Start the shared job that puts C{key} in the cache."""
        cache = self.cache
        job = _Shared(coroutine, after=cache.unpin)
        job.uri = uri
        if not job.finished:
            self._jobs[key] = job

            def forget():
                if self._jobs.get(key) is job:
                    del self._jobs[key]

            job.before = forget
        return job

    async def _fetch(self, key, digest, executable, item):
        """Download into the cache; the entry comes back pinned."""
        cache = self.cache
        size = item.get("size")
        tmp = cache.temporary()
        cache.make_room(size)
        with self._space(cache.directory, size):
            length, _ = await self._download(key, item["uri"], tmp, size, digest, 0o600)
        try:
            return cache.add(digest, executable, tmp, length)
        except OSError as e:
            _remove(tmp)
            raise _io_failure(e) from None

    async def _variant(self, other, executable):
        """Make the other mode of a cached file by a local copy; pinned."""
        cache = self.cache
        cache.pin(other)
        try:
            tmp = cache.temporary()
            cache.make_room(other.size)
            with self._space(cache.directory, other.size):
                job = self._workers.run(_copy_file, other.path, tmp, 0o600)
                try:
                    await _mirror(job)
                except CancelledError:
                    job.addBoth(lambda _: _remove(tmp))
                    raise
                except OSError as e:
                    _remove(tmp)
                    raise _io_failure(e) from None
            try:
                return cache.add(other.digest, executable, tmp, other.size)
            except OSError as e:
                _remove(tmp)
                raise _io_failure(e) from None
        finally:
            cache.unpin(other)

    async def _use(self, entry, target, item):
        """
        Put the cached C{entry} at C{target}.

        @return: False if the entry turned out to be unusable (it is gone).
        """
        cache = self.cache
        cache.pin(entry)
        try:
            state = cache.check(entry)
            if state == "missing":
                return False
            if state == "verify" and not await self._verify(entry):
                return False
            size = item.get("size")
            if size is not None and entry.size != size:
                raise _Failed(f"size mismatch: expected {size} bytes, the content with this sha256 has {entry.size}")
            if not await self._place(entry, target):
                return False
            cache.touch(entry)
            return True
        finally:
            cache.unpin(entry)

    async def _verify(self, entry):
        job = self._checks.get(entry)
        if job is None:
            job = _Shared(self._verify_job(entry))
            if not job.finished:
                self._checks[entry] = job
        return await job.wait()

    async def _verify_job(self, entry):
        cache = self.cache
        cache.pin(entry)
        try:
            job = self._workers.run(sha256_file, entry.path)
            try:
                size, digest = await _mirror(job)
            except OSError:
                cache.drop(entry, why="unreadable")
                return False
            return cache.mark_verified(entry, size, digest)
        finally:
            self._checks.pop(entry, None)
            cache.unpin(entry)

    async def _place(self, entry, target):
        tmp = paths.temporary_for(target)
        try:
            _remove(tmp)
            os.link(entry.path, tmp)
        except FileNotFoundError:
            if not os.path.exists(entry.path):
                self.cache.drop(entry, why="its file disappeared")
                return False
            raise _io_failure(FileNotFoundError(errno.ENOENT, "No such file or directory")) from None
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EMLINK, errno.EPERM, errno.EACCES, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise _io_failure(e) from None
            with self._space(os.path.dirname(target), entry.size):
                job = self._workers.run(_copy_file, entry.path, tmp, entry.mode)
                try:
                    await _mirror(job)
                except CancelledError:
                    job.addBoth(lambda _: _remove(tmp))
                    raise
                except (OSError, paths.PathEscape) as e:
                    _remove(tmp)
                    if isinstance(e, paths.PathEscape):
                        raise _Failed(str(e)) from None
                    raise _io_failure(e) from None
        try:
            os.replace(tmp, target)
        except OSError as e:
            _remove(tmp)
            raise _io_failure(e) from None
        return True

    # -- stage out ------------------------------------------------------------

    async def stage_out(self, task_dir, outputs):
        """
        Upload every output that exists.

        @return: C{(uploaded, errors)}: C{[{"path", "size", "sha256"}]} for
            the files sent, and the reasons of the ones that failed (a
            required file missing, an escape, a transfer error).  Every file
            is tried, so a failed task still delivers what it has.
        """
        plan = []  # ("upload", rel, uri, optional) or ("error", message)
        for item in outputs:
            if "pattern" in item:
                try:
                    matches, problems = paths.find_outputs(task_dir, item["pattern"])
                except OSError as e:
                    matches, problems = [], [f"output pattern {item['pattern']!r}: {e.strerror}"]
                base = item["uri"] if item["uri"].endswith("/") else item["uri"] + "/"
                plan.extend(("upload", rel, base + quote(rel), False) for rel in matches)
                plan.extend(("error", p) for p in problems)
            else:
                plan.append(("upload", item["path"], item["uri"], bool(item.get("optional"))))
        jobs = [self._output(task_dir, *step[1:]) for step in plan if step[0] == "upload"]
        results = iter(await _Group(jobs, fail_fast=False).wait()) if jobs else iter(())
        uploaded, errors = [], []
        for step in plan:
            if step[0] == "error":
                errors.append(step[1])
                continue
            kind, value = next(results)
            if kind == "ok":
                uploaded.append(value)
            elif kind == "error":
                errors.append(value)
        return uploaded, errors

    async def _output(self, task_dir, rel, uri, optional):
        what = f"output {rel!r}"
        key = task_dir
        f = None
        failures = counted = attempts = 0
        try:
            while True:
                await self.limiter.acquire(key)
                try:
                    if f is None:
                        try:
                            f = paths.open_output(task_dir, rel)
                        except paths.PathEscape as e:
                            return ("error", str(e))
                        except OSError as e:
                            return ("error", f"{what}: {e.strerror}")
                        if f is None:
                            return ("missing", None) if optional else ("error", f"{what} is missing")
                    attempts += 1
                    size, digest = await self._put_once(uri, f.fileno())
                    self.bytes_out += size
                    return ("ok", {"path": rel, "size": size, "sha256": digest})
                except _Failed as e:
                    if not e.transient:
                        return ("error", f"{what}: {e.message}")
                    failure = e
                finally:
                    self.limiter.release(key)
                failures += 1
                if not self._waits_for(uri, failure):
                    counted += 1
                if counted > self._retries:
                    return ("error", f"{what}: {failure.message} (gave up after {attempts} attempts)")
                delay = self._delay(failures, failure.retry_after)
                self.log.info(
                    "PUT {uri}: {reason}; retrying in {delay:.1f} s",
                    uri=_shown(uri), reason=failure.message, delay=delay,
                )
                await deferLater(self._clock, delay)
        except CancelledError:
            raise
        except Exception as e:  # a bug: report it, do not lose the other outputs
            self.log.failure("Uploading {what} failed", what=what)
            return ("error", f"{what}: {_describe(e)}")
        finally:
            if f is not None:
                f.close()

    async def _put_once(self, uri, fd):
        try:
            length = os.fstat(fd).st_size
        except OSError as e:
            raise _io_failure(e, "reading") from None
        exchange = _Exchange(self, "PUT", uri, self._headers(uri))
        stall, timeout = self._stall_timeout, self._timeout
        producer = _FileProducer(
            fd, length, self._workers,
            on_start=lambda: exchange.watchdog.watch(stall, f"no progress sending the body for {stall:g} s"),
            on_progress=exchange.watchdog.touch,
            on_sent=lambda: exchange.watchdog.watch(timeout, f"no answer within {timeout:g} s of the upload"),
        )
        try:
            try:
                response = await exchange.start(producer)
            except _Failed:
                if producer.error is not None:
                    raise producer.error from None
                raise
            if not 200 <= response.code < 300:
                await self._refuse(response, "PUT", uri, exchange.watchdog)
            await self._drop(response, exchange.watchdog)
        finally:
            exchange.watchdog.stop()
        if producer.sent != length:
            raise _Failed("the upload was cut short", transient=True)
        return length, producer.hash.hexdigest()


class _Exchange:
    """
    One HTTP request through treq, with a watchdog.  Cancelling it (the
    task was cancelled) raises L{CancelledError}; the watchdog expiring
    raises a transient L{_Failed}; network errors are classified.
    """

    def __init__(self, stager, method, uri, headers):
        self.stager = stager
        self.method = method
        self.uri = uri
        self.headers = headers
        self.watchdog = _Watchdog(stager._clock, self._expire)
        self._why = None
        self._inner = None

    def _expire(self, message):
        if self._why is None:
            # No answer at all (nothing or only part of a request body went
            # out, or the answer never came): the server is not reachable.
            self._why = _Failed(f"{self.method} {_shown(self.uri)}: {message}", unreachable=True)
            self._inner.cancel()

    def start(self, data=None):
        stager = self.stager
        stager.requests += 1
        self.watchdog.watch(stager._timeout, f"no answer within {stager._timeout:g} s")
        self._inner = inner = stager._http.request(
            self.method, self.uri, headers=self.headers, data=data, unbuffered=True
        )

        def cancel(outer):
            if self._why is None:
                self._why = CancelledError()
            inner.cancel()

        outer = Deferred(cancel)

        def done(result):
            if self._why is not None or outer.called:
                if not isinstance(result, Failure):
                    result.deliverBody(_Discard())
                if not outer.called:
                    outer.errback(Failure(self._why))
                return None
            if isinstance(result, Failure):
                outer.errback(Failure(_network_failure(result.value, self.method, self.uri)))
            else:
                outer.callback(result)
            return None

        inner.addBoth(done)
        return outer


def _tcp_transport(response):
    """The TCP transport under a (treq-wrapped) response, or None."""
    inner = getattr(response, "original", response)
    proxy = getattr(inner, "_transport", None)
    return getattr(proxy, "_producer", None)


def _tune(response, size=None):
    """
    Read (and buffer writes) in bigger pieces on this connection: Twisted
    reads 64 KiB at a time by default, which costs a trip through the HTTP
    parser (and a GIL hand-over to the writer thread) per 64 KiB.
    """
    transport = _tcp_transport(response)
    if transport is not None and hasattr(transport, "bufferSize"):
        transport.bufferSize = size or RECV_SIZE


def _content_range(response):
    """C{(first byte, total or None)} of a 206 response, or (None, None)."""
    values = response.headers.getRawHeaders(b"content-range", [])
    if not values:
        return None, None
    try:
        unit, _, spec = values[0].decode("latin-1").strip().partition(" ")
        span, _, total = spec.partition("/")
        first = int(span.partition("-")[0])
        return first, (int(total) if total.strip() != "*" else None)
    except ValueError:
        return None, None


def _validator(response):
    etags = response.headers.getRawHeaders(b"etag", [])
    if etags and not etags[0].startswith(b"W/"):
        return etags[0]
    modified = response.headers.getRawHeaders(b"last-modified", [])
    return modified[0] if modified else None


def _network_failure(exc, method, uri):
    """The L{_Failed} for an exception from a request."""
    reasons = [r.value for r in getattr(exc, "reasons", None) or []] or [exc]
    message = f"{method} {_shown(uri)} failed: {_describe(exc)}"
    for inner in reasons:
        if isinstance(inner, _Failed):
            return inner
        if isinstance(inner, (web_error.PageRedirect, web_error.InfiniteRedirection)):
            return _Failed(message)
        if inner.__class__.__module__.startswith("OpenSSL") or isinstance(inner, net_error.SSLError):
            return _Failed(message)  # a certificate problem does not go away by itself
    # The server went away before it answered (it is going down, or its
    # listener is gone): like no connection at all.
    if isinstance(exc, (ResponseNeverReceived, RequestTransmissionFailed,
                        net_error.ConnectError, net_error.DNSLookupError)):
        return _Failed(message, unreachable=True)
    if isinstance(exc, (ResponseFailed, net_error.ConnectionClosed)):
        return _Failed(message, transient=True)
    return _Failed(message)


def _io_failure(error, doing="writing"):
    """The (permanent) L{_Failed} for an C{OSError} on the local disk."""
    if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return _Failed(f"disk full ({error.strerror or 'no space left on device'})")
    text = getattr(error, "strerror", None) or str(error) or error.__class__.__name__
    return _Failed(f"{doing} failed: {text}")


def _describe(error):
    reasons = getattr(error, "reasons", None)
    if reasons:
        error = reasons[0].value
    text = str(error) or error.__class__.__name__
    return " ".join(text.split())[:300]


def _remove(path):
    try:
        os.unlink(path)
    except OSError:
        pass
