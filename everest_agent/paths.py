"""
Keeping every file a task names inside its task directory.

A spec's paths are checked lexically first (L{everest_agent.protocol}); the
functions here check them again on the disk, where symbolic links (maybe
planted by the task itself) could lead elsewhere.
"""

import glob
import os
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

    @return: the absolute path to rename the finished file to.
    @raise PathEscape: if the parent resolves outside the task directory.
    """
    root = os.path.realpath(task_dir)
    target = os.path.join(root, relpath)
    parent = os.path.dirname(target)
    if not _inside(root, os.path.realpath(parent)):
        raise PathEscape(f"input {relpath!r} leads outside the task directory")
    os.makedirs(parent, exist_ok=True)
    if not _inside(root, os.path.realpath(parent)):
        raise PathEscape(f"input {relpath!r} leads outside the task directory")
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


def match_outputs(task_dir, pattern):
    """
    Files in C{task_dir} matching the glob C{pattern} (C{**} recurses),
    relative to it, sorted.  Matches that are not regular files are skipped;
    matches that resolve outside the directory raise L{PathEscape}.
    """
    root = os.path.realpath(task_dir)
    found = []
    for rel in glob.glob(pattern, root_dir=root, recursive=True):
        full = os.path.join(root, rel)
        if not _inside(root, os.path.realpath(full)):
            raise PathEscape(f"output {rel!r} (from pattern {pattern!r}) leads outside the task directory")
        if os.path.isfile(full):
            found.append(os.path.normpath(rel))
    return sorted(set(found))
