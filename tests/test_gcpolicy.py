"""The collector settings of the agent's and the platform's processes."""

import gc

from twisted.trial.unittest import SynchronousTestCase

from everest_agent import gcpolicy


class ConfigureTests(SynchronousTestCase):
    def setUp(self):
        before = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *before)
        self.addCleanup(gc.unfreeze)

    def test_thresholds_and_freeze(self):
        frozen = gc.get_freeze_count()
        before = gcpolicy.configure()
        self.assertEqual(len(before), 3)
        self.assertEqual(gc.get_threshold(), (gcpolicy.YOUNG_THRESHOLD, *gcpolicy.OLDER_THRESHOLDS))
        self.assertGreater(gc.get_freeze_count(), frozen)

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
