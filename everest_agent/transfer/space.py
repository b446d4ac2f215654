"""
Disk space for downloads: before a download of known size, the free space
of the directory it goes to (less what other downloads in flight there have
claimed) must hold it, or the task fails at once.
"""

import os
from contextlib import contextmanager

from everest_agent.transfer.errors import Failed, io_failure


class DiskSpace:
    """The bytes claimed by downloads in flight, per file system."""

    def __init__(self):
        self._reserved = {}  # st_dev -> bytes

    @contextmanager
    def claim(self, directory, size, reserve=True):
        """Check (and, with C{reserve}, claim) room for C{size} bytes in C{directory}."""
        if size is None:
            yield
            return
        try:
            st = os.statvfs(directory)
            dev = os.stat(directory).st_dev
        except OSError as e:
            raise io_failure(e) from None
        free = st.f_bavail * st.f_frsize - self._reserved.get(dev, 0)
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
