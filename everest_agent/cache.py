"""
A content-addressed cache of input files, shared by every task of one agent.

Parameter sweeps send the same inputs to thousands of tasks.  An input that
names its C{sha256} is fetched once into the cache and then hard-linked (or
copied, across file systems) into each task directory that needs it.  Inputs
without a C{sha256} are never cached: a URI alone says nothing about what the
bytes will be next time, and HTTP revalidation would cost a round trip per
task for little gain.

Layout under the cache directory::

    sha256/<hh>/<64 hex digits>      the content, mode 0444
    sha256/<hh>/<64 hex digits>.x    the same content, executable (0555)
    tmp/<id>/                        downloads in progress of one open cache
    tmp/<id>.lock                    held (flock) while that cache is open

where C{<hh>} is the first two hex digits.  The executable variant is a
separate file (an inode has one mode); it is made by a local copy of the
other variant, never by a second download.

Entries are read-only, and so is every hard link to them in a task
directory, so a task cannot change the bytes other tasks share by accident.
A task running as root (or one that changes the mode back) still could; so
an entry's size and modification time are recorded when its content was
last verified, and an entry whose stamp changed, or that was found on disk
when the cache was opened (after a restart or a crash), is hashed again
before it is used.  A corrupt entry is dropped and fetched again.

Eviction is least recently used, down to C{max_size} bytes.  The order
survives restarts: each use sets the file's access time explicitly.  An
entry is in use while a task is verifying it or linking/copying it into its
directory (it is I{pinned}); a pinned entry is never evicted, so the cache
may exceed its size for as long as that lasts.  Evicting an entry only
removes the cache's own name for it: tasks that got it by hard link keep
their file.  Content larger than C{max_size} is still shared by the tasks
that ask for it at the same time, then dropped.

Several agents may share a cache directory (two agents with one
C{work_dir}): each open cache downloads into a C{tmp/} directory of its own,
whose lock file it holds for as long as it is open, and opening a cache
removes only the C{tmp/} directories whose lock nobody holds (their agent is
gone).  Entries themselves are only ever replaced by a rename of complete,
verified content, so the agents' indexes may differ but never their bytes.

The index lives in memory, on the reactor thread.  Its disk work (looking
at an entry, setting its access time, renaming one in, removing one) is
done through a L{Lane} once L{ContentCache.use} gave it the agent's
file-system threads: one job at a time, in the order asked, so a removal
and a later rename of the same name never cross.  Before that (while
L{ContentCache.open} scans the directory, in a thread of its own, and in
tests) it is done at once, where it is asked.  Hashing and copying are
done by the caller, in a thread.
"""

import errno
import fcntl
import hashlib
import os
import re
import shutil
import stat
import time
import uuid
from collections import OrderedDict

from twisted.internet import defer
from twisted.logger import Logger

from everest_agent.transfer.jobs import Lane, run_inline

_NAME = re.compile(r"[0-9a-f]{64}(\.x)?\Z")
READ_ONLY = 0o444
EXECUTABLE = 0o555


def parse_size(value):
    """
    A byte count, with an optional binary suffix: C{"10G"}, C{"512M"},
    C{"1.5T"}, C{"64KiB"}, C{"100 MB"}, C{"1000"}.  K, M, G, T and P are
    powers of 1024.
    """
    match = re.match(r"\s*(\d+(?:\.\d*)?)\s*(?:([KMGTP])(?:I?B)?|B)?\s*\Z", str(value), re.IGNORECASE)
    if not match:
        raise ValueError("must be a size in bytes, optionally with a suffix K, M, G or T (powers of 1024)")
    number, unit = match.groups()
    factor = 1024 ** ("KMGTP".index(unit.upper()) + 1) if unit else 1
    return int(float(number) * factor) if "." in number else int(number) * factor


def sha256_file(path, block=1 << 20):
    """
    The size and sha256 (hex) of the file at C{path}.  Meant to run in a
    thread: reading and hashing release the GIL.
    """
    digest = hashlib.sha256()
    size = 0
    buf = bytearray(block)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            digest.update(view[:n])
            size += n
    return size, digest.hexdigest()


class Entry:
    """One file in the cache."""

    __slots__ = (
        "digest", "executable", "path", "size", "stamp", "verified", "pins", "transient", "gone",
    )

    def __init__(self, digest, executable, path, size, stamp, verified):
        self.digest = digest
        self.executable = executable
        self.path = path
        self.size = size
        self.stamp = stamp  # (size, mtime_ns) when the content was last verified
        self.verified = verified
        self.pins = 0
        self.transient = False  # larger than the whole cache: dropped when unpinned
        self.gone = False  # removed from the cache

    @property
    def key(self):
        return (self.digest, self.executable)

    @property
    def mode(self):
        return EXECUTABLE if self.executable else READ_ONLY

    def __repr__(self):
        return f"<Entry {self.digest[:12]}{'.x' if self.executable else ''} {self.size}B pins={self.pins}>"


def _stamp(st):
    return (st.st_size, st.st_mtime_ns)


class ContentCache:
    """
    The index of a cache directory, kept in memory.

    @ivar total: bytes held by the (non-transient) entries.
    """

    log = Logger()

    def __init__(self, directory, max_size, clock=time.time):
        self.directory = os.path.abspath(directory)
        self.max_size = max_size
        self._clock = clock
        self._entries = OrderedDict()  # key -> Entry, least recently used first
        self.total = 0
        self.evictions = 0
        self._tmp_root = os.path.join(self.directory, "tmp")
        self._tmp = None  # this cache's own directory in tmp/, once open
        self._lock = None
        self._store = os.path.join(self.directory, "sha256")
        self._disk = run_inline

    def use(self, run):
        """
        From now on do the disk work through C{run} (the thread seam:
        C{run(f, *args)} returns a Deferred), one job at a time, in order.
        """
        self._disk = Lane(run)

    @property
    def tmp_dir(self):
        """Where this (open) cache's downloads in progress are."""
        return self._tmp

    # -- opening ----------------------------------------------------------------

    def open(self):
        """
        Create the directory if needed, empty C{tmp/} and index what is there
        (unverified).  Then evict down to the size limit.

        @raise OSError: if the directory cannot be created or read.
        """
        os.makedirs(self._tmp_root, mode=0o755, exist_ok=True)
        os.makedirs(self._store, mode=0o755, exist_ok=True)
        self._sweep_tmp()
        self._claim_tmp()
        found = []
        for sub in os.listdir(self._store):
            subdir = os.path.join(self._store, sub)
            if not re.match(r"[0-9a-f]{2}\Z", sub) or not os.path.isdir(subdir):
                continue
            for name in os.listdir(subdir):
                path = os.path.join(subdir, name)
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if not _NAME.match(name) or not name.startswith(sub) or not _isreg(st):
                    self.log.warn("Removing stray file {path} from the cache", path=path)
                    _remove(path)
                    continue
                digest = name[:64]
                entry = Entry(digest, name.endswith(".x"), path, st.st_size, _stamp(st), verified=False)
                found.append((st.st_atime_ns, entry))
        found.sort(key=lambda pair: pair[0])
        for _, entry in found:
            self._entries[entry.key] = entry
            self.total += entry.size
        self._evict()
        self.log.info(
            "Content cache {directory}: {count} files, {total} bytes (limit {limit})",
            directory=self.directory, count=len(self._entries), total=self.total, limit=self.max_size,
        )

    def _claim_tmp(self):
        """Make and lock this cache's own temporary directory."""
        name = uuid.uuid4().hex
        fresh = os.path.join(self._tmp_root, f".{name}.new")
        fd = os.open(fresh, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # Locked before it has its name: a sweep never sees it unlocked.
            os.replace(fresh, os.path.join(self._tmp_root, f"{name}.lock"))
            os.mkdir(os.path.join(self._tmp_root, name), 0o755)
        except BaseException:
            os.close(fd)
            _remove(fresh)
            raise
        self._lock = fd
        self._tmp = os.path.join(self._tmp_root, name)

    def _sweep_tmp(self):
        """Remove what the caches of agents that are gone left in C{tmp/}."""
        names = set(os.listdir(self._tmp_root))
        for name in names:
            path = os.path.join(self._tmp_root, name)
            if name.endswith(".lock") or name.endswith(".new"):
                if not _unlocked(path):
                    continue
                owned = name[1:-4] if name.endswith(".new") else name[:-5]
                _remove(os.path.join(self._tmp_root, owned))
                _remove(path)
            elif f"{name}.lock" not in names or not os.path.exists(f"{path}.lock"):
                # A directory whose lock is gone, or a file of the layout
                # before per-cache directories.
                _remove(path)

    def close(self):
        """
        Give up this cache's temporary directory (what is in it is lost).

        @return: a Deferred that fires when that is done.
        """
        if self._lock is None:
            return defer.succeed(None)
        lock, self._lock = self._lock, None
        return self._disk(_release_tmp, self._tmp, lock)

    # -- looking up -------------------------------------------------------------

    def path_for(self, digest, executable):
        name = digest + (".x" if executable else "")
        return os.path.join(self._store, digest[:2], name)

    def get(self, digest, executable):
        """The entry for this content and mode, or None."""
        return self._entries.get((digest, executable))

    def __len__(self):
        return len(self._entries)

    def __contains__(self, key):
        return key in self._entries

    def entries(self):
        """Every entry, least recently used first."""
        return list(self._entries.values())

    def check(self, entry):
        """
        Whether C{entry} can be used as it is.

        @return: a Deferred of C{"ok"}; C{"verify"} if its content must be
            hashed again (never verified by this process, or changed
            since); or C{"missing"} if its file is gone (the entry is then
            dropped).
        """
        if entry.gone:
            return defer.succeed("missing")
        return self._disk(_look, entry.path, entry.mode).addCallback(self._checked, entry)

    def _checked(self, seen, entry):
        if entry.gone:
            return "missing"
        state, stamp = seen
        if state != "ok" and state != "mode restored":
            self.drop(entry, why=state)
            return "missing"
        if state == "mode restored":
            # Someone made it writable (or changed its run bit): it is put
            # back, and the content looked at again.
            entry.verified = False
        if not entry.verified or stamp != entry.stamp:
            return "verify"
        return "ok"

    def mark_verified(self, entry, size, digest, stamp):
        """
        Record the result of hashing C{entry}'s file (L{hash_file}: the
        bytes read, their sha256, and the file's stamp just after, or None
        if it was gone by then).

        @return: True if the content is right; if not, the entry is dropped.
        """
        if entry.gone:
            return False
        if digest != entry.digest:
            self.log.warn(
                "Cache entry {path} is corrupt (sha256 {actual}); dropping it",
                path=entry.path, actual=digest,
            )
            self.drop(entry, why="corrupt")
            return False
        if stamp is None:
            self.drop(entry, why="its file disappeared")
            return False
        if stamp[0] != size:
            return True  # changed while it was being hashed: look again next time
        self.total += stamp[0] - entry.size
        entry.size = stamp[0]
        entry.stamp = stamp
        entry.verified = True
        return True

    # -- using ------------------------------------------------------------------

    def pin(self, entry):
        entry.pins += 1

    def unpin(self, entry):
        entry.pins -= 1
        assert entry.pins >= 0, entry
        if entry.pins == 0:
            if entry.transient:
                self.drop(entry, why="larger than the cache")
            else:
                self._evict()

    def touch(self, entry):
        """Mark C{entry} as just used (in memory, and in its access time)."""
        if entry.gone:
            return
        self._entries.move_to_end(entry.key)
        self._disk(_set_atime, entry.path, int(self._clock() * 1e9))

    # -- adding and removing ----------------------------------------------------

    def temporary(self, hint="part"):
        """A fresh path in the cache's C{tmp/} directory (not created)."""
        return os.path.join(self._tmp, f"{uuid.uuid4().hex}.{hint}")

    def make_room(self, size):
        """Evict unpinned entries so that C{size} more bytes fit, if they can."""
        if size is not None and size <= self.max_size:
            self._evict(extra=size)

    def add(self, digest, executable, temporary, size):
        """
        Move the verified file C{temporary} into the cache and index it.

        @return: a Deferred of the new entry, pinned once: the caller
            unpins it.  It fails with the C{OSError} if the file cannot be
            moved in (C{temporary} is then removed).
        """
        path = self.path_for(digest, executable)
        mode = EXECUTABLE if executable else READ_ONLY
        return self._disk(_install, temporary, path, mode).addCallback(self._added, digest, executable, path)

    def _added(self, stamp, digest, executable, path):
        old = self._entries.pop((digest, executable), None)
        if old is not None:
            old.gone = True
            if not old.transient:
                self.total -= old.size
        entry = Entry(digest, executable, path, stamp[0], stamp, verified=True)
        entry.pins = 1
        self._entries[entry.key] = entry
        if entry.size > self.max_size:
            entry.transient = True
        else:
            self.total += entry.size
            self._evict()
        self.touch(entry)
        return entry

    def drop(self, entry, why="dropped"):
        """Remove C{entry} (its file and its index record), pinned or not."""
        if entry.gone:
            return
        entry.gone = True
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
            if not entry.transient:
                self.total -= entry.size
        self._disk(_remove, entry.path)
        self.log.debug("Cache entry {path} removed: {why}", path=entry.path, why=why)

    def _evict(self, extra=0):
        if self.total + extra <= self.max_size:
            return
        for entry in list(self._entries.values()):
            if self.total + extra <= self.max_size:
                break
            if entry.pins or entry.transient:
                continue
            self.drop(entry, why="least recently used")
            self.evictions += 1


def hash_file(path):
    """
    The size and sha256 (hex) of the file at C{path}, and its stamp (size,
    modification time) just after, or None if it is gone by then (in a
    thread).
    """
    size, digest = sha256_file(path)
    try:
        stamp = _stamp(os.lstat(path))
    except OSError:
        stamp = None
    return size, digest, stamp


def _look(path, mode):
    """
    How the file of an entry is (in a thread): C{(state, stamp)}, the state
    C{"ok"}, C{"mode restored"} (its mode had changed and is put back), or
    why it is unusable.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "its file disappeared", None
    except OSError:
        return "its file cannot be looked at", None
    if not _isreg(st):
        return "it is no longer a regular file", None
    if (st.st_mode & 0o7777) != mode:
        try:
            os.chmod(path, mode)
            st = os.lstat(path)
        except OSError:
            return "its mode cannot be restored", None
        return "mode restored", _stamp(st)
    return "ok", _stamp(st)


def _set_atime(path, now_ns):
    """Set the access time of C{path}, keeping its modification time (in a thread)."""
    try:
        st = os.lstat(path)
        os.utime(path, ns=(now_ns, st.st_mtime_ns), follow_symlinks=False)
    except OSError:
        pass


def _install(temporary, path, mode):
    """
    Give C{temporary} its mode and rename it to C{path} (in a thread); on
    failure C{temporary} is removed.

    @return: its stamp.
    """
    try:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        os.chmod(temporary, mode)
        st = os.lstat(temporary)
        os.replace(temporary, path)
    except BaseException:
        _remove(temporary)
        raise
    return _stamp(st)


def _release_tmp(tmp, lock):
    """Remove a closed cache's temporary directory, then let go of its lock (in a thread)."""
    _remove(tmp)
    _remove(f"{tmp}.lock")
    os.close(lock)


def _unlocked(path):
    """Whether nobody holds the lock file C{path} (it may be removed then)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        return e.errno not in (errno.ENOENT,)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def _isreg(st):
    return stat.S_ISREG(st.st_mode)


def _remove(path):
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except OSError:
        pass
