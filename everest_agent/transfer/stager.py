"""
The stager: a task's inputs in before it runs, its outputs out after.

It puts together the pieces of this package: downloads stream through
L{everest_agent.transfer.sink}, uploads through
L{everest_agent.transfer.producer}, each attempt is an
L{everest_agent.transfer.exchange} and every transfer goes through the one
retry loop of L{everest_agent.transfer.retry}; inputs naming a C{sha256} go
through the content cache (L{everest_agent.transfer.cached}); outputs are
found and opened through L{everest_agent.paths} (the one walker that keeps
every path inside the task directory).

Limits and fairness
    At most C{max_concurrent} transfers (downloads and uploads together) run
    at once.  The next free slot goes to the waiting task that holds the
    fewest slots (oldest first among equals), so one task with a thousand
    inputs cannot starve the others.

Disk safety
    Before a download of known C{size}, the free space of the directory it
    goes to (less what other downloads in flight there have claimed) must
    hold it, or the task fails at once.  ENOSPC at any point fails that task
    ("disk full"), removes its partial files, and leaves everything else
    running.  The file is renamed into place only when it is complete and
    its size and sha256 are right.

Stage-out bounds
    Only regular files are outputs (a FIFO, device, socket or directory
    fails the task with a reason, and is never opened in a way that could
    block).  One task's outputs may add up to C{max_stage_out} bytes; those
    beyond fail the task.  Uploads still running C{stage_out_timeout}
    seconds after the stage-out began are stopped and fail the task.  An
    output pattern looks at C{max_output_entries} directory entries and
    matches C{max_output_files} files at most.

Threads
    Everything that touches a task directory (creating input files, linking
    cached content in, finding and opening outputs) and every bulk write,
    hash or read runs through C{run(f, *args)}, a small thread pool of the
    stager's own (L{from_config}); tests pass one that runs inline.

The platform's token goes only to URIs with the platform's own scheme, host
and port (L{everest_agent.transfer.urls.same_origin}); every other server
gets no credentials, and a redirect to another origin drops the header
(Twisted's redirect agent does).  An input that names its own
C{authorization} (an Everest-dialect input's C{auth}) is fetched with that
header verbatim and never with the platform's token, whatever its origin.

Outputs that stay in the task directory (an Everest-dialect task's kept
outputs) are only listed: L{Stager.list_outputs} finds, opens and hashes
them in a thread, confined like every output.
"""

import base64
import hashlib
import os
from urllib.parse import quote

from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

from everest_agent import paths
from everest_agent.cache import ContentCache
from everest_agent.client import trust_root
from everest_agent.transfer.cached import CachedInputs
from everest_agent.transfer.errors import Failed, StagingError, describe, io_failure, remove
from everest_agent.transfer.exchange import Exchanges, RangeState
from everest_agent.transfer.jobs import FairLimiter, Lane, gather, mirror, pool_runner
from everest_agent.transfer.retry import RetryPolicy, retrying
from everest_agent.transfer.sink import FileWriter
from everest_agent.transfer.space import DiskSpace
from everest_agent.transfer.urls import public_url, same_origin


def http_client(reactor, ca_file=None, timeout=60.0, max_concurrent=8, context_factory=None):
    """
    The treq client a stager uses (persistent connections, verified TLS).

    @return: C{(client, pool)}; close the pool's cached connections when done.
    """
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = max_concurrent
    if context_factory is None:
        context_factory = BrowserLikePolicyForHTTPS(trustRoot=trust_root(ca_file))
    agent = Agent(reactor, contextFactory=context_factory, pool=pool, connectTimeout=timeout)
    return HTTPClient(agent), pool


def _write_inline(target, data, executable):
    """Write an inline input through a temporary name (in a thread)."""
    tmp = paths.temporary_for(target)
    try:
        fd = paths.create_exclusive(tmp, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if executable:
                os.fchmod(fd, 0o755)
        finally:
            os.close(fd)
        paths.replace_into(tmp, target)
    except BaseException:
        remove(tmp)
        raise


def _prepare_inputs(task_dir, inputs):
    """Plan the inputs and write the inline ones (in a thread)."""
    planned = _plan_inputs(task_dir, inputs)
    for target, item in planned:
        if "data" not in item:
            continue
        data = base64.b64decode(item["data"])
        what = f"input {item['path']!r}"
        if item.get("size") is not None and len(data) != item["size"]:
            raise StagingError(f"{what}: size mismatch: expected {item['size']} bytes, got {len(data)}")
        digest = hashlib.sha256(data).hexdigest()
        if item.get("sha256") and digest != item["sha256"]:
            raise StagingError(f"{what}: checksum mismatch: expected sha256 {item['sha256']}, got {digest}")
        try:
            _write_inline(target, data, bool(item.get("executable")))
        except OSError as e:
            raise StagingError(f"{what}: {io_failure(e).message}") from None
        except paths.PathEscape as e:
            raise StagingError(f"{what}: {e}") from None
    return planned


def _plan_inputs(task_dir, inputs):
    """Where each input goes, its parent directories made (in a thread)."""
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
    return planned


def _plan_outputs(task_dir, outputs, max_entries, max_files):
    """
    Find and open every output (in a thread, in one go).

    @return: steps, in order: C{("upload", rel, uri, fd, size)},
        C{("missing", rel)} for an optional file that is not there, or
        C{("error", message)}.
    """
    steps = []
    try:
        for item in outputs:
            if "pattern" in item:
                try:
                    matches, problems = paths.find_outputs(task_dir, item["pattern"], max_entries, max_files)
                except (OSError, paths.PathEscape) as e:
                    matches, problems = [], [f"output pattern {item['pattern']!r}: {getattr(e, 'strerror', None) or e}"]
                base = item["uri"] if item["uri"].endswith("/") else item["uri"] + "/"
                steps.extend(_open_output(task_dir, rel, base + quote(rel), False) for rel in matches)
                steps.extend(("error", p) for p in problems)
            else:
                steps.append(_open_output(task_dir, item["path"], item["uri"], bool(item.get("optional"))))
    except BaseException:
        _close_steps(steps)
        raise
    return steps


def _open_output(task_dir, rel, uri, optional):
    what = f"output {rel!r}"
    try:
        found = paths.open_output(task_dir, rel)
    except paths.PathEscape as e:
        return ("error", str(e))
    except OSError as e:
        return ("error", f"{what}: {e.strerror}")
    if found is None:
        return ("missing", rel) if optional else ("error", f"{what} is missing")
    return ("upload", rel, uri) + found


#: Bytes read at a time when hashing an output that stays in the task directory.
HASH_CHUNK = 1 << 20


def _hash_fd(fd):
    """C{(bytes read, sha256 hex)} of the open file C{fd}, from its start (in a thread)."""
    digest = hashlib.sha256()
    length = 0
    while True:
        chunk = os.read(fd, HASH_CHUNK)
        if not chunk:
            return length, digest.hexdigest()
        length += len(chunk)
        digest.update(chunk)


def _list_outputs(task_dir, patterns, max_entries, max_files):
    """
    The files that C{patterns} (names or globs) match in C{task_dir}, each
    opened without leaving it and hashed (in a thread, in one go).

    @return: C{(files, errors)}: C{[{"path", "size", "sha256"}]} in the
        order found (a file matched twice is listed once), and one reason
        for each match that leads outside or is not a regular file.  A
        pattern that matches nothing is not an error.
    """
    files, errors, seen = [], [], set()
    for pattern in patterns:
        try:
            matches, problems = paths.find_outputs(task_dir, pattern, max_entries, max_files)
        except (OSError, paths.PathEscape) as e:
            matches, problems = [], [f"output pattern {pattern!r}: {getattr(e, 'strerror', None) or e}"]
        errors.extend(problems)
        for rel in matches:
            if rel in seen:
                continue
            seen.add(rel)
            step = _open_output(task_dir, rel, None, True)
            if step[0] == "error":
                errors.append(step[1])
                continue
            if step[0] == "missing":  # gone between the match and the open
                continue
            fd = step[3]
            try:
                size, digest = _hash_fd(fd)
            except OSError as e:
                errors.append(f"output {rel!r}: {e.strerror or e}")
                continue
            finally:
                os.close(fd)
            files.append({"path": rel, "size": size, "sha256": digest})
    return files, errors


def _close_steps(steps):
    for step in steps:
        if step[0] == "upload":
            try:
                os.close(step[3])
            except OSError:
                pass


class Stager:
    """
    Transfers files for tasks over HTTP(S).

    @param reactor: the reactor.
    @param http: the treq client (see L{http_client}).
    @param run: the thread seam, C{run(f, *args)} returning a Deferred.
    @param clock: what watchdogs and retry delays are timed with (default:
        C{reactor}); tests pass a L{twisted.internet.task.Clock}.
    @param random: a L{random.Random} for the backoff jitter.
    @param cache_dir: the content cache's directory; None (or a
        C{cache_size} of 0) turns the cache off.
    @param on_close: called by L{close}; may return a Deferred.
    """

    log = Logger()

    def __init__(
        self, reactor, http, platform_url, token, *, run, timeout=60.0,
        stall_timeout=60.0, retries=5, retry_initial_delay=1.0, retry_max_delay=60.0,
        max_concurrent=8, cache_dir=None, cache_size=0, clock=None, random=None,
        stage_out_timeout=86400.0, max_stage_out=1 << 40, max_output_entries=1_000_000,
        max_output_files=100_000, on_close=None,
    ):
        self._reactor = reactor
        self._clock = clock if clock is not None else reactor
        self._run = run
        self._platform_url = platform_url
        self._token = token
        self._timeout = timeout
        self._stall_timeout = stall_timeout
        self.policy = RetryPolicy(platform_url, retries, retry_initial_delay, retry_max_delay, random)
        self.http = Exchanges(http, self._clock, timeout, stall_timeout)
        self.limiter = FairLimiter(max_concurrent)
        self.space = DiskSpace(run)
        self.stage_out_timeout = stage_out_timeout
        self.max_stage_out = max_stage_out
        self.max_output_entries = max_output_entries
        self.max_output_files = max_output_files
        self._on_close = on_close
        self._cache_dir = cache_dir if cache_dir and cache_size > 0 else None
        self._cache_size = cache_size
        self._cached = None
        self._cache_failed = False
        self._opening = None
        self._lane = Lane(self._run)
        self.bytes_out = 0

    @classmethod
    def with_client(cls, reactor, platform_url, token, *, ca_file=None, context_factory=None,
                    threads=None, **kwargs):
        """
        A stager with its own HTTP client and thread pool (C{threads}
        threads; C{max_concurrent + 2} by default), both closed by L{close}.
        """
        max_concurrent = kwargs.get("max_concurrent", 8)
        http, connections = http_client(
            reactor, ca_file, kwargs.get("timeout", 60.0), max_concurrent, context_factory
        )
        pool = ThreadPool(minthreads=0, maxthreads=threads or max_concurrent + 2, name="everest-transfer")
        triggers = []

        def start():
            # On first use, so that a stager that never moves a file starts
            # no threads (and needs nothing of the reactor but this).
            pool.start()
            triggers.append(reactor.addSystemEventTrigger("during", "shutdown", pool.stop))

        def close():
            for trigger in triggers:
                try:
                    reactor.removeSystemEventTrigger(trigger)
                except (ValueError, KeyError):
                    pass
            if pool.started:
                pool.stop()
            pool.joined = True
            return connections.closeCachedConnections()

        return cls(reactor, http, platform_url, token, run=pool_runner(reactor, pool, start),
                   on_close=close, **kwargs)

    @classmethod
    def from_config(cls, config, reactor, **kwargs):
        """A stager set up from the agent's configuration (C{[transfer]})."""
        transfer = config.transfer
        work_dir = config.agent.work_dir
        cache_dir = getattr(transfer, "cache_dir", "") or os.path.join(work_dir, ".cache")
        options = dict(
            timeout=transfer.timeout,
            stall_timeout=getattr(transfer, "stall_timeout", 60.0),
            retries=getattr(transfer, "retries", 5),
            retry_initial_delay=getattr(transfer, "retry_initial_delay", 1.0),
            retry_max_delay=getattr(transfer, "retry_max_delay", 60.0),
            max_concurrent=getattr(transfer, "max_concurrent", 8),
            cache_dir=cache_dir,
            cache_size=getattr(transfer, "cache_size", 10 << 30),
            stage_out_timeout=getattr(transfer, "stage_out_timeout", 86400.0),
            max_stage_out=getattr(transfer, "max_stage_out", 1 << 40),
            max_output_entries=getattr(transfer, "max_output_entries", 1_000_000),
            max_output_files=getattr(transfer, "max_output_files", 100_000),
        )
        options.update(kwargs)
        return cls.with_client(
            reactor, config.platform.url if config.platform else "", config.platform.token if config.platform else "",
            ca_file=(config.platform.ca_file or None) if config.platform else None, **options,
        )

    @property
    def requests(self):
        return self.http.requests

    @property
    def bytes_in(self):
        return self.http.bytes_in

    @property
    def cache(self):
        """The content cache (opened here if it was not yet), or None."""
        if self._cached is None and self._cache_dir is not None and not self._cache_failed:
            self._cache_opened(self._open_cache())
        return self._cached.cache if self._cached is not None else None

    def _open_cache(self):
        cache = ContentCache(self._cache_dir, self._cache_size)
        try:
            cache.open()
        except OSError as e:
            return e
        return cache

    def _cache_opened(self, result):
        if self._cached is not None or self._cache_failed:
            return
        if isinstance(result, OSError):
            self._cache_failed = True
            self.log.error(
                "Content cache {directory} unusable ({error}); inputs are fetched for every task",
                directory=self._cache_dir, error=result.strerror or result,
            )
            return
        result.use(self._run)
        self._cached = CachedInputs(result, self._download, self._run, self.space)

    async def _cached_inputs(self):
        """The cache glue, once the cache is open (its first scan runs in a thread)."""
        if self._cached is None and self._cache_dir is not None and not self._cache_failed:
            if self._opening is None:
                self._opening = self._run(self._open_cache)
                self._opening.addCallback(self._cache_opened)
            await mirror(self._opening)
        return self._cached

    def _headers(self, uri, authorization=None):
        if authorization is not None:
            # The input's own credentials, verbatim; never the platform's token.
            return {b"Authorization": [authorization.encode("utf-8")]}
        if self._token and same_origin(self._platform_url, uri):
            return {b"Authorization": [b"Bearer " + self._token.encode("ascii")]}
        return {}

    def close(self):
        """
        Give up the cache's temporary directory, then close idle connections
        and stop the worker threads.

        @return: a Deferred, or None if there was nothing to wait for.
        """
        on_close, self._on_close = self._on_close, None
        if self._cached is None:
            return on_close() if on_close is not None else None
        closing = self._cached.cache.close()
        if on_close is not None:
            closing.addBoth(lambda _: on_close())
        return closing

    # -- stage in -------------------------------------------------------------

    async def stage_in(self, task_dir, inputs):
        """Put every input in place, or raise L{StagingError}."""
        planned = await self._in_order(_prepare_inputs, task_dir, inputs)
        downloads = [(t, i) for t, i in planned if "data" not in i]
        if downloads:
            await gather([self._input(task_dir, t, i) for t, i in downloads], fail_fast=True)

    def _in_order(self, f, *args):
        """
        Run C{f} in a thread after the jobs given here before it have
        finished: tasks whose inputs are all inline are ready in the order
        they came, as they would be without threads.
        """
        return self._lane(f, *args)

    async def _input(self, task_dir, target, item):
        what = f"input {item['path']!r}"
        try:
            # (An input with its own credentials never shares the cache:
            # what it may read is not for every task to have.)
            cached = (await self._cached_inputs()
                      if item.get("sha256") and item.get("authorization") is None else None)
            if cached is not None:
                await cached.put(task_dir, target, item)
            else:
                await self._input_direct(task_dir, target, item)
        except Failed as e:
            raise StagingError(f"{what}: {e.message}") from None

    async def _input_direct(self, key, target, item):
        size = item.get("size")
        tmp = paths.temporary_for(target)
        async with self.space.claim(os.path.dirname(target), size):
            await self._download(key, item["uri"], tmp, size, item.get("sha256"),
                                 0o755 if item.get("executable") else 0o644,
                                 authorization=item.get("authorization"))
        try:
            await mirror(self._run(paths.replace_or_remove, tmp, target))
        except OSError as e:
            raise io_failure(e) from None
        except paths.PathEscape as e:
            raise Failed(str(e)) from None

    async def _download(self, key, uri, tmp, size, sha256, mode, authorization=None):
        """
        Fetch C{uri} into the new file C{tmp}, with retries.  On success the
        file is complete and verified; on failure it is gone.

        @return: C{(size, sha256 hex)}; the hash only when C{sha256} was
            given (nothing else needs it).
        @raise Failed: when it cannot be done.
        """
        writer = None
        state = RangeState()

        async def attempt():
            nonlocal writer
            if writer is None:
                try:
                    fd = await mirror(self._run(paths.create_exclusive, tmp, mode))
                except OSError as e:
                    raise io_failure(e) from None
                except paths.PathEscape as e:
                    raise Failed(str(e)) from None
                writer = FileWriter(fd, self._run, hashing=bool(sha256))
            await self.http.get(uri, self._headers(uri, authorization), writer, state, size)

        try:
            await retrying(
                attempt, method="GET", uri=uri, policy=self.policy, limiter=self.limiter,
                key=key, clock=self._clock, log=self.log, progress=lambda: writer.written if writer else 0,
            )
            length = writer.written
            digest = writer.hash.hexdigest() if writer.hashing else None
            if size is not None and length != size:
                raise Failed(f"size mismatch: expected {size} bytes, got {length}")
            if sha256 and digest != sha256:
                raise Failed(f"checksum mismatch: expected sha256 {sha256}, got {digest}")
            await writer.close()
            return length, digest
        except BaseException:
            if writer is not None:
                await writer.dispose(unlink=tmp)
            raise

    # -- stage out ------------------------------------------------------------

    async def stage_out(self, task_dir, outputs, uris=False):
        """
        Upload every output that exists.

        @param uris: also give, in each entry of C{uploaded}, the C{uri} the
            file was PUT to.
        @return: C{(uploaded, errors)}: C{[{"path", "size", "sha256"}]} for
            the files sent (size and hash of the bytes sent, taken while
            they streamed), and the reasons of the ones that failed (a
            required file missing, an escape, not a regular file, a bound
            passed, a transfer error).  Every file is tried, so a failed
            task still delivers what it has.
        """
        job = self._run(_plan_outputs, task_dir, outputs, self.max_output_entries, self.max_output_files)
        try:
            steps = await mirror(job)
        except CancelledError:
            job.addCallback(_close_steps)
            raise
        try:
            uploaded, errors = await self._send(task_dir, steps)
        finally:
            _close_steps(steps)
        if not uris:
            for entry in uploaded:
                del entry["uri"]
        return uploaded, errors

    async def list_outputs(self, task_dir, patterns):
        """
        The files that stay in the task directory: every match of
        C{patterns}, found, opened (confined) and hashed in a thread.

        @return: C{(files, errors)}, see L{_list_outputs}.
        """
        if not patterns:
            return [], []
        return await mirror(self._run(
            _list_outputs, task_dir, list(patterns), self.max_output_entries, self.max_output_files
        ))

    async def _send(self, task_dir, steps):
        budget = self.max_stage_out
        uploads, over = [], []
        for step in steps:
            if step[0] == "upload":
                budget -= step[4]
                if budget < 0:
                    over.append(step)
                else:
                    uploads.append(step)
        pending, expired = [], []

        def expire():
            expired.append(True)
            for d in pending:
                if not d.called:
                    d.cancel()

        async def bounded(step):
            d = Deferred.fromCoroutine(self._output(task_dir, step[1], step[2], step[3]))
            pending.append(d)
            try:
                return await d
            except CancelledError:
                if expired:
                    return ("error", f"output {step[1]!r}: not sent within {self.stage_out_timeout:g} s "
                                     "(the stage-out time limit, [transfer] stage_out_timeout)")
                raise

        timer = self._clock.callLater(self.stage_out_timeout, expire) if uploads else None
        try:
            results = iter(await gather([bounded(s) for s in uploads], fail_fast=False))
        finally:
            if timer is not None and timer.active():
                timer.cancel()
        uploaded, errors = [], []
        for step in steps:
            if step[0] == "error":
                errors.append(step[1])
            elif step[0] == "upload" and step in over:
                errors.append(
                    f"output {step[1]!r}: the outputs add up to more than {self.max_stage_out} bytes "
                    "(the stage-out size limit, [transfer] max_stage_out)"
                )
            elif step[0] == "upload":
                kind, value = next(results)
                (uploaded if kind == "ok" else errors).append(value)
        return uploaded, errors

    async def _output(self, key, rel, uri, fd):
        what = f"output {rel!r}"
        try:
            size, digest = await retrying(
                lambda: self.http.put(uri, self._headers(uri), fd, self._run),
                method="PUT", uri=uri, policy=self.policy, limiter=self.limiter,
                key=key, clock=self._clock, log=self.log,
            )
        except Failed as e:
            return ("error", f"{what}: {e.message}")
        except CancelledError:
            raise
        except Exception as e:  # a bug: report it, do not lose the other outputs
            self.log.failure("Uploading {what} to {uri} failed", what=what, uri=public_url(uri))
            return ("error", f"{what}: {describe(e)}")
        self.bytes_out += size
        return ("ok", {"path": rel, "size": size, "sha256": digest, "uri": uri})
