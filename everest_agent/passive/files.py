"""
Task outputs over HTTP in passive mode: C{GET}/C{HEAD /files/<taskId>/<path>}.

Only the credential that submitted a task may read its files.  A file is
opened inside the task directory by the walker stage-out uses
(L{everest_agent.paths.open_output}: symbolic links followed inside only,
regular files only), off the reactor thread, and streamed from
a worker thread a block at a time with the transport's backpressure, so a
1 GiB output never sits in memory.  C{Range: bytes=...} (one range) is
honoured; other forms of C{Range} get the whole file, as HTTP allows.
"""

import os
import re

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.web import http, resource, server

from everest_agent import paths
from everest_agent.protocol import valid_task_id

log = Logger(namespace="everest_agent.passive.files")

#: Bytes read from disk per step of a response.
BLOCK = 256 * 1024

_RANGE = re.compile(r"bytes=(\d*)-(\d*)\Z")


def parse_range(header, size):
    """
    One C{Range} header against a file of C{size} bytes.

    @return: C{None} to send the whole file, C{(start, end)} (inclusive) for
        one satisfiable range, or C{False} when the range cannot be satisfied.
    """
    if header is None:
        return None
    match = _RANGE.match(header.strip())
    if match is None:
        return None  # several ranges or another unit: the whole file
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:
        length = int(last)
        if length == 0:
            return False
        return (max(size - length, 0), size - 1) if size else False
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or (last and int(last) < start):
        return False
    return start, end


class _ThreadedBody:
    """
    Streams C{length} bytes of an open file into a request: each block is
    read in a worker thread and written in the reactor's, and reading stops
    while the transport asks the producer to pause.
    """

    def __init__(self, reactor, pool, request, f, length):
        self._reactor, self._pool = reactor, pool
        self._request, self._file, self._left = request, f, length
        self._resumed = None
        self._stopped = False

    def pauseProducing(self):
        if self._resumed is None:
            self._resumed = defer.Deferred()

    def resumeProducing(self):
        resumed, self._resumed = self._resumed, None
        if resumed is not None:
            resumed.callback(None)

    def stopProducing(self):
        self._stopped = True
        self.resumeProducing()

    async def run(self):
        request = self._request
        request.registerProducer(self, True)
        try:
            while self._left > 0 and not self._stopped:
                data = await deferToThreadPool(
                    self._reactor, self._pool, self._file.read, min(BLOCK, self._left)
                )
                if not data or self._stopped:
                    break
                self._left -= len(data)
                request.write(data)
                if self._resumed is not None:
                    await self._resumed
        finally:
            self._file.close()
            if not self._stopped:
                request.unregisterProducer()
                if self._left == 0:
                    request.finish()
                else:
                    # The file shrank under us: the length promised is a lie now.
                    request.loseConnection()


class FilesResource(resource.Resource):
    """
    @param tokens: a L{everest_agent.passive.credentials.ClientTokens}.
    @param lookup: C{lookup(task_id)} -> C{(owner, task_dir)} of a task the
        agent knows, or C{None}.
    @param pool: the thread pool that opens and reads files.
    """

    isLeaf = True

    def __init__(self, reactor, pool, tokens, lookup):
        super().__init__()
        self._reactor, self._pool = reactor, pool
        self._tokens, self._lookup = tokens, lookup

    def render_HEAD(self, request):
        return self.render_GET(request)

    def render_GET(self, request):
        client = self._tokens.authenticate(request.getHeader(b"authorization"))
        if client is None:
            request.setHeader(b"www-authenticate", b"EverestAgentClientToken")
            return _error(request, http.UNAUTHORIZED, "a valid EverestAgentClientToken is needed")
        parts = [p.decode("utf-8", "replace") for p in request.postpath]
        if len(parts) < 2 or not valid_task_id(parts[0]):
            return _error(request, http.NOT_FOUND, "no such file")
        task_id, names = parts[0], parts[1:]
        if any(n in ("", ".", "..") or "/" in n or "\0" in n for n in names):
            return _error(request, http.FORBIDDEN, "the path must stay inside the task directory")
        known = self._lookup(task_id)
        if known is None:
            return _error(request, http.NOT_FOUND, "no such task")
        owner, task_dir = known
        if owner != client.owner:
            log.info("Client {client} refused a file of task {task_id}: not its task",
                     client=client.label, task_id=task_id)
            return _error(request, http.FORBIDDEN, "this task belongs to another client")
        reply = _Reply(request)
        d = defer.Deferred.fromCoroutine(self._serve(reply, task_dir, "/".join(names)))
        d.addErrback(self._failed, reply)
        return server.NOT_DONE_YET

    async def _serve(self, reply, task_dir, relpath):
        request = reply.request
        try:
            found = await deferToThreadPool(self._reactor, self._pool, _open, task_dir, relpath)
        except paths.PathEscape as e:
            reply.error(http.FORBIDDEN, str(e))
            return
        except OSError as e:
            reply.error(http.NOT_FOUND, f"cannot open it: {e.strerror}")
            return
        if found is None:
            reply.error(http.NOT_FOUND, "no such file")
            return
        f, size = found
        wanted = parse_range(_text(request.getHeader(b"range")), size)
        request.setHeader(b"accept-ranges", b"bytes")
        request.setHeader(b"content-type", b"application/octet-stream")
        if wanted is False:
            f.close()
            request.setHeader(b"content-range", f"bytes */{size}".encode())
            reply.error(http.REQUESTED_RANGE_NOT_SATISFIABLE, "range not satisfiable")
            return
        start, end = wanted if wanted else (0, size - 1)
        length = end - start + 1 if size else 0
        if wanted:
            request.setResponseCode(http.PARTIAL_CONTENT)
            request.setHeader(b"content-range", f"bytes {start}-{end}/{size}".encode())
        request.setHeader(b"content-length", str(length).encode())
        if request.method == b"HEAD" or length == 0:
            f.close()
            request.finish()
            return
        if start:
            f.seek(start)
        await _ThreadedBody(self._reactor, self._pool, request, f, length).run()

    def _failed(self, failure, reply):
        log.failure("Serving a task file failed", failure)
        if not reply.request.startedWriting:
            reply.error(http.INTERNAL_SERVER_ERROR, "internal error")


def _open(task_dir, relpath):
    """
    Output C{relpath} of C{task_dir} opened for reading as stage-out opens
    it (L{paths.open_output}; in a worker thread).

    @return: C{(file, size)}, or None if there is no such file.
    """
    found = paths.open_output(task_dir, relpath)
    if found is None:
        return None
    fd, size = found
    try:
        return os.fdopen(fd, "rb"), size
    except BaseException:
        os.close(fd)
        raise


def _text(value):
    return None if value is None else value.decode("latin-1")


def _error(request, code, message):
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    return (message + "\n").encode("utf-8")


class _Reply:
    """A request being answered, and whether its client went away meanwhile."""

    def __init__(self, request):
        self.request = request
        self.lost = False
        request.notifyFinish().addErrback(self._lost)

    def _lost(self, _):
        self.lost = True

    def error(self, code, message):
        request = self.request
        if self.lost or request.finished:
            return
        body = _error(request, code, message)
        request.setHeader(b"content-length", str(len(body)).encode())
        request.write(body)
        request.finish()
