"""
Keeping every file a task names inside its task directory.

A spec's paths are checked lexically first (L{everest_agent.protocol}); the
functions here check them again on the disk, where symbolic links (maybe
planted by the task itself, or by an earlier task with the same id) could
lead elsewhere, and where a running task can swap a directory for a link
between two system calls.

How confinement is done
=======================

Never by resolving a path to a string and opening the string afterwards
(C{realpath} then C{open} leaves a window between the two in which a
component can be swapped).  Instead every path is walked one component at
a time from an open descriptor of the task directory, each component opened
with C{openat(dirfd, name, O_NOFOLLOW | O_DIRECTORY)} relative to the
descriptor of the one before it.  A symbolic link met on the way is never
followed by the kernel: its text is read (C{readlinkat}) and walked the
same way, from the directory that holds it, with C{..} popping back to a
descriptor already held (never above the task directory) and an absolute
target accepted only when it names a place inside the task directory.  So
whatever the task does meanwhile, every descriptor in the walk was reached
from the task directory's through entries that were not links when they
were opened: the file finally opened is inside (the equivalent of Linux's
C{openat2(RESOLVE_IN_ROOT)}, which Python does not expose).  What this does
not stop: a process of the agent's own user that I{moves} a directory it
can already read into the task directory (it could as well copy the files).

The task directory itself is opened by L{open_task_dir} from a descriptor
of C{work_dir}: an existing entry of the task's name that is a symbolic
link, not a directory, or not owned by the agent's user is never used.  It
is moved aside (renamed to C{.quarantine/<name>.<n>} in C{work_dir}, and
the task gets a fresh directory) rather than failing the task: a task id is
the platform's to reuse, and a link left by one task must not deny the id's
next run; nothing of the entry is followed, read or deleted, so an operator
can see what was planted.

The API (small, for the staging code and the handlers alike)
=============================================================

All of these block: call them off the reactor thread (a thread pool).

  - L{open_task_dir}C{(work_dir, name)}: descriptor of a task directory,
    created if needed, checked as above.
  - L{open_dir}C{(dir_fd, relpath, create=False)}: descriptor of a directory
    under C{dir_fd} (parents created with C{create}).
  - L{open_file}C{(dir_fd, relpath, flags, mode)}: descriptor of a file
    under C{dir_fd}.  For reading, links inside are followed (confined) and
    anything but a regular file is refused without blocking (FIFOs are
    opened with C{O_NONBLOCK}); for writing, the last component is never
    followed (C{O_NOFOLLOW}; with C{O_CREAT}, whatever is there is unlinked
    first and the file is created with C{O_EXCL}).
  - L{replace_file}C{(dir_fd, tmp, name)}: rename within one directory fd.
  - L{fresh_dir}C{(dir_fd, name)}: the agent's own subdirectory (a link or
    file in its place is removed, never followed);
    L{open_task_dir_nofollow}C{(path)}: an existing task directory again.

The older path-taking functions (L{input_target}, L{open_output},
L{create_exclusive}, L{find_outputs}) are kept for the staging code; they
walk the same way.
"""

import errno
import fnmatch
import itertools
import os
import posixpath
import stat

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _CLOEXEC
#: Symbolic links followed in one walk before giving up (the kernel's limit).
MAX_LINKS = 40
#: Where L{open_task_dir} moves an unusable entry, inside C{work_dir}.
QUARANTINE = ".quarantine"


class PathEscape(ValueError):
    """A path that leads outside the task directory (or names the wrong kind of file)."""


class _NotDirectory(PathEscape):
    """A component of a path that should be a directory is some other file."""


class UnsafeDirectory(OSError):
    """A directory the agent must not use (a link, or someone else's)."""


def _inside(root_real, path_real):
    return path_real == root_real or path_real.startswith(root_real + os.sep)


def _fd_path(fd):
    """The path the kernel knows for directory C{fd} (for messages and lexical checks)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def _split(relpath):
    return [part for part in relpath.split("/") if part not in ("", ".")]


class _Walk:
    """
    A walk from C{root_fd}: a stack of (descriptor, name) of the
    directories entered, the root's first (borrowed, never closed here).
    """

    def __init__(self, root_fd, what, follow=True):
        self.stack = [(root_fd, None)]
        self.what = what
        self.follow = follow
        self.links = 0
        self._root_real = None

    @property
    def fd(self):
        return self.stack[-1][0]

    def rel(self, name=None):
        parts = [n for _, n in self.stack[1:]]
        if name is not None:
            parts.append(name)
        return "/".join(parts)

    def close(self):
        for fd, _ in self.stack[1:]:
            os.close(fd)
        del self.stack[1:]

    def escape(self, why="leads outside the task directory"):
        return PathEscape(f"{self.what} {why}")

    def link_parts(self, name):
        """
        The components to walk instead of link C{name} in the current
        directory, or None if it is not a link (any more).
        """
        try:
            target = os.readlink(name, dir_fd=self.fd)
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.ENOENT):
                return None
            raise
        if not self.follow:
            raise self.escape(f"has {self.rel(name)!r}, a symbolic link")
        self.links += 1
        if self.links > MAX_LINKS:
            raise self.escape("has too many levels of symbolic links")
        if target.startswith("/"):
            if self._root_real is None:
                self._root_real = _fd_path(self.stack[0][0])
            root = self._root_real
            normal = posixpath.normpath(target)
            if root is None or not _inside(root, normal):
                raise self.escape()
            while len(self.stack) > 1:
                os.close(self.stack.pop()[0])
            return _split(normal[len(root):])
        return _split(target)

    def enter(self, parts, create=False):
        """Walk directory components C{parts} (a list, consumed)."""
        while parts:
            name = parts.pop(0)
            if name == "..":
                if len(self.stack) == 1:
                    raise self.escape()
                os.close(self.stack.pop()[0])
                continue
            try:
                fd = os.open(name, _DIR_FLAGS, dir_fd=self.fd)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(name, 0o755, dir_fd=self.fd)
                except FileExistsError:
                    pass  # made meanwhile: open it (again) as whatever it is
                parts.insert(0, name)
                continue
            except OSError as e:
                if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                link = self.link_parts(name)
                if link is not None:
                    parts[:0] = link
                    continue
                mode = _lstat_mode(name, self.fd)
                if mode and not stat.S_ISLNK(mode) and not stat.S_ISDIR(mode):
                    raise _NotDirectory(f"{self.what} has {self.rel(name)!r}, which is not a directory") from None
                parts.insert(0, name)  # it changed meanwhile: look again
                continue
            self.stack.append((fd, name))

    def last(self, relpath, create=False):
        """Walk to the parent of C{relpath}'s last component: @return: that name."""
        parts = _split(relpath)
        if not parts:
            raise self.escape("names the task directory itself")
        name = parts.pop()
        if name == "..":
            raise self.escape("names a directory")
        self.enter(parts, create=create)
        return name


def _lstat_mode(name, dir_fd):
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except OSError:
        return 0


def open_dir(dir_fd, relpath, create=False, what=None):
    """
    Open directory C{relpath} under C{dir_fd}, links resolved inside it.

    @return: a new descriptor (the caller closes it).
    @raise PathEscape: if it leads outside C{dir_fd} or is not a directory.
    @raise FileNotFoundError: if it does not exist (and C{create} is false).
    """
    walk = _Walk(dir_fd, what or f"directory {relpath!r}")
    try:
        walk.enter(_split(relpath), create=create)
        if len(walk.stack) == 1:
            return os.dup(dir_fd)
        fd = walk.stack.pop()[0]
        return fd
    finally:
        walk.close()


def open_file(dir_fd, relpath, flags=os.O_RDONLY, mode=0o644, what=None, follow=True):
    """
    Open file C{relpath} under C{dir_fd} without ever leaving it.

    Reading (C{flags} without C{O_WRONLY}, C{O_RDWR} or C{O_CREAT}): a link
    at the end is followed too, inside only; the file must be a regular
    file (a FIFO, device, socket or directory is refused, without blocking).
    Writing: the parents are resolved inside, the last component is opened
    with C{O_NOFOLLOW}; with C{O_CREAT}, what is there is removed first and
    the file made with C{O_EXCL} (a fresh file, never a planted one).

    With C{follow} false, no link is followed at all (for the agent's own
    files, which never are links: one there was planted).

    @return: a new descriptor.
    @raise PathEscape: leads outside, is not a regular file (or meets a link
        without C{follow}).
    @raise FileNotFoundError: nothing there (reading).
    """
    walk = _Walk(dir_fd, what or f"file {relpath!r}", follow)
    writing = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
    try:
        name = walk.last(relpath)
        while True:
            if writing:
                if flags & os.O_CREAT:
                    _unlink_entry(walk, name)
                    flags |= os.O_EXCL
                try:
                    fd = os.open(name, flags | os.O_NOFOLLOW | _CLOEXEC, mode, dir_fd=walk.fd)
                except FileExistsError:
                    continue  # planted again between the unlink and the open
                except OSError as e:
                    if e.errno == errno.ELOOP:
                        raise walk.escape("is a symbolic link") from None
                    if e.errno == errno.EISDIR:
                        raise walk.escape("is a directory") from None
                    raise
            else:
                try:
                    fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | _CLOEXEC, dir_fd=walk.fd)
                except OSError as e:
                    if e.errno != errno.ELOOP:
                        raise
                    link = walk.link_parts(name)
                    if link is None:
                        continue
                    if not link:
                        raise walk.escape("names a directory") from None
                    name = link.pop()
                    walk.enter(link)
                    if name == "..":
                        raise walk.escape("names a directory") from None
                    continue
            try:
                kind = os.fstat(fd).st_mode
                if not stat.S_ISREG(kind):
                    raise walk.escape("is a directory" if stat.S_ISDIR(kind) else "is not a regular file")
                if not writing:
                    os.set_blocking(fd, True)
            except BaseException:
                os.close(fd)
                raise
            return fd
    finally:
        walk.close()


def _unlink_entry(walk, name):
    try:
        os.unlink(name, dir_fd=walk.fd)
    except FileNotFoundError:
        pass
    except (IsADirectoryError, PermissionError) as e:
        if stat.S_ISDIR(_lstat_mode(name, walk.fd)):
            raise walk.escape("is a directory") from None
        raise e


def fresh_dir(dir_fd, name, mode=0o755):
    """
    Open directory entry C{name} of C{dir_fd} (the agent's own, e.g.
    C{.everest}), making it if needed; a link or a file in its place (left
    by an earlier run of the same task id) is removed first, never
    followed.  @return: a new descriptor.
    """
    for _ in range(10):
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            try:
                os.unlink(name, dir_fd=dir_fd)
            except FileNotFoundError:
                pass
        try:
            os.mkdir(name, mode, dir_fd=dir_fd)
        except FileExistsError:
            pass
    raise PathEscape(f"{name!r} keeps being replaced")


def open_task_dir_nofollow(path):
    """
    Open an existing task directory C{path} again (its parent is the
    operator's C{work_dir}): refuse it if it became a link or someone
    else's.  @return: a descriptor.  @raise PathEscape, FileNotFoundError.
    """
    try:
        fd = os.open(path, _DIR_FLAGS)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise PathEscape(f"the task directory {path} is not a directory (a symbolic link?)") from None
        raise
    if os.fstat(fd).st_uid != os.geteuid():
        os.close(fd)
        raise PathEscape(f"the task directory {path} is not owned by the agent's user")
    return fd


def replace_file(dir_fd, tmp, name):
    """Rename C{tmp} to C{name}, both entries of directory C{dir_fd} (a link there is replaced)."""
    os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def open_task_dir(work_dir, name, create=True, uid=None, log=None):
    """
    Open (creating it if need be) the task directory C{name} in C{work_dir}.

    C{work_dir} is the operator's (its own links are followed); the entry
    C{name} is the platform's: if it is a symbolic link, not a directory, or
    a directory not owned by C{uid} (default: the agent's user), it is moved
    aside to L{QUARANTINE} (see the module's docstring) and a fresh
    directory is made.

    @return: a descriptor of the task directory.
    @raise UnsafeDirectory: if a bad entry cannot be moved aside.
    @raise FileNotFoundError: if it does not exist and C{create} is false.
    """
    if "/" in name or name in ("", ".", ".."):
        raise PathEscape(f"task directory name {name!r} is not a single path component")
    uid = os.geteuid() if uid is None else uid
    root = os.open(work_dir, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
    try:
        for _ in range(10):
            try:
                fd = os.open(name, _DIR_FLAGS, dir_fd=root)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(name, 0o755, dir_fd=root)
                except FileExistsError:
                    pass
                continue
            except OSError as e:
                if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                _quarantine(root, work_dir, name, "it is not a directory (a symbolic link?)", log)
                continue
            st = os.fstat(fd)
            if st.st_uid == uid:
                return fd
            os.close(fd)
            _quarantine(root, work_dir, name, f"it is owned by uid {st.st_uid}, not {uid}", log)
            if not create:
                raise FileNotFoundError(errno.ENOENT, "moved aside", name)
        raise UnsafeDirectory(errno.EAGAIN, f"the task directory {name!r} keeps being replaced")
    finally:
        os.close(root)


def _quarantine(root, work_dir, name, why, log):
    try:
        os.mkdir(QUARANTINE, 0o700, dir_fd=root)
    except FileExistsError:
        pass
    try:
        aside = os.open(QUARANTINE, _DIR_FLAGS, dir_fd=root)
    except OSError as e:
        raise UnsafeDirectory(e.errno, f"cannot use the task directory {name!r} ({why}) "
                                       f"nor move it aside: {e.strerror}") from None
    try:
        for n in itertools.count(1):
            try:
                os.stat(f"{name}.{n}", dir_fd=aside, follow_symlinks=False)
            except FileNotFoundError:
                break
        os.rename(name, f"{name}.{n}", src_dir_fd=root, dst_dir_fd=aside)
    except FileNotFoundError:
        return  # gone meanwhile
    except OSError as e:
        raise UnsafeDirectory(e.errno, f"cannot use the task directory {name!r} ({why}) "
                                       f"nor move it aside: {e.strerror}") from None
    finally:
        os.close(aside)
    if log is not None:
        log.warn("Task directory {name} in {work_dir} moved aside to {aside}: {why}",
                 name=name, work_dir=work_dir, aside=f"{QUARANTINE}/{name}.{n}", why=why)


# -- the path-taking functions the staging code uses -------------------------


def _open_root(task_dir):
    return os.open(task_dir, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)


def input_target(task_dir, relpath):
    """
    Where to write input C{relpath}: creates its parent directories
    (walking from the task directory, see the module's docstring) and
    returns the absolute path of the file's place, its directory part made
    of real directories inside C{task_dir}.  The file itself is written to
    a temporary name and renamed over the target, which replaces a link
    instead of following it.

    @raise PathEscape: if the path, or its parent once resolved, is
        outside the task directory, or if it names a directory.
    """
    normal = posixpath.normpath(relpath)
    if normal.startswith("/") or normal in (".", "..") or normal.startswith("../"):
        raise PathEscape(f"input {relpath!r} leads outside the task directory")
    root = os.path.realpath(task_dir)
    root_fd = _open_root(root)
    walk = _Walk(root_fd, f"input {relpath!r}")
    try:
        name = walk.last(normal, create=True)
        parent = walk.rel()
        if stat.S_ISDIR(_lstat_mode(name, walk.fd)):
            raise PathEscape(f"input {relpath!r} names a directory")
    finally:
        walk.close()
        os.close(root_fd)
    return os.path.join(root, parent, name) if parent else os.path.join(root, name)


def open_output(task_dir, relpath):
    """
    Open output C{relpath} for reading, refusing anything that resolves
    outside C{task_dir} or is not a regular file (see L{open_file}).

    @return: an open binary file, or None if there is no such file.
    @raise PathEscape: if it leads outside, or is not a regular file.
    """
    root_fd = _open_root(task_dir)
    try:
        fd = open_file(root_fd, relpath, what=f"output {relpath!r}")
    except (FileNotFoundError, NotADirectoryError):
        return None
    finally:
        os.close(root_fd)
    return os.fdopen(fd, "rb")


def temporary_for(target):
    """The name a file is written under before it is renamed to C{target}."""
    head, tail = os.path.split(target)
    return os.path.join(head, f".{tail}.part")


def create_exclusive(path, mode=0o644):
    """
    Create C{path} for writing, never through a symbolic link: whatever is
    at C{path} already (a stale partial file, or a link planted there) is
    removed first, and the file is created with C{O_EXCL | O_NOFOLLOW}.
    Its directory is opened with C{O_NOFOLLOW} on every component of the
    absolute path (L{input_target} returns one made of real directories).

    @return: a file descriptor.
    """
    head, tail = os.path.split(os.path.abspath(path))
    root = os.open("/", os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
    try:
        walk = _Walk(root, repr(path))
        try:
            for part in _split(head):
                try:
                    fd = os.open(part, _DIR_FLAGS, dir_fd=walk.fd)
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise PathEscape(f"{path!r}: {part!r} is a symbolic link or not a directory") from None
                    raise
                walk.stack.append((fd, part))
            flags = os.O_WRONLY | os.O_CREAT
            return open_file(walk.fd, tail, flags, mode, what=repr(path))
        finally:
            walk.close()
    finally:
        os.close(root)


def find_outputs(task_dir, pattern):
    """
    The files in C{task_dir} that the glob C{pattern} matches.

    Matching follows L{glob} conventions, one path segment at a time: C{*},
    C{?} and C{[...]} never cross a C{/}, a segment C{**} matches any number
    of directories (zero included), and names starting with C{.} match only
    segments that start with C{.} too.

    Nothing outside the task directory is ever looked at: the walk goes
    from directory descriptors (see the module's docstring); symbolic links
    to directories are followed only when they point inside the task
    directory, and never by C{**} (so a link loop cannot make the walk
    endless).  A symbolic link that the pattern matches and that leads
    outside is reported, not followed; links to files inside are matched.

    @return: C{(matches, errors)}: the matching regular files as sorted
        paths relative to the task directory, and one message for each
        match that leads outside.
    """
    normal = posixpath.normpath(pattern)
    if normal.startswith("/") or normal == ".." or normal.startswith("../"):
        return [], [f"output pattern {pattern!r} leads outside the task directory"]
    segments = [s for s in normal.split("/") if s not in ("", ".")]
    if segments and segments[-1] == "**":
        segments.append("*")
    found, errors = set(), []
    if segments:
        try:
            root_fd = _open_root(task_dir)
        except OSError:
            return [], []
        try:
            _walk(root_fd, root_fd, "", segments, 0, found, errors, pattern)
        finally:
            os.close(root_fd)
    return sorted(found), errors


def match_outputs(task_dir, pattern):
    """
    Like L{find_outputs}, but raise L{PathEscape} for the first match that
    leads outside the task directory.
    """
    found, errors = find_outputs(task_dir, pattern)
    if errors:
        raise PathEscape(errors[0])
    return found


def _magic(segment):
    return any(c in segment for c in "*?[")


def _segment_matches(name, segment):
    if name.startswith(".") and not segment.startswith("."):
        return False
    return fnmatch.fnmatchcase(name, segment)


def _entries(dir_fd):
    """(name, lstat mode) of each entry of directory C{dir_fd}."""
    try:
        with os.scandir(os.dup(dir_fd)) as it:
            out = []
            for entry in it:
                try:
                    out.append((entry.name, entry.stat(follow_symlinks=False).st_mode))
                except OSError:
                    pass
            return out
    except OSError:
        return []


def _kind(root_fd, child):
    """What C{child} (relative to the root) is, links followed inside: 'dir', 'file', None; or PathEscape."""
    try:
        fd = open_dir(root_fd, child, what=f"output {child!r}")
    except _NotDirectory:
        pass
    except (FileNotFoundError, NotADirectoryError):
        return None
    else:
        os.close(fd)
        return "dir"
    walk = _Walk(root_fd, f"output {child!r}")
    try:
        name = walk.last(child)
        for _ in range(MAX_LINKS + 1):
            mode = _lstat_mode(name, walk.fd)
            if not stat.S_ISLNK(mode):
                return "file" if stat.S_ISREG(mode) else None
            link = walk.link_parts(name)
            if link is None:
                continue
            if not link:
                return "dir"
            name = link.pop()
            walk.enter(link)
        raise walk.escape("has too many levels of symbolic links")
    except (FileNotFoundError, NotADirectoryError):
        return None
    finally:
        walk.close()


def _walk(root_fd, dir_fd, rel, segments, i, found, errors, pattern):
    """Match C{segments[i:]} against directory C{dir_fd} (C{rel} relative to the root)."""
    segment = segments[i]
    last = i == len(segments) - 1
    if segment == "**":  # never last: find_outputs appends "*" after a final "**"
        _walk(root_fd, dir_fd, rel, segments, i + 1, found, errors, pattern)
        for name, mode in _entries(dir_fd):
            if name.startswith(".") or not stat.S_ISDIR(mode):
                continue  # links are never followed by **
            try:
                sub = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
            except OSError:
                continue
            try:
                _walk(root_fd, sub, posixpath.join(rel, name) if rel else name,
                      segments, i, found, errors, pattern)
            finally:
                os.close(sub)
        return
    magic = _magic(segment)
    if magic:
        names = sorted(n for n, _ in _entries(dir_fd) if _segment_matches(n, segment))
    else:
        names = [segment]
    for name in names:
        child = posixpath.join(rel, name) if rel else name
        mode = _lstat_mode(name, dir_fd)
        if not mode:
            continue
        if stat.S_ISLNK(mode):
            try:
                kind = _kind(root_fd, child)
            except PathEscape:
                errors.append(
                    f"output {child!r} (from pattern {pattern!r}) leads outside the task directory"
                )
                continue
        else:
            kind = "dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else None
        if last:
            if kind == "file":
                found.add(child)
        elif kind == "dir":
            try:
                sub = open_dir(root_fd, child)
            except (OSError, PathEscape):
                continue
            try:
                _walk(root_fd, sub, child, segments, i + 1, found, errors, pattern)
            finally:
                os.close(sub)
