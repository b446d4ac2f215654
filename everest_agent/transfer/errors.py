"""The ways a transfer fails, and the words a task's reason uses for them."""

import errno

from everest_agent import paths


class StagingError(Exception):
    """A transfer failed; the message is the task's failure reason."""


class Failed(Exception):
    """
    One attempt (or all of them) failed.  C{transient} ones are retried;
    C{unreachable} ones (no answer at all, or a gateway saying its backend
    is down) are transient too, and do not count against the retries when
    the server is the platform's own (see L{everest_agent.transfer.retry}).
    """

    def __init__(self, message, transient=False, retry_after=None, unreachable=False):
        super().__init__(message)
        self.message = message
        self.transient = transient or unreachable
        self.retry_after = retry_after
        self.unreachable = unreachable


def io_failure(error, doing="writing"):
    """The (permanent) L{Failed} for an C{OSError} on the local disk."""
    if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return Failed(f"disk full ({error.strerror or 'no space left on device'})")
    text = getattr(error, "strerror", None) or str(error) or error.__class__.__name__
    return Failed(f"{doing} failed: {text}")


def describe(error):
    """One line (at most 300 characters) saying what C{error} is."""
    reasons = getattr(error, "reasons", None)
    if reasons:
        error = reasons[0].value
    text = str(error) or error.__class__.__name__
    return " ".join(text.split())[:300]


def remove(path):
    """
    Unlink C{path}, if it is there, never through a link
    (L{everest_agent.paths.remove_file}).  Blocking: call it in the
    file-system threads.
    """
    paths.remove_file(path)
