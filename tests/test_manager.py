"""
TaskManager and TaskWorker: the state machine, slots, idempotence and
restarts, with fake handler, stager and session, and a Clock.
"""

import os

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from everest_agent.interfaces import IJob, ISender, ITaskHandler
from everest_agent.manager import SlotPool, TaskManager
from everest_agent.outbox import Outbox
from everest_agent.protocol import ProtocolError
from everest_agent.registry import TaskRegistry
from everest_agent.sender import Sender
from everest_agent.testing import FakeSession, FakeStager, FakeTaskHandler


def spec(command="true", **extra):
    s = {"command": command}
    s.update(extra)
    return s


class Harness:
    """An agent core without a network: manager, sender, outbox, registry."""

    def __init__(self, test, state_dir=None, slots=2, handler=None, allowed=()):
        self.clock = Clock()
        self.state_dir = state_dir or test.mktemp()
        os.makedirs(self.state_dir, exist_ok=True)
        self.work_dir = os.path.join(self.state_dir, "work")
        self.outbox = Outbox(self.state_dir, self.clock, fsync=False)
        self.outbox.load()
        self.registry = TaskRegistry(self.state_dir, self.clock, fsync=False)
        self.registry.load()
        self.sender = Sender(self.outbox, self.clock, wallclock=lambda: 1000.0)
        self.handler = handler or FakeTaskHandler()
        self.stager = FakeStager()
        self.manager = TaskManager(
            self.registry, self.sender, self.handler, self.stager, self.work_dir, slots,
            allowed_commands=allowed, wallclock=self.clock.seconds,
        )
        self.session = FakeSession()
        self.sender.welcomed(self.session, 0)
        self.manager.startService()

    def pump(self):
        for _ in range(20):
            self.clock.advance(0)

    def submit(self, task_id, s):
        self.manager.submit(task_id, s)
        self.pump()

    def states(self, task_id):
        return self.session.states(task_id)

    def last(self, task_id):
        return [m for m in self.session.sent if m[0] == "TASK_STATE" and m[1] == task_id][-1]

    def stop(self):
        self.manager.stopService()
        self.outbox.stop()


class ManagerTests(SynchronousTestCase):
    def test_interfaces(self):
        h = Harness(self)
        verifyObject(ISender, h.sender)
        verifyObject(ITaskHandler, h.handler)
        h.submit("t1", spec())
        verifyObject(IJob, h.handler.jobs["t1"])

    def test_accepted_only_once_recorded(self):
        h = Harness(self)
        h.manager.submit("t1", spec())
        self.assertEqual(h.session.sent, [])
        with open(os.path.join(h.state_dir, "tasks.jsonl")) as f:
            self.assertEqual(f.read(), "")
        h.pump()
        with open(os.path.join(h.state_dir, "tasks.jsonl")) as f:
            self.assertIn('"t1"', f.read())
        self.assertEqual(h.states("t1")[0], "ACCEPTED")

    def test_happy_path(self):
        h = Harness(self)
        h.submit("t1", spec(inputs=[{"path": "a", "data": ""}], outputs=[{"path": "b", "uri": "http://x/b"}]))
        job = h.handler.jobs["t1"]
        self.assertEqual(job.request.environment["EVEREST_TASK_ID"], "t1")
        self.assertEqual(job.request.directory, os.path.join(h.work_dir, "t1"))
        job.finish(0)
        h.pump()
        self.assertEqual(h.states("t1"), ["ACCEPTED", "STAGING_IN", "RUNNING", "STAGING_OUT", "DONE"])
        info = h.last("t1")[3]
        self.assertEqual(info["exitCode"], 0)
        self.assertNotIn("reason", info)
        for key in ("seq", "time", "stageInTime", "runTime", "stageOutTime", "outputs"):
            self.assertIn(key, info)
        seqs = [m[3]["seq"] for m in h.session.sent]
        self.assertEqual(seqs, list(range(1, len(seqs) + 1)))

    def test_nonzero_exit_fails_and_still_stages_out(self):
        h = Harness(self)
        h.submit("t1", spec(outputs=[{"path": "stdout", "uri": "http://x/o"}]))
        h.handler.jobs["t1"].finish(3)
        h.pump()
        self.assertEqual(h.states("t1")[-1], "FAILED")
        self.assertEqual(h.last("t1")[3]["exitCode"], 3)
        self.assertEqual(h.last("t1")[3]["reason"], "exit code 3")
        self.assertEqual(len(h.stager.staged_out), 1)

    def test_stage_out_error_fails_task(self):
        h = Harness(self)
        h.stager.out_errors = ["output 'r' is missing"]
        h.submit("t1", spec(outputs=[{"path": "r", "uri": "http://x/r"}]))
        h.handler.jobs["t1"].finish(0)
        h.pump()
        self.assertEqual(h.states("t1")[-1], "FAILED")
        self.assertEqual(h.last("t1")[3]["reason"], "output 'r' is missing")
        self.assertEqual(h.last("t1")[3]["exitCode"], 0)

    def test_stage_in_error_fails_before_running(self):
        h = Harness(self)
        h.stager.fail_in = "input 'a': checksum mismatch"
        h.submit("t1", spec(inputs=[{"path": "a", "data": ""}]))
        self.assertEqual(h.states("t1"), ["ACCEPTED", "STAGING_IN", "FAILED"])
        self.assertEqual(h.last("t1")[3]["reason"], "input 'a': checksum mismatch")
        self.assertEqual(h.handler.jobs, {})

    def test_duplicate_submit_does_not_run_again(self):
        h = Harness(self)
        h.submit("t1", spec())
        h.submit("t1", spec())
        self.assertEqual(len(h.handler.jobs), 1)
        self.assertEqual(h.states("t1"), ["ACCEPTED", "RUNNING", "RUNNING"])
        h.handler.jobs["t1"].finish(0)
        h.pump()
        h.submit("t1", spec("other"))
        self.assertEqual(h.states("t1")[-2:], ["DONE", "DONE"])
        self.assertEqual(len(h.handler.jobs), 1)

    def test_duplicate_submit_in_same_turn(self):
        h = Harness(self)
        h.manager.submit("t1", spec())
        h.manager.submit("t1", spec())
        h.pump()
        self.assertEqual(h.states("t1"), ["ACCEPTED", "RUNNING"])

    def test_cancel_unknown(self):
        h = Harness(self)
        e = self.assertRaises(ProtocolError, h.manager.cancel, "nope")
        self.assertEqual(e.code, "unknown-task")
        self.assertEqual(e.as_message()[1]["taskId"], "nope")

    def test_cancel_running(self):
        h = Harness(self)
        h.submit("t1", spec())
        h.manager.cancel("t1")
        h.pump()
        self.assertTrue(h.handler.jobs["t1"].canceled)
        self.assertEqual(h.states("t1"), ["ACCEPTED", "RUNNING", "CANCELED"])
        self.assertEqual(h.last("t1")[3]["reason"], "canceled")
        # Cancel of a finished task does nothing.
        h.manager.cancel("t1")
        h.pump()
        self.assertEqual(h.states("t1"), ["ACCEPTED", "RUNNING", "CANCELED"])

    def test_cancel_during_stage_in(self):
        h = Harness(self)
        h.stager.hold_in = defer.Deferred()
        h.submit("t1", spec(inputs=[{"path": "a", "data": ""}]))
        self.assertEqual(h.states("t1"), ["ACCEPTED", "STAGING_IN"])
        h.manager.cancel("t1")
        h.pump()
        self.assertEqual(h.states("t1"), ["ACCEPTED", "STAGING_IN", "CANCELED"])
        self.assertEqual(h.handler.jobs, {})

    def test_slots_and_queue(self):
        h = Harness(self, slots=2)
        h.submit("big", spec(resourceRequirements={"coresPerNode": 2}))
        h.submit("small", spec())
        self.assertEqual(h.states("small"), ["ACCEPTED", "QUEUED"])
        self.assertEqual(h.manager.counts(), (2, 1))
        h.manager.cancel("small")
        h.pump()
        self.assertEqual(h.states("small"), ["ACCEPTED", "QUEUED", "CANCELED"])
        self.assertEqual(h.manager.counts(), (2, 0))
        h.submit("next", spec())
        h.handler.jobs["big"].finish(0)
        h.pump()
        self.assertEqual(h.states("next"), ["ACCEPTED", "QUEUED", "RUNNING"])
        self.assertEqual(h.manager.counts(), (1, 0))
        self.assertNotIn("small", h.handler.jobs)

    def test_slot_freed_by_a_cancel_waits_for_the_rest_of_the_batch(self):
        """
        Cancels that arrive together (after a reconnect) are all handled
        before a queued task starts in the slot the first one freed.
        """
        h = Harness(self, slots=1)
        h.handler.durable_jobs = False  # like local processes: started without waiting for the disk
        h.submit("running", spec())
        h.submit("queued", spec())
        self.assertEqual(h.states("queued"), ["ACCEPTED", "QUEUED"])
        h.manager.cancel("running")  # its job ends at once, freeing the slot
        h.manager.cancel("queued")  # same reactor turn
        h.pump()
        self.assertEqual(h.states("running")[-1], "CANCELED")
        self.assertEqual(h.states("queued"), ["ACCEPTED", "QUEUED", "CANCELED"])
        self.assertNotIn("queued", h.handler.jobs)

    def test_freed_slot_goes_to_the_next_task_without_waiting_for_the_disk(self):
        """A finished job hands its slot on at the end of its turn, with no commit to wait for first."""
        h = Harness(self, slots=1)
        h.handler.durable_jobs = False
        h.submit("first", spec())
        h.submit("second", spec())
        h.handler.jobs["first"].finish(0)
        self.assertNotIn("second", h.handler.jobs)  # not in the middle of the turn
        h.clock.advance(0)  # the end of the turn
        self.assertIn("second", h.handler.jobs)
        h.pump()
        self.assertEqual(h.states("first")[-1], "DONE")

    def test_stopping_starts_no_queued_task(self):
        """
        Abandoning the running tasks at a stop frees their slots, but no
        queued task takes them: it stays queued for the next start.
        """
        h = Harness(self, slots=1)
        h.handler.durable_jobs = False  # started synchronously once a slot is granted
        h.submit("running", spec())
        for n in range(3):
            h.submit(f"queued{n}", spec())
        h.manager.stopping = True
        h.manager.stopService()
        h.pump()
        self.assertEqual(list(h.handler.jobs), ["running"])
        # Not started, nor about to be: the next start stages and runs them.
        self.assertLessEqual({h.registry.get(f"queued{n}").get("phase") for n in range(3)}, {"new", "staged"})

    def test_allow_list(self):
        import re

        h = Harness(self, allowed=[re.compile(r"echo \w+")])
        h.submit("ok", spec("echo hi"))
        h.submit("no", spec("echo hi; rm -rf /"))
        self.assertIn("ok", h.handler.jobs)
        self.assertNotIn("no", h.handler.jobs)
        self.assertEqual(h.states("no"), ["ACCEPTED", "FAILED"])
        self.assertIn("allowed_commands", h.last("no")[3]["reason"])

    def test_bad_spec_fails_task(self):
        h = Harness(self)
        h.submit("t1", spec(inputs=[{"path": "../x", "data": ""}]))
        self.assertEqual(h.states("t1"), ["ACCEPTED", "FAILED"])
        self.assertIn("leaves the task directory", h.last("t1")[3]["reason"])
        h.submit("t2", {"nocommand": 1})
        self.assertEqual(h.states("t2"), ["ACCEPTED", "FAILED"])

    def test_submit_failure(self):
        h = Harness(self, handler=FakeTaskHandler(fail_submit="sbatch: error: invalid partition"))
        h.submit("t1", spec())
        self.assertEqual(h.states("t1"), ["ACCEPTED", "FAILED"])
        self.assertEqual(h.last("t1")[3]["reason"], "sbatch: error: invalid partition")
        self.assertEqual(h.manager.counts(), (0, 0))

    def test_batch_reports_job_id(self):
        h = Harness(self, handler=FakeTaskHandler(batch=True))
        h.submit("t1", spec())
        job = h.handler.jobs["t1"]
        self.assertEqual(h.last("t1")[2:4][0], "QUEUED")
        self.assertEqual(h.last("t1")[3]["jobId"], job.job_id)
        job.start()
        h.pump()
        self.assertEqual(h.last("t1")[3]["jobId"], job.job_id)
        job.finish(0)
        h.pump()
        self.assertEqual(h.states("t1"), ["ACCEPTED", "QUEUED", "RUNNING", "DONE"])

    def test_batch_job_ends_before_running_seen(self):
        h = Harness(self, handler=FakeTaskHandler(batch=True))
        h.submit("t1", spec())
        h.handler.jobs["t1"].finish(0)
        h.pump()
        self.assertEqual(h.states("t1"), ["ACCEPTED", "QUEUED", "DONE"])

    def test_hello_tasks_until_acknowledged(self):
        h = Harness(self)
        h.submit("t1", spec())
        h.submit("t2", spec())
        self.assertEqual(h.manager.hello_tasks(), ["t1", "t2"])
        h.handler.jobs["t1"].finish(0)
        h.pump()
        self.assertEqual(h.manager.hello_tasks(), ["t1", "t2"])
        h.sender.ack(h.last("t1")[3]["seq"])
        self.assertEqual(h.manager.hello_tasks(), ["t2"])
        # Still known: a repeated submit re-sends DONE rather than running it.
        h.submit("t1", spec())
        self.assertEqual(h.states("t1")[-1], "DONE")
        self.assertEqual(len(h.handler.jobs), 2)

    def test_keep_finished_forgets_oldest(self):
        h = Harness(self)
        h.manager.keep_finished = 1
        for name in ("a", "b"):
            h.submit(name, spec())
            h.handler.jobs[name].finish(0)
            h.pump()
        h.sender.ack(h.outbox.last_seq)
        self.assertNotIn("a", h.registry)
        self.assertIn("b", h.registry)


class RestartTests(SynchronousTestCase):
    def restart(self, h, handler=None):
        h.sender.ack(h.outbox.durable_seq)
        h.stop()
        return Harness(self, state_dir=h.state_dir, handler=handler or FakeTaskHandler(batch=True))

    def test_submitted_batch_job_is_reattached_by_id(self):
        h = Harness(self, handler=FakeTaskHandler(batch=True))
        h.submit("t1", spec())
        job_id = h.handler.jobs["t1"].job_id
        h2 = self.restart(h)
        h2.pump()
        self.assertEqual(h2.handler.reattached, [("t1", job_id)])
        h2.handler.jobs["t1"].finish(0)
        h2.pump()
        self.assertEqual(h2.states("t1"), ["DONE"])
        # seq keeps growing across the restart
        self.assertGreater(h2.last("t1")[3]["seq"], h.outbox.last_seq)

    def test_submitting_phase_looks_for_job_by_name(self):
        h = Harness(self, handler=FakeTaskHandler(batch=True, hold_submit=True))
        h.submit("t1", spec())
        self.assertIn("t1", h.handler.jobs)  # sbatch is running
        with open(os.path.join(h.state_dir, "tasks.jsonl")) as f:
            self.assertNotIn('"job"', f.read())
        # The agent dies before the job id is on disk; a new one starts.
        h2 = Harness(self, state_dir=h.state_dir, handler=FakeTaskHandler(batch=True))
        h2.pump()
        self.assertEqual(h2.handler.reattached, [("t1", None)])

    def test_finished_tasks_are_not_rerun(self):
        h = Harness(self)
        h.submit("t1", spec())
        h.handler.jobs["t1"].finish(0)
        h.pump()
        h.stop()  # DONE is in the outbox, not acknowledged
        h2 = Harness(self, state_dir=h.state_dir)
        h2.pump()
        self.assertEqual(h2.handler.jobs, {})
        self.assertEqual(h2.manager.hello_tasks(), ["t1"])  # DONE not yet acknowledged
        h2.sender.welcomed(FakeSession(), 0)
        self.assertEqual(h2.outbox.durable_pending()[-1][2], "DONE")

    def test_local_task_lost_in_restart_fails(self):
        h = Harness(self)
        h.submit("t1", spec())
        from everest_agent.interfaces import JobLost

        handler = FakeTaskHandler()
        handler.reattach = lambda request, job_id: defer.fail(JobLost("its outcome is unknown"))
        h2 = self.restart(h, handler)
        h2.pump()
        self.assertEqual(h2.states("t1"), ["FAILED"])
        self.assertEqual(h2.last("t1")[3]["reason"], "its outcome is unknown")


    def test_task_never_started_in_restart_is_started_once(self):
        """A handler that finds the job never started (JobNeverStarted): the worker starts it, once."""
        h = Harness(self, handler=FakeTaskHandler(hold_submit=True))
        h.submit("t1", spec())  # the agent dies while the job is being started
        from everest_agent.interfaces import JobNeverStarted

        handler = FakeTaskHandler()
        handler.reattach = lambda request, job_id: defer.fail(JobNeverStarted("the agent stopped first"))
        h2 = self.restart(h, handler)
        h2.pump()
        self.assertEqual(list(h2.handler.jobs), ["t1"])
        h2.handler.jobs["t1"].finish(0)
        h2.pump()
        self.assertEqual(h2.states("t1"), ["RUNNING", "DONE"])


class SlotPoolTests(SynchronousTestCase):
    def test_fifo(self):
        pool = SlotPool(2)
        self.assertEqual(self.successResultOf(pool.acquire(1)), 1)
        big = pool.acquire(2)
        small = pool.acquire(1)
        self.assertNoResult(big)
        self.assertNoResult(small)  # waits behind the big one
        pool.release(1)
        self.assertEqual(self.successResultOf(big), 2)
        self.assertNoResult(small)
        pool.release(2)
        self.successResultOf(small)
        self.assertEqual(pool.used, 1)


class DamagedStateTests(SynchronousTestCase):
    def test_damaged_records_fail_alone(self):
        state_dir = self.mktemp()
        os.makedirs(state_dir)
        with open(os.path.join(state_dir, "tasks.jsonl"), "w") as f:
            f.write('{"id":"good","spec":{"command":"true"},"state":"ACCEPTED","phase":"new"}\n')
            f.write('{"id":"bad-spec","spec":{"command":5},"state":"ACCEPTED","phase":"new"}\n')
            f.write('{"id":"bad-phase","spec":{"command":"true"},"state":"ACCEPTED","phase":"???"}\n')
            f.write('{"id":"bad-job","spec":{"command":"true"},"state":"RUNNING","phase":"submitted","job":7}\n')
            f.write('{"id":"torn","spec":{"comm')
        with open(os.path.join(state_dir, "outbox.jsonl"), "w") as f:
            f.write("garbage\n")
        h = Harness(self, state_dir=state_dir)
        h.pump()
        self.assertIn("good", h.handler.jobs)
        for task_id in ("bad-spec", "bad-phase", "bad-job"):
            self.assertEqual(h.states(task_id), ["FAILED"], task_id)
            self.assertIn("damaged", h.last(task_id)[3]["reason"])
        self.assertNotIn("torn", h.registry)
        self.assertEqual(len(self.flushLoggedErrors()), 0)


class ReportSizeTests(SynchronousTestCase):
    def test_terminal_report_fits_in_a_frame(self):
        from everest_agent import protocol

        h = Harness(self)
        many = [{"path": f"out/file-{i:06d}.dat", "size": i, "sha256": "0" * 64} for i in range(20000)]
        h.stager.stage_out = lambda task_dir, outputs: _succeed((many, ["x" * 100000]))
        h.submit("t1", spec(outputs=[{"pattern": "out/*", "uri": "http://x/"}]))
        h.handler.jobs["t1"].finish(0)
        h.pump()
        message = h.last("t1")
        self.assertEqual(message[2], "FAILED")
        self.assertLess(len(protocol.encode(message)), protocol.MAX_FRAME_SIZE)
        self.assertGreater(message[3]["outputsOmitted"], 0)
        self.assertEqual(len(message[3]["outputs"]) + message[3]["outputsOmitted"], 20000)
        self.assertLessEqual(len(message[3]["reason"]), 4096)


async def _succeed(value):
    return value


class CrashBetweenWritesTests(SynchronousTestCase):
    """
    The outbox and the registry are two files.  With both in one commit
    group, outbox first, a crash between their writes can only leave the
    outbox ahead; the next start carries its states forward.
    """

    def test_outbox_ahead_is_carried_forward(self):
        from everest_agent.journal import CommitGroup

        clock = Clock()
        state_dir = self.mktemp()
        os.makedirs(state_dir)
        group = CommitGroup(clock)
        outbox = Outbox(state_dir, clock, fsync=False, group=group)
        registry = TaskRegistry(state_dir, clock, fsync=False, group=group)
        outbox.load()
        registry.load()
        self.assertEqual([j.path for j in group.journals], [outbox._journal.path, registry._journal.path])
        registry.create("t1", {"command": "true"}, state="RUNNING", phase="ended",
                        result={"exit_code": 0, "reason": None, "canceled": False})
        group.flush()
        # A terminal report: the outbox write lands, the agent dies before
        # the registry's.
        outbox.put(lambda seq: ["TASK_STATE", "t1", "DONE", {"seq": seq, "time": 1.0, "exitCode": 0}])
        registry.update("t1", state="DONE", finished=True)
        outbox._journal._write_queued()
        h = Harness(self, state_dir=state_dir)
        h.pump()
        record = h.registry.get("t1")
        self.assertTrue(record["finished"])
        self.assertEqual(record["terminal_seq"], 1)
        # DONE is re-sent as it was (same seq), never reported again.
        self.assertEqual(h.session.sent, [["TASK_STATE", "t1", "DONE", {"seq": 1, "time": 1.0, "exitCode": 0}]])
        self.assertEqual(h.manager.hello_tasks(), ["t1"])

    def test_group_writes_in_order_and_waits_on_failure(self):
        from everest_agent import journal as journal_module
        from everest_agent.journal import CommitGroup, Journal

        clock = Clock()
        base = self.mktemp()
        os.makedirs(base)
        group = CommitGroup(clock)
        first = group.add(Journal(os.path.join(base, "first"), clock))
        second = group.add(Journal(os.path.join(base, "second"), clock))
        d2 = second.append({"b": 1})
        d1 = first.append({"a": 1})
        real = os.fsync
        calls = []

        def fsync(fd):
            calls.append(fd)
            if len(calls) == 1:
                raise OSError(28, "No space left on device")
            return real(fd)

        self.patch(journal_module.os, "fsync", fsync)
        clock.advance(0)
        # The first member failed: the second was not written either.
        self.assertEqual(os.path.getsize(os.path.join(base, "second")) if os.path.exists(os.path.join(base, "second")) else 0, 0)
        self.assertFalse(d1.called or d2.called)
        clock.advance(group.retry_delay)
        self.assertTrue(d1.called and d2.called)


class WaitingLineTests(SynchronousTestCase):
    """
    Tasks with nothing to stage in wait for their slots as entries in the
    pool's line: no worker, no task directory, until their slots are theirs.
    """

    def restart(self, h, handler=None, slots=1):
        h.sender.ack(h.outbox.durable_seq)
        h.stop()
        return Harness(self, state_dir=h.state_dir, slots=slots, handler=handler or FakeTaskHandler())

    def test_waiting_task_holds_no_worker_nor_directory(self):
        h = Harness(self, slots=1)
        h.submit("t1", spec())
        h.submit("t2", spec())
        self.assertEqual(h.states("t2"), ["ACCEPTED", "QUEUED"])
        self.assertEqual(sorted(h.manager.workers), ["t1"])
        self.assertTrue(h.manager.pool.waiting("t2"))
        self.assertFalse(os.path.exists(os.path.join(h.work_dir, "t2")))
        self.assertTrue(h.manager.is_running("t2"))
        self.assertEqual(h.manager.unfinished(), 2)
        # ACCEPTED and QUEUED are in the record, in one update.
        self.assertEqual(h.registry.get("t2")["state"], "QUEUED")
        h.handler.jobs["t1"].finish(0)
        h.pump()
        self.assertEqual(h.states("t2"), ["ACCEPTED", "QUEUED", "RUNNING"])
        self.assertTrue(os.path.isdir(os.path.join(h.work_dir, "t2")))
        self.assertEqual(h.manager.counts(), (1, 0))

    def test_cancel_of_a_waiting_task_is_at_once(self):
        h = Harness(self, slots=1)
        h.submit("t1", spec())
        for n in range(1000):
            h.manager.submit(f"w{n}", spec())
        h.pump()
        self.assertEqual(h.manager.counts(), (1, 1000))
        h.manager.cancel("w500")
        h.pump()
        self.assertEqual(h.states("w500"), ["ACCEPTED", "QUEUED", "CANCELED"])
        self.assertEqual(h.last("w500")[3]["reason"], "canceled")
        self.assertEqual(h.manager.counts(), (1, 999))
        self.assertFalse(h.manager.is_running("w500"))
        self.assertNotIn("w500", h.manager.workers)
        # The others keep their places and still run, in order.
        order = []
        for n in range(1000):
            if n == 500:
                continue
            h.handler.jobs[list(h.handler.jobs)[-1]].finish(0)
            h.pump()
            order.append(list(h.handler.jobs)[-1])
        self.assertEqual(order, [f"w{n}" for n in range(1000) if n != 500])
        self.assertNotIn("w500", h.handler.jobs)
        self.assertEqual(h.states("w500"), ["ACCEPTED", "QUEUED", "CANCELED"])

    def test_cancel_before_the_record_is_on_disk(self):
        h = Harness(self, slots=1)
        h.submit("t1", spec())
        h.manager.submit("t2", spec())
        self.assertTrue(h.manager.is_running("t2"))
        h.manager.cancel("t2")
        h.pump()
        self.assertEqual(h.states("t2"), ["ACCEPTED", "CANCELED"])
        self.assertEqual(h.manager.counts(), (1, 0))
        h.handler.jobs["t1"].finish(0)
        h.pump()
        self.assertNotIn("t2", h.handler.jobs)

    def test_fcfs_with_multi_slot_tasks(self):
        h = Harness(self, slots=3)
        h.submit("a", spec(resourceRequirements={"coresPerNode": 2}))
        h.submit("big", spec(resourceRequirements={"coresPerNode": 3}))
        h.submit("small", spec())  # fits in the free slot, but comes after "big"
        self.assertEqual(h.states("big"), ["ACCEPTED", "QUEUED"])
        self.assertEqual(h.states("small"), ["ACCEPTED", "QUEUED"])
        self.assertNotIn("small", h.handler.jobs)
        h.handler.jobs["a"].finish(0)
        h.pump()
        self.assertIn("big", h.handler.jobs)
        self.assertNotIn("small", h.handler.jobs)
        self.assertEqual(h.manager.counts(), (3, 1))
        h.handler.jobs["big"].finish(0)
        h.pump()
        self.assertIn("small", h.handler.jobs)
        self.assertEqual(h.manager.counts(), (1, 0))

    def test_waiting_and_worker_waits_share_one_line(self):
        """A staged task (a worker waiting) and a lined-up one keep their order."""
        h = Harness(self, slots=1)
        h.submit("t1", spec())
        h.submit("staged", spec(inputs=[{"path": "a", "data": ""}]))
        h.submit("plain", spec())
        self.assertIn("staged", h.manager.workers)
        self.assertNotIn("plain", h.manager.workers)
        h.handler.jobs["t1"].finish(0)
        h.pump()
        self.assertIn("staged", h.handler.jobs)
        self.assertNotIn("plain", h.handler.jobs)
        h.handler.jobs["staged"].finish(0)
        h.pump()
        self.assertIn("plain", h.handler.jobs)

    def test_restart_with_10k_waiting_tasks_resumes_them_in_order(self):
        h = Harness(self, slots=1)
        h.submit("t0", spec())
        ids = [f"q{n:05d}" for n in range(10000)]
        for task_id in ids:
            h.manager.submit(task_id, spec())
        h.pump()
        self.assertEqual(h.manager.counts(), (1, 10000))
        h2 = self.restart(h, slots=1)
        h2.pump()
        # t0's job is found again and takes its slot back before the line moves.
        self.assertEqual(h2.manager.hello_tasks(), sorted(["t0"] + ids))
        self.assertEqual(list(h2.manager.workers), ["t0"])
        self.assertEqual(h2.handler.reattached, [("t0", "101")])
        self.assertEqual(h2.manager.counts(), (1, 10000))
        # Nothing is reported twice: QUEUED was already sent before the restart.
        self.assertEqual(h2.states("q00001"), [])
        order = ["t0"]
        for _ in range(10000):
            h2.handler.jobs[order[-1]].finish(0)
            h2.pump()
            order.append(list(h2.handler.jobs)[-1])
        self.assertEqual(order, ["t0"] + ids)
        h2.handler.jobs[order[-1]].finish(0)
        h2.pump()
        self.assertEqual(h2.manager.counts(), (0, 0))
        self.assertEqual(h2.states("q09999"), ["RUNNING", "DONE"])

    def test_restart_reports_what_a_recorded_task_missed(self):
        """Recorded, but the agent died before its ACCEPTED: sent at the next start."""
        h = Harness(self, slots=1)
        h.submit("t1", spec())
        h.manager.submit("t2", spec())
        h.registry.write_ahead()  # the record reached the file, its ACCEPTED did not
        h.manager.pool.stop()
        h.outbox._journal._queue.clear()
        h2 = Harness(self, state_dir=h.state_dir, slots=0)
        h2.pump()
        self.assertEqual(h2.states("t2"), ["ACCEPTED", "QUEUED"])
        self.assertIn("t2", h2.manager.hello_tasks())
        self.assertNotIn("t2", h2.manager.workers)
        self.assertTrue(h2.manager.pool.waiting("t2"))

    def test_hello_lists_waiting_tasks(self):
        h = Harness(self, slots=1)
        h.submit("t1", spec())
        for n in range(5):
            h.submit(f"w{n}", spec())
        self.assertEqual(h.manager.hello_tasks(), ["t1", "w0", "w1", "w2", "w3", "w4"])

    def test_stopping_grants_no_waiting_task(self):
        h = Harness(self, slots=1)
        h.submit("t1", spec())
        h.submit("t2", spec())
        h.manager.stopService()
        h.pump()
        self.assertEqual(list(h.handler.jobs), ["t1"])
        self.assertEqual(h.states("t2"), ["ACCEPTED", "QUEUED"])

    def test_pool_line_counts_and_withdraws(self):
        granted = []
        pool = SlotPool(2)
        pool.on_grant = lambda task_id, count: granted.append((task_id, count))
        pool.enqueue("a", 2)
        self.assertEqual(granted, [("a", 2)])
        d = pool.acquire(1)
        pool.enqueue("b", 1)
        pool.enqueue("c", 1)
        self.assertEqual((pool.queued, pool.waiting_ids()), (3, ["b", "c"]))
        self.assertTrue(pool.withdraw("b"))
        self.assertFalse(pool.withdraw("b"))
        pool.release(2)
        self.assertTrue(d.called)
        self.assertEqual(granted, [("a", 2), ("c", 1)])
        self.assertEqual((pool.used, pool.queued), (2, 0))

    def test_directories_of_the_next_in_line_are_made_ahead(self):
        h = Harness(self, slots=2)
        for n in range(6):
            h.manager.submit(f"t{n}", spec())
        h.pump()
        self.assertEqual(list(h.handler.jobs), ["t0", "t1"])
        self.assertTrue(os.path.isdir(os.path.join(h.work_dir, "t1")))
        h.handler.jobs["t0"].finish(0)
        h.pump()
        # t2 runs; the two behind it have their directories, the rest not yet.
        self.assertIn("t2", h.handler.jobs)
        made = [n for n in range(3, 6) if os.path.isdir(os.path.join(h.work_dir, f"t{n}"))]
        self.assertEqual(made, [3, 4])
        h.manager.cancel("t3")
        h.pump()
        self.assertEqual(h.states("t3"), ["ACCEPTED", "QUEUED", "CANCELED"])
        self.assertNotIn("t3", h.manager._dirs)
