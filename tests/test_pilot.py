"""
Pilot mode without a scheduler: the agent's pilot handler and the pilot
worker joined by an in-memory link, on a Clock.
"""

import json
import os
import shlex
import struct

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.test.iosim import FakeTransport, connect
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from everest_agent import jobscript
from everest_agent.fsio import StallingFileIO, reactor_thread_guard
from everest_agent.interfaces import IJob, ITaskHandler, JobLost, JobNeverStarted, JobRequest, JobResult
from everest_agent.manager import SlotPool, TaskManager
from everest_agent.outbox import Outbox
from everest_agent.pilot import handler as pilot_handler
from everest_agent.pilot import link as L
from everest_agent.pilot.handler import PilotTaskHandler
from everest_agent.pilot.runner import Pilot
from everest_agent.registry import TaskRegistry
from everest_agent.sender import Sender
from everest_agent.status import _pilot_lines
from everest_agent.testing import FakeSession, FakeStager, FakeTaskHandler


class FakeBatch(Service, FakeTaskHandler):
    """The batch handler pilots are submitted through: its jobs start when the test says."""

    name = "slurm"
    polls = poll_failures = 0
    last_poll_duration = None

    def __init__(self):
        FakeTaskHandler.__init__(self, batch=True)

    def check_requirements(self, requirements):
        pass


class Reactor(Clock):
    """A Clock that 'listens' (the handler only needs the port number)."""

    def listenTCP(self, port, factory, interface=""):
        self.factory = factory

        class Port:
            def getHost(self):
                return type("A", (), {"port": 4242})()

            def stopListening(self):
                return defer.succeed(None)

        return Port()


def frame(*messages):
    data = json.dumps([list(m) for m in messages]).encode()
    return struct.pack("!I", len(data)) + data


class Harness:
    def __init__(self, test, max_tasks=8, cores=2, walltime=3600.0):
        self.test = test
        self.reactor = Reactor()
        self.root = os.path.abspath(test.mktemp())
        os.makedirs(self.root)
        self.batch = FakeBatch()
        self.handler = PilotTaskHandler(
            self.reactor, self.batch, os.path.join(self.root, "state"), max_tasks=max_tasks, max_pilots=2,
            cores=cores, walltime=walltime, idle_timeout=60, listen=("127.0.0.1", 0),
            advertise_address="127.0.0.1", heartbeat=5, connect_timeout=30, lost_timeout=20,
        )
        self.pool = SlotPool(max_tasks, clock=self.reactor)
        self.pool.set_capacity(0)
        self.handler.pool = self.pool
        self.handler.startService()
        self.pumps = []

    def request(self, task_id, **requirements):
        directory = os.path.join(self.root, "tasks", task_id)
        os.makedirs(directory, exist_ok=True)
        return JobRequest(task_id, directory, "true", {}, requirements)

    def record(self, index=0):
        return list(self.handler.pilots.values())[index]

    def connect_pilot(self, record, secret=None):
        """Start the pilot job of C{record} and join a Pilot to the handler."""
        job = self.batch.jobs[f"everest-pilot-{record.pilot_id}"]
        if not job.running.called:
            job.start()
        tasks = FakeTaskHandler()
        pilot = Pilot(self.reactor, "127.0.0.1", 4242, record.pilot_id, secret or record.secret, record.cores,
                      3600.0, handler=tasks, heartbeat=5, exit=lambda: None)
        self.join(pilot)
        return pilot, tasks

    def join(self, pilot):
        agent_side = self.reactor.factory.buildProtocol(None)
        pilot_side = L.Link(pilot, self.reactor, 5)
        pump = connect(agent_side, FakeTransport(agent_side, True), pilot_side, FakeTransport(pilot_side, False))
        self.pumps.append(pump)
        self.settle()
        return pump

    def settle(self):
        for _ in range(6):
            self.reactor.advance(0)
            for pump in self.pumps:
                pump.pump()


class PilotHandlerTests(SynchronousTestCase):
    def test_interfaces(self):
        h = Harness(self)
        verifyObject(ITaskHandler, h.handler)
        d = h.handler.submit(h.request("t1"))
        self.assertFalse(d.called)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(list(h.handler.waiting), [])

    def test_task_through_a_pilot(self):
        h = Harness(self)
        self.assertEqual(h.pool.capacity, 0)
        d = h.handler.submit(h.request("t1"))
        self.assertEqual(len(h.handler.pilots), 1)  # submitted on demand
        record = h.record()
        argv = h.batch.jobs[f"everest-pilot-{record.pilot_id}"].request.command
        self.assertIn("-m everest_agent.pilot", argv)
        self.assertNotIn(record.secret, argv)  # the secret is in a file only
        secret_file = os.path.join(record.directory, "secret")
        self.assertEqual(os.stat(secret_file).st_mode & 0o777, 0o600)
        pilot, tasks = h.connect_pilot(record)
        self.assertEqual(record.state, "running")
        job = self.successResultOf(d)
        verifyObject(IJob, job)
        self.assertEqual(job.job_id, record.job_id)
        self.assertTrue(job.batch)
        h.settle()
        self.assertTrue(job.running.called)
        self.assertEqual(h.pool.capacity, 2)
        tasks.jobs["t1"].finish(3)
        h.settle()
        self.assertEqual(self.successResultOf(job.result), JobResult(3, "exit code 3"))
        self.assertEqual(pilot.unacked, set())  # the agent acknowledged it

    def test_processes_left_by_a_task_reach_the_agent(self):
        """A task whose processes outlived it in the pilot: the agent's job says so (its directory is not used again)."""
        h = Harness(self)
        ds = [h.handler.submit(h.request(f"t{i}")) for i in range(2)]
        pilot, tasks = h.connect_pilot(h.record())
        jobs = [self.successResultOf(d) for d in ds]
        h.settle()
        tasks.jobs["t0"].leftover = True
        for task_id in ("t0", "t1"):
            tasks.jobs[task_id].finish(0)
        h.settle()
        self.assertEqual([job.leftover for job in jobs], [True, False])
        self.assertEqual(self.successResultOf(jobs[0].result), JobResult(0, None))

    def test_one_frame_per_turn(self):
        h = Harness(self)
        ds = [h.handler.submit(h.request(f"t{i}")) for i in range(2)]
        pilot, tasks = h.connect_pilot(h.record())
        link = h.record().link
        sent = link.frames_sent
        for job in [self.successResultOf(d) for d in ds]:
            h.settle()
        for task_id in ("t0", "t1"):
            tasks.jobs[task_id].finish(0)
        h.settle()
        self.assertEqual(link.frames_sent - sent, 1)  # both acks in one frame

    def test_wrong_secret_is_dropped(self):
        h = Harness(self)
        h.handler.submit(h.request("t1"))
        record = h.record()
        for first in [(L.HELLO, {"pilot": record.pilot_id, "secret": "guess"}),
                      (L.RUN, {"task": "x"}),
                      (L.HELLO, {"pilot": "nobody", "secret": record.secret})]:
            link = h.reactor.factory.buildProtocol(None)
            transport = StringTransport()
            link.makeConnection(transport)
            link.dataReceived(frame(first, (L.CANCEL, {"task": "t1"})))
            h.reactor.advance(0)
            self.assertTrue(transport.disconnecting or getattr(transport, "disconnected", False))
            self.assertEqual(transport.value(), b"")  # nothing said to it
        self.assertEqual(h.handler.refused_connections, 3)
        self.assertIsNone(record.link)

    def test_silent_connection_is_dropped(self):
        h = Harness(self)
        link = h.reactor.factory.buildProtocol(None)
        transport = StringTransport()
        link.makeConnection(transport)
        h.reactor.advance(20)
        self.assertTrue(transport.disconnecting)

    def test_impossible_tasks_fail_at_once(self):
        h = Harness(self, cores=2, walltime=600)
        for requirements, words in [({"coresPerNode": 3}, "[pilot] cores"), ({"nodes": 2}, "one node"),
                                    ({"timeLimit": 590}, "walltime")]:
            with self.assertRaises(ValueError) as caught:
                h.handler.slots_needed(requirements)
            self.assertIn(words, str(caught.exception))
        self.assertEqual(h.handler.slots_needed({"coresPerNode": 2, "timeLimit": 100}), 2)

    def test_multi_core_tasks_fit_in_one_pilot(self):
        h = Harness(self)
        first = h.handler.submit(h.request("a"))
        _, tasks_a = h.connect_pilot(h.record())
        self.successResultOf(first)
        wide = h.handler.submit(h.request("wide", coresPerNode=2))
        self.assertFalse(wide.called)  # one core free in pilot A: not enough
        h.handler._scale()
        self.assertEqual(len(h.handler.pilots), 2)
        _, tasks_b = h.connect_pilot(h.record(1))
        job = self.successResultOf(wide)
        self.assertEqual(job.pilot, h.record(1))
        self.assertIn("wide", tasks_b.jobs)

    def test_pilot_loss(self):
        h = Harness(self)
        ds = [h.handler.submit(h.request(t)) for t in ("ran", "done", "unsent")]
        record = h.record()
        pilot, tasks = h.connect_pilot(record)
        ran, done, unsent = [self.successResultOf(d) for d in ds[:2]] + [None]
        self.assertFalse(ds[2].called)  # 2 cores: the third waits
        os.makedirs(os.path.join(ran.request.directory, ".everest"))
        os.makedirs(os.path.join(done.request.directory, ".everest"))
        with open(os.path.join(done.request.directory, ".everest", "exitcode"), "w") as f:
            f.write("5\n")
        h.batch.jobs[f"everest-pilot-{record.pilot_id}"].finish(None, "CANCELLED by someone else")
        h.settle()
        result = self.successResultOf(ran.result)
        self.assertIn(record.job_id, result.reason)
        self.assertIn("CANCELLED", result.reason)
        self.assertEqual(self.successResultOf(done.result).exit_code, 5)
        self.assertEqual(record.state, "ended")
        self.assertEqual([j.task_id for j in h.handler.waiting], ["unsent"])
        self.assertFalse(os.path.exists(os.path.join(record.directory, "secret")))

    def test_task_sent_but_never_received_goes_back(self):
        h = Harness(self)
        first = h.handler.submit(h.request("first"))
        record = h.record()
        pilot, tasks = h.connect_pilot(record)
        self.successResultOf(first)
        d = h.handler.submit(h.request("t"))
        job = self.successResultOf(d)  # sent, not received yet
        # The pilot is lost: "t" never started there (no .everest): back in the queue.
        h.handler._pilot_ended(record, "NODE_FAIL")
        self.assertEqual(list(h.handler.waiting), [job])
        self.assertIsNone(job.job_id)

    def test_link_cut_and_reconnect(self):
        h = Harness(self)
        d = h.handler.submit(h.request("t"))
        record = h.record()
        pilot, tasks = h.connect_pilot(record)
        job = self.successResultOf(d)
        h.settle()
        # Half-open: nothing arrives any more from either side.
        pump = h.pumps.pop()
        for _ in range(3):
            h.reactor.advance(5)
        pump.flush()  # (what was written, then the ends of the connection)
        self.assertEqual(record.state, "away")
        tasks.jobs["t"].finish(0)  # it ends while the link is down
        self.assertIsNone(pilot.link)
        pilot._retry_call.cancel()
        pilot._retry_call = None
        h.join(pilot)  # the pilot reconnects
        self.assertEqual(record.state, "running")
        self.assertEqual(self.successResultOf(job.result).exit_code, 0)
        self.assertEqual(len(tasks.jobs), 1)  # never run twice

    def test_restart_reattach(self):
        h = Harness(self)
        d = h.handler.submit(h.request("t"))
        record = h.record()
        pilot, tasks = h.connect_pilot(record)
        self.successResultOf(d)
        h.settle()
        job_id = record.job_id
        h.handler.stopService()
        # A new agent on the same state: its pilot reconnects and is claimed.
        h2 = Harness.__new__(Harness)
        h2.__dict__.update(h.__dict__)
        h2.batch = FakeBatch()
        h2.handler = PilotTaskHandler(h.reactor, h2.batch, os.path.join(h.root, "state"), max_tasks=8,
                                      max_pilots=2, cores=2, listen=("127.0.0.1", 0),
                                      advertise_address="127.0.0.1", heartbeat=5)
        h2.handler.pool = h2.pool = SlotPool(8, clock=h.reactor)
        h2.pumps = []
        h2.handler.startService()
        self.assertEqual(h2.pool.capacity, 8)  # until the old pilots speak
        again = h2.handler.reattach(h.request("t"), job_id)
        never = h2.handler.reattach(h.request("other"), None)
        self.assertFalse(again.called)
        h2.join(pilot)
        job = self.successResultOf(again)
        self.assertTrue(job.running.called)
        self.failureResultOf(never, JobNeverStarted)
        tasks.jobs["t"].finish(0)
        h2.settle()
        self.assertEqual(self.successResultOf(job.result).exit_code, 0)
        self.assertEqual(h2.pool.capacity, 2)

    def test_idle_pilot_is_told_to_stop(self):
        h = Harness(self)
        d = h.handler.submit(h.request("t"))
        pilot, tasks = h.connect_pilot(h.record())
        self.successResultOf(d)
        h.settle()
        tasks.jobs["t"].finish(0)
        h.settle()
        for _ in range(61):
            h.reactor.advance(1)
            h.settle()
        self.assertTrue(pilot.ended)

    def test_never_connects(self):
        h = Harness(self)
        h.handler.submit(h.request("t"))
        record = h.record()
        h.batch.jobs[f"everest-pilot-{record.pilot_id}"].start()
        h.reactor.advance(31)
        self.assertIn("never connected back", record.end_reason)
        self.assertTrue(h.batch.jobs[f"everest-pilot-{record.pilot_id}"].canceled)
        self.assertEqual(h.handler.unreachable, 1)
        h.handler._scale()
        self.assertEqual(len(h.handler.pilots), 1)  # backing off
        lines = _pilot_lines({"pilots": {"pilots": [], "unreachable": 1, "address": "x:1"}})
        self.assertIn("never connected back", lines[-1])


class ManagedHarness(Harness):
    """The pilot handler under a real TaskManager (registry, outbox, sender), on the same Clock."""

    def __init__(self, test, **kwargs):
        super().__init__(test, **kwargs)
        state = os.path.join(self.root, "agent")
        os.makedirs(state)
        self.outbox = Outbox(state, self.reactor, fsync=False)
        self.outbox.load()
        self.registry = TaskRegistry(state, self.reactor, fsync=False)
        self.registry.load()
        self.sender = Sender(self.outbox, self.reactor, wallclock=lambda: 1000.0)
        self.manager = TaskManager(self.registry, self.sender, self.handler, FakeStager(),
                                   os.path.join(self.root, "work"), self.handler.max_tasks,
                                   wallclock=self.reactor.seconds)
        self.pool = self.handler.pool = self.manager.pool
        self.pool.set_capacity(0)
        self.session = FakeSession()
        self.sender.welcomed(self.session, 0)
        self.manager.startService()
        test.addCleanup(self.outbox.stop)

    def submit(self, task_id, **requirements):
        self.manager.submit(task_id, {"command": "true", "resourceRequirements": requirements})
        self.settle()
        self.handler._scale()  # (its timer's work, at once)

    def states(self, task_id):
        return self.session.states(task_id)


class CancelWhileWaitingForAPilotTests(SynchronousTestCase):
    """A task holding agent slots while no pilot has room for it: a cancel ends it at once."""

    def two_half_full_pilots(self):
        h = ManagedHarness(self)
        h.submit("a")
        h.submit("c")
        pilot1, tasks1 = h.connect_pilot(h.record())
        h.settle()
        h.submit("b")  # pilot 1 is full: a second pilot is submitted for it
        self.assertEqual(len(h.handler.pilots), 2)
        pilot2, tasks2 = h.connect_pilot(h.record(1))
        h.settle()
        tasks1.jobs["c"].finish(0)
        h.settle()
        self.assertEqual(h.states("c")[-1], "DONE")
        self.assertEqual([h.record(i).free for i in (0, 1)], [1, 1])
        return h, (tasks1, tasks2), (pilot1, pilot2)

    def test_cancel_of_a_task_waiting_for_room_in_a_pilot(self):
        h, tasks, _ = self.two_half_full_pilots()
        h.submit("wide", coresPerNode=2)
        # Four slots, two used: "wide" holds two, but neither pilot has two free cores.
        self.assertEqual(h.pool.used, 4)
        self.assertEqual([j.task_id for j in h.handler.waiting], ["wide"])
        self.assertEqual(h.states("wide"), ["ACCEPTED"])
        frames = [h.record(i).link.frames_sent for i in (0, 1)]
        h.manager.cancel("wide")
        h.settle()
        self.assertEqual(h.states("wide"), ["ACCEPTED", "CANCELED"])  # at once, not when placed
        self.assertEqual(list(h.handler.waiting), [])
        self.assertEqual(h.pool.used, 2)  # its slots are back
        self.assertEqual([h.record(i).link.frames_sent for i in (0, 1)], frames)  # no pilot told
        self.assertEqual([h.record(i).free for i in (0, 1)], [1, 1])
        for t in tasks:
            self.assertNotIn("wide", t.jobs)
        # The pilots go on: "a" and "b" end as they would have.
        tasks[0].jobs["a"].finish(0)
        tasks[1].jobs["b"].finish(4)
        h.settle()
        self.assertEqual((h.states("a")[-1], h.states("b")[-1]), ("DONE", "FAILED"))

    def test_cancel_of_a_task_back_in_the_queue(self):
        h, tasks, pilots = self.two_half_full_pilots()
        h.submit("wide", coresPerNode=2)
        job = h.handler.waiting[0]
        # It is sent once pilot 1 has room, and refused: that pilot's end is near.
        pilots[0].draining = True
        tasks[0].jobs["a"].finish(0)
        h.settle()
        self.assertEqual(h.record(0).state, "draining")
        self.assertNotIn("wide", tasks[0].jobs)
        self.assertEqual(list(h.handler.waiting), [job])
        self.assertIsNone(job.pilot)
        frames = [h.record(i).link.frames_sent for i in (0, 1)]
        h.manager.cancel("wide")
        h.settle()
        self.assertEqual(h.states("wide")[-1], "CANCELED")
        self.assertNotIn("RUNNING", h.states("wide"))
        self.assertEqual(list(h.handler.waiting), [])
        self.assertEqual([h.record(i).link.frames_sent for i in (0, 1)], frames)


class LostPilotReadsTests(SynchronousTestCase):
    """What a lost pilot's tasks left is read in the file-system threads, one hop per loss."""

    def setUp(self):
        self.h = h = Harness(self)
        self.files = StallingFileIO(h.reactor, delay=None)
        h.handler.use_files(self.files)
        guard = reactor_thread_guard(self.files)
        self.patch(pilot_handler.jobscript, "read_exit_code", guard(jobscript.read_exit_code))
        self.patch(pilot_handler.os.path, "isdir", guard(os.path.isdir))

    def test_one_hop_for_the_tasks_of_one_loss(self):
        h = self.h
        ds = [h.handler.submit(h.request(t)) for t in ("ran", "done", "unsent")]
        record = h.record()
        h.connect_pilot(record)
        ran, done = [self.successResultOf(d) for d in ds[:2]]
        for job in (ran, done):
            os.makedirs(os.path.join(job.request.directory, ".everest"))
        with open(os.path.join(done.request.directory, ".everest", "exitcode"), "w") as f:
            f.write("5\n")
        h.handler._pilot_ended(record, "NODE_FAIL")
        self.assertEqual(self.files.pending, 1)  # one hop for every task of the loss
        self.assertFalse(ran.result.called or done.result.called)
        self.files.release()
        self.assertEqual(self.files.calls, 1)
        self.assertIn(f"batch job {record.job_id}", self.successResultOf(ran.result).reason)
        self.assertEqual(self.successResultOf(done.result).exit_code, 5)
        # "unsent" never reached a pilot; it waits for the next one.
        self.assertEqual([j.task_id for j in h.handler.waiting], ["unsent"])

    def test_task_sent_not_started_back_first_in_the_queue(self):
        h = self.h
        first = h.handler.submit(h.request("first"))
        record = h.record()
        h.connect_pilot(record)
        first = self.successResultOf(first)
        sent = self.successResultOf(h.handler.submit(h.request("sent")))
        later = h.handler.submit(h.request("later"))  # no room: it waits
        h.handler._pilot_ended(record, "NODE_FAIL")
        self.files.release()
        # "first" had started: it fails; "sent" goes back ahead of "later".
        self.assertIn("ended under it", self.successResultOf(first.result).reason)
        self.assertEqual([j.task_id for j in h.handler.waiting], ["sent", "later"])
        self.assertIsNone(sent.job_id)
        self.assertFalse(later.called)

    def test_failed_hop_fails_the_running_tasks(self):
        h = self.h
        d = h.handler.submit(h.request("t"))
        record = h.record()
        h.connect_pilot(record)
        job = self.successResultOf(d)
        job.mark_started()
        self.patch(pilot_handler, "read_task_ends", lambda directories: 1 / 0)
        h.handler._pilot_ended(record, "NODE_FAIL")
        self.files.release()
        self.assertIn(f"batch job {record.job_id}", self.successResultOf(job.result).reason)
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_restart_reads_through_the_seam(self):
        h = self.h
        task = h.request("gone")
        os.makedirs(os.path.join(task.directory, ".everest"))
        with open(os.path.join(task.directory, ".everest", "exitcode"), "w") as f:
            f.write("3\n")
        found = h.handler.reattach(task, "999")  # a pilot job this agent never had
        never = h.handler.reattach(h.request("never"), None)
        h.reactor.advance(0)
        self.assertFalse(found.called or never.called)
        self.assertEqual(self.files.pending, 1)  # both in one hop (one reactor turn)
        self.files.release()
        job = self.successResultOf(found)
        self.assertEqual(self.successResultOf(job.result), JobResult(3, "exit code 3"))
        self.failureResultOf(never, JobNeverStarted)

    def test_readied_but_never_begun_is_not_lost(self):
        """A pilot lost between readying a task's directory and its spawn: the task starts again."""
        from everest_agent import spares

        h = self.h
        readied, marked = h.request("readied"), h.request("marked")
        for task in (readied, marked):
            for fd in spares.open_for_spawn(task.directory):
                os.close(fd)
        with open(os.path.join(marked.directory, ".everest", "exitcode"), "w") as f:
            f.write("    started")  # what the wrapper writes before the command
        never = h.handler.reattach(readied, "999")
        lost = h.handler.reattach(marked, "999")
        h.reactor.advance(0)
        self.files.release()
        self.failureResultOf(never, JobNeverStarted)
        self.failureResultOf(lost, JobLost)

    def test_damaged_exit_code_file(self):
        h = self.h
        task = h.request("bad")
        os.makedirs(os.path.join(task.directory, ".everest"))
        with open(os.path.join(task.directory, ".everest", "exitcode"), "w") as f:
            f.write("not a number\n")
        d = h.handler.reattach(task, "999")
        h.reactor.advance(0)
        self.files.release()
        self.assertIn("damaged", self.failureResultOf(d, JobLost).getErrorMessage())


class PilotWorkerTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.tasks = FakeTaskHandler()
        self.pilot = Pilot(self.clock, "h", 1, "p1", "s", 2, 600.0, handler=self.tasks, exit=lambda: None)
        self.sent = []
        self.pilot.link = type("Link", (), {"send": lambda _, kind, fields=None: self.sent.append((kind, fields))})()
        self.pilot.welcomed = True

    def run_task(self, task_id, **requirements):
        self.pilot.msg_run({"task": task_id, "directory": "/nonexistent", "command": "true",
                            "requirements": requirements})
        return self.sent[-1]

    def test_never_runs_a_task_twice(self):
        self.assertEqual(self.run_task("t")[0], L.STARTED)
        self.assertEqual(self.run_task("t")[0], L.STARTED)
        self.tasks.jobs["t"].finish(0)
        self.assertEqual(self.run_task("t"), (L.ENDED, {"task": "t", "result": [0, None, False]}))
        self.assertEqual(len(self.tasks.jobs), 1)

    def test_refuses_what_does_not_fit(self):
        self.assertIn("walltime", self.run_task("long", timeLimit=590)[1]["reason"])
        self.assertEqual(self.run_task("wide", coresPerNode=2)[0], L.STARTED)
        self.assertIn("free cores", self.run_task("more")[1]["reason"])
        self.clock.advance(600 - 60)
        self.assertEqual(self.sent[-1][0], L.DRAINING)
        self.tasks.jobs["wide"].finish(0)
        self.assertIn("ending", self.run_task("late")[1]["reason"])

    def test_processes_left_are_told_in_the_fourth_item(self):
        self.run_task("t")
        self.tasks.jobs["t"].leftover = True
        self.tasks.jobs["t"].finish(0)
        self.assertEqual(self.sent[-1], (L.ENDED, {"task": "t", "result": [0, None, False, True]}))

    def test_outcomes_offered_again_until_acknowledged(self):
        self.run_task("t")
        self.tasks.jobs["t"].finish(2)
        hello = []
        self.pilot.link_made(type("Link", (), {"send": lambda _, kind, fields=None: hello.append(fields)})())
        self.assertEqual(hello[0]["finished"], {"t": [2, "exit code 2", False]})
        self.pilot.msg_ack({"tasks": ["t"]})
        self.assertEqual(self.pilot.unacked, set())

    def test_gives_up_without_an_agent_once_idle(self):
        self.pilot.link = None
        self.pilot.welcomed = False
        self.pilot.reconnect_for = 10
        self.clock.advance(11)
        self.pilot._retry()
        self.assertTrue(self.pilot.ended)

    def test_a_second_sigterm_does_not_stop_the_reactor_again(self):
        from everest_agent.pilot.runner import TermOnce

        stops = []
        handler = TermOnce(type("Reactor", (), {"sigTerm": lambda _, number, frame: stops.append(number)})())
        handler(15, None)  # the scheduler's
        handler(15, None)  # the guard's, forwarded
        self.assertEqual((stops, handler.received), ([15], 2))


class SlotPoolCapacityTests(SynchronousTestCase):
    def test_raised_capacity_grants(self):
        pool = SlotPool(0)
        d = pool.acquire(2)
        self.assertFalse(d.called)
        pool.set_capacity(1)
        self.assertFalse(d.called)
        pool.set_capacity(2)
        self.assertEqual(self.successResultOf(d), 2)
        pool.set_capacity(0)  # lowered: held slots stay held
        self.assertEqual(pool.used, 2)


class CheckLineTests(SynchronousTestCase):
    def config(self, **pilot):
        from types import SimpleNamespace

        state_dir = os.path.abspath(self.mktemp())
        os.makedirs(state_dir)
        values = dict(python="", advertise_address="127.0.0.1", max_pilots=2, cores=2)
        values.update(pilot)
        return SimpleNamespace(pilot=SimpleNamespace(**values),
                               agent=SimpleNamespace(hostname="localhost", state_dir=state_dir))

    def test_check_line(self):
        from everest_agent.check import check_pilot
        from everest_agent.status import StatusFile

        config = self.config()
        self.assertTrue(check_pilot(config).ok)
        self.assertFalse(check_pilot(self.config(python="/nonexistent/python")).ok)
        bad = check_pilot(self.config(advertise_address="no-such-host.invalid"))
        self.assertFalse(bad.ok)
        self.assertIn("does not resolve", bad.message)
        status = StatusFile(config.agent.state_dir, "ws://x")
        status.data["pilots"] = {"pilots": [], "unreachable": 2, "address": "10.0.0.1:7"}
        status.write()
        result = check_pilot(config)
        self.assertFalse(result.ok)
        self.assertIn("never connected back to 10.0.0.1:7", result.message)


class GuardCommandTests(SynchronousTestCase):
    """The pilot's job command: the worker under its guard (everest_agent.pilot.guard)."""

    def test_job_command_execs_the_guard_over_the_worker(self):
        h = Harness(self)
        h.handler.submit(h.request("t"))
        record = h.record()
        command = h.batch.jobs[f"everest-pilot-{record.pilot_id}"].request.command
        argv = shlex.split(command)
        self.assertEqual(argv[0], "exec")  # the guard is the job's process, not a child of a shell
        self.assertEqual(argv[1:7], [h.handler.python, "-m", "everest_agent.pilot.guard",
                                     "--grace", f"{h.handler.kill_grace:g}", "--"])
        self.assertEqual(argv[7:10], [h.handler.python, "-m", "everest_agent.pilot"])
        self.assertEqual(argv[argv.index("--pilot-id") + 1], record.pilot_id)

    def test_the_pilot_imports_the_agents_own_package(self):
        """Whatever the scheduler passes the job (Grid Engine: nothing), the agent's package first."""
        import everest_agent

        self.patch(os, "environ", dict(os.environ, PYTHONPATH="/site/extra"))
        h = Harness(self)
        h.handler.submit(h.request("t"))
        request = h.batch.jobs[f"everest-pilot-{h.record().pilot_id}"].request
        here = os.path.dirname(os.path.dirname(os.path.abspath(everest_agent.__file__)))
        self.assertEqual(request.environment["PYTHONPATH"].split(os.pathsep), [here, "/site/extra"])

    def test_another_python_keeps_its_own_packages(self):
        h = Harness(self)
        h.handler.python = "/opt/other/bin/python3"
        h.handler.submit(h.request("t"))
        request = h.batch.jobs[f"everest-pilot-{h.record().pilot_id}"].request
        self.assertNotIn("PYTHONPATH", request.environment)
