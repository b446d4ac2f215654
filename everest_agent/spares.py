"""
Task directories used again: making a file costs more than emptying one.

On the ordinary disk of a login node, the kernel's work to make a new inode
(a directory or a file) is most of what a trivial task costs the machine:
about 0.8 ms of system time each on the ext4 disk here, against 10-30 us to
truncate, rename or unlink one (NFS and Lustre pay a round trip to their
metadata server for each).  A local task needs five: its directory,
C{.everest}, C{stdout}, C{stderr} and C{.everest/exitcode}.  So the
directory of a finished task that retention takes away (L{retention}) is
not deleted but emptied and kept as a I{spare}, and the next new task
directory is a spare renamed into place:

    work_dir/.spare/<n>/stdout                      (empty)
    work_dir/.spare/<n>/stderr                      (empty)
    work_dir/.spare/<n>/.everest.spare/exitcode     (not written)

Emptying (L{SpareDirs.give}) removes every other entry, keeps those three
only if each is a regular file with one link (anything else the task left in
their place is removed, never followed or truncated through), truncates
them (the exit-code file only loses its newline, which makes it read as not
written: L{jobscript.exit_code_writer}), and renames C{.everest} to C{.everest.spare}: a task directory holds
a C{.everest} only once a job was started in it, which is how a restarted
agent tells a task that never started from one that ended unseen
(L{everest_agent.handlers.local}, the pilot handler).  L{open_state_dir},
called just before a job starts, renames it back (or makes C{.everest} if
there is none), and L{empty_exit_code} un-writes the exit-code file instead of
removing it, so the job's own write of its status creates nothing either.
A spare directory holds no byte of the task it came from.

A task whose processes outlived it (a command's C{cmd &} still running when
its wrapper ended: the job's C{leftover}, recorded with the task) never
gives its directory: such a process may still write to its C{stdout} or
through its working directory, which would then be another task's.  What
this cannot see is a process that left the task's process group and
session (C{setsid}) and kept the directory or a file of it open; a daemon
that detaches properly changes to C{/} and closes them.

At most L{LIMIT} spares are kept; beyond that, directories are deleted as
before.  Everything here blocks: it runs in the agent's directory process
(L{everest_agent.taskdirs}) or its file-system threads, and is
safe from several of them at once.
"""

import errno
import os
import shutil
import stat
import sys
import threading

from everest_agent import jobscript, paths

#: The spares' directory, in C{work_dir} (a task id never starts with a dot).
SPARE_DIR = ".spare"
#: A spare's C{.everest}, under the name that says no job was started in it.
IDLE_STATE_DIR = jobscript.STATE_DIR + ".spare"
#: Spares kept at most (each is four empty inodes, two of them directories).
LIMIT = 1024
#: The mode of a task's C{stdout} and C{stderr}.
FILE_MODE = 0o644

_KEPT_FILES = ("stdout", "stderr")
_EXIT_CODE = os.path.basename(jobscript.EXIT_CODE_FILE)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _CLOEXEC


def _remove(name, dir_fd):
    """Remove entry C{name} of C{dir_fd}, whatever it is, following no link."""
    try:
        mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        # By descriptors, links inside never followed (Linux's rmtree).
        if sys.version_info >= (3, 11):
            shutil.rmtree(name, dir_fd=dir_fd)
        else:
            shutil.rmtree(f"/proc/self/fd/{dir_fd}/{name}")
    else:
        os.unlink(name, dir_fd=dir_fd)


def _open_emptied(name, dir_fd, exit_code=False):
    """
    Open entry C{name} of C{dir_fd} for writing and truncate it, if it is a
    regular file of the agent's user with one link (checked on the open
    descriptor, so nothing swapped in is truncated); else remove whatever
    is there, following no link and opening no FIFO or device for good.

    With C{exit_code}, a written exit-code file of the usual size is not
    truncated but has its newline taken back (one byte written, where a
    truncation costs the file system a journal transaction): it then reads
    as not written (L{jobscript.read_exit_code}), and the next status is
    written over it in place (L{jobscript.exit_code_writer}).

    @return: a blocking descriptor, or None if no file is left.
    """
    try:
        fd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | _CLOEXEC,
                     dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.ENXIO, errno.EISDIR, errno.EACCES, errno.ETXTBSY,
                           errno.EOPNOTSUPP, errno.ENODEV, errno.EWOULDBLOCK):
            raise
        _remove(name, dir_fd)  # a link, FIFO, socket, device, directory or unwritable file
        return None
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_uid == os.geteuid():
            if exit_code and st.st_size == jobscript.EXIT_CODE_SIZE:
                os.pwrite(fd, b" ", jobscript.EXIT_CODE_SIZE - 1)
            elif st.st_size:
                os.ftruncate(fd, 0)
            if stat.S_IMODE(st.st_mode) != FILE_MODE:
                os.fchmod(fd, FILE_MODE)
            os.set_blocking(fd, True)
            fd, kept = None, fd
            return kept
    finally:
        if fd is not None:
            os.close(fd)
    os.unlink(name, dir_fd=dir_fd)
    return None


def _empty_file(name, dir_fd, exit_code=False):
    """L{_open_emptied}, closed.  @return: whether a file is left."""
    fd = _open_emptied(name, dir_fd, exit_code)
    if fd is None:
        return False
    os.close(fd)
    return True


def open_output(dir_fd, name):
    """
    A task's C{stdout} or C{stderr} (entry C{name} of its directory
    C{dir_fd}), empty, for its job to write: the one already there if it is
    fit (L{_open_emptied}), else a fresh one (L{paths.open_file}: whatever
    is there removed first, the file made with C{O_EXCL}).

    @return: a new descriptor.
    """
    fd = _open_emptied(name, dir_fd)
    if fd is None:
        fd = paths.open_file(dir_fd, name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE, follow=False)
    return fd


def empty_exit_code(state_fd):
    """
    Make sure no exit status is recorded in the task's C{.everest}
    (descriptor C{state_fd}) before its job starts: the file is emptied, or
    its newline taken back (L{jobscript.read_exit_code} reads either as
    none), or whatever else is in its place removed.
    """
    _empty_file(_EXIT_CODE, state_fd, exit_code=True)


def open_state_dir(task_fd):
    """
    The task's C{.everest} (descriptor of the task directory C{task_fd}),
    just before a job starts in it: a spare's idle one renamed into place,
    else an existing one, else made (L{paths.fresh_dir}: a link in its
    place is removed, never followed).  @return: a new descriptor.
    """
    try:
        os.rename(IDLE_STATE_DIR, jobscript.STATE_DIR, src_dir_fd=task_fd, dst_dir_fd=task_fd)
    except FileNotFoundError:
        pass
    except OSError as e:
        # ENOTEMPTY/EEXIST: a .everest of an earlier start is there already.
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise
        _remove(IDLE_STATE_DIR, task_fd)
    return paths.fresh_dir(task_fd, jobscript.STATE_DIR)


def open_for_spawn(directory):
    """
    Everything a local job's wrapper needs of its task directory
    C{directory}, ready just before it starts (blocking): the directory
    opened again (L{paths.open_task_dir_nofollow}), its C{.everest} in place
    with no exit status in it (L{open_state_dir}, L{empty_exit_code}), and
    C{stdout} and C{stderr} open for writing (L{open_output}).  In a
    directory used again none of it makes a file.

    @return: C{[directory, stdout, stderr]}, new descriptors (close-on-exec)
        the caller owns.
    """
    fds = [paths.open_task_dir_nofollow(directory)]
    try:
        state = open_state_dir(fds[0])
        try:
            empty_exit_code(state)
        finally:
            os.close(state)
        for name in ("stdout", "stderr"):
            fds.append(open_output(fds[0], name))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


class SpareDirs:
    """
    The spare task directories of one C{work_dir}: L{take} one for a new
    task, L{give} a finished task's directory to be emptied and kept.
    """

    def __init__(self, work_dir, limit=LIMIT):
        self.work_dir = work_dir
        self.limit = limit
        self._lock = threading.Lock()
        self._names = None  # of the spares, once listed
        self._next = 0
        self.taken = 0
        self.given = 0

    @property
    def count(self):
        """Spares ready now (None before the first use lists them)."""
        names = self._names
        return None if names is None else len(names)

    def _load(self, root):
        # Under the lock, once: what an earlier agent left is usable (a
        # directory enters .spare only once emptied).
        if self._names is not None:
            return
        try:
            fd = os.open(SPARE_DIR, _DIR_FLAGS, dir_fd=root)
        except FileNotFoundError:
            self._names = []
            return
        try:
            names = [n for n in os.listdir(fd) if n.isdigit()]
        finally:
            os.close(fd)
        names.sort(key=int)
        self._names = names
        self._next = int(names[-1]) + 1 if names else 0

    def take(self, root, name):
        """
        Rename a spare to task directory C{name} of C{work_dir} (descriptor
        C{root}) if there is a spare and no entry C{name}.

        @return: True if it did; False leaves C{name} as it was.
        """
        try:
            os.stat(name, dir_fd=root, follow_symlinks=False)
            return False  # something is there: the caller checks it
        except FileNotFoundError:
            pass
        while True:
            with self._lock:
                self._load(root)
                if not self._names:
                    return False
                spare = self._names.pop()
            try:
                os.rename(os.path.join(SPARE_DIR, spare), name, src_dir_fd=root, dst_dir_fd=root)
            except FileNotFoundError:
                continue  # removed by hand meanwhile: the next one
            except OSError as e:
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    with self._lock:  # made meanwhile: keep the spare
                        self._names.append(spare)
                    return False
                raise
            self.taken += 1
            return True

    def wanted(self, root):
        """Whether a directory given now would be kept."""
        with self._lock:
            self._load(root)
            return len(self._names) < self.limit

    def give(self, root, name):
        """
        Empty directory C{name} of C{work_dir} (descriptor C{root}; a real
        directory of the agent's user, set aside by retention) and keep it
        as a spare.

        @return: True if it was kept; False if it was not wanted or is not
            fit (the caller then removes it).
        """
        if not self.wanted(root):
            return False
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=root)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                return False
            raise
        try:
            if os.fstat(fd).st_uid != os.geteuid():
                return False
            for entry in os.listdir(fd):
                if entry in _KEPT_FILES:
                    _empty_file(entry, fd)
                elif entry == jobscript.STATE_DIR:
                    self._empty_state_dir(fd)
                else:
                    _remove(entry, fd)
        finally:
            os.close(fd)
        with self._lock:
            if len(self._names) >= self.limit:
                return False
            spare = str(self._next)
            self._next += 1
        try:
            os.mkdir(SPARE_DIR, 0o700, dir_fd=root)
        except FileExistsError:
            pass
        try:
            os.rename(name, os.path.join(SPARE_DIR, spare), src_dir_fd=root, dst_dir_fd=root)
        except OSError:
            return False
        with self._lock:
            self._names.append(spare)
        self.given += 1
        return True

    @staticmethod
    def _empty_state_dir(task_fd):
        try:
            fd = os.open(jobscript.STATE_DIR, _DIR_FLAGS, dir_fd=task_fd)
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            _remove(jobscript.STATE_DIR, task_fd)
            return
        try:
            for entry in os.listdir(fd):
                if entry == _EXIT_CODE:
                    _empty_file(entry, fd, exit_code=True)
                else:
                    _remove(entry, fd)
        finally:
            os.close(fd)
        os.rename(jobscript.STATE_DIR, IDLE_STATE_DIR, src_dir_fd=task_fd, dst_dir_fd=task_fd)
