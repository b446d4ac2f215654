"""
Moving a task's files: inputs in before it runs, outputs out after.

Downloads stream with treq (C{unbuffered=True} and C{treq.collect}) into a
temporary file next to the target, hashing and counting as the bytes arrive;
the file is renamed into place only when complete and verified.  Uploads
stream from the file through a body producer that hashes what it reads, so
the C{sha256} reported for an output is that of the bytes sent.  Nothing is
ever held whole in memory.

The platform's token goes only to URIs with the platform's own host and
port (L{same_origin}); every other server gets no credentials.
"""

import base64
import errno
import hashlib
import os
from urllib.parse import quote, urlsplit

import treq
from treq.client import HTTPClient
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, FileBodyProducer, HTTPConnectionPool

from everest_agent import paths
from everest_agent.client import trust_root

_DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}
CHUNK = 256 * 1024


class StagingError(Exception):
    """A transfer failed; the message is the task's failure reason."""


def origin(url):
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    return host, parts.port or _DEFAULT_PORTS.get(parts.scheme)


def same_origin(platform_url, uri):
    """Whether C{uri} has the platform URL's host and port."""
    return origin(platform_url) == origin(uri)


class _HashingReader:
    """A file wrapper that hashes and counts what is read through it."""

    def __init__(self, f):
        self._f = f
        self.hash = hashlib.sha256()
        self.size = 0

    def read(self, n=-1):
        data = self._f.read(n)
        self.hash.update(data)
        self.size += len(data)
        return data

    def seek(self, *args):
        return self._f.seek(*args)

    def tell(self):
        return self._f.tell()

    def close(self):
        self._f.close()


class Stager:
    """
    Transfers files for tasks over HTTP(S).
    """

    log = Logger()

    def __init__(self, reactor, platform_url, token, ca_file=None, timeout=60.0):
        self._reactor = reactor
        self._platform_url = platform_url
        self._token = token
        self._timeout = timeout
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = 8
        policy = BrowserLikePolicyForHTTPS(trustRoot=trust_root(ca_file))
        self._http = HTTPClient(Agent(reactor, contextFactory=policy, pool=self._pool))
        self.bytes_in = 0
        self.bytes_out = 0

    def _headers(self, uri):
        if self._token and same_origin(self._platform_url, uri):
            return {b"Authorization": [b"Bearer " + self._token.encode("ascii")]}
        return {}

    # -- stage in -------------------------------------------------------------

    async def stage_in(self, task_dir, inputs):
        """Put every input in place, or raise L{StagingError}."""
        for item in inputs:
            try:
                target = paths.input_target(task_dir, item["path"])
            except paths.PathEscape as e:
                raise StagingError(str(e)) from None
            except OSError as e:
                raise StagingError(f"input {item['path']!r}: {e.strerror}") from None
            if "data" in item:
                self._write_inline(target, item)
            else:
                await self._download(target, item)
            if item.get("executable"):
                os.chmod(target, 0o755)

    def _write_inline(self, target, item):
        data = base64.b64decode(item["data"])
        self._check(item, len(data), hashlib.sha256(data).hexdigest())
        tmp = _temporary(target)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        except OSError as e:
            _remove(tmp)
            raise StagingError(_io_reason(f"input {item['path']!r}", e)) from None

    def _check(self, item, size, digest):
        path = item["path"]
        if "size" in item and size != item["size"]:
            raise StagingError(f"input {path!r}: size mismatch: expected {item['size']} bytes, got {size}")
        if "sha256" in item and digest != item["sha256"]:
            raise StagingError(f"input {path!r}: checksum mismatch: expected sha256 {item['sha256']}, got {digest}")

    async def _download(self, target, item):
        uri, path = item["uri"], item["path"]
        try:
            response = await self._http.get(
                uri, headers=self._headers(uri), unbuffered=True, timeout=self._timeout
            )
        except defer.CancelledError:
            raise
        except Exception as e:
            raise StagingError(f"input {path!r}: GET {uri} failed: {_describe(e)}") from None
        if response.code != 200:
            await _discard(response)
            raise StagingError(f"input {path!r}: GET {uri} answered HTTP {response.code}")
        tmp = _temporary(target)
        digest = hashlib.sha256()
        size = 0
        limit = item.get("size")
        try:
            with open(tmp, "wb") as f:

                def write(data):
                    nonlocal size
                    size += len(data)
                    if limit is not None and size > limit:
                        raise StagingError(
                            f"input {path!r}: size mismatch: more than the expected {limit} bytes"
                        )
                    f.write(data)
                    digest.update(data)

                try:
                    await treq.collect(response, write)
                except StagingError:
                    raise
                except defer.CancelledError:
                    raise
                except OSError as e:
                    raise StagingError(_io_reason(f"input {path!r}", e)) from None
                except Exception as e:
                    raise StagingError(f"input {path!r}: GET {uri} broke off: {_describe(e)}") from None
            self._check(item, size, digest.hexdigest())
            os.replace(tmp, target)
        except OSError as e:
            raise StagingError(_io_reason(f"input {path!r}", e)) from None
        finally:
            _remove(tmp)
            self.bytes_in += size

    # -- stage out ------------------------------------------------------------

    async def stage_out(self, task_dir, outputs):
        """
        Upload every output that exists.

        @return: C{(uploaded, errors)}: C{[{"path", "size", "sha256"}]} for
            the files sent, and the reasons of the ones that failed (a
            required file missing, an escape, a transfer error).  Every file
            is tried, so a failed task still delivers what it has.
        """
        uploaded, errors = [], []
        for item in outputs:
            if "pattern" in item:
                try:
                    matches = paths.match_outputs(task_dir, item["pattern"])
                except (paths.PathEscape, OSError) as e:
                    errors.append(str(e))
                    continue
                base = item["uri"]
                if not base.endswith("/"):
                    base += "/"
                for rel in matches:
                    await self._upload_one(task_dir, rel, base + quote(rel), False, uploaded, errors)
            else:
                await self._upload_one(
                    task_dir, item["path"], item["uri"], item.get("optional"), uploaded, errors
                )
        return uploaded, errors

    async def _upload_one(self, task_dir, rel, uri, optional, uploaded, errors):
        try:
            f = paths.open_output(task_dir, rel)
        except paths.PathEscape as e:
            errors.append(str(e))
            return
        except OSError as e:
            errors.append(f"output {rel!r}: {e.strerror}")
            return
        if f is None:
            if not optional:
                errors.append(f"output {rel!r} is missing")
            return
        reader = _HashingReader(f)
        try:
            producer = FileBodyProducer(reader, readSize=CHUNK)
            response = await self._http.put(uri, data=producer, headers=self._headers(uri), timeout=self._timeout)
            await _discard(response)
            if response.code not in (200, 201, 204):
                errors.append(f"output {rel!r}: PUT {uri} answered HTTP {response.code}")
                return
        except defer.CancelledError:
            raise
        except Exception as e:
            errors.append(f"output {rel!r}: PUT {uri} failed: {_describe(e)}")
            return
        finally:
            reader.close()
        self.bytes_out += reader.size
        uploaded.append({"path": rel, "size": reader.size, "sha256": reader.hash.hexdigest()})

    def close(self):
        return self._pool.closeCachedConnections()


def _temporary(target):
    head, tail = os.path.split(target)
    return os.path.join(head, f".{tail}.part")


def _remove(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def _io_reason(what, error):
    if error.errno == errno.ENOSPC:
        return f"{what}: disk full"
    return f"{what}: {error.strerror or error}"


def _describe(error):
    text = str(error) or error.__class__.__name__
    return " ".join(text.split())[:300]


async def _discard(response):
    try:
        await treq.content(response)
    except Exception:
        pass
