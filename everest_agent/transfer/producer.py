"""
The upload producer: a file sent as a request body, read and hashed ahead.

Blocks of L{READ_SIZE} are read (C{pread}) and hashed in a worker thread
(both release the GIL), at most L{PREFETCH} blocks ahead of the transport,
which can pause and resume the producer.  So the reading and hashing of one
block overlap the sending of the previous ones, and the C{sha256} reported
for an output is that of the bytes sent.  Each block goes to the transport
whole, as the very C{bytes} object that was read and hashed
(L{everest_agent.transfer.fastpath.tune_upload}).
"""

import hashlib
import os
from collections import deque

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from everest_agent.transfer import fastpath
from everest_agent.transfer.errors import Failed, io_failure

#: Uploads read the file in blocks of this size, at most L{PREFETCH} ahead.
READ_SIZE = 1 << 20
PREFETCH = 3


def read_and_hash(fd, n, offset, digest):
    """Read C{n} bytes at C{offset} and feed them to C{digest} (in a thread)."""
    data = os.pread(fd, n, offset)
    digest.update(data)
    return data


@implementer(IBodyProducer)
class FileProducer:
    """
    Sends C{length} bytes of the file C{fd} as a request body, reading
    through C{run} (the thread seam).  C{on_start}, C{on_progress} and
    C{on_sent} tell a watchdog when the body starts, moves and is all sent.
    """

    def __init__(self, fd, length, run, on_start=None, on_progress=None, on_sent=None):
        self.length = length
        self._fd = fd
        self._run = run
        self.hash = hashlib.sha256()
        self.sent = 0
        self.error = None
        self.tuned = False
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
        self.tuned = fastpath.tune_upload(consumer, READ_SIZE)
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
            d = self._run(read_and_hash, self._fd, n, self._offset, self.hash)
            self._offset += n
            d.addBoth(self._got, n)

    def _got(self, result, n):
        self._reading = False
        if self._stopped:
            return None
        if isinstance(result, Failure):
            self._fail(io_failure(result.value, "reading"))
        elif len(result) < n:
            self._fail(Failed("the file shrank while it was being uploaded"))
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
