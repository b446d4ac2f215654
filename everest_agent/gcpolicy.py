"""
How the agent's (and the reference platform's) process runs Python's
cyclic garbage collector.

Measured on a burst of 30,000 submits (``benchmarks/throughput.py`` item 4
with ``--burst-profile``): with the interpreter's default thresholds
(700, 10, 10) the agent spent about 30 % of its CPU in full collections,
42 of them, each walking every object of a heap that holds 100,000s of
task records.  They come so often because a task's short-lived objects
(its Deferreds, the decoded frame, the queued journal line) live for a
reactor turn, and a turn of a burst allocates far more than 700 objects,
so they are promoted to the oldest generation before they die and count
towards its next collection.

L{configure} sets a young-generation threshold large enough that what
lives for a turn dies young, and moves what exists when the process has
imported its code (modules, classes, functions) out of the collector's
sight (C{gc.freeze}): that is never garbage.  The state loaded later
(task records, resumed workers) is not frozen, so whatever of it becomes
cyclic garbage is still collected.  Reference counting still frees
everything without a cycle at once; cycles are collected as before, only
later.

It is called once, by the entry points that make a long-running process
(the twistd plugins of the agent and of the reference platform), never
from a constructor or a library call.
"""

import gc

#: Allocations (minus deallocations) of tracked objects between two
#: young collections; the interpreter's default is 700.
YOUNG_THRESHOLD = 50000
#: Young collections per middle one, middle ones per full one (the defaults).
OLDER_THRESHOLDS = (10, 10)


def configure():
    """
    Set the collector's thresholds for a long-running server process and
    move every object that exists now to the permanent generation.  Call it
    once the process has imported its code and before it builds or loads
    anything that may become garbage.

    @return: the thresholds before.
    """
    before = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, *OLDER_THRESHOLDS)
    gc.freeze()
    return before
