"""
RESOURCE_STATE: what the platform is told about this resource, and when.

Sent after each WELCOME, every C{heartbeat} seconds (the platform says how
often, within L{MIN_HEARTBEAT} and L{MAX_HEARTBEAT}), and when the slots in
use change, at most once a second.
"""

import math
import os
import time

from twisted.internet import defer, task
from twisted.logger import Logger

from everest_agent import protocol


def memory_info(path="/proc/meminfo"):
    """C{{"total", "available"}} in bytes, from /proc/meminfo (zeros elsewhere)."""
    found = {}
    try:
        with open(path, "rb") as f:
            for line in f:
                name, _, rest = line.partition(b":")
                if name in (b"MemTotal", b"MemAvailable"):
                    found[name] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return {"total": found.get(b"MemTotal", 0), "available": found.get(b"MemAvailable", 0)}


def disk_free(path):
    try:
        st = os.statvfs(path)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


#: Bounds of the platform's C{heartbeat}: a WELCOME asking for reports every
#: millisecond must not make the agent flood the connection.
MIN_HEARTBEAT = 1.0
MAX_HEARTBEAT = 3600.0
DEFAULT_HEARTBEAT = 30.0


def clamp_heartbeat(heartbeat):
    """The interval actually used for the platform's C{heartbeat}."""
    if not isinstance(heartbeat, (int, float)) or isinstance(heartbeat, bool) or not math.isfinite(heartbeat) \
            or heartbeat <= 0:
        return DEFAULT_HEARTBEAT
    return min(max(float(heartbeat), MIN_HEARTBEAT), MAX_HEARTBEAT)


class ResourceMonitor:
    log = Logger()

    #: At most one report a second for changes in slots in use.
    min_interval = 1.0

    def __init__(self, reactor, sender, manager, handler, hostname, work_dir, wallclock=time.time):
        self._reactor = reactor
        self._sender = sender
        self._manager = manager
        self._handler = handler
        self._hostname = hostname
        self._work_dir = work_dir
        self._time = wallclock
        self._loop = None
        self._pending_call = None
        self._last_sent = None
        self.sent = 0
        manager.slot_listeners.append(self.slots_changed)

    @defer.inlineCallbacks
    def snapshot(self):
        try:
            scheduler = yield self._handler.resource_info()
        except Exception as e:
            self.log.warn("Cannot read the scheduler's state: {error}", error=e)
            scheduler = {"error": str(e)}
        busy, queued = self._manager.counts()
        try:
            load = list(os.getloadavg())
        except OSError:
            load = [0.0, 0.0, 0.0]
        return {
            "time": self._time(),
            "hostname": self._hostname,
            "handler": self._handler.name,
            "slots": self._manager.pool.capacity,
            "busy": busy,
            "queued": queued,
            "load": load,
            "memory": memory_info(),
            "disk": {"path": self._work_dir, "free": disk_free(self._work_dir)},
            "scheduler": scheduler,
        }

    @defer.inlineCallbacks
    def send(self):
        self._last_sent = self._reactor.seconds()
        info = yield self.snapshot()
        if self._sender.send_unreliable([protocol.RESOURCE_STATE, info]):
            self.sent += 1

    def welcomed(self, heartbeat):
        used = clamp_heartbeat(heartbeat)
        if used != heartbeat:
            self.log.warn("The platform asks for a heartbeat of {asked!r} s; using {used} s",
                          asked=heartbeat, used=used)
        heartbeat = used
        self.lost()
        self._loop = task.LoopingCall(self.send)
        self._loop.clock = self._reactor
        self._loop.start(heartbeat, now=True).addErrback(
            lambda f: self.log.failure("Resource reports stopped", f)
        )

    def lost(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._pending_call is not None and self._pending_call.active():
            self._pending_call.cancel()
        self._pending_call = None

    def slots_changed(self):
        if self._loop is None or self._pending_call is not None:
            return
        wait = 0
        if self._last_sent is not None:
            wait = max(0, self._last_sent + self.min_interval - self._reactor.seconds())
        self._pending_call = self._reactor.callLater(wait, self._send_change)

    def _send_change(self):
        self._pending_call = None
        self.send()
