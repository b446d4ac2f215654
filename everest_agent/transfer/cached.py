"""
The content cache glue: inputs that name a C{sha256} go through the agent's
content cache (L{everest_agent.cache}).

Such an input is fetched once into the cache and hard-linked (or, across
file systems, copied) into every task that needs it; it is read-only in the
task (0444, 0555 when executable).  Concurrent requests for the same content
wait for the one download in flight, which is cancelled only if every task
waiting for it is cancelled.  The other mode of cached content is made by a
local copy, never by a second download.  An entry found on disk (after a
restart) or changed since it was verified is hashed again before use.
"""

import errno
import os

from twisted.internet.defer import CancelledError

from everest_agent import paths
from everest_agent.cache import hash_file
from everest_agent.transfer.errors import Failed, io_failure, remove
from everest_agent.transfer.jobs import Shared, mirror


def copy_file(source, target, mode):
    """Copy C{source} to a new file C{target} (never through a link; in a thread)."""
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


def _other_file_system(directory, cache_directory):
    """Whether C{directory} is on another file system than the cache (in a thread)."""
    return os.stat(directory).st_dev != os.stat(cache_directory).st_dev


#: Errors of a hard link that a copy gets around.
_NO_LINK = (errno.EXDEV, errno.EMLINK, errno.EPERM, errno.EACCES, errno.EOPNOTSUPP, errno.ENOTSUP)


def link_into(source, target):
    """
    Hard-link C{source} at C{target} (through a temporary name, renamed
    over whatever is there; in a thread).

    @return: C{"ok"}; C{"gone"} if C{source} is missing; C{"copy"} if a
        link cannot be made here.
    """
    tmp = paths.temporary_for(target)
    try:
        paths.link_exclusive(source, tmp)
    except FileNotFoundError:
        if not os.path.exists(source):
            return "gone"
        raise
    except OSError as e:
        if e.errno in _NO_LINK:
            return "copy"
        raise
    paths.replace_or_remove(tmp, target)
    return "ok"


def copy_into(source, target, mode):
    """Copy C{source} to C{target} through a temporary name (in a thread)."""
    tmp = paths.temporary_for(target)
    try:
        copy_file(source, tmp, mode)
        paths.replace_into(tmp, target)
    except BaseException:
        remove(tmp)
        raise


class CachedInputs:
    """
    Puts cached content in place for tasks.

    @param cache: the L{everest_agent.cache.ContentCache} (opened).
    @param download: C{await download(key, uri, tmp, size, sha256, mode)},
        the stager's retried download into a new file.
    @param run: the thread seam.
    @param space: the L{everest_agent.transfer.space.DiskSpace}.
    """

    def __init__(self, cache, download, run, space):
        self.cache = cache
        self._download = download
        self._run = run
        self._space = space
        self.jobs = {}  # (sha256, executable) -> Shared fetch or copy into the cache
        self._checks = {}  # Entry -> Shared verification

    async def put(self, key, target, item):
        """Put the content C{item} names at C{target} (raise L{Failed} if not)."""
        cache = self.cache
        digest, executable, size = item["sha256"], bool(item.get("executable")), item.get("size")
        if size is not None and cache.get(digest, executable) is None:
            # A miss: room for the copy too, if the task is on another file system.
            directory = os.path.dirname(target)
            try:
                other_fs = await mirror(self._run(_other_file_system, directory, cache.directory))
            except OSError as e:
                raise io_failure(e) from None
            if other_fs:
                async with self._space.claim(directory, size, reserve=False):
                    pass
        tried = set()
        while True:
            entry = cache.get(digest, executable)
            if entry is not None:
                if await self._use(entry, target, item):
                    return
                continue
            job = self.jobs.get((digest, executable)) or self.jobs.get((digest, not executable))
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
            except Failed:
                if job.uri is None or job.uri == item["uri"] or item["uri"] in tried:
                    raise
                # That download was from another task's URI: try ours.
            tried.add(job.uri)

    def _start_job(self, key, uri, coroutine):
        """Start the shared job that puts C{key} in the cache."""
        job = Shared(coroutine, after=self.cache.unpin)
        job.uri = uri
        if not job.finished:
            self.jobs[key] = job

            def forget():
                if self.jobs.get(key) is job:
                    del self.jobs[key]

            job.before = forget
        return job

    async def _fetch(self, key, digest, executable, item):
        """Download into the cache; the entry comes back pinned."""
        cache = self.cache
        size = item.get("size")
        tmp = cache.temporary()
        cache.make_room(size)
        async with self._space.claim(cache.directory, size):
            length, _ = await self._download(key, item["uri"], tmp, size, digest, 0o600)
        try:
            return await mirror(cache.add(digest, executable, tmp, length))  # (tmp removed if not)
        except OSError as e:
            raise io_failure(e) from None

    async def _in_thread(self, f, *args, cleanup=None):
        """Run C{f} in a thread; a cancelled wait lets it finish, then cleans up."""
        job = self._run(f, *args)
        try:
            return await mirror(job)
        except CancelledError:
            if cleanup is not None:
                job.addBoth(lambda _: self._run(cleanup))
            raise
        except paths.PathEscape as e:
            raise Failed(str(e)) from None
        except OSError as e:
            raise io_failure(e) from None

    async def _variant(self, other, executable):
        """Make the other mode of a cached file by a local copy; pinned."""
        cache = self.cache
        cache.pin(other)
        try:
            tmp = cache.temporary()
            cache.make_room(other.size)
            async with self._space.claim(cache.directory, other.size):
                try:
                    await self._in_thread(copy_file, other.path, tmp, 0o600, cleanup=lambda: remove(tmp))
                except Failed:
                    await self._run(remove, tmp)
                    raise
            try:
                return await mirror(cache.add(other.digest, executable, tmp, other.size))
            except OSError as e:
                raise io_failure(e) from None
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
            state = await mirror(cache.check(entry))
            if state == "missing":
                return False
            if state == "verify" and not await self._verify(entry):
                return False
            size = item.get("size")
            if size is not None and entry.size != size:
                raise Failed(f"size mismatch: expected {size} bytes, the content with this sha256 has {entry.size}")
            if not await self._place(entry, target):
                return False
            cache.touch(entry)
            return True
        finally:
            cache.unpin(entry)

    async def _verify(self, entry):
        job = self._checks.get(entry)
        if job is None:
            job = Shared(self._verify_job(entry))
            if not job.finished:
                self._checks[entry] = job
        return await job.wait()

    async def _verify_job(self, entry):
        cache = self.cache
        cache.pin(entry)
        try:
            try:
                size, digest, stamp = await mirror(self._run(hash_file, entry.path))
            except OSError:
                cache.drop(entry, why="unreadable")
                return False
            return cache.mark_verified(entry, size, digest, stamp)
        finally:
            self._checks.pop(entry, None)
            cache.unpin(entry)

    async def _place(self, entry, target):
        how = await self._in_thread(link_into, entry.path, target)
        if how == "gone":
            self.cache.drop(entry, why="its file disappeared")
            return False
        if how == "copy":
            tmp = paths.temporary_for(target)
            async with self._space.claim(os.path.dirname(target), entry.size):
                await self._in_thread(copy_into, entry.path, target, entry.mode, cleanup=lambda: remove(tmp))
        return True
