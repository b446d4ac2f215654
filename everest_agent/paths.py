"""
Keeping every file a task names inside its task directory.

A spec's paths are checked lexically first (L{everest_agent.protocol}); the
functions here check them again on the disk, where symbolic links (maybe
planted by the task itself) could lead elsewhere.
"""

import fnmatch
import os
import posixpath
import stat


class PathEscape(ValueError):
    """A path that leads outside the task directory."""


def _inside(root_real, path_real):
    return path_real == root_real or path_real.startswith(root_real + os.sep)


def input_target(task_dir, relpath):
    """
    Where to write input C{relpath}: creates its parent directories and
    checks that, with every symbolic link resolved, they are inside
    C{task_dir}.  The file itself is written to a temporary name and renamed
    over the target, which replaces a link instead of following it.

    @return: the absolute path to rename the finished file to, with its
        directory part already resolved.
    @raise PathEscape: if the path, or its parent once resolved, is
        outside the task directory, or if it names a directory.
    """
    root = os.path.realpath(task_dir)
    normal = posixpath.normpath(relpath)
    if normal.startswith("/") or normal in (".", "..") or normal.startswith("../"):
        raise PathEscape(f"input {relpath!r} leads outside the task directory")
    parent = os.path.join(root, os.path.dirname(normal))
    if not _inside(root, os.path.realpath(parent)):
        raise PathEscape(f"input {relpath!r} leads outside the task directory")
    os.makedirs(parent, exist_ok=True)
    real_parent = os.path.realpath(parent)
    if not _inside(root, real_parent):
        raise PathEscape(f"input {relpath!r} leads outside the task directory")
    target = os.path.join(real_parent, os.path.basename(normal))
    if os.path.isdir(target) and not os.path.islink(target):
        raise PathEscape(f"input {relpath!r} names a directory")
    return target


def open_output(task_dir, relpath):
    """
    Open output C{relpath} for reading, refusing anything that resolves
    outside C{task_dir} or is not a regular file.

    @return: an open binary file, or None if there is no such file.
    @raise PathEscape: if it leads outside, or is not a regular file.
    """
    root = os.path.realpath(task_dir)
    target = os.path.join(root, relpath)
    if not os.path.lexists(target):
        return None
    real = os.path.realpath(target)
    if not _inside(root, real):
        raise PathEscape(f"output {relpath!r} leads outside the task directory")
    fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise PathEscape(f"output {relpath!r} is not a regular file")
    except BaseException:
        os.close(fd)
        raise
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

    @return: a file descriptor.
    """
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        raise PathEscape(f"{path!r} is a directory") from None
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    return os.open(path, flags, mode)


def find_outputs(task_dir, pattern):
    """
    The files in C{task_dir} that the glob C{pattern} matches.

    Matching follows L{glob} conventions, one path segment at a time: C{*},
    C{?} and C{[...]} never cross a C{/}, a segment C{**} matches any number
    of directories (zero included), and names starting with C{.} match only
    segments that start with C{.} too.

    Nothing outside the task directory is ever looked at: symbolic links to
    directories are followed only when they point inside the task
    directory, and never by C{**} (so a link loop cannot make the walk
    endless).  A symbolic link that the pattern matches and that leads
    outside is reported, not followed; links to files inside are matched.

    @return: C{(matches, errors)}: the matching regular files as sorted
        paths relative to the task directory, and one message for each
        match that leads outside.
    """
    root = os.path.realpath(task_dir)
    normal = posixpath.normpath(pattern)
    if normal.startswith("/") or normal == ".." or normal.startswith("../"):
        return [], [f"output pattern {pattern!r} leads outside the task directory"]
    segments = [s for s in normal.split("/") if s not in ("", ".")]
    if segments and segments[-1] == "**":
        segments.append("*")
    found, errors = set(), []
    if segments:
        _walk(root, "", segments, 0, found, errors, pattern)
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


def _entries(root, rel):
    try:
        with os.scandir(os.path.join(root, rel) if rel else root) as it:
            return [e.name for e in it]
    except OSError:
        return []


def _walk(root, rel, segments, i, found, errors, pattern):
    """Match C{segments[i:]} against the directory C{rel} (relative to root)."""
    segment = segments[i]
    last = i == len(segments) - 1
    if segment == "**":  # never last: find_outputs appends "*" after a final "**"
        _walk(root, rel, segments, i + 1, found, errors, pattern)
        for name in _entries(root, rel):
            if name.startswith("."):
                continue
            child = posixpath.join(rel, name) if rel else name
            full = os.path.join(root, child)
            if os.path.isdir(full) and not os.path.islink(full):
                _walk(root, child, segments, i, found, errors, pattern)
        return
    magic = _magic(segment)
    for name in sorted(_entries(root, rel)) if magic else [segment]:
        if magic and not _segment_matches(name, segment):
            continue
        child = posixpath.join(rel, name) if rel else name
        full = os.path.join(root, child)
        if not os.path.lexists(full):
            continue
        real = os.path.realpath(full)
        if not _inside(root, real):
            errors.append(
                f"output {child!r} (from pattern {pattern!r}) leads outside the task directory"
            )
            continue
        if last:
            if os.path.isfile(real):
                found.add(child)
        elif os.path.isdir(real):
            _walk(root, child, segments, i + 1, found, errors, pattern)
