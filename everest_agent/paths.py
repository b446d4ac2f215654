"""
Keeping every file a task names inside its task directory: the one walker.

A spec's paths are checked lexically first (L{everest_agent.protocol}); the
functions here check them again on the disk, where symbolic links (maybe
planted by the task itself, or by an earlier task with the same id) could
lead elsewhere, and where a running task can swap a directory for a link
between two system calls.  Every caller goes through this module: the
stager's inputs and outputs, the passive-mode file server, the handlers'
C{stdout}, C{stderr} and exit-code files, the job script.

How confinement is done
=======================

Never by resolving a path to a string and opening the string afterwards
(C{realpath} then C{open} leaves a window between the two in which a
component can be swapped).  Instead every path is walked one component at
a time from an open descriptor of the task directory (L{_Walk}), each
component opened with C{openat(dirfd, name, O_NOFOLLOW | O_DIRECTORY)}
relative to the descriptor of the one before it.  A symbolic link met on
the way is never followed by the kernel: its text is read (C{readlinkat})
and walked the same way, from the directory that holds it, with C{..}
popping back to a descriptor already held (never above the task directory)
and an absolute target accepted only when it names a place inside the task
directory.  So whatever the task does meanwhile, every descriptor in the
walk was reached from the task directory's through entries that were not
links when they were opened: the file finally opened is inside (the
equivalent of Linux's C{openat2(RESOLVE_IN_ROOT)}, which Python does not
expose).  What this does not stop: a process of the agent's own user that
I{moves} a directory it can already read into the task directory (it could
as well copy the files).

Only regular files are read.  The type of the last component is looked at
before it is opened (C{fstatat} without following), so a FIFO, socket,
device or directory is refused with a reason naming what it is (L{kind})
and never opened; the open itself uses C{O_NONBLOCK | O_NOCTTY} (a FIFO
swapped in at the last moment cannot block it) and the type is checked
again on the open descriptor.

The task directory itself is opened by L{open_task_dir} from a descriptor
of C{work_dir}: an existing entry of the task's name that is a symbolic
link, not a directory, or not owned by the agent's user is never used.  It
is moved aside (renamed to C{.quarantine/<name>.<n>} in C{work_dir}, and
the task gets a fresh directory) rather than failing the task: a task id is
the platform's to reuse, and a link left by one task must not deny the id's
next run; nothing of the entry is followed, read or deleted, so an operator
can see what was planted.  Opened again later by its path
(L{open_task_dir_nofollow}, which every path-taking function here uses),
it is refused if it has become a link or someone else's.

The API
=======

All of these block on the file system: call them off the reactor thread
(the stager's and the passive server's file-work threads).

  - L{open_task_dir}C{(work_dir, name)}: descriptor of a task directory,
    created if needed, checked as above;
    L{open_task_dir_nofollow}C{(path)}: an existing task directory again.
  - L{open_dir}C{(dir_fd, relpath, create=False)}: descriptor of a directory
    under C{dir_fd} (parents created with C{create}).
  - L{open_file}C{(dir_fd, relpath, flags, mode)}: descriptor of a file
    under C{dir_fd}.  For reading, links inside are followed (confined) and
    anything but a regular file is refused without being opened (see
    above); for writing, the last component is never followed
    (C{O_NOFOLLOW}; with C{O_CREAT}, whatever is there is unlinked first
    and the file is created with C{O_EXCL}).
  - L{replace_file}C{(dir_fd, tmp, name)}: rename within one directory fd.
  - L{fresh_dir}C{(dir_fd, name)}: the agent's own subdirectory (a link or
    file in its place is removed, never followed).

The path-taking functions the staging code and the passive file server
use walk the same way:

  - L{open_output}C{(task_dir, relpath)}: an output opened for reading:
    C{(fd, size)}, or None when there is none;
  - L{find_outputs}C{(task_dir, pattern, max_entries, max_matches)}: the
    output glob, bounded in the directory entries it looks at and the
    files it matches (L{TooMany}), listing directories with C{scandir}
    (their entries' types come from the directory itself, no C{stat} each);
  - L{input_target}C{(task_dir, relpath)}, L{temporary_for},
    L{create_exclusive}, L{link_exclusive}, L{replace_into}: where an input
    is written (its parents made inside), under a temporary name created
    (or hard-linked) and then renamed into place from a descriptor of its
    directory, opened without following a link on the way.
"""

import errno
import fnmatch
import itertools
import os
import posixpath
import stat

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _CLOEXEC
#: What reading opens with, besides the caller's flags: never a link, never blocking, never a terminal.
_READ_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | _CLOEXEC
#: The same for writing (a FIFO in place of a file opened without O_CREAT fails at once).
_WRITE_FLAGS = _READ_FLAGS
#: Symbolic links followed in one walk before giving up (the kernel's limit).
MAX_LINKS = 40
#: Times one walk looks again at an entry that changed under it before giving up.
MAX_RETRIES = 100
#: Directories an output pattern's walk goes down at most.
MAX_DEPTH = 256
#: Where L{open_task_dir} moves an unusable entry, inside C{work_dir}.
QUARANTINE = ".quarantine"


class PathEscape(ValueError):
    """A path that leads outside the task directory (or names the wrong kind of file)."""


class NotRegular(PathEscape):
    """A file to read that is not a regular file (a FIFO, a device, a directory...)."""


class _NotDirectory(PathEscape):
    """A component of a path that should be a directory is some other file."""


class UnsafeDirectory(OSError):
    """A directory the agent must not use (a link, or someone else's)."""


class TooMany(Exception):
    """An output pattern walked or matched more than its bound."""


def kind(mode):
    """What a file of this mode is, in words (for a reason: C{"a FIFO"})."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISLNK, "a symbolic link"),
                       (stat.S_ISREG, "a regular file")):
        if test(mode):
            return name
    return "not a regular file"


def _inside(root_real, path_real):
    return path_real == root_real or path_real.startswith(root_real.rstrip("/") + "/")


def _fd_path(fd):
    """The path the kernel knows for directory C{fd} (for messages and lexical checks)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def _split(relpath):
    return [part for part in relpath.split("/") if part not in ("", ".")]


def _lstat_mode(name, dir_fd):
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except OSError:
        return 0


class _Walk:
    """
    A walk from C{root_fd}: a stack of (descriptor, name) of the
    directories entered, the root's first (borrowed, never closed here).

    @param what: how the path is named in a reason (C{"output 'x'"}).
    @param follow: whether links are followed (inside only); without, any
        link met is refused.
    """

    def __init__(self, root_fd, what, follow=True):
        self.stack = [(root_fd, None)]
        self.what = what
        self.follow = follow
        self.links = 0
        self.retries = 0
        self._root_real = None

    @property
    def fd(self):
        return self.stack[-1][0]

    def rel(self, name=None):
        """The path, from the root, of the current directory (or of its entry C{name})."""
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

    def again(self):
        """An entry changed between two looks at it: look again, a bounded number of times."""
        self.retries += 1
        if self.retries > MAX_RETRIES:
            raise self.escape("keeps changing while it is looked up")

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
                    self.again()  # made meanwhile: open it (again) as whatever it is
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
                self.again()
                parts.insert(0, name)  # it changed meanwhile: look again
                continue
            self.stack.append((fd, name))

    def to_last(self, parts, create=False):
        """
        Walk all of C{parts} but the last component.

        @return: that last name, or None when C{parts} name a directory
            that the walk is now in (nothing, or a final C{..}).
        """
        name = parts.pop() if parts else None
        if name == "..":
            parts.append(name)
            name = None
        self.enter(parts, create=create)
        return name

    def last(self, relpath, create=False):
        """Walk to the parent of C{relpath}'s last component: @return: that name (see L{to_last})."""
        return self.to_last(_split(relpath), create=create)

    def settle(self, name):
        """
        Follow the links at the end of the walk (inside only).

        @return: C{(name, stat)} of what the last component is, not
            following it: a name in the current directory that was not a
            link when looked at, or C{(None, stat)} for the current
            directory itself.
        @raise FileNotFoundError: nothing there.
        """
        while True:
            if name is None:
                return None, os.fstat(self.fd)
            st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
            if not stat.S_ISLNK(st.st_mode):
                return name, st
            link = self.link_parts(name)
            if link is None:
                self.again()
                continue
            name = self.to_last(link)

    def open_regular(self, name, flags=os.O_RDONLY):
        """
        Open the last component C{name} (links followed, see L{settle}) for
        reading: a regular file only, refused before it is opened
        otherwise, opened without blocking and checked again.

        @return: C{(fd, stat)} (the descriptor blocking again).
        @raise NotRegular: it is something else.
        """
        while True:
            name, st = self.settle(name)
            if not stat.S_ISREG(st.st_mode):
                raise NotRegular(f"{self.what} is {kind(st.st_mode)}, not a regular file")
            try:
                fd = os.open(name, flags | _READ_FLAGS, dir_fd=self.fd)
            except OSError as e:
                if e.errno != errno.ELOOP:
                    raise
                self.again()  # a link now: look again
                continue
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise NotRegular(f"{self.what} is {kind(st.st_mode)}, not a regular file")
                os.set_blocking(fd, True)
            except BaseException:
                os.close(fd)
                raise
            return fd, st


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
    file (a FIFO, device, socket or directory is refused without being
    opened, see L{_Walk.open_regular}).
    Writing: the parents are resolved inside, the last component is opened
    with C{O_NOFOLLOW}; with C{O_CREAT}, what is there is removed first and
    the file made with C{O_EXCL} (a fresh file, never a planted one).

    With C{follow} false, no link is followed at all (for the agent's own
    files, which never are links: one there was planted).

    @return: a new descriptor.
    @raise PathEscape: leads outside, is not a regular file (L{NotRegular}),
        passes through something that is not a directory (or meets a link
        without C{follow}).
    @raise FileNotFoundError: nothing there (reading).
    """
    walk = _Walk(dir_fd, what or f"file {relpath!r}", follow)
    writing = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
    try:
        name = walk.last(relpath)
        if not writing:
            return walk.open_regular(name, flags)[0]
        if name is None:
            raise walk.escape("names a directory")
        while True:
            if flags & os.O_CREAT:
                _unlink_entry(walk, name)
                flags |= os.O_EXCL
            try:
                fd = os.open(name, flags | _WRITE_FLAGS, mode, dir_fd=walk.fd)
            except FileExistsError:
                walk.again()
                continue  # planted again between the unlink and the open
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise walk.escape("is a symbolic link") from None
                if e.errno == errno.EISDIR:
                    raise walk.escape("is a directory") from None
                if e.errno == errno.ENXIO:  # a FIFO nobody reads (O_NONBLOCK)
                    raise NotRegular(f"{walk.what} is {kind(_lstat_mode(name, walk.fd))}, "
                                     "not a regular file") from None
                raise
            try:
                mode_ = os.fstat(fd).st_mode
                if not stat.S_ISREG(mode_):
                    raise NotRegular(f"{walk.what} is {kind(mode_)}, not a regular file")
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
    operator's C{work_dir}, followed): refuse it if it became a link, is
    not a directory, or is someone else's.  Where every path-taking
    function here starts.

    @return: a descriptor.
    @raise PathEscape: it is refused.
    @raise FileNotFoundError: it is not there.
    """
    try:
        fd = os.open(path, _DIR_FLAGS)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            what = "a symbolic link, not a directory" if os.path.islink(path) else "not a directory"
            raise PathEscape(f"the task directory {path} is {what}") from None
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


# -- the path-taking functions: inputs ----------------------------------------


def _lexically_outside(normal):
    return normal.startswith("/") or normal == ".." or normal.startswith("../")


def input_target(task_dir, relpath):
    """
    Where to write input C{relpath}: creates its parent directories
    (walking from the task directory, see the module's docstring) and
    returns the absolute path of the file's place, its directory part made
    of real directories inside C{task_dir}.  The file itself is written to
    a temporary name (L{temporary_for}, L{create_exclusive}) and renamed
    over the target, which replaces a link instead of following it.

    @raise PathEscape: if the path, or its parent once resolved, is
        outside the task directory, passes through a file that is not a
        directory, or names a directory; or if the task directory is
        refused (L{open_task_dir_nofollow}).
    """
    normal = posixpath.normpath(relpath)
    if _lexically_outside(normal) or normal == ".":
        raise PathEscape(f"input {relpath!r} leads outside the task directory")
    root_fd = open_task_dir_nofollow(task_dir)
    walk = _Walk(root_fd, f"input {relpath!r}")
    try:
        root = _fd_path(root_fd) or os.path.realpath(task_dir)
        name = walk.last(normal, create=True)
        if name is None or stat.S_ISDIR(_lstat_mode(name, walk.fd)):
            raise PathEscape(f"input {relpath!r} names a directory")
        parent = walk.rel()
    finally:
        walk.close()
        os.close(root_fd)
    return os.path.join(root, parent, name) if parent else os.path.join(root, name)


def temporary_for(target):
    """The name a file is written under before it is renamed to C{target}."""
    head, tail = os.path.split(target)
    return os.path.join(head, f".{tail}.part")


def _open_parent(path):
    """
    The directory of C{path}, opened with C{O_NOFOLLOW} on every component
    of its absolute path (so a link anywhere on the way is refused, never
    followed), and C{path}'s last name in it.

    @return: C{(descriptor, name)}; the caller closes the descriptor.
    @raise PathEscape: a component is a link or not a directory.
    """
    head, tail = os.path.split(os.path.abspath(path))
    root = os.open("/", os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
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
        return (walk.stack.pop()[0] if len(walk.stack) > 1 else os.dup(root)), tail
    finally:
        walk.close()
        os.close(root)


def create_exclusive(path, mode=0o644):
    """
    Create C{path} for writing, never through a symbolic link: whatever is
    at C{path} already (a stale partial file, or a link planted there) is
    removed first, and the file is created with C{O_EXCL | O_NOFOLLOW}.
    Its directory is opened with C{O_NOFOLLOW} on every component of the
    absolute path (L{input_target} returns one made of real directories).

    @return: a file descriptor.
    """
    dir_fd, name = _open_parent(path)
    try:
        return open_file(dir_fd, name, os.O_WRONLY | os.O_CREAT, mode, what=repr(path))
    finally:
        os.close(dir_fd)


def remove_file(path):
    """
    Unlink C{path} if it is there, its directory opened as
    L{create_exclusive} opens it: a link on the way is never followed (then
    nothing is removed: the file is not where it was made), and a link at
    C{path} itself is removed, not what it points to.  Blocking: for the
    file-system threads.
    """
    try:
        dir_fd, name = _open_parent(path)
    except (OSError, PathEscape):
        return
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def link_exclusive(source, path):
    """
    Hard-link C{source} (the agent's own file, e.g. cached content) at
    C{path}, its directory opened as L{create_exclusive} opens it; whatever
    is at C{path} already is removed first, never followed.

    @raise FileNotFoundError: C{source} (or C{path}'s directory) is not there.
    """
    dir_fd, name = _open_parent(path)
    walk = _Walk(dir_fd, repr(path))
    try:
        _unlink_entry(walk, name)
        os.link(source, name, dst_dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


def replace_into(tmp, target):
    """
    Rename C{tmp} over C{target}, both in one directory (as
    L{temporary_for} names them), that directory opened as
    L{create_exclusive} opens it: a link swapped in on the way between the
    write and the rename is refused, never followed; a link at C{target}
    is replaced.

    @raise PathEscape: a component of the directory is a link.
    """
    dir_fd, name = _open_parent(target)
    try:
        head, tmp_name = os.path.split(os.path.abspath(tmp))
        if head != os.path.dirname(os.path.abspath(target)):
            raise ValueError(f"{tmp!r} and {target!r} are not in one directory")
        os.rename(tmp_name, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


def replace_or_remove(tmp, target):
    """L{replace_into}; if that fails, C{tmp} is removed (L{remove_file})."""
    try:
        replace_into(tmp, target)
    except BaseException:
        remove_file(tmp)
        raise


# -- the path-taking functions: outputs ---------------------------------------


def open_output(task_dir, relpath):
    """
    Open output C{relpath} of C{task_dir} for reading: links followed
    inside only, a regular file only (anything else is refused without
    being opened, see L{_Walk.open_regular}).

    @return: C{(fd, size)} (the caller closes C{fd}), or None if there is
        no such file (nothing there, or a component on the way is a file,
        not a directory).
    @raise PathEscape: it leads outside, the task directory is refused
        (L{open_task_dir_nofollow}), or it is not a regular file
        (L{NotRegular}, its reason naming what it is: C{"output 'x' is a
        FIFO, not a regular file"}).
    @raise OSError: it cannot be opened (the task directory is missing,
        permissions).
    """
    what = f"output {relpath!r}"
    if relpath.startswith("/"):
        raise PathEscape(f"{what} leads outside the task directory")
    root_fd = open_task_dir_nofollow(task_dir)
    walk = _Walk(root_fd, what)
    try:
        fd, st = walk.open_regular(walk.last(relpath))
    except (FileNotFoundError, NotADirectoryError, _NotDirectory):
        return None
    finally:
        walk.close()
        os.close(root_fd)
    return fd, st.st_size


def find_outputs(task_dir, pattern, max_entries=1_000_000, max_matches=100_000):
    """
    The files in C{task_dir} that the glob C{pattern} matches.

    Matching follows L{glob} conventions, one path segment at a time: C{*},
    C{?} and C{[...]} never cross a C{/}, a segment C{**} matches any number
    of directories (zero included), and names starting with C{.} match only
    segments that start with C{.} too.

    Nothing outside the task directory is ever looked at: the walk goes
    from directory descriptors (see the module's docstring); symbolic links
    that the pattern matches are resolved inside the task directory only,
    and never followed by C{**} (so a link loop cannot make the walk
    endless).  One that leads outside is reported, not followed.  Only
    regular files match (a FIFO, socket, device, or a link to a
    directory, does not).

    The walk looks at C{max_entries} directory entries at most, matches
    C{max_matches} files at most and goes L{MAX_DEPTH} directories deep at
    most; past a bound the pattern matches nothing and its one error says
    which bound (L{TooMany}).

    @return: C{(matches, errors)}: the matching regular files as sorted
        paths relative to the task directory, and one message for each
        match that leads outside, or for a walk past its bounds.
    @raise PathEscape: the task directory is refused
        (L{open_task_dir_nofollow}).
    @raise OSError: it cannot be opened or a directory in it listed.
    """
    normal = posixpath.normpath(pattern)
    if _lexically_outside(normal):
        return [], [f"output pattern {pattern!r} leads outside the task directory"]
    segments = []
    for segment in _split(normal):
        # ("**/**" matches what "**" does: walking both would only multiply the work.)
        if segment != "**" or not segments or segments[-1] != "**":
            segments.append(segment)
    if segments and segments[-1] == "**":
        segments.append("*")
    if not segments:
        return [], []
    root_fd = open_task_dir_nofollow(task_dir)
    try:
        glob = _Glob(root_fd, pattern, max_entries, max_matches)
        try:
            glob.walk(root_fd, "", segments, 0, 0)
        except TooMany as e:
            return [], [f"output pattern {pattern!r} {e}; name the outputs more narrowly"]
    finally:
        os.close(root_fd)
    return sorted(glob.found), glob.errors


def match_outputs(task_dir, pattern):
    """
    Like L{find_outputs}, but raise L{PathEscape} for the first match that
    leads outside the task directory (or a bound passed).
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


def _is_regular(root_fd, rel, what):
    """Whether C{rel} (from the root, links followed inside) is a regular file, not opening it."""
    walk = _Walk(root_fd, what)
    try:
        return stat.S_ISREG(walk.settle(walk.last(rel))[1].st_mode)
    finally:
        walk.close()


class _Glob:
    """One pattern's walk from the task directory C{root_fd}, with its bounds."""

    def __init__(self, root_fd, pattern, max_entries, max_matches):
        self.root_fd = root_fd
        self.pattern = pattern
        self.max_entries = max_entries
        self.max_matches = max_matches
        self.entries = 0
        self.found = set()
        self.errors = []

    def names(self, fd):
        """
        The entries of directory C{fd}: C{[(name, is_dir, is_link,
        is_file)]}, none of them followed; the types are the directory's
        own (C{d_type}: no C{stat} each, except on file systems that do
        not give them).
        """
        out = []
        with os.scandir(fd) as it:
            for e in it:
                self.entries += 1
                if self.entries > self.max_entries:
                    raise TooMany(f"looked at more than {self.max_entries} entries "
                                  "(the bound, [transfer] max_output_entries)")
                try:
                    out.append((e.name, e.is_dir(follow_symlinks=False), e.is_symlink(),
                                e.is_file(follow_symlinks=False)))
                except OSError:
                    continue  # gone meanwhile
        return out

    def add(self, rel):
        self.found.add(rel)
        if len(self.found) > self.max_matches:
            raise TooMany(f"matches more than {self.max_matches} files "
                          "(the bound, [transfer] max_output_files)")

    @staticmethod
    def open_dir(fd, name):
        """A subdirectory, not followed if it is a link (None if it is not a directory any more)."""
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=fd)
        except OSError:
            return None

    def down(self, fd, rel, segments, i, depth):
        """Walk on in subdirectory C{fd} (closed after)."""
        try:
            if depth >= MAX_DEPTH:
                raise TooMany(f"goes more than {MAX_DEPTH} directories deep")
            self.walk(fd, rel, segments, i, depth + 1)
        finally:
            os.close(fd)

    def walk(self, fd, rel, segments, i, depth, listing=None):
        """
        Match C{segments[i:]} against directory C{fd} (C{rel} from the
        root); C{listing} is its L{names}, when a C{**} has read them
        already (each directory is listed, and its entries counted, once).
        """
        segment = segments[i]
        last = i == len(segments) - 1
        if segment == "**":  # never last: find_outputs appends "*" after a final "**"
            listing = self.names(fd)
            self.walk(fd, rel, segments, i + 1, depth, listing)
            for name, is_dir, _, _ in listing:
                if name.startswith(".") or not is_dir:
                    continue  # links are never followed by **
                child = self.open_dir(fd, name)
                if child is not None:
                    self.down(child, posixpath.join(rel, name) if rel else name, segments, i, depth)
            return
        if _magic(segment):
            names = listing if listing is not None else self.names(fd)
            candidates = sorted(c for c in names if _segment_matches(c[0], segment))
        else:
            try:
                mode = os.stat(segment, dir_fd=fd, follow_symlinks=False).st_mode
            except OSError:
                return
            candidates = [(segment, stat.S_ISDIR(mode), stat.S_ISLNK(mode), stat.S_ISREG(mode))]
        for name, is_dir, is_link, is_file in candidates:
            child_rel = posixpath.join(rel, name) if rel else name
            if is_link:
                self.follow(child_rel, segments, i, last, depth)
            elif last:
                if is_file:
                    self.add(child_rel)
            elif is_dir:
                child = self.open_dir(fd, name)
                if child is not None:
                    self.down(child, child_rel, segments, i + 1, depth)

    def follow(self, rel, segments, i, last, depth):
        """A symbolic link the pattern matched: resolved inside the root only."""
        what = f"output {rel!r} (from pattern {self.pattern!r})"
        try:
            if last:
                if _is_regular(self.root_fd, rel, what):
                    self.add(rel)
                return
            fd = open_dir(self.root_fd, rel, what=what)
        except (NotRegular, _NotDirectory):
            return  # a link to something that is not what the pattern wants
        except PathEscape as e:
            self.errors.append(str(e))
            return
        except OSError:
            return  # dangling inside, or changed meanwhile
        self.down(fd, rel, segments, i + 1, depth)
