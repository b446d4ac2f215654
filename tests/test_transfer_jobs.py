"""The fair slot limiter (L{everest_agent.transfer.jobs})."""


from twisted.internet.defer import CancelledError
from twisted.trial.unittest import SynchronousTestCase

from everest_agent.transfer.jobs import FairLimiter as _FairLimiter


class FairLimiterTests(SynchronousTestCase):
    def test_limit_and_fairness(self):
        limiter = _FairLimiter(2)
        a = [limiter.acquire("A") for _ in range(4)]
        self.assertEqual([d.called for d in a], [True, True, False, False])
        b = limiter.acquire("B")
        c = limiter.acquire("C")
        self.assertFalse(b.called)
        limiter.release("A")  # A holds 1, B and C none: B, which waited longer than C
        self.assertTrue(b.called)
        self.assertEqual((a[2].called, c.called), (False, False))
        limiter.release("B")  # A holds 1, C none: C, although A asked first
        self.assertTrue(c.called)
        self.assertFalse(a[2].called)
        limiter.release("A")
        limiter.release("C")
        self.assertTrue(a[2].called and a[3].called)
        self.assertEqual(limiter.active, 2)
        self.assertEqual(limiter.held, {"A": 2})

    def test_fewest_held_first(self):
        limiter = _FairLimiter(3)
        held = [limiter.acquire("A") for _ in range(3)]
        self.assertTrue(all(d.called for d in held))
        more_a = limiter.acquire("A")
        b = limiter.acquire("B")
        limiter.release("A")
        self.assertTrue(b.called)  # B holds none, A holds two
        self.assertFalse(more_a.called)
        limiter.release("B")
        self.assertTrue(more_a.called)

    def test_cancel_waiting(self):
        limiter = _FairLimiter(1)
        first = limiter.acquire("A")
        second = limiter.acquire("B")
        second.cancel()
        self.failureResultOf(second, CancelledError)
        limiter.release("A")
        self.assertEqual(limiter.active, 0)
        self.assertTrue(first.called)
        self.assertEqual(limiter.waiting(), 0)
