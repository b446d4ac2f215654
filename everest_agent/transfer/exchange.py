"""
The HTTP exchange: one GET or PUT attempt through a treq client, watched.

treq's C{timeout} stops at the response headers, so every exchange has its
own L{Watchdog}: C{timeout} seconds to connect and get an answer (and, for
an upload, to get one after the last byte was sent), and C{stall_timeout}
seconds without a byte moving while a body streams.  Either ends that
attempt as a transient failure.  Network errors and HTTP statuses are
classified here (L{network_failure}, L{Exchanges.refuse}); retrying is
L{everest_agent.transfer.retry}'s job.

An interrupted download resumes with C{Range: bytes=N-} (and C{If-Range}
with the validator of the first response) when the server had said
C{Accept-Ranges: bytes} and sent a C{Content-Length}; a C{200} answer to
that starts over.
"""

import os

from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web import error as web_error
from twisted.web.client import (
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.iweb import UNKNOWN_LENGTH

from everest_agent.transfer import fastpath
from everest_agent.transfer.errors import Failed, describe, io_failure
from everest_agent.transfer.producer import FileProducer
from everest_agent.transfer.sink import BodyReceiver
from everest_agent.transfer.urls import public_url

TRANSIENT_STATUS = frozenset([408, 425, 429]) | frozenset(range(500, 600))
#: Bodies of responses we do not want are read up to this much, then dropped.
DISCARD_LIMIT = 1 << 20


class Watchdog:
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


class Discard(Protocol):
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


class RangeState:
    """What one download learned that lets a later attempt resume it."""

    def __init__(self):
        self.resumable = False
        self.validator = None
        self.total = None


def network_failure(exc, method, uri):
    """The L{Failed} for an exception from a request."""
    reasons = [r.value for r in getattr(exc, "reasons", None) or []] or [exc]
    message = f"{method} {public_url(uri)} failed: {describe(exc)}"
    for inner in reasons:
        if isinstance(inner, Failed):
            return inner
        if isinstance(inner, (web_error.PageRedirect, web_error.InfiniteRedirection)):
            return Failed(message)
        if inner.__class__.__module__.startswith("OpenSSL") or isinstance(inner, net_error.SSLError):
            return Failed(message)  # a certificate problem does not go away by itself
    # The server went away before it answered (it is going down, or its
    # listener is gone): like no connection at all.
    if isinstance(exc, (ResponseNeverReceived, RequestTransmissionFailed,
                        net_error.ConnectError, net_error.DNSLookupError)):
        return Failed(message, unreachable=True)
    if isinstance(exc, (ResponseFailed, net_error.ConnectionClosed)):
        return Failed(message, transient=True)
    return Failed(message)


def content_range(response):
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


def validator(response):
    """The strong ETag (or else Last-Modified) of a response, for If-Range."""
    etags = response.headers.getRawHeaders(b"etag", [])
    if etags and not etags[0].startswith(b"W/"):
        return etags[0]
    modified = response.headers.getRawHeaders(b"last-modified", [])
    return modified[0] if modified else None


class Exchange:
    """
    One HTTP request through a treq client, with a watchdog.  Cancelling
    it (the task was cancelled) raises L{CancelledError}; the watchdog
    expiring raises a transient L{Failed}; network errors are classified.
    """

    def __init__(self, http, clock, method, uri, headers, timeout):
        self.http = http
        self.method = method
        self.uri = uri
        self.headers = headers
        self.timeout = timeout
        self.watchdog = Watchdog(clock, self._expire)
        self._why = None
        self._inner = None

    def _expire(self, message):
        if self._why is None:
            # No answer at all (nothing or only part of a request body went
            # out, or the answer never came): the server is not reachable.
            self._why = Failed(f"{self.method} {public_url(self.uri)}: {message}", unreachable=True)
            self._inner.cancel()

    def start(self, data=None):
        self.watchdog.watch(self.timeout, f"no answer within {self.timeout:g} s")
        self._inner = inner = self.http.request(
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
                    result.deliverBody(Discard())
                if not outer.called:
                    outer.errback(Failure(self._why))
                return None
            if isinstance(result, Failure):
                outer.errback(Failure(network_failure(result.value, self.method, self.uri)))
            else:
                outer.callback(result)
            return None

        inner.addBoth(done)
        return outer


class Exchanges:
    """
    GET and PUT attempts with one treq client (C{http}), timed by C{clock}.

    @ivar requests: requests sent.
    @ivar bytes_in: body bytes received by downloads.
    """

    def __init__(self, http, clock, timeout, stall_timeout):
        self.http = http
        self.clock = clock
        self.timeout = timeout
        self.stall_timeout = stall_timeout
        self.requests = 0
        self.bytes_in = 0

    def exchange(self, method, uri, headers):
        self.requests += 1
        return Exchange(self.http, self.clock, method, uri, headers, self.timeout)

    async def get(self, uri, headers, writer, state, size):
        """
        One GET attempt: resume, restart or start the body in C{writer}
        (a L{everest_agent.transfer.sink.FileWriter}).

        @raise Failed: the attempt failed (transient ones may be retried).
        """
        offset = writer.written
        if offset and state.resumable:
            headers = dict(headers)
            headers[b"Range"] = [f"bytes={offset}-".encode("ascii")]
            if state.validator:
                headers[b"If-Range"] = [state.validator]
        elif offset:
            await writer.reset()
            offset = 0
        exchange = self.exchange("GET", uri, headers)
        try:
            response = await exchange.start()
            code = response.code
            if offset and code == 206:
                start, total = content_range(response)
                if start != offset or (state.total is not None and total not in (None, state.total)):
                    state.resumable = False
                    await self.drop(response, exchange.watchdog)
                    raise Failed(f"GET {public_url(uri)}: the server resumed at the wrong place", transient=True)
            elif code == 200:
                if offset:
                    await writer.reset()
                    offset = 0
                state.total = response.length if response.length != UNKNOWN_LENGTH else None
                state.resumable = state.total is not None and b"bytes" in b",".join(
                    response.headers.getRawHeaders(b"accept-ranges", [])
                ).lower()
                state.validator = validator(response)
                if size is not None and state.total is not None and state.total != size:
                    await self.drop(response, exchange.watchdog)
                    raise Failed(f"size mismatch: expected {size} bytes, the server sends {state.total}")
            elif offset and code == 416:
                state.resumable = False
                await self.drop(response, exchange.watchdog)
                raise Failed(f"GET {public_url(uri)}: the server refused to resume (HTTP 416)", transient=True)
            else:
                await self.refuse(response, "GET", uri, exchange.watchdog)
            if size is not None:
                limit = size - offset
            elif state.total is not None:
                limit = state.total - offset
            else:
                limit = None
            receiver = BodyReceiver(writer, limit, exchange.watchdog, self.stall_timeout)
            fastpath.tune_download(response)
            response.deliverBody(receiver)
            try:
                complete = await receiver.done
            except Failed:
                await writer.drain()
                raise
            finally:
                self.bytes_in += receiver.received
            await writer.drain()
            if writer.error is not None:
                raise io_failure(writer.error)
            if not complete and state.total is not None and writer.written != state.total:
                raise Failed(f"GET {public_url(uri)}: the body ended early", transient=True)
        finally:
            exchange.watchdog.stop()

    async def put(self, uri, headers, fd, run):
        """
        One PUT attempt: the whole file C{fd}, read through C{run}.

        @return: C{(size, sha256 hex of the bytes sent)}.
        @raise Failed: the attempt failed (transient ones may be retried).
        """
        try:
            length = os.fstat(fd).st_size
        except OSError as e:
            raise io_failure(e, "reading") from None
        exchange = self.exchange("PUT", uri, headers)
        stall, timeout = self.stall_timeout, self.timeout
        producer = FileProducer(
            fd, length, run,
            on_start=lambda: exchange.watchdog.watch(stall, f"no progress sending the body for {stall:g} s"),
            on_progress=exchange.watchdog.touch,
            on_sent=lambda: exchange.watchdog.watch(timeout, f"no answer within {timeout:g} s of the upload"),
        )
        try:
            try:
                response = await exchange.start(producer)
            except Failed:
                if producer.error is not None:
                    raise producer.error from None
                raise
            if not 200 <= response.code < 300:
                await self.refuse(response, "PUT", uri, exchange.watchdog)
            await self.drop(response, exchange.watchdog)
        finally:
            exchange.watchdog.stop()
        if producer.sent != length:
            raise Failed("the upload was cut short", transient=True)
        return length, producer.hash.hexdigest()

    async def drop(self, response, watchdog=None):
        """Read and throw away the body of C{response}."""
        if watchdog is not None:
            watchdog.watch(self.stall_timeout, f"no data for {self.stall_timeout:g} s")
        receiver = Discard(watchdog)
        response.deliverBody(receiver)
        await receiver.done

    async def refuse(self, response, method, uri, watchdog=None):
        """Raise the L{Failed} for an unwanted status."""
        code = response.code
        phrase = (response.phrase or b"").decode("latin-1").strip()
        retry_after = None
        if code in (429, 503):
            values = response.headers.getRawHeaders(b"retry-after", [])
            if values and values[0].strip().isdigit():
                retry_after = int(values[0].strip())
        await self.drop(response, watchdog)
        raise Failed(
            f"{method} {public_url(uri)} answered HTTP {code}{' ' + phrase if phrase else ''}",
            transient=code in TRANSIENT_STATUS,
            retry_after=retry_after,
            unreachable=code in (502, 503, 504),
        )
