"""
The durable outbox of reliable messages.

Each reliable message gets the next sequence number and is appended to the
journal C{outbox.jsonl} in C{state_dir}; it is handed out for sending only
once that append is on disk (see L{everest_agent.journal} for how writes of
one reactor turn share one fsync).  An C{ACK} from the platform appends an
ack record and drops every message it covers from memory.  When the file
holds many more records than are still pending it is compacted: rewritten
as one C{next} record (so C{seq} keeps growing across restarts, even with
nothing pending), one C{ack} record (what the platform has), plus the
pending messages.

Records: C{{"seq": n, "msg": [...]}}, C{{"ack": n}}, C{{"next": n}}.

Each message is encoded once (L{protocol.encode}), when it is put: the
same bytes make its journal line and, once that is on disk, its frame on
the wire (L{Sender}), and they are what the outbox keeps in memory until
the platform acknowledges it (a C{bytes} object: small, and nothing for the
garbage collector to walk).  L{durable_pending} and L{oldest} decode them
again for the few readers that want the message itself.

The journal is compacted when it holds more than twice as many records as
are pending plus L{compact_slack}: a compaction rewrites every pending
message, so with a fixed slack a platform that lags behind a burst of
100,000 reports would make the agent rewrite them over and over.
"""

import json
import os
from collections import OrderedDict

from everest_agent import protocol
from everest_agent.journal import Journal, _dumps as _journal_dumps
from everest_agent.statedir import replay_outbox


def _line(seq, payload):
    """The journal line of message C{payload} (its encoded bytes) with C{seq}."""
    return b'{"seq":%d,"msg":%s}\n' % (seq, payload)


def _encode_loaded(message):
    """
    A message read back from the journal, encoded for the wire.  One that
    the contract's encoder refuses (a NaN, written by an older version
    that encoded at sending time) keeps the journal's encoding: it stays
    pending, in order, as it was.
    """
    try:
        return protocol.encode(message)
    except ValueError:
        return _journal_dumps(message).encode("utf-8")


class Outbox:
    #: Compact when the journal has this many more records than pending messages.
    compact_slack = 10000

    def __init__(self, state_dir, reactor, fsync=True, group=None, files=None):
        """
        @param files: an L{everest_agent.fsio.IFileIO}: compaction while
            the agent runs goes through it, off the reactor thread.
        """
        self._journal = Journal(os.path.join(state_dir, "outbox.jsonl"), reactor, fsync, files)
        if group is not None:
            group.add(self._journal)
        self._pending = OrderedDict()  # seq -> message, durable or not
        self.last_seq = 0  # highest seq ever given out
        self.acked = 0  # highest seq the platform acknowledged
        self.durable_seq = 0  # every message with seq <= this is on disk

    def load(self):
        """Read the journal back after a (re)start, then compact it."""
        pending, last_seq, acked = replay_outbox(self._journal.load())
        self._pending = OrderedDict((seq, _encode_loaded(message)) for seq, message in pending)
        self.last_seq = max(self.last_seq, last_seq)
        self.acked = max(self.acked, acked)
        self.durable_seq = self.last_seq
        self._compact()

    def put(self, build):
        """
        Give the next C{seq} to a message and queue it for disk.

        @param build: a callable taking C{seq} and returning the message.
        @return: C{(seq, payload, durable)}: C{payload} is the message
            encoded (L{protocol.encode}), as it goes on the wire;
            C{durable} is a Deferred that fires once it is on disk.
        @raise ValueError: the message cannot be encoded (nothing is kept
            and C{seq} is not used).
        """
        seq = self.last_seq + 1
        payload = protocol.encode(build(seq))
        self.last_seq = seq
        self._pending[seq] = payload
        d = self._journal.append_line(_line(seq, payload))

        def on_disk(_):
            self.durable_seq = max(self.durable_seq, seq)
            return seq

        return seq, payload, d.addCallback(on_disk)

    def ack(self, seq):
        """
        The platform has every message with C{seq <=} this.

        @return: True if this acknowledged something new.
        """
        if seq <= self.acked:
            return False
        seq = min(seq, self.last_seq)
        if seq <= self.acked:
            return False
        self.acked = seq
        pending = self._pending
        while pending:
            first = next(iter(pending))
            if first > seq:
                break
            del pending[first]
        self._journal.append_line(b'{"ack":%d}\n' % seq, wait=False)
        if self._journal.lines > 2 * len(pending) + self.compact_slack:
            self._journal.compact_soon(self._records)
        return True

    def durable_payloads(self):
        """The unacknowledged messages already on disk, encoded, in seq order."""
        durable = self.durable_seq
        return [payload for seq, payload in self._pending.items() if seq <= durable]

    def durable_pending(self):
        """The unacknowledged messages already on disk, in seq order."""
        return [json.loads(payload) for payload in self.durable_payloads()]

    def __len__(self):
        return len(self._pending)

    def oldest(self):
        """C{(seq, message)} of the oldest unacknowledged message, or None."""
        for seq, payload in self._pending.items():
            return seq, json.loads(payload)
        return None

    def _records(self):
        """What a compacted journal holds (the messages as their lines, encoded already)."""
        records = [{"next": self.last_seq + 1}, {"ack": self.acked}]
        records.extend(_line(s, p) for s, p in self._pending.items())
        return records

    def _compact(self):
        self._journal.compact(self._records())

    def stop(self):
        """@return: a Deferred firing once everything is on disk and the file closed."""
        return self._journal.stop()
