"""
RESOURCE_STATE timing under a hostile WELCOME (issue 11, item 9): a heartbeat
of 0.001 s must not make the agent send hundreds of reports a second.
"""

from types import SimpleNamespace

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from everest_agent import protocol
from everest_agent.resource import MAX_HEARTBEAT, MIN_HEARTBEAT, ResourceMonitor, clamp_heartbeat


class _Sender:
    def __init__(self):
        self.sent = []

    def send_unreliable(self, message):
        self.sent.append(message)
        return True


class HeartbeatTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.sender = _Sender()
        manager = SimpleNamespace(slot_listeners=[], counts=lambda: (0, 0), pool=SimpleNamespace(capacity=2))
        handler = SimpleNamespace(name="local", resource_info=lambda: defer.succeed({}))
        self.monitor = ResourceMonitor(self.clock, self.sender, manager, handler, "host", self.mktemp(),
                                       wallclock=self.clock.seconds)

    def reports_in(self, heartbeat, seconds):
        self.monitor.welcomed(heartbeat)
        for _ in range(int(seconds * 1000)):
            self.clock.advance(0.001)
        self.monitor.lost()
        return [m for m in self.sender.sent if m[0] == protocol.RESOURCE_STATE]

    def test_millisecond_heartbeat_clamped(self):
        reports = self.reports_in(0.001, 10.5)
        # One right after WELCOME, then one a second: not ~750 a second.
        self.assertEqual(len(reports), 11)

    def test_normal_heartbeat_kept(self):
        self.assertEqual(len(self.reports_in(5, 10.5)), 3)  # at 0, 5 and 10 s

    def test_clamp(self):
        self.assertEqual(clamp_heartbeat(0.001), MIN_HEARTBEAT)
        self.assertEqual(clamp_heartbeat(30), 30)
        self.assertEqual(clamp_heartbeat(10 ** 9), MAX_HEARTBEAT)
        for bad in (0, -1, float("nan"), float("inf"), True, "5", None):
            self.assertEqual(clamp_heartbeat(bad), 30)
