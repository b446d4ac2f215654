"""The collector settings of the agent's and the platform's processes."""

import gc

from twisted.trial.unittest import SynchronousTestCase

from everest_agent import gcpolicy


class FakeReactor:
    def __init__(self):
        self.when_running = []

    def callWhenRunning(self, f, *args):
        self.when_running.append((f, args))


class ConfigureTests(SynchronousTestCase):
    def setUp(self):
        before = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *before)
        self.addCleanup(gc.unfreeze)

    def test_thresholds_now_freeze_once_running(self):
        reactor = FakeReactor()
        frozen = gc.get_freeze_count()
        before = gcpolicy.configure(reactor)
        self.assertEqual(len(before), 3)
        self.assertEqual(gc.get_threshold(), (gcpolicy.YOUNG_THRESHOLD, *gcpolicy.OLDER_THRESHOLDS))
        self.assertEqual(gc.get_freeze_count(), frozen)  # not yet: the services load their state first
        [(f, args)] = reactor.when_running
        f(*args)
        self.assertGreater(gc.get_freeze_count(), frozen)

    def test_without_a_reactor_at_once(self):
        gcpolicy.configure()
        self.assertGreater(gc.get_freeze_count(), 0)

    def test_cycles_are_still_collected(self):
        gcpolicy.configure()

        class Node:
            pass

        a, b = Node(), Node()
        a.other, b.other = b, a
        import weakref

        ref = weakref.ref(a)
        del a, b
        gc.collect()
        self.assertIsNone(ref())
