"""
Disk space for downloads: before a download of known size, the free space
of the directory it goes to (less what other downloads in flight there have
claimed) must hold it, or the task fails at once.  The file system is asked
in the file-system threads (a C{statvfs} waits on a networked one).
"""

import os
from contextlib import asynccontextmanager

from everest_agent.transfer.errors import Failed, io_failure
from everest_agent.transfer.jobs import mirror


def room(directory):
    """C{(free bytes, st_dev)} of the file system C{directory} is on (in a thread)."""
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize, os.stat(directory).st_dev


class DiskSpace:
    """
    The bytes claimed by downloads in flight, per file system.

    @param run: the thread seam (C{run(f, *args)} returns a Deferred).
    """

    def __init__(self, run):
        self._run = run
        self._reserved = {}  # st_dev -> bytes

    @asynccontextmanager
    async def claim(self, directory, size, reserve=True):
        """
        C{async with space.claim(directory, size):} check (and, with
        C{reserve}, claim for the length of the block) room for C{size}
        bytes in C{directory}.

        @raise Failed: if there is not that much room, or the file system
            cannot be asked.
        """
        if size is None:
            yield
            return
        try:
            free, dev = await mirror(self._run(room, directory))
        except OSError as e:
            raise io_failure(e) from None
        free -= self._reserved.get(dev, 0)
        if size > free:
            raise Failed(f"not enough disk space: {size} bytes needed, {max(free, 0)} available in {directory}")
        if not reserve:
            yield
            return
        self._reserved[dev] = self._reserved.get(dev, 0) + size
        try:
            yield
        finally:
            self._reserved[dev] -= size
            if not self._reserved[dev]:
                del self._reserved[dev]
