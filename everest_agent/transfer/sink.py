"""
The download sink: a response body streamed to a file, in constant memory.

L{BodyReceiver} (the protocol a response delivers its body to) only queues
the chunks; L{FileWriter} has a worker thread write them (C{pwritev}, about
L{BATCH} bytes at a time) to the file and then feed the same batch to
sha256 (only when a C{sha256} is to be checked), in one job: one trip to a
thread and back per MiB, and the hash reads the batch while it is still in
the CPU's cache.  Both calls release the GIL, so receiving runs in parallel
with them.  (Writing and hashing in two lanes, two trips per MiB, cost 0.3
CPU-s more per GiB and was slower: see docs/benchmarks.rst.)  When more
than L{HIGH_WATER} bytes are not yet written and hashed, the transport is
paused until the backlog is back at L{LOW_WATER}: a slow disk slows the
download down instead of filling memory (about 10 MiB per download at most).
"""

import errno
import hashlib
import os
from collections import deque

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import PotentialDataLoss, ResponseDone

from everest_agent.transfer.errors import Failed, describe, io_failure, remove

#: Bytes handed to the writer thread at once (fewer if the batch has
#: L{MAX_IOV} chunks already).
BATCH = 1 << 20
MAX_IOV = 256
#: A download's transport is paused above this many bytes not yet on disk...
HIGH_WATER = 8 << 20
#: ...and resumed at or below this many.
LOW_WATER = 4 << 20


def write_all(fd, chunks, offset):
    """Write C{chunks} at C{offset}, all of them (in a worker thread)."""
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


def write_and_hash(fd, chunks, offset, digest):
    """Write C{chunks} at C{offset}, then feed them to C{digest} if any (in a worker thread)."""
    total = write_all(fd, chunks, offset)
    if digest is not None:
        for c in chunks:
            digest.update(c)
    return total


class FileWriter:
    """
    Writes a download to the file C{fd} and hashes it, through C{run} (the
    thread seam: C{run(f, *args)} returns a Deferred).  The reactor thread
    only queues chunks; one job at a time writes and then hashes a batch,
    in order, so the file and the hash see the bytes in the order they came.
    """

    def __init__(self, fd, run, hashing=True):
        self.fd = fd
        self._run = run
        self.hashing = hashing
        self.hash = hashlib.sha256() if hashing else None
        self.written = 0  # on disk (and fed to the hash)
        self.queued = 0  # handed to write()
        self._batch = []
        self._batch_size = 0
        self._to_write = deque()
        self._writing = False
        self.error = None  # the OSError of a failed write
        self.on_drain = None
        self.on_error = None
        self._idle = []  # callables, run when nothing is queued or running
        self.closed = False

    @property
    def backlog(self):
        """Bytes handed over but not yet written and hashed."""
        return self.queued - self.written

    @property
    def busy(self):
        return self._writing or bool(self._to_write)

    def write(self, data):
        self._batch.append(data)
        self._batch_size += len(data)
        self.queued += len(data)
        if self._batch_size >= BATCH or len(self._batch) >= MAX_IOV:
            self._flush()
            self._next()

    def _flush(self):
        if self._batch and self.error is None:
            self._to_write.append((self._batch, self._batch_size))
        self._batch = []
        self._batch_size = 0

    def _next(self):
        if self.error is not None:
            self._to_write.clear()
        if not self._writing and self._to_write:
            batch, size = self._to_write.popleft()
            self._writing = True
            self._run(write_and_hash, self.fd, batch, self.written, self.hash).addBoth(self._wrote, size)
        if not self.busy:
            callbacks, self._idle = self._idle, []
            for f in callbacks:
                f()

    def _failed(self, error):
        if self.error is None:
            self.error = error
            if self.on_error is not None:
                self.on_error(error)

    def _wrote(self, result, size):
        self._writing = False
        if isinstance(result, Failure):
            self._failed(result.value)
        else:
            self.written += size
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
        assert not self.busy
        await self._run(os.ftruncate, self.fd, 0)
        self.hash = hashlib.sha256() if self.hashing else None
        self.written = self.queued = 0

    def dispose(self, unlink=None):
        """
        Drop what is queued, then (once no job runs) close the file and
        remove C{unlink}, both in a job of their own (a close may wait on a
        networked file system; L{errors.remove} never follows a link).  This
        happens even if the returned Deferred is cancelled.
        """
        self._batch = []
        self._batch_size = 0
        if self.error is None:
            self.error = CancelledError()
        d = Deferred()

        def finish():
            self._close(unlink).addBoth(lambda _: d.called or d.callback(None))

        self._when_idle(finish)
        return d

    def _close(self, unlink=None):
        """Close the file (and remove C{unlink}) in a job; a Deferred of its end."""
        if self.closed:
            return self._run(remove, unlink) if unlink is not None else succeed(None)
        self.closed = True
        return self._run(close_file, self.fd, unlink)

    async def close(self):
        """
        Write what is queued, then close the file.

        @raise Failed: if the close fails (a networked file system reports
            a write error there).
        """
        await self.drain()
        try:
            await self._close()
        except OSError as e:
            raise io_failure(e) from None


def close_file(fd, unlink=None):
    """Close C{fd}, then remove C{unlink} if given (in a worker thread)."""
    try:
        os.close(fd)
    finally:
        if unlink is not None:
            remove(unlink)


class BodyReceiver(Protocol):
    """
    Receives one response body into a L{FileWriter}, pausing the transport
    while the disk is behind, with a stall watchdog.  C{done} fires when the
    body is complete (with True, or False when its end was only the
    connection closing), or fails with L{Failed}.
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
        self.writer.on_error = lambda e: self._abort(io_failure(e))
        self.watchdog.on_expire = lambda message: self._abort(Failed(message, transient=True))
        self.watchdog.watch(self.stall_timeout, f"no data for {self.stall_timeout:g} s")

    def dataReceived(self, data):
        if self.finished:
            return
        self.received += len(data)
        self.watchdog.touch()
        if self.limit is not None and self.received > self.limit:
            self._abort(Failed(f"size mismatch: the server sends more than the {self.limit} bytes expected"))
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
                Failed(
                    f"the connection broke off after {self.received} bytes of the body "
                    f"({describe(reason.value)})",
                    transient=True,
                )
            )
