"""
The journal, the durable outbox and the sender.
"""

import json
import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from everest_agent import protocol
from everest_agent.fsio import StallingFileIO
from everest_agent.journal import CommitGroup, Journal
from everest_agent.outbox import Outbox
from everest_agent.sender import Sender
from everest_agent.testing import FakeSession


def patch_fsync(test, disk_full):
    """Make the journal's fsync fail with ENOSPC whenever C{disk_full()} says so."""
    from everest_agent import journal as journal_module

    real_fsync = os.fsync

    def fsync(fd):
        if disk_full():
            raise OSError(28, "No space left on device")
        return real_fsync(fd)

    test.patch(journal_module.os, "fsync", fsync)


class JournalTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.path = self.mktemp()

    def test_group_commit(self):
        """Records appended in one reactor turn share one write and one fsync."""
        journal = Journal(self.path, self.clock)
        ds = [journal.append({"n": i}) for i in range(1000)]
        self.assertEqual([d.called for d in ds[:1]], [False])
        self.assertFalse(os.path.exists(self.path))
        self.clock.advance(0)
        self.assertTrue(all(d.called for d in ds))
        self.assertEqual(journal.flushes, 1)
        self.assertEqual([r["n"] for r in Journal(self.path, self.clock).load()], list(range(1000)))

    def test_torn_line_skipped(self):
        with open(self.path, "w") as f:
            f.write('{"a":1}\n{"b":2}\n{"c":')
        journal = Journal(self.path, self.clock)
        self.assertEqual(journal.load(), [{"a": 1}, {"b": 2}])
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_failed_write_is_retried_without_duplicates(self):
        """
        A write that fails after some bytes reached the file (ENOSPC at
        fsync) is taken back and retried later; nothing is reported durable
        before it is, and nothing is written twice.
        """
        journal = Journal(self.path, self.clock)
        once = iter([True])
        patch_fsync(self, lambda: next(once, False))  # the first fsync fails
        d = journal.append({"x": 1})
        self.clock.advance(0)
        self.assertFalse(d.called)
        self.assertEqual(os.path.getsize(self.path), 0)
        journal.append({"y": 2})
        self.clock.advance(journal.retry_delay)
        self.assertTrue(d.called)
        journal.stop()
        self.assertEqual(Journal(self.path, self.clock).load(), [{"x": 1}, {"y": 2}])

    def test_rewrite_is_atomic_and_keeps_queued(self):
        journal = Journal(self.path, self.clock)
        journal.append({"old": 1})
        self.clock.advance(0)
        journal.append({"queued": 1})
        journal.rewrite([{"compacted": 1}])
        journal.append({"after": 1})
        journal.stop()
        self.assertEqual(
            Journal(self.path, self.clock).load(), [{"compacted": 1}, {"after": 1}]
        )
        self.assertEqual(os.stat(self.path).st_mode & 0o777, 0o600)


    def test_rewrite_keeps_records_appended_by_waiters(self):
        """
        The flush before a compaction fires its waiters, and a waiter may
        append at once (the next state of a task): that record is not an
        error, and it lands after the compacted records.
        """
        journal = Journal(self.path, self.clock)
        d = journal.append({"first": 1})
        d.addCallback(lambda _: journal.append({"next": 1}))
        journal.rewrite([{"compacted": 1}])
        journal.stop()
        self.assertEqual(
            Journal(self.path, self.clock).load(), [{"compacted": 1}, {"next": 1}]
        )

    def test_compacted_member_never_ahead_of_earlier_member(self):
        """
        A compaction snapshots its records before the group flush, so a
        change a waiter makes during that flush (whose record in the first
        journal is only queued) is not in the compacted second journal.
        """
        group = CommitGroup(self.clock)
        first = group.add(Journal(self.path, self.clock))
        second = group.add(Journal(self.mktemp(), self.clock))
        record = {"state": "RUNNING"}

        def next_state(_):
            record["state"] = "DONE"
            first.append({"report": "DONE"})

        first.append({"report": "RUNNING"}).addCallback(next_state)
        second.rewrite([record])
        self.assertEqual(Journal(first.path, self.clock).load(), [{"report": "RUNNING"}])
        self.assertEqual(Journal(second.path, self.clock).load(), [{"state": "RUNNING"}])

    def test_compaction_waits_while_the_disk_is_full(self):
        """
        An ACK that triggers compaction while writes fail does not raise:
        compaction waits, and every record is written once the disk has room.
        """
        box = Outbox(os.path.dirname(self.path) or ".", self.clock)
        box.load()
        box.compact_slack = 0
        full = [False]
        patch_fsync(self, lambda: full[0])
        for _ in range(3):
            box.put(lambda seq: ["X", seq])
        self.clock.advance(0)
        full[0] = True
        box.put(lambda seq: ["X", seq])
        self.clock.advance(0)
        box.ack(3)
        self.assertEqual(box.durable_seq, 3)
        full[0] = False
        self.clock.advance(box._journal.retry_delay)
        self.assertEqual(box.durable_seq, 4)
        box.put(lambda seq: ["X", seq])
        box.stop()
        reloaded = Outbox(os.path.dirname(self.path) or ".", self.clock)
        reloaded.load()
        self.assertEqual((reloaded.acked, reloaded.last_seq), (3, 5))
        self.assertEqual(reloaded.durable_pending(), [["X", 4], ["X", 5]])
        self.flushLoggedErrors()


    def test_write_ahead_is_in_the_file_before_the_flush(self):
        """
        write_ahead puts what is queued in the file at once (what a killed
        agent leaves behind); its waiters hear only after the fsync.
        """
        journal = Journal(self.path, self.clock)
        d = journal.append({"submitting": 1})
        journal.write_ahead()
        self.assertEqual(Journal(self.path, self.clock).load(), [{"submitting": 1}])
        self.assertFalse(d.called)
        journal.append({"next": 1})
        self.clock.advance(0)
        self.assertTrue(d.called)
        self.assertEqual(journal.flushes, 1)
        self.assertEqual(Journal(self.path, self.clock).load(), [{"submitting": 1}, {"next": 1}])

    def test_fsync_failure_after_write_ahead_takes_it_back(self):
        journal = Journal(self.path, self.clock)
        once = iter([True])
        patch_fsync(self, lambda: next(once, False))  # the first fsync fails
        first = journal.append({"a": 1})
        journal.write_ahead()
        second = journal.append({"b": 2})
        self.clock.advance(0)  # the fsync fails: both are taken back, in order
        self.assertEqual(os.path.getsize(self.path), 0)
        self.assertFalse(first.called or second.called)
        self.clock.advance(journal.retry_delay)
        self.assertTrue(first.called and second.called)
        journal.stop()
        self.assertEqual(Journal(self.path, self.clock).load(), [{"a": 1}, {"b": 2}])
        self.flushLoggedErrors()

    def test_group_write_ahead_keeps_member_order(self):
        group = CommitGroup(self.clock)
        first = group.add(Journal(self.path, self.clock))
        second = group.add(Journal(self.mktemp(), self.clock))
        second.append({"registry": 1})
        first.append({"outbox": 1})
        order = []
        real_append = Journal._append

        def spy(journal, data):
            order.append(journal)
            return real_append(journal, data)

        self.patch(Journal, "_append", spy)
        second.write_ahead()
        self.assertEqual(order, [first, second])
        self.clock.advance(0)
        self.assertEqual(Journal(second.path, self.clock).load(), [{"registry": 1}])


class JournalLineTests(SynchronousTestCase):
    """Lines encoded by the caller (the outbox's), and no fstat per write."""

    def setUp(self):
        self.clock = Clock()
        self.path = self.mktemp()

    def test_lines_encoded_already(self):
        journal = Journal(self.path, self.clock)
        d = journal.append_line(b'{"seq":1,"msg":["X",1]}\n')
        self.assertIsNone(journal.append_line(b'{"ack":1}\n', wait=False))
        journal.append({"n": 2})
        self.assertNoResult(d)
        self.clock.advance(0)
        self.successResultOf(d)
        self.assertEqual(Journal(self.path, self.clock).load(),
                         [{"seq": 1, "msg": ["X", 1]}, {"ack": 1}, {"n": 2}])
        journal.rewrite([{"next": 5}, b'{"seq":4,"msg":["X",4]}\n'])
        self.assertEqual(Journal(self.path, self.clock).load(), [{"next": 5}, {"seq": 4, "msg": ["X", 4]}])

    def test_one_fstat_per_open_file(self):
        """The journal keeps its end offset: an fstat when it opens the file, none per flush."""
        from everest_agent import journal as journal_module

        with open(self.path, "wb") as f:
            f.write(b'{"old":1}\n')
        stats = []
        real_fstat = os.fstat
        self.patch(journal_module.os, "fstat", lambda fd: stats.append(fd) or real_fstat(fd))
        journal = Journal(self.path, self.clock)
        for i in range(50):
            journal.append({"n": i})
            self.clock.advance(0)
        self.assertEqual(len(stats), 1)
        self.assertEqual(journal._end, os.path.getsize(self.path))
        self.assertEqual(len(Journal(self.path, self.clock).load()), 51)

    def test_failed_write_then_offsets_still_right(self):
        """After a write is taken back (ENOSPC at fsync), the next ones start where it did."""
        failing = [True]
        patch_fsync(self, lambda: failing[0])
        journal = Journal(self.path, self.clock)
        d1 = journal.append({"n": 1})
        self.clock.advance(0)
        self.assertNoResult(d1)
        self.assertEqual(os.path.getsize(self.path), 0)
        failing[0] = False
        d2 = journal.append({"n": 2})
        self.clock.advance(journal.retry_delay)
        self.successResultOf(d1)
        self.successResultOf(d2)
        self.assertEqual(journal._end, os.path.getsize(self.path))
        self.assertEqual(Journal(self.path, self.clock).load(), [{"n": 1}, {"n": 2}])


class FakeSyncThread:
    """Stands for the fsync thread: runs nothing until the test says so."""

    def __init__(self):
        self.calls = []

    def __call__(self, function):
        from twisted.internet.defer import Deferred

        d = Deferred()
        self.calls.append((function, d))
        return d

    def finish(self, fail=None):
        from twisted.python.failure import Failure

        function, d = self.calls.pop(0)
        if fail is None:
            try:
                result = function()
            except Exception:
                fail = Failure()
        if fail is not None:
            d.errback(fail)
        else:
            d.callback(result)


class ThreadedSyncTests(SynchronousTestCase):
    """A commit group whose fsyncs run in another thread, one at a time."""

    def setUp(self):
        self.clock = Clock()
        self.thread = FakeSyncThread()
        self.group = CommitGroup(self.clock, sync_in_thread=self.thread)
        self.outbox = self.group.add(Journal(self.mktemp(), self.clock))
        self.registry = self.group.add(Journal(self.mktemp(), self.clock))

    def load(self, journal):
        return Journal(journal.path, self.clock).load()

    def test_written_at_once_durable_after_the_thread(self):
        first = self.outbox.append({"m": 1})
        record = self.registry.append({"r": 1})
        self.clock.advance(0)
        self.assertEqual((self.load(self.outbox), self.load(self.registry)), ([{"m": 1}], [{"r": 1}]))
        self.assertFalse(first.called or record.called)
        self.assertEqual(len(self.thread.calls), 1)
        self.thread.finish()
        self.assertTrue(first.called and record.called)

    def test_one_fsync_in_flight_the_next_covers_the_rest(self):
        fired = []
        self.outbox.append({"m": 1}).addCallback(lambda _: fired.append(1))
        self.clock.advance(0)
        for n in (2, 3):
            self.outbox.append({"m": n}).addCallback(lambda _, n=n: fired.append(n))
            self.clock.advance(0)
        self.assertEqual(len(self.thread.calls), 1)  # 2 and 3 are written, waiting
        self.assertEqual(len(self.load(self.outbox)), 3)
        self.thread.finish()
        self.assertEqual(fired, [1])
        self.clock.advance(0)
        self.assertEqual(len(self.thread.calls), 1)
        self.thread.finish()
        self.assertEqual(fired, [1, 2, 3])
        self.assertEqual(self.outbox.flushes, 2)

    def test_failed_fsync_cuts_off_and_retries_in_order(self):
        from twisted.python.failure import Failure

        first = self.outbox.append({"m": 1})
        self.clock.advance(0)
        second = self.outbox.append({"m": 2})  # written behind the failing fsync
        self.clock.advance(0)
        self.thread.finish(Failure(OSError(28, "No space left on device")))
        self.assertEqual(self.load(self.outbox), [])
        self.assertFalse(first.called or second.called)
        self.clock.advance(self.group.retry_delay)
        self.thread.finish()
        self.assertTrue(first.called and second.called)
        self.assertEqual(self.load(self.outbox), [{"m": 1}, {"m": 2}])
        self.flushLoggedErrors()

    def test_stop_overtakes_the_fsync_in_flight(self):
        fired = []
        self.outbox.append({"m": 1}).addCallback(lambda _: fired.append(1))
        self.clock.advance(0)
        self.outbox.append({"m": 2}).addCallback(lambda _: fired.append(2))
        self.outbox.stop()
        self.registry.stop()
        self.assertEqual(fired, [1, 2])
        self.thread.finish()  # the overtaken fsync ends later: nothing happens twice
        self.assertEqual(fired, [1, 2])
        self.assertEqual(self.load(self.outbox), [{"m": 1}, {"m": 2}])

    def test_compaction_during_an_fsync_in_flight(self):
        waited = self.outbox.append({"m": 1})
        self.clock.advance(0)
        self.outbox.rewrite([{"compacted": 1}])
        self.assertTrue(waited.called)
        self.thread.finish()
        self.outbox.append({"m": 2})
        self.clock.advance(0)
        self.thread.finish()
        self.assertEqual(self.load(self.outbox), [{"compacted": 1}, {"m": 2}])


class CompactionOffTheReactorTests(SynchronousTestCase):
    """L{Journal.compact_soon}: compaction through a file system that stalls."""

    def setUp(self):
        self.clock = Clock()
        self.thread = FakeSyncThread()
        self.files = StallingFileIO(self.clock, delay=None)
        self.group = CommitGroup(self.clock, sync_in_thread=self.thread)
        self.outbox = self.group.add(Journal(self.mktemp(), self.clock, files=self.files))
        self.registry = self.group.add(Journal(self.mktemp(), self.clock, files=self.files))

    def load(self, journal):
        return Journal(journal.path, self.clock).load()

    def test_compaction_runs_in_the_file_system_threads(self):
        """
        Nothing of the compaction runs in the calling thread: the old file
        stays until the stalled work is done, records appended meanwhile
        wait, and then go into the new file after the snapshot.
        """
        before = self.registry.append({"r": 1})
        self.clock.advance(0)
        self.thread.finish()
        self.assertTrue(before.called)
        covered = self.registry.append({"r": 2})  # queued, so in the snapshot
        self.registry.compact_soon(lambda: [{"snapshot": 1}])
        self.assertEqual(self.files.pending, 1)
        later = self.registry.append({"r": 3})
        self.clock.advance(0)
        self.assertEqual(self.load(self.registry), [{"r": 1}])
        self.assertFalse(covered.called or later.called)
        self.files.release()
        self.assertTrue(covered.called)
        self.assertEqual(self.load(self.registry), [{"snapshot": 1}])
        self.clock.advance(0)
        self.thread.finish()
        self.assertTrue(later.called)
        self.assertEqual(self.load(self.registry), [{"snapshot": 1}, {"r": 3}])
        self.assertEqual(self.registry.lines, 2)

    def test_waits_for_the_fsync_in_flight(self):
        self.registry.append({"r": 1})
        self.clock.advance(0)
        self.registry.compact_soon(lambda: [{"snapshot": 1}])
        self.assertEqual(self.files.pending, 0)  # the fsync of {"r": 1} is still running
        self.thread.finish()
        self.assertEqual(self.files.pending, 1)
        self.files.release()
        self.assertEqual(self.load(self.registry), [{"snapshot": 1}])

    def test_later_member_never_ahead_of_an_earlier_one(self):
        """
        While the outbox compacts, the registry's records wait; the
        outbox's snapshot is on disk before any of them.
        """
        self.outbox.compact_soon(lambda: [{"next": 5}])
        record = self.registry.append({"r": 1})
        self.clock.advance(0)
        self.assertEqual(self.load(self.registry), [])
        self.files.release()
        self.clock.advance(0)
        self.assertEqual(self.load(self.registry), [{"r": 1}])
        self.thread.finish()
        self.assertTrue(record.called)

    def test_earlier_member_written_and_synced_before_the_snapshot(self):
        synced = []
        real = os.fsync
        from everest_agent import journal as journal_module

        self.patch(journal_module.os, "fsync", lambda fd: synced.append(fd) or real(fd))
        self.outbox.append({"m": 1})
        self.registry.compact_soon(lambda: [{"snapshot": 1}])
        self.assertEqual(self.load(self.outbox), [{"m": 1}])  # written before the snapshot
        self.files.release()
        self.assertIn(self.outbox._file.fileno(), synced)

    def test_refused_compaction_keeps_the_old_file_and_every_record(self):
        from everest_agent import journal as journal_module

        self.registry.append({"r": 1})
        self.clock.advance(0)
        self.thread.finish()
        self.registry.compact_soon(lambda: [{"snapshot": 1}])
        waiting = self.registry.append({"r": 2})
        real_replace = os.replace

        def full(*args):
            raise OSError(28, "No space left on device")

        self.patch(journal_module.os, "replace", full)
        self.files.release()
        self.patch(journal_module.os, "replace", real_replace)
        self.assertEqual(self.load(self.registry), [{"r": 1}])
        self.clock.advance(0)
        self.thread.finish()
        self.assertTrue(waiting.called)
        self.assertEqual(self.load(self.registry), [{"r": 1}, {"r": 2}])

    def test_stop_waits_for_the_compaction(self):
        self.registry.append({"r": 1})
        self.registry.compact_soon(lambda: [{"snapshot": 1}])
        self.registry.append({"r": 2})
        stopped = self.registry.stop()
        self.assertNoResult(stopped)
        self.files.release()
        self.successResultOf(stopped)
        self.assertEqual(self.load(self.registry), [{"snapshot": 1}, {"r": 2}])


class OutboxTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.dir = self.mktemp()
        os.makedirs(self.dir)

    def outbox(self):
        box = Outbox(self.dir, self.clock, fsync=False)
        box.load()
        return box

    def test_seq_survives_restart_even_when_all_acked(self):
        box = self.outbox()
        for _ in range(3):
            box.put(lambda seq: ["X", seq])
        self.clock.advance(0)
        box.ack(3)
        box.stop()
        box = self.outbox()
        self.assertEqual(len(box), 0)
        seq, message, _ = box.put(lambda seq: ["X", seq])
        self.assertEqual(seq, 4)

    def test_unacked_survive_restart_in_order(self):
        box = self.outbox()
        for _ in range(5):
            box.put(lambda seq: ["X", seq])
        self.clock.advance(0)
        box.ack(2)
        box.stop()
        box = self.outbox()
        self.assertEqual(box.durable_pending(), [["X", 3], ["X", 4], ["X", 5]])
        self.assertEqual(box.acked, 2)

    def test_only_durable_messages_are_pending_for_resend(self):
        box = self.outbox()
        box.put(lambda seq: ["X", seq])
        self.assertEqual(box.durable_pending(), [])
        self.clock.advance(0)
        self.assertEqual(box.durable_pending(), [["X", 1]])

    def test_compaction(self):
        box = self.outbox()
        box.compact_slack = 10
        for _ in range(50):
            box.put(lambda seq: ["X", seq])
            self.clock.advance(0)
            box.ack(box.last_seq)
        self.assertLess(box._journal.lines, 15)
        box.stop()
        self.assertEqual(self.outbox().last_seq, 50)

    def test_compaction_while_running_is_off_the_reactor(self):
        """An ACK that compacts hands the work to the file-system threads."""
        files = StallingFileIO(self.clock, delay=2.0)
        box = Outbox(self.dir, self.clock, fsync=False, files=files)
        box.load()
        box.compact_slack = 10
        for _ in range(20):
            box.put(lambda seq: ["X", seq])
            self.clock.advance(0)
            box.ack(box.last_seq)
        self.assertEqual(files.calls, 1)  # one compaction at a time
        self.clock.advance(2.0)
        box.put(lambda seq: ["X", seq])  # records of the stall, then this: compact again
        self.clock.advance(0)
        box.ack(box.last_seq)
        self.assertEqual(files.calls, 2)
        self.clock.advance(2.0)
        self.assertLess(box._journal.lines, 5)
        self.successResultOf(box.stop())
        box = Outbox(self.dir, self.clock, fsync=False)
        box.load()
        self.assertEqual((box.last_seq, box.acked, len(box)), (21, 21, 0))

    def test_message_encoded_once(self):
        """The journal's line holds the very bytes that go on the wire."""
        box = self.outbox()
        seq, payload, d = box.put(lambda seq: ["TASK_STATE", "t1", "ACCEPTED", {"seq": seq, "time": 1.25, "é": "ü"}])
        self.assertEqual(payload, protocol.encode(["TASK_STATE", "t1", "ACCEPTED", {"seq": 1, "time": 1.25, "é": "ü"}]))
        self.clock.advance(0)
        with open(os.path.join(self.dir, "outbox.jsonl"), "rb") as f:
            self.assertEqual(f.read().splitlines()[-1], b'{"seq":1,"msg":' + payload + b"}")
        self.assertEqual(box.durable_payloads(), [payload])
        self.assertEqual(box.oldest(), (1, json.loads(payload)))

    def test_unencodable_message_takes_no_seq(self):
        box = self.outbox()
        self.assertRaises(ValueError, box.put, lambda seq: ["X", float("nan")])
        seq, _, _ = box.put(lambda seq: ["X", seq])
        self.assertEqual((seq, len(box)), (1, 1))

    def test_journal_of_an_older_version_with_a_nan_still_loads(self):
        with open(os.path.join(self.dir, "outbox.jsonl"), "w") as f:
            f.write('{"seq":1,"msg":["X",NaN]}\n{"seq":2,"msg":["X",2]}\n')
        box = self.outbox()
        self.assertEqual(box.durable_payloads(), [b'["X",NaN]', b'["X",2]'])
        self.assertEqual(box.last_seq, 2)

    def test_compaction_under_a_lagging_platform_is_linear(self):
        """
        A platform that stays 1,000 messages behind: each compaction rewrites
        those 1,000, so they must come at intervals that grow with them, not
        every C{compact_slack} records.
        """
        box = self.outbox()
        box.compact_slack = 10
        rewritten = []
        real = box._records

        def records():
            got = real()
            rewritten.append(len(got))
            return got

        box._records = records
        for _ in range(1000):
            box.put(lambda seq: ["X", seq])
        for _ in range(5000):
            box.put(lambda seq: ["X", seq])
            self.clock.advance(0)
            box.ack(box.last_seq - 1000)
        self.assertLess(sum(rewritten), 12 * 1002)  # a fixed slack: about 1,000 compactions of 1,002
        self.assertLess(box._journal.lines, 2 * 1000 + 10 + 3)
        box.stop()
        reloaded = self.outbox()
        self.assertEqual((reloaded.last_seq, reloaded.acked, len(reloaded)), (6000, 5000, 1000))

    def test_ack_beyond_last_seq_is_clamped(self):
        box = self.outbox()
        box.put(lambda seq: ["X", seq])
        self.clock.advance(0)
        self.assertTrue(box.ack(99))
        self.assertEqual(box.acked, 1)
        seq, _, _ = box.put(lambda seq: ["X", seq])
        self.assertEqual(seq, 2)


class SenderTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.box = Outbox(self.dir, self.clock, fsync=False)
        self.box.load()
        self.sender = Sender(self.box, self.clock, wallclock=lambda: 42.0)

    def test_sent_only_after_on_disk(self):
        session = FakeSession()
        self.sender.welcomed(session, 0)
        d = self.sender.task_state("t1", "ACCEPTED")
        self.assertEqual(session.sent, [])
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(d), 1)
        self.assertEqual(session.sent, [["TASK_STATE", "t1", "ACCEPTED", {"seq": 1, "time": 42.0}]])
        with open(os.path.join(self.dir, "outbox.jsonl")) as f:
            self.assertIn("ACCEPTED", f.read())

    def test_resent_after_reconnect_until_acked(self):
        first = FakeSession()
        self.sender.welcomed(first, 0)
        for i in range(4):
            self.sender.task_state(f"t{i}", "ACCEPTED")
        self.clock.advance(0)
        self.sender.ack(1)
        self.sender.lost(first)
        self.sender.task_message("t3", "hello")  # while disconnected
        self.clock.advance(0)
        self.assertEqual(len(first.sent), 4)
        second = FakeSession()
        self.sender.welcomed(second, 2)  # the platform had up to 2
        self.assertEqual(
            [m[1] for m in second.sent], ["t2", "t3", "t3"]
        )
        self.assertEqual(second.sent[-1], ["TASK_MESSAGE", "t3", "hello", {"seq": 5}])

    def test_bytes_on_the_wire_are_the_journals(self):
        wire = []

        class Session(FakeSession):
            def send_payload(self, payload):
                wire.append(payload)
                super().send_payload(payload)

        session = Session()
        self.sender.welcomed(session, 0)
        self.sender.task_state("t1", "ACCEPTED")
        self.sender.task_message("t1", "hello")
        self.clock.advance(0)
        with open(os.path.join(self.dir, "outbox.jsonl"), "rb") as f:
            lines = f.read().splitlines()[2:]  # (after the "next" and "ack" of load's compaction)
        self.assertEqual(lines, [b'{"seq":%d,"msg":%s}' % (i + 1, p) for i, p in enumerate(wire)])
        self.assertEqual(session.sent[1], ["TASK_MESSAGE", "t1", "hello", {"seq": 2}])
        again = Session()
        self.sender.welcomed(again, 1)
        self.assertEqual(wire[-1], wire[1])  # re-sent: the same bytes

    def test_unreliable_dropped_while_disconnected(self):
        self.assertFalse(self.sender.send_unreliable(["RESOURCE_STATE", {}]))
        session = FakeSession()
        self.sender.welcomed(session, 0)
        self.assertTrue(self.sender.send_unreliable(["RESOURCE_STATE", {}]))
        self.assertEqual(session.sent, [["RESOURCE_STATE", {}]])

    def test_ack_listeners(self):
        seen = []
        self.sender.add_ack_listener(seen.append)
        self.sender.welcomed(FakeSession(), 0)
        self.sender.task_state("t", "ACCEPTED")
        self.sender.task_state("t", "RUNNING")
        self.clock.advance(0)
        self.sender.ack(1)
        self.sender.ack(1)  # nothing new
        self.sender.ack(2)
        self.assertEqual(seen, [1, 2])


class OutboxAckSurvivesCompactionTests(SynchronousTestCase):
    def test_acked_survives_compaction(self):
        clock = Clock()
        state_dir = self.mktemp()
        os.makedirs(state_dir)
        box = Outbox(state_dir, clock, fsync=False)
        box.load()
        for _ in range(3):
            box.put(lambda seq: ["X", seq])
        clock.advance(0)
        box.ack(2)
        box.stop()
        for _ in range(2):  # each load compacts
            box = Outbox(state_dir, clock, fsync=False)
            box.load()
            self.assertEqual(box.acked, 2)
            self.assertEqual(box.durable_pending(), [["X", 3]])
            box.stop()
