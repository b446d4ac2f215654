"""
Opening a task's outputs without ever leaving its task directory.

Every path is walked from a file descriptor of the task directory, one
component at a time, each opened relative to the directory before it with
C{O_NOFOLLOW}.  A symbolic link is never followed by the kernel: it is read
(C{readlink}) and its target spliced into the rest of the path, and C{..}
goes back to a directory this walk already holds (it is never opened), so
the walk cannot rise above the task directory, whatever the task renames or
swaps while it runs.  What the walk opens is the object that was reached,
at that moment, through entries of directories inside the task directory;
a component swapped for a link between the look and the open makes the
C{O_NOFOLLOW} open fail, and the output is refused.

Only regular files are outputs.  The type is looked at before anything is
opened (C{fstatat} without following), the open uses C{O_NONBLOCK} (a FIFO
swapped in at the last moment cannot block it) and the type is checked
again on the open descriptor.  Everything here blocks on the file system:
callers run it in a worker thread, never on the reactor thread.

L{find_outputs} matches an output pattern the same way, listing directories
through their descriptors, with bounds on the entries it looks at and the
files it matches.
"""

import os
import posixpath
import stat
from collections import deque

from everest_agent.paths import PathEscape, _magic, _segment_matches as _matches

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | _CLOEXEC
#: Symbolic links one lookup may read (the kernel's own limit is 40).
MAX_LINKS = 40


class NotRegular(PathEscape):
    """An output that is not a regular file (a FIFO, a device, a directory...)."""


def kind(mode):
    """What a file of this mode is, in words."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def open_root(task_dir):
    """
    A descriptor of C{task_dir} itself; its last component must not be a
    symbolic link.

    @raise PathEscape: it is one.
    @raise OSError: it cannot be opened.
    """
    parent, name = os.path.split(os.path.abspath(task_dir))
    pfd = os.open(parent or "/", os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=pfd)
    except OSError as e:
        if os.path.islink(os.path.join(parent, name)):
            raise PathEscape(f"the task directory {task_dir!r} is a symbolic link") from None
        raise e
    finally:
        os.close(pfd)


class Root:
    """A task directory held open: where every lookup starts."""

    def __init__(self, task_dir):
        self.path = task_dir
        self.real = os.path.realpath(task_dir)
        self.fd = open_root(task_dir)

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def lookup(self, rel, what, directory=False):
        """
        Open C{rel} beneath the task directory, resolving symbolic links
        inside it by hand.

        @param what: how the path is named in a message (C{"output 'x'"}).
        @param directory: open it as a directory (else as a regular file).
        @return: C{(fd, stat)}, or None if there is nothing there.
        @raise PathEscape: it leads outside, or it is not a regular file
            (L{NotRegular}) or directory.
        """
        outside = PathEscape(f"{what} leads outside the task directory")
        parts = deque(p for p in rel.split("/"))
        stack = [os.dup(self.fd)]
        links = 0
        try:
            while parts:
                name = parts.popleft()
                if name in ("", "."):
                    if not parts and len(stack) == 1 and not directory:
                        raise NotRegular(f"{what} is a directory")
                    continue
                if name == "..":
                    if len(stack) == 1:
                        raise outside
                    os.close(stack.pop())
                    continue
                last = not any(p not in ("", ".") for p in parts)
                try:
                    st = os.stat(name, dir_fd=stack[-1], follow_symlinks=False)
                except (FileNotFoundError, NotADirectoryError):
                    return None
                if stat.S_ISLNK(st.st_mode):
                    links += 1
                    if links > MAX_LINKS:
                        raise PathEscape(f"{what}: too many levels of symbolic links")
                    try:
                        target = os.readlink(name, dir_fd=stack[-1])
                    except OSError:
                        raise PathEscape(f"{what} changed while it was opened") from None
                    if target.startswith("/"):
                        normal = posixpath.normpath(target)
                        if normal != self.real and not normal.startswith(self.real + "/"):
                            raise outside
                        target = normal[len(self.real):].lstrip("/")
                        for fd in stack[1:]:
                            os.close(fd)
                        del stack[1:]
                    parts.extendleft(reversed(target.split("/")))
                    continue
                if not last or directory:
                    if not stat.S_ISDIR(st.st_mode):
                        if last:
                            raise NotRegular(f"{what} is {kind(st.st_mode)}, not a directory")
                        return None
                    try:
                        stack.append(os.open(name, _DIR_FLAGS, dir_fd=stack[-1]))
                    except OSError:
                        raise PathEscape(f"{what} changed while it was opened") from None
                    continue
                if not stat.S_ISREG(st.st_mode):
                    raise NotRegular(f"{what} is {kind(st.st_mode)}, not a regular file")
                try:
                    fd = os.open(name, _FILE_FLAGS, dir_fd=stack[-1])
                except FileNotFoundError:
                    return None
                except OSError:
                    raise PathEscape(f"{what} changed while it was opened") from None
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    os.close(fd)
                    raise NotRegular(f"{what} is {kind(st.st_mode)}, not a regular file")
                return fd, st
            fd = stack.pop() if len(stack) > 1 or directory else None
            if fd is None:
                raise NotRegular(f"{what} is a directory")
            return fd, os.fstat(fd)
        finally:
            for fd in stack:
                os.close(fd)


def open_output(task_dir, rel):
    """
    Open output C{rel} of C{task_dir} for reading (blocking: run it in a
    thread).

    @return: C{(fd, size)}, or None if there is no such file.
    @raise PathEscape: it leads outside, or is not a regular file.
    """
    with Root(task_dir) as root:
        found = root.lookup(rel, f"output {rel!r}")
    if found is None:
        return None
    fd, st = found
    return fd, st.st_size


class TooMany(Exception):
    """A pattern walked or matched more than its bound."""


class _Walk:
    def __init__(self, root, pattern, max_entries, max_matches):
        self.root = root
        self.pattern = pattern
        self.max_entries = max_entries
        self.max_matches = max_matches
        self.entries = 0
        self.found = set()
        self.errors = []

    def names(self, fd):
        """The entries of the directory C{fd}: C{[(name, is_dir, is_link, is_file)]}."""
        out = []
        with os.scandir(fd) as it:
            for e in it:
                self.entries += 1
                if self.entries > self.max_entries:
                    raise TooMany(f"looked at more than {self.max_entries} entries")
                try:
                    out.append((e.name, e.is_dir(follow_symlinks=False), e.is_symlink(),
                                e.is_file(follow_symlinks=False)))
                except OSError:
                    continue
        return out

    def add(self, rel):
        self.found.add(rel)
        if len(self.found) > self.max_matches:
            raise TooMany(f"matches more than {self.max_matches} files")

    def open_dir(self, fd, name):
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=fd)
        except OSError:
            return None

    def walk(self, fd, rel, segments, i):
        """Match C{segments[i:]} against the directory C{fd} (C{rel} from the root)."""
        segment = segments[i]
        last = i == len(segments) - 1
        if segment == "**":  # never last: a final "**" is followed by "*"
            self.walk(fd, rel, segments, i + 1)
            for name, is_dir, _, _ in self.names(fd):
                if name.startswith(".") or not is_dir:
                    continue
                child = self.open_dir(fd, name)
                if child is not None:
                    try:
                        self.walk(child, posixpath.join(rel, name) if rel else name, segments, i)
                    finally:
                        os.close(child)
            return
        if _magic(segment):
            candidates = [c for c in sorted(self.names(fd)) if _matches(c[0], segment)]
        else:
            try:
                st = os.stat(segment, dir_fd=fd, follow_symlinks=False)
            except OSError:
                return
            candidates = [(segment, stat.S_ISDIR(st.st_mode), stat.S_ISLNK(st.st_mode), stat.S_ISREG(st.st_mode))]
        for name, is_dir, is_link, is_file in candidates:
            child_rel = posixpath.join(rel, name) if rel else name
            if is_link:
                self.follow(child_rel, segments, i, last)
            elif last:
                if is_file:
                    self.add(child_rel)
            elif is_dir:
                child = self.open_dir(fd, name)
                if child is not None:
                    try:
                        self.walk(child, child_rel, segments, i + 1)
                    finally:
                        os.close(child)

    def follow(self, rel, segments, i, last):
        """A symbolic link the pattern matched: resolved inside the root only."""
        what = f"output {rel!r} (from pattern {self.pattern!r})"
        try:
            found = self.root.lookup(rel, what, directory=not last)
        except NotRegular:
            return  # a link to something that is not what the pattern wants
        except PathEscape as e:
            self.errors.append(str(e))
            return
        if found is None:
            return
        fd, _ = found
        try:
            if last:
                self.add(rel)
            else:
                self.walk(fd, rel, segments, i + 1)
        finally:
            os.close(fd)


def find_outputs(task_dir, pattern, max_entries=1_000_000, max_matches=100_000):
    """
    The files in C{task_dir} that the glob C{pattern} matches (blocking:
    run it in a thread).

    Matching follows L{glob} conventions, one path segment at a time: C{*},
    C{?} and C{[...]} never cross a C{/}, a segment C{**} matches any number
    of directories (zero included), and names starting with C{.} match only
    segments that start with C{.} too.  Symbolic links are resolved inside
    the task directory only, and never by C{**} (so a link loop cannot make
    the walk endless); one that leads outside is reported, not followed.

    @return: C{(matches, errors)}: the matching regular files as sorted
        paths relative to the task directory, and one message for each
        match that leads outside, or for a walk past its bounds (then there
        are no matches).
    """
    normal = posixpath.normpath(pattern)
    if normal.startswith("/") or normal == ".." or normal.startswith("../"):
        return [], [f"output pattern {pattern!r} leads outside the task directory"]
    segments = [s for s in normal.split("/") if s not in ("", ".")]
    if segments and segments[-1] == "**":
        segments.append("*")
    if not segments:
        return [], []
    with Root(task_dir) as root:
        walk = _Walk(root, pattern, max_entries, max_matches)
        try:
            walk.walk(root.fd, "", segments, 0)
        except TooMany as e:
            return [], [f"output pattern {pattern!r} {e}; name the outputs more narrowly"]
    return sorted(walk.found), walk.errors
