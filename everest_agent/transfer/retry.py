"""
The one retry loop, shared by downloads and uploads.

Transient failures (connection refused/reset/lost, timeouts, stalls, HTTP
408, 425, 429 and 5xx) are retried with exponential backoff and jitter: the
delay doubles from C{initial_delay} up to C{max_delay}, and is drawn from its
upper half; a C{Retry-After} of a 429/503 is honoured up to C{max_delay}.
C{retries} bounds the consecutive attempts that made no progress: an attempt
that brought new bytes starts the count again.  The platform's own file
server being unreachable (no connection, no answer, or a 502/503/504 from its
gateway) does not count either: the agent waits for its platform anyway, so
those transfers go on at C{max_delay} until it is back (or the task is
cancelled).  Any other failure ends the transfer at once.

A transfer holds a slot of the fair limiter while an attempt runs, and
gives it back while it waits to retry.
"""

import random as _random

from twisted.internet.task import deferLater

from everest_agent.transfer.errors import Failed
from everest_agent.transfer.urls import public_url, same_origin


class RetryPolicy:
    """How often and how late to try again."""

    def __init__(self, platform_url, retries=5, initial_delay=1.0, max_delay=60.0, random=None):
        self.platform_url = platform_url
        self.retries = retries
        self.initial_delay = initial_delay
        self.max_delay = max_delay
        self.random = random if random is not None else _random.Random()

    def delay(self, failures, retry_after=None):
        """Seconds to wait after the C{failures}-th failure in a row."""
        base = min(self.max_delay, self.initial_delay * 2 ** min(failures - 1, 40))
        delay = base * (0.5 + 0.5 * self.random.random())
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_delay))
        return delay

    def waits_for(self, uri, failure):
        """
        Whether C{failure} does not count against the retries: the platform
        itself cannot be reached (it is restarting, say).  A task whose files
        cannot reach the platform would not reach it as FAILED either; so
        these transfers keep trying, at the longest delay, until the platform
        is back or the task is cancelled.  A platform that answers with an
        error still fails the transfer after the retries.
        """
        return failure.unreachable and same_origin(self.platform_url, uri)


async def retrying(attempt, *, method, uri, policy, limiter, key, clock, log, progress=None):
    """
    Call C{await attempt()} holding a slot of C{limiter} for C{key} until it
    returns (its result is returned) or fails for good (L{Failed} raised).

    @param progress: a callable giving the bytes moved so far; an attempt
        that moved it beyond its best resets the count of failures.
    """
    failures = counted = attempts = best = 0
    while True:
        await limiter.acquire(key)
        try:
            attempts += 1
            return await attempt()
        except Failed as e:
            if not e.transient:
                raise
            failure = e
        finally:
            limiter.release(key)
        if progress is not None and progress() > best:
            best = progress()
            failures = counted = 0
        failures += 1
        if not policy.waits_for(uri, failure):
            counted += 1
        if counted > policy.retries:
            raise Failed(f"{failure.message} (gave up after {attempts} attempts)")
        delay = policy.delay(failures, failure.retry_after)
        log.info(
            "{method} {uri}: {reason}; retrying in {delay:.1f} s",
            method=method, uri=public_url(uri), reason=failure.message, delay=delay,
        )
        await deferLater(clock, delay)
