"""
The platform's file store: C{GET}/C{HEAD} and C{PUT} under C{/files/<path>}.

A C{PUT} body is streamed by L{PlatformRequest} straight into a temporary
file inside the store and renamed into place when complete, so an upload
never sits in memory and a reader never sees half a file.
"""

import os
from urllib.parse import unquote_to_bytes

from twisted.logger import Logger
from twisted.web import http, resource, server, static

log = Logger(namespace="everest_agent.platform.files")

FILES_PREFIX = b"/files/"


class PlatformRequest(server.Request):
    """
    A request that writes the body of a C{PUT} to the file store into a
    temporary file in the store itself.
    """

    _incoming = None
    _refused = False

    def gotLength(self, length):
        platform = getattr(getattr(self.channel, "site", None), "platform", None)
        # The method and path are known to the channel, not yet to the request.
        command = getattr(self.channel, "_command", None)
        path = getattr(self.channel, "_path", None) or b""
        if platform is not None and length != 0:
            area = _area(command, path, platform)
            if area is not None and not platform.authorized(area, bearer_token(self)):
                self._refuse(command, path)
                return
        if (
            platform is not None
            and platform.files_dir is not None
            and command == b"PUT"
            and path.startswith(FILES_PREFIX)
        ):
            self.content = platform.incoming_file()
            self._incoming = self.content.name
        else:
            super().gotLength(length)

    def _refuse(self, command, path):
        """
        Answer 401 and close, before a byte of the body is read: it goes
        nowhere (not to disk, not to memory) until the connection is gone.
        """
        self._refused = True
        self.content = _Discard()
        # No "100 Continue" after the answer: the client must not send the body.
        self.requestHeaders.removeHeader(b"expect")
        shown = path.split(b"?", 1)[0][:200].decode("ascii", "replace")
        log.info("{method} {path}: no valid token; refused before reading the body",
                 method=(command or b"?").decode("ascii", "replace"), path=shown)
        body = b"a valid token is required: Authorization: Bearer <token>\n"
        self.channel.transport.write(
            b"HTTP/1.1 401 Unauthorized\r\n"
            b'WWW-Authenticate: Bearer realm="everest"\r\n'
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: " + str(len(body)).encode("ascii") + b"\r\n"
            b"Connection: close\r\n\r\n" + body
        )
        self.channel.loseConnection()

    def requestReceived(self, command, path, version):
        if self._refused:
            return  # already answered; the connection is closing
        super().requestReceived(command, path, version)

    def take_incoming(self):
        """
        The name of the temporary file holding the body, closed; the caller
        now owns it.  C{None} if the body was not written to the store.
        """
        name, self._incoming = self._incoming, None
        if name is not None:
            self.content.flush()
            os.fsync(self.content.fileno())
        return name

    def discard_incoming(self):
        name, self._incoming = self._incoming, None
        if name is not None:
            try:
                os.unlink(name)
            except OSError:
                pass

    def connectionLost(self, reason):
        self.discard_incoming()
        super().connectionLost(reason)


class _Discard:
    """The body of a refused request: written to nowhere."""

    def write(self, data):
        pass

    def seek(self, *args):
        return 0

    def read(self, *args):
        return b""

    def close(self):
        pass


def _area(command, path, platform):
    """Which credential a request with a body needs: C{"api"}, C{"files"} or C{None}."""
    # As the resource tree will see it: segments URL-decoded, empty ones
    # skipped (so neither "/%61pi/" nor "//api/" gets around this).
    segments = [unquote_to_bytes(s) for s in path.split(b"?", 1)[0].split(b"/") if s]
    first = segments[0] if segments else b""
    if first == b"api":
        return "api"
    if command == b"PUT" and first == b"files" and platform.files_auth:
        return "files"
    return None


def bearer_token(request):
    """
    The token of an C{Authorization: Bearer} header, or C{None}.
    """
    value = request.getHeader(b"authorization")
    if value is None:
        return None
    scheme, _, token = value.partition(b" ")
    if scheme.lower() != b"bearer" or not token.strip():
        return None
    try:
        return token.strip().decode("utf-8")
    except UnicodeDecodeError:
        return None


def _credential(platform, token, had_header):
    """
    Whose credential a request carried, in words that hold no secret:
    C{"agent <name>"}, C{"api"}, C{"other"} (a header the platform does
    not know) or C{None} (no C{Authorization} header).
    """
    if token is not None:
        name = platform.token_name(token)
        if name is not None:
            return f"agent {name}"
        if platform.authorized("api", token):
            return "api"
    return "other" if had_header else None


def _error(request, code, message):
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    return message.encode("utf-8") + b"\n"


class FileStore(resource.Resource):
    """
    C{/files/}: every request is recorded in C{platform.file_requests}, and
    whose credential it carried in C{platform.file_credentials}.
    """

    isLeaf = True

    def __init__(self, platform):
        super().__init__()
        self.platform = platform

    def render(self, request):
        try:
            return self._render(request)
        finally:
            if isinstance(request, PlatformRequest):
                request.discard_incoming()

    def _render(self, request):
        platform = self.platform
        method = request.method.decode("ascii", "replace")
        try:
            segments = [s.decode("utf-8") for s in request.postpath]
        except UnicodeDecodeError:
            segments = None
        path = "/".join(segments) if segments is not None else repr(request.postpath)
        had_header = request.getHeader(b"authorization") is not None
        token = bearer_token(request)
        authorized = token is not None and platform.authorized("files", token)
        platform.file_requests.append((method, path, authorized, had_header))
        platform.file_credentials.append((method, path, _credential(platform, token, had_header)))
        if platform.files_auth and not authorized:
            log.info("{method} /files/{path}: unauthorized", method=method, path=path)
            request.setHeader(b"www-authenticate", b'Bearer realm="everest"')
            return _error(request, http.UNAUTHORIZED, "a valid agent token is required")
        if segments is None or any("/" in s for s in segments):
            return _error(request, http.BAD_REQUEST, "bad file path")
        try:
            full = platform.resolve_file(path)
        except ValueError as e:
            return _error(request, http.BAD_REQUEST, str(e))

        if method in ("GET", "HEAD"):
            if not os.path.isfile(full):
                return _error(request, http.NOT_FOUND, f"no file {path}")
            return static.File(full, defaultType="application/octet-stream").render(request)
        if method == "PUT":
            return self._put(request, path, full)
        request.setHeader(b"allow", b"GET, HEAD, PUT")
        return _error(request, http.NOT_ALLOWED, f"{method} is not allowed here")

    def _put(self, request, path, full):
        if os.path.isdir(full):
            return _error(request, http.CONFLICT, f"{path} is a directory")
        try:
            os.makedirs(os.path.dirname(full), exist_ok=True)
        except OSError as e:
            return _error(request, http.CONFLICT, f"cannot create the directory of {path}: {e.strerror}")
        incoming = request.take_incoming() if isinstance(request, PlatformRequest) else None
        if incoming is None:
            # The body was buffered elsewhere (not our request class): copy it.
            with self.platform.incoming_file() as f:
                request.content.seek(0)
                while True:
                    chunk = request.content.read(65536)
                    if not chunk:
                        break
                    f.write(chunk)
            incoming = f.name
        try:
            os.replace(incoming, full)
        except OSError as e:
            os.unlink(incoming)
            return _error(request, http.CONFLICT, f"cannot store {path}: {e.strerror}")
        size = os.path.getsize(full)
        log.info("stored /files/{path} ({size} bytes)", path=path, size=size)
        request.setResponseCode(http.CREATED)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b""
