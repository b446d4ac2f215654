"""Backoff (L{everest_agent.transfer.retry}) and failure classification (L{everest_agent.transfer.exchange})."""

import errno

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseNeverReceived

from everest_agent.transfer import errors, exchange
from everest_agent.transfer.retry import RetryPolicy
from everest_agent.transfer.urls import public_url


class BackoffTests(SynchronousTestCase):
    def test_delays_grow_with_jitter_and_cap(self):
        class Fixed:
            def __init__(self, value):
                self.value = value

            def random(self):
                return self.value

        low = RetryPolicy("wss://p/", initial_delay=1.0, max_delay=10.0, random=Fixed(0.0))
        high = RetryPolicy("wss://p/", initial_delay=1.0, max_delay=10.0, random=Fixed(1.0))
        self.assertEqual([low.delay(n) for n in (1, 2, 3, 4, 5, 6)], [0.5, 1.0, 2.0, 4.0, 5.0, 5.0])
        self.assertEqual([high.delay(n) for n in (1, 2, 3, 4, 5, 6)], [1.0, 2.0, 4.0, 8.0, 10.0, 10.0])
        self.assertEqual(low.delay(1, retry_after=30), 10.0)
        self.assertEqual(low.delay(1, retry_after=3), 3)

    def test_classification(self):
        from twisted.internet import error

        from twisted.python.failure import Failure

        self.assertTrue(exchange.network_failure(error.ConnectionRefusedError(), "GET", "http://h/x").transient)
        self.assertTrue(exchange.network_failure(ResponseNeverReceived([Failure(error.ConnectionLost())]), "GET", "http://h/x").transient)
        self.assertFalse(exchange.network_failure(ValueError("bad url"), "GET", "http://h/x").transient)
        self.assertIn("disk full", errors.io_failure(OSError(errno.ENOSPC, "No space left on device")).message)
        self.assertNotIn("secret", public_url("https://user:pw@h/x?sig=secret"))
