"""
The fault-injection suite of issue 5.

Whatever dies (the connection, the platform, the agent process, the disk's
free space, the scheduler's commands), every accepted task must reach
exactly one terminal state on the platform, with its real exit code and its
outputs byte for byte, and nothing may run twice.  Each scenario runs the
agent as a real process (C{twistd everest-agent}) behind a L{ChaosProxy},
with the reference platform in this process, and ends with L{check}: one
row of the table printed at the end of the run (and written to
C{_trial_temp/fault-table.txt}): scenario, tasks, lost, duplicated, wrong.

Phases are targeted by holding a task in them: C{STAGING_IN} by an input
whose server holds the request, C{QUEUED} by a full agent (local, a
blocker task) or a held job (SLURM, C{sbatch --hold}), C{RUNNING} by a
command waiting for a gate file, C{STAGING_OUT} by an upload endpoint that
holds the request, "terminal state in the outbox but not acknowledged" by
a platform that sends no C{ACK}.  C{ACCEPTED} is hit by killing the agent
(or cutting its connection) in the very reactor turn in which the
platform applies the C{ACCEPTED} report.
"""

import errno
import hashlib
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
import uuid

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError
from twisted.trial.unittest import SkipTest, TestCase

from everest_agent import protocol as P
from everest_agent.platform import NotConnected
from tests.support import TOKEN as TOKEN_OF_AGENT, none_left
from tests.faults import (
    AgentProcess,
    ChaosProxy,
    Expect,
    HoldServer,
    PlatformHandle,
    Row,
    SeqRecorder,
    TaskFactory,
    check,
    qdel_prefix,
    durable_seqs,
    eventually,
    kill_marked,
    make_scheduler_wrappers,
    read_outbox,
    read_registry,
    record,
    scancel_prefix,
    sleep,
    slurm_problem,
    unique_prefix,
    with_timeout,
    write_agent_ini,
)

SLURM_PROBLEM = slurm_problem()

ACCEPTED, STAGING_IN, QUEUED, RUNNING, STAGING_OUT = "ACCEPTED", "STAGING_IN", "QUEUED", "RUNNING", "STAGING_OUT"
TERMINAL_UNACKED = "TERMINAL_UNACKED"


class _Held:
    """Tasks held in one phase: what to submit, when they are there, how to let go."""

    def __init__(self, phase, made, ready, release, first=None, while_down=None):
        self.phase = phase
        self.made = made  # [(task_id, spec, Expect)]
        self.ready = ready
        self.release = release
        self.first = first or made[0][0]
        self.while_down = while_down  # called while the agent is away (RUNNING)

    def ready_or_fail(self, plat):
        """C{ready()}, but a held task that ended already fails the test at once."""
        if self.phase != TERMINAL_UNACKED:
            ended = [t for t, _, _ in self.made if plat.terminal(t)]
            if ended:
                why = [(plat.task(t).state, (plat.task(t).info or {}).get("reason")) for t in ended]
                raise AssertionError(f"{ended} ended before they could be held in {self.phase}: {why}")
        return self.ready()

    @property
    def expectations(self):
        return [e for _, _, e in self.made]


class FaultScenario(TestCase):
    """
    Plumbing for one scenario: a platform, a proxy, a hold server, the
    agent process, and the verdict.
    """

    timeout = 120
    handler_type = "local"
    #: How a batch job is submitted held, and released (the QUEUED phase).
    hold_args = "--hold"
    release_argv = ["scontrol", "release"]
    pilot_mode = False  # tasks run in pilot jobs ([pilot] enabled)

    @property
    def label(self):
        """How the table names this scenario's back end."""
        return f"{self.handler_type} pilots" if self.pilot_mode else self.handler_type
    #: Factor for waits that depend on a batch scheduler (a busy one is slow).
    patience = 1

    async def setUp(self):
        self.started = time.monotonic()
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(self.root)
        self.prefix = unique_prefix()
        self.mark = uuid.uuid4().hex
        self.hold = HoldServer().start()
        # File URLs go through the proxy too: same origin as the WebSocket
        # URL, so the agent sends its token with them.
        self.proxy = ChaosProxy(0).start()
        self.plat = PlatformHandle(self.root, public_url=self.proxy.http_url())
        await self.plat.start()
        self.proxy.retarget(self.plat.port)
        self.tasks = TaskFactory(self.root, self.prefix, self.plat, self.hold)
        self.agent = None
        self.state_dir = os.path.join(self.root, "state")
        self.env_extra = {}
        self.path_prefix = None
        self.mounted = None
        self.addCleanup(self._cleanup)

    async def _cleanup(self):
        if self.agent is not None and self.agent.alive:
            try:
                await self.agent.kill9()
            except Exception:
                pass
        kill_marked(self.mark)
        if self.handler_type == "slurm":
            scancel_prefix(self.prefix)
        self.hold.release_all()
        await self.proxy.stop()
        await self.hold.stop()
        await self.plat.close()
        if self.mounted:
            subprocess.run(["umount", "-l", self.mounted], capture_output=True)

    # -- the agent ------------------------------------------------------------

    def agent_env(self):
        env = dict(os.environ)
        env["EVEREST_FAULTS_MARK"] = self.mark
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        if self.path_prefix:
            env["PATH"] = self.path_prefix + os.pathsep + env.get("PATH", os.defpath)
        env.update(self.env_extra)
        return env

    async def start_agent(self, sections=None):
        ini = write_agent_ini(self.root, self.proxy.url(), self.handler_type, sections)
        self.agent = AgentProcess(ini, os.path.join(self.root, "agent.log"), self.agent_env(), self.root)
        self.agent.start()
        await self.connected()
        return self.agent

    def diagnose(self):
        lines = []
        platform = self.plat.platform
        if platform is not None:
            for task_id in self.tasks.task_ids:
                task = platform.tasks.get(task_id)
                lines.append(
                    f"  {task_id}: {task.states if task else None} info={task.info if task else None} "
                    f"runs={self.tasks.runs_of(task_id)}"
                )
            lines.append(f"  platform agent: {platform.agent()!r}; violations {platform.violations}")
        lines.append(f"  proxy: accepted {self.proxy.accepted}, refused {self.proxy.refused}, "
                     f"live {len(self.proxy.live)}")
        lines.append(f"  agent outbox (last, acked, pending seqs): {self._outbox_summary()}")
        if self.agent is not None:
            lines.append(f"  agent alive {self.agent.alive}, starts {self.agent.starts}, exits {self.agent.exits}")
            lines.append(self.agent.log_tail())
        return "\n".join(lines)

    def _outbox_summary(self):
        last, acked, pending = read_outbox(self.state_dir)
        return last, acked, sorted(pending)

    async def connected(self, timeout=30):
        await eventually(lambda: self.plat.platform is not None and self.plat.platform.connected(),
                         timeout=timeout, what="the agent to connect", diagnose=self.diagnose)

    async def disconnected(self, timeout=15):
        await eventually(lambda: self.plat.platform is None or not self.plat.platform.connected(),
                         timeout=timeout, what="the platform to see the agent go", diagnose=self.diagnose)

    async def kill9(self):
        await self.agent.kill9()
        self.keep_state()
        await self.disconnected()

    def keep_state(self):
        """A copy of the state directory as the kill left it (for post-mortems), in C{state-after-kill-N}."""
        import shutil

        target = os.path.join(self.root, f"state-after-kill-{len(self.agent.exits)}")
        try:
            shutil.copytree(self.state_dir, target, ignore=shutil.ignore_patterns("filler", "lock"))
        except OSError:
            pass

    async def restart_agent(self):
        if self.agent.alive:
            await self.kill9()
        self.agent.start()
        await self.connected()

    def kill_on(self, task_id, state):
        """SIGKILL the agent in the reactor turn in which the platform applies C{state}."""
        d = self.plat.platform.wait_for(task_id, state)
        d.addCallbacks(lambda _: self.agent.kill9_now(), lambda f: None)

    # -- tasks ----------------------------------------------------------------

    def submit(self, made):
        for task_id, spec, _ in made:
            self.plat.platform.submit(spec, task_id=task_id)

    async def wait_reached(self, task_ids, state, timeout=30):
        await eventually(lambda: all(self.plat.reached(t, state) for t in task_ids), timeout=timeout,
                         what=f"{', '.join(task_ids)} to reach {state}", diagnose=self.diagnose)

    async def wait_agent_finished(self, task_ids, timeout=30):
        """Until the agent has each task's terminal report durably in its outbox."""

        def finished():
            records = read_registry(self.state_dir)
            return all(records.get(t, {}).get("terminal_seq") is not None for t in task_ids)

        await eventually(finished, timeout=timeout, what="the agent to finish the tasks on its own",
                         diagnose=self.diagnose)

    def held(self, phase, count=2, exit_codes=None):
        """Make C{count} tasks that will be held in C{phase}."""
        codes = list(exit_codes or [0, 3, 0, 5][:count])
        tasks, hold = self.tasks, self.hold
        if phase in (ACCEPTED, STAGING_IN):
            made = [tasks.make(phase[:3].lower(), exit_code=c, hold_input=True) for c in codes]
            ids = [m[0] for m in made]

            def ready():
                return all(self.plat.reached(t, STAGING_IN) and hold.holding("GET", t) for t in ids)

            def release():
                for t in ids:
                    hold.release(t)

            return _Held(phase, made, ready, release)
        if phase == QUEUED:
            if self.handler_type == "local" or self.pilot_mode:
                blocker = tasks.make("blk", gate=True)
                made = [blocker] + [tasks.make("que", exit_code=c) for c in codes]
                ids = [m[0] for m in made[1:]]

                def ready():
                    return self.plat.reached(blocker[0], RUNNING) and all(self.plat.state(t) == QUEUED for t in ids)

                return _Held(phase, made, ready, lambda: tasks.open_gate(blocker[0]))
            made = [tasks.make("que", exit_code=c) for c in codes]
            ids = [m[0] for m in made]

            def job_ids():
                return [(self.plat.task(t).info or {}).get("jobId") for t in ids]

            def ready():
                return all(self.plat.state(t) == QUEUED for t in ids) and all(job_ids())

            def release():
                subprocess.run(self.release_argv + [j for j in job_ids() if j], capture_output=True, timeout=30)

            return _Held(phase, made, ready, release)
        if phase == RUNNING:
            made = [tasks.make("run", exit_code=c, gate=True) for c in codes]
            ids = [m[0] for m in made]
            half = ids[len(ids) // 2:]

            def ready():
                return all(self.plat.reached(t, RUNNING) and tasks.runs_of(t) == 1 for t in ids)

            def release():
                for t in ids:
                    tasks.open_gate(t)

            async def while_down():
                # Half of them end while the agent is away: their real exit
                # codes must still reach the platform.
                for t in half:
                    tasks.open_gate(t)
                await eventually(lambda: all(tasks.ended(t) for t in half), what="tasks to end while the agent is away")
                await sleep(0.3)  # let their processes be gone, not just done writing

            return _Held(phase, made, ready, release, while_down=while_down)
        if phase == STAGING_OUT:
            made = [tasks.make("out", exit_code=c, hold_output=True) for c in codes]
            ids = [m[0] for m in made]

            def ready():
                return all(self.plat.reached(t, STAGING_OUT) and hold.holding("PUT", t) for t in ids)

            def release():
                for t in ids:
                    hold.release(t)

            return _Held(phase, made, ready, release)
        if phase == TERMINAL_UNACKED:
            made = [tasks.make("ter", exit_code=c) for c in codes]
            ids = [m[0] for m in made]
            # No ACK, and WELCOME too says nothing new arrived: after the
            # restart the agent re-sends everything; the platform must drop
            # it all by seq.
            self.plat.platform.pause_acks(welcome=True)

            def ready():
                return all(self.plat.terminal(t) for t in ids)

            return _Held(phase, made, ready, lambda: self.plat.platform.resume_acks())
        raise ValueError(phase)

    def phase_sections(self, phase):
        if phase == QUEUED:
            if self.handler_type == "local" or self.pilot_mode:
                return {"agent": {"max_tasks": "1"}}
            return {"handler": {"extra_args": self.hold_args}}
        return None

    # -- the verdict ------------------------------------------------------------

    async def finish(self, scenario, expectations, timeout=60, ignore_unknown_prefix=None, require_clean_log=True,
                     note=""):
        """Wait for every task and for every report to be acknowledged; record the row; fail unless clean."""
        ids = [e.task_id for e in expectations]
        try:
            await eventually(lambda: all(self.plat.terminal(t) for t in ids), timeout=timeout * self.patience,
                             what="every task to reach a terminal state", diagnose=self.diagnose)
            await eventually(self._all_acked, timeout=20, what="the agent's outbox to be fully acknowledged",
                             diagnose=self.diagnose)
        except AssertionError as e:
            row = check(scenario, self.plat, expectations, self.tasks, ignore_unknown_prefix=ignore_unknown_prefix)
            row.seconds = time.monotonic() - self.started
            if row.clean:
                row.wrong += 1
                row.details.append(str(e).splitlines()[0])
            record(row)
            raise
        last_seq = read_outbox(self.state_dir)[0]
        row = check(scenario, self.plat, expectations, self.tasks, agent_last_seq=last_seq,
                    ignore_unknown_prefix=ignore_unknown_prefix)
        row.seconds = time.monotonic() - self.started
        row.note = note
        record(row)
        problems = []
        if not row.clean:
            problems.append("\n".join(row.details))
        if self.handler_type != "local":
            # The scenario really went through the batch scheduler.
            no_job = [e.task_id for e in expectations
                      if min(e.runs) >= 1 and not all(self.tasks.run_job_ids(e.task_id))]
            if no_job:
                problems.append(f"ran outside a batch job: {no_job}")
        if require_clean_log and self.agent is not None:
            for needle in ("Unexpected error", "Unhandled Error", "Unhandled error in Deferred", "Traceback"):
                if needle in self.agent.log_text():
                    problems.append(f"the agent's log has {needle!r}")
        if problems:
            self.fail(f"{scenario}: " + "\n".join(problems) + "\n" + self.diagnose())
        return row

    def _all_acked(self):
        platform = self.plat.platform
        if platform is None or not platform.connected():
            return False
        last, acked, pending = read_outbox(self.state_dir)
        return not pending and platform.agent().last_seq == last

    # -- generic scenarios ------------------------------------------------------

    async def kill9_in(self, phase):
        """kill -9 of the agent while tasks are held in C{phase}, then a restart."""
        await self.start_agent(self.phase_sections(phase))
        held = self.held(phase, count=4 if phase == RUNNING else 2)
        self.submit(held.made)
        if phase == ACCEPTED:
            self.kill_on(held.first, ACCEPTED)
            await self.agent.wait_exit(timeout=30)
            self.keep_state()
            await self.disconnected()
        else:
            await eventually(lambda: held.ready_or_fail(self.plat), timeout=45 * self.patience,
                             what=f"the tasks to be held in {phase}", diagnose=self.diagnose)
            await self.kill9()
        if held.while_down is not None:
            await held.while_down()
        await self.restart_agent()
        held.release()
        name = "in " + (phase if phase != TERMINAL_UNACKED else "terminal-in-outbox-before-ACK")
        await self.finish(f"{self.label}: kill -9 {name}", held.expectations)
        if phase == TERMINAL_UNACKED:
            self.assertGreater(self.plat.recorder.dropped, 0, "the platform dropped no re-sent report")


    async def cancel_and_kill9(self):
        """
        A cancel goes out and the agent dies in the same instant; more
        cancels arrive while it is away.  After the restart every canceled
        task is CANCELED once, and its process is really gone.
        """
        local = self.handler_type == "local"
        await self.start_agent({"agent": {"max_tasks": "2"}} if local else None)
        made = [self.tasks.make("cnl", gate=True) for _ in range(3 if local else 2)]
        self.submit(made)
        ids = [m[0] for m in made]
        running, queued = ids[:2], ids[2:]
        await eventually(lambda: all(self.plat.reached(t, RUNNING) and self.tasks.runs_of(t) for t in running)
                         and all(self.plat.state(t) == QUEUED for t in queued), timeout=45 * self.patience,
                         what="two tasks running (and one queued)", diagnose=self.diagnose)
        self.plat.platform.cancel(running[0])
        self.agent.kill9_now()
        await self.agent.wait_exit()
        await self.disconnected()
        for t in ids[1:]:
            self.plat.platform.cancel(t)
        self.agent.start()
        await self.connected()
        await eventually(lambda: all(self.plat.terminal(t) for t in ids), timeout=45 * self.patience,
                         what="the cancels",
                         diagnose=self.diagnose)
        for t in ids:
            self.tasks.open_gate(t)
        await sleep(0.5)  # a process that survived its cancel would now end
        survivors = [t for t in ids if self.tasks.ended(t)]
        expectations = [Expect(t, ("CANCELED",), None, runs=(1,) if t in running else (0,), check_exit=False)
                        for t in ids]
        await self.finish(f"{self.label}: cancel, kill -9 at once, more cancels while down",
                          expectations)
        self.assertEqual(survivors, [], "a canceled task's process kept running")

    async def kill_storm(self, kills=8, seed=5):
        """
        kill -9 at random moments (seeded; C{EVEREST_FAULTS_SEED} picks
        another seed), over and over, while tasks go through every phase:
        a crash at any point of the agent's work, its start included.
        """
        import random

        seed = int(os.environ.get("EVEREST_FAULTS_SEED", seed))
        rng = random.Random(seed)
        await self.start_agent()
        made = [self.tasks.make("storm", exit_code=c, http_input=True, seconds=0.3) for c in (0, 1, 0, 2, 0, 3)]
        self.submit(made)
        for _ in range(kills):
            await sleep(rng.uniform(0.05, 0.7))
            await self.kill9()
            self.agent.start()
        await self.connected()
        await self.finish(f"{self.label}: {kills} kill -9 at random moments (seed {seed})",
                          [e for _, _, e in made])


class LocalKillTests(FaultScenario):
    """kill -9 of the agent in each phase of a local task, then a restart."""

    def test_kill9_accepted(self):
        return defer.Deferred.fromCoroutine(self.kill9_in(ACCEPTED))

    def test_kill9_staging_in(self):
        return defer.Deferred.fromCoroutine(self.kill9_in(STAGING_IN))

    def test_kill9_queued(self):
        return defer.Deferred.fromCoroutine(self.kill9_in(QUEUED))

    def test_kill9_running(self):
        return defer.Deferred.fromCoroutine(self.kill9_in(RUNNING))

    def test_kill9_staging_out(self):
        return defer.Deferred.fromCoroutine(self.kill9_in(STAGING_OUT))

    def test_kill9_terminal_unacked(self):
        return defer.Deferred.fromCoroutine(self.kill9_in(TERMINAL_UNACKED))

    async def test_kill9_races_the_start(self):
        """
        kill -9 in the turn ACCEPTED arrives, for tasks with nothing to
        stage: the agent dies somewhere between recording the task and
        starting its process (phases new, staged, submitting, submitted).
        """
        await self.start_agent()
        made = [self.tasks.make("race", exit_code=c) for c in (0, 2, 0, 4)]
        self.submit(made)
        self.kill_on(made[-1][0], ACCEPTED)
        await self.agent.wait_exit(timeout=30)
        self.keep_state()
        await self.disconnected()
        await self.restart_agent()
        await self.finish(f"{self.label}: kill -9 racing the task's start", [e for _, _, e in made])

    def test_cancel_and_kill9(self):
        return defer.Deferred.fromCoroutine(self.cancel_and_kill9())

    def test_kill_storm(self):
        return defer.Deferred.fromCoroutine(self.kill_storm())

    async def test_kill9_between_registry_and_outbox_writes(self):
        """
        A crash state with the registry ahead of the outbox: the registry
        says the task is finished, the outbox never got its report.  The
        agent's commit group (outbox first, then registry, in one flush)
        no longer produces it, but a state directory from an older version
        or one damaged by hand can hold it.  Built here from a real run: the agent is killed
        while the task runs, the task ends, its outputs are put where the
        agent's stage-out would have put them, and the registry gets the
        record its flush would have written.  The restarted agent must
        still report the task.
        """
        await self.torn_terminal_report(registry=True)

    async def test_kill9_between_outbox_and_registry_writes(self):
        """
        The order the commit group allows: the outbox holds the terminal
        report, the registry does not know the task finished.  The
        restarted agent must not report a second terminal state.
        """
        await self.torn_terminal_report(registry=False)

    async def torn_terminal_report(self, registry):
        await self.start_agent()
        task_id, spec, expect = self.tasks.make("torn", exit_code=3, gate=True)
        self.submit([(task_id, spec, expect)])
        await eventually(lambda: self.plat.reached(task_id, RUNNING) and self.tasks.runs_of(task_id),
                         what="the task to run", diagnose=self.diagnose)
        await self.kill9()
        self.tasks.open_gate(task_id)
        await eventually(lambda: self.tasks.ended(task_id), what="the task to end")
        await sleep(0.3)
        # What the agent's stage-out did before the kill.
        task_dir = os.path.join(self.root, "work", task_id)
        outputs = []
        for name in ("result.txt", "blob.bin", "stdout"):
            with open(os.path.join(task_dir, name), "rb") as f:
                data = f.read()
            self.plat.platform.put_file(f"{task_id}/{name}", data)
            outputs.append({"path": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        info = {"exitCode": 3, "stageInTime": 0.0, "runTime": 0.1, "stageOutTime": 0.0, "outputs": outputs,
                "reason": "exit code 3"}
        if registry:
            # The registry's flush made it; the outbox's did not.
            with open(os.path.join(self.state_dir, "tasks.jsonl"), "a") as f:
                f.write(json.dumps({"state": "FAILED", "finished": True, "info": info, "id": task_id}) + "\n")
            name = "local: kill -9 between the registry and outbox writes of a terminal report"
        else:
            # The outbox's flush made it; the registry's did not.
            seq = read_outbox(self.state_dir)[0] + 1
            message = ["TASK_STATE", task_id, "FAILED", dict(info, seq=seq, time=time.time())]
            with open(os.path.join(self.state_dir, "outbox.jsonl"), "a") as f:
                f.write(json.dumps({"seq": seq, "msg": message}) + "\n")
            name = "local: kill -9 between the outbox and registry writes of a terminal report"
        self.agent.start()
        await self.connected()
        await self.finish(name, [expect], timeout=8)

    async def test_machine_crash(self):
        """
        The machine goes down: the agent and every task process die at once.
        Tasks that were running end FAILED (no exit status survives); the
        others run after the restart; nothing runs twice.
        """
        await self.start_agent({"agent": {"max_tasks": "2"}})
        running = [self.tasks.make("crash", gate=True) for _ in range(2)]
        queued = [self.tasks.make("crashq", exit_code=c) for c in (0, 4)]
        staging = [self.tasks.make("crashs", hold_input=True)]
        self.submit(running + queued + staging)
        ids = [m[0] for m in running]
        await eventually(lambda: all(self.plat.reached(t, RUNNING) and self.tasks.runs_of(t) for t in ids)
                         and all(self.plat.state(m[0]) == QUEUED for m in queued)
                         and self.hold.holding("GET", staging[0][0]), timeout=30,
                         what="tasks running, queued and staging in", diagnose=self.diagnose)
        kill_marked(self.mark)  # the agent and every task process
        await self.agent.wait_exit()
        await self.disconnected()
        self.agent.start()
        await self.connected()
        self.hold.release(staging[0][0])
        lost = [Expect(t, ("FAILED",), None, runs=(1,)) for t in ids]
        await self.finish("local: machine crash (agent and tasks killed)",
                          lost + [e for _, _, e in queued + staging])

    async def test_sigterm_while_running(self):
        """A clean stop (SIGTERM) with tasks running, then a start: as an upgrade does."""
        await self.start_agent()
        held = self.held(RUNNING, count=2)
        self.submit(held.made)
        await eventually(lambda: held.ready_or_fail(self.plat), what="tasks running", diagnose=self.diagnose)
        await self.agent.terminate()
        await self.disconnected()
        await held.while_down()
        self.agent.start()
        await self.connected()
        held.release()
        await self.finish("local: SIGTERM stop while RUNNING, start", held.expectations)


class HostileTaskTests(FaultScenario):
    """
    Issue 11: a task that plants a link as a later task's directory, and a
    task that flips a directory and a link during its own stage-out.
    Nothing outside may be written or uploaded; the later task runs in a
    directory of its own.
    """

    def outside(self):
        outside = os.path.join(self.root, "outside")
        os.makedirs(outside, exist_ok=True)
        with open(os.path.join(outside, "data.txt"), "w") as f:
            f.write("SECRET\n")
        return outside

    def untouched(self, outside):
        def listing():
            return "\n".join(sorted(os.listdir(outside))).encode()

        return ("outside untouched", listing, b"data.txt")

    async def test_planted_link_for_a_later_task_id(self):
        await self.start_agent()
        outside = self.outside()
        victim_id, victim_spec, victim_expect = self.tasks.make("victim")
        planter_id, planter_spec, planter_expect = self.tasks.make("planter")
        planter_spec["command"] = f"ln -s {outside} ../{victim_id}; " + planter_spec["command"]
        self.submit([(planter_id, planter_spec, planter_expect)])
        await self.wait_reached([planter_id], P.DONE)
        self.assertTrue(os.path.islink(os.path.join(self.root, "work", victim_id)))
        self.submit([(victim_id, victim_spec, victim_expect)])
        victim_expect.outputs.append(self.untouched(outside))
        await self.finish("local: a task plants a link as a later task's directory",
                          [planter_expect, victim_expect])
        self.assertTrue(os.path.islink(os.path.join(self.root, "work", ".quarantine", f"{victim_id}.1")))

    async def test_directory_flipped_to_a_link_during_stage_out(self):
        await self.start_agent()
        outside = self.outside()
        task_id, spec, expect = self.tasks.make("flip")
        names = [f"f{i}" for i in range(200)]
        # out/fN hold "inside"; outside/fN would hold SECRET: a flipper left
        # running in the background swaps out/ and a link for 5 s, as fast
        # as it can.
        for name in names:
            with open(os.path.join(outside, name), "w") as f:
                f.write("SECRET\n")
        flipper = ("import os, time\n"
                   "end = time.time() + 5\n"
                   "while time.time() < end:\n"
                   "    try:\n"
                   "        os.rename('out', 'out.real'); os.symlink(%r, 'out')\n"
                   "        os.unlink('out'); os.rename('out.real', 'out')\n"
                   "    except OSError: pass\n" % outside)
        with open(os.path.join(self.root, "flipper.py"), "w") as f:
            f.write(flipper)
        flip = (f"mkdir out; for n in {' '.join(names)}; do echo inside > out/$n; done; "
                f"{sys.executable} {os.path.join(self.root, 'flipper.py')} >/dev/null 2>&1 & sleep 0.3; ")
        spec["command"] = flip + spec["command"]
        spec["outputs"] += [{"path": f"out/{n}", "uri": self.plat.platform.file_url(f"{task_id}/{n}")}
                            for n in names]
        leaked = os.path.join(self.plat.files_dir, task_id)

        def secrets():
            found = []
            for name in names:
                try:
                    with open(os.path.join(leaked, name), "rb") as f:
                        if f.read() != b"inside\n":
                            found.append(name)
                except OSError:
                    pass
            return " ".join(found).encode()

        # Some uploads may fail (out/ was a link or missing at that moment):
        # the task may end FAILED for that, but no upload carries SECRET.
        expect.states = ("DONE", "FAILED")
        expect.outputs = []
        self.submit([(task_id, spec, expect)])
        await self.finish("local: a task flips a directory and a link during stage-out", [expect])
        self.assertEqual(secrets(), b"", "uploads that carried a file from outside")
        self.assertEqual(sorted(os.listdir(outside)), sorted(["data.txt"] + names))


class ConnectionTests(FaultScenario):
    """The connection dies (cut, half-open, slow) in each phase."""

    async def cut_in(self, phase):
        """
        Cut the connection while tasks are held in C{phase} and keep the
        agent away while they go on to their end; then let it back.
        """
        await self.start_agent(self.phase_sections(phase))
        held = self.held(phase, count=2)
        self.submit(held.made)

        def cut(_=None):
            self.proxy.refuse = True
            self.proxy.cut()

        if phase == ACCEPTED:
            d = self.plat.platform.wait_for(held.first, ACCEPTED)
            d.addCallbacks(cut, lambda f: None)
            await eventually(lambda: self.proxy.refuse, what="ACCEPTED", diagnose=self.diagnose)
        else:
            await eventually(lambda: held.ready_or_fail(self.plat), timeout=45 * self.patience,
                             what=f"tasks held in {phase}", diagnose=self.diagnose)
            cut()
        await self.disconnected()
        ids = [e.task_id for e in held.expectations]
        if phase == TERMINAL_UNACKED:
            self.proxy.refuse = False
            await self.connected()
            held.release()
        else:
            held.release()
            await self.wait_agent_finished(ids)
            self.proxy.refuse = False
        name = phase if phase != TERMINAL_UNACKED else "terminal-in-outbox-before-ACK"
        await self.finish(f"connection cut in {name}", held.expectations)

    def test_cut_accepted(self):
        return defer.Deferred.fromCoroutine(self.cut_in(ACCEPTED))

    def test_cut_staging_in(self):
        return defer.Deferred.fromCoroutine(self.cut_in(STAGING_IN))

    def test_cut_queued(self):
        return defer.Deferred.fromCoroutine(self.cut_in(QUEUED))

    def test_cut_running(self):
        return defer.Deferred.fromCoroutine(self.cut_in(RUNNING))

    def test_cut_staging_out(self):
        return defer.Deferred.fromCoroutine(self.cut_in(STAGING_OUT))

    def test_cut_terminal_unacked(self):
        return defer.Deferred.fromCoroutine(self.cut_in(TERMINAL_UNACKED))

    async def test_half_open(self):
        """
        The link goes silent both ways without a FIN: the agent's own ping
        timeout (1 s + 2 s here) must notice and reconnect; the platform
        notices later with its own (2 s + 3 s), and refuses the new session
        (4003) until then.
        """
        await self.start_agent()
        held = self.held(RUNNING, count=2)
        self.submit(held.made)
        await eventually(lambda: held.ready_or_fail(self.plat), what="tasks running", diagnose=self.diagnose)
        stalled = self.proxy.stall()
        self.assertEqual(len(stalled), 1)
        start = time.monotonic()
        held.release()  # their reports go into the dead connection
        await eventually(lambda: stalled[0].agent_gone, timeout=10, what="the agent to notice the half-open connection",
                         diagnose=self.diagnose)
        noticed = time.monotonic() - start
        self.assertLess(noticed, 1 + 2 + 2.5, f"the agent took {noticed:.1f} s to notice")
        self.assertIn("ping timeout", self.agent.log_text())
        await self.finish("half-open connection (ping timeout)", held.expectations)

    async def test_latency_and_cut(self):
        """300 ms each way, a cut in the middle: no spurious ping timeouts, nothing lost."""
        self.proxy.delay(0.3)
        await self.start_agent()
        held = self.held(RUNNING, count=2)
        self.submit(held.made)
        await eventually(lambda: held.ready_or_fail(self.plat), what="tasks running", diagnose=self.diagnose)
        self.proxy.cut()
        held.release()
        await self.finish("latency 300 ms + cut", held.expectations)
        self.assertNotIn("ping timeout", self.agent.log_text(), "the slow link was taken for a dead one")

    async def test_network_down_during_transfers(self):
        """
        File transfers to the platform (same host and port as the
        WebSocket) are refused while inputs are due; later the whole
        network goes (WebSocket and transfers) while outputs are due.  The
        transfers are retried; nothing fails.
        """
        await self.start_agent()
        self.proxy.refuse_files = True
        made = [self.tasks.make("net", exit_code=c, gate=True, platform_input=True) for c in (0, 4)]
        self.submit(made)
        ids = [m[0] for m in made]
        refused = self.proxy.refused
        await eventually(lambda: self.proxy.refused >= refused + 2, what="downloads to be refused",
                         diagnose=self.diagnose)
        self.proxy.refuse_files = False
        await eventually(lambda: all(self.plat.reached(t, RUNNING) and self.tasks.runs_of(t) for t in ids),
                         what="the tasks to run", diagnose=self.diagnose)
        self.proxy.refuse = self.proxy.refuse_files = True
        self.proxy.cut(files=True)
        refused = self.proxy.refused
        for t in ids:
            self.tasks.open_gate(t)
        await eventually(lambda: all(self.tasks.ended(t) for t in ids) and self.proxy.refused >= refused + 4,
                         what="uploads to be refused", diagnose=self.diagnose)
        self.proxy.refuse = self.proxy.refuse_files = False
        await self.finish("network down (WebSocket + file transfers) during stage-in and stage-out",
                          [e for _, _, e in made])

    async def test_no_acks_for_a_while(self):
        """
        The platform sends no ACK (and WELCOME too claims nothing new came)
        for a while, across two reconnections; then it acknowledges.  The
        agent re-sends everything each time; the platform drops the copies.
        """
        self.plat.platform.pause_acks(welcome=True)
        await self.start_agent()
        made = [self.tasks.make("noack", exit_code=c) for c in (0, 1, 0, 2, 0, 0)]
        self.submit(made)
        ids = [m[0] for m in made]
        await eventually(lambda: all(self.plat.terminal(t) for t in ids), what="tasks to end", diagnose=self.diagnose)
        for _ in range(2):
            dropped = self.plat.recorder.dropped
            self.proxy.cut()
            await self.disconnected()
            await self.connected()
            await eventually(lambda: self.plat.recorder.dropped > dropped, what="re-sent reports",
                             diagnose=self.diagnose)
        last, acked, pending = read_outbox(self.state_dir)
        self.assertEqual(acked, 0)
        self.assertTrue(pending)
        self.plat.platform.resume_acks()
        await self.finish("platform sends no ACK for a while, then does", [e for _, _, e in made])


class PlatformRestartTests(FaultScenario):
    """The platform goes away mid-run and comes back from its state file."""

    async def restart_mid_run(self, crash):
        await self.start_agent()
        held = self.held(RUNNING, count=4)
        self.submit(held.made)
        queued = [self.tasks.make("later", exit_code=c) for c in (0, 6)]
        await eventually(lambda: held.ready_or_fail(self.plat), what="tasks running", diagnose=self.diagnose)
        ids = [e.task_id for e in held.expectations]
        ended_while_down = ids[:2]

        async def while_down():
            # Two tasks end while the platform is away: their outputs cannot
            # be uploaded, nor their states reported, until it is back.
            failures = self.proxy.upstream_failures.get("http", 0)
            for t in ended_while_down:
                self.tasks.open_gate(t)
            await eventually(lambda: all(self.tasks.ended(t) for t in ended_while_down), what="tasks to end")
            await eventually(lambda: self.proxy.upstream_failures.get("http", 0) >= failures + 2,
                             what="the agent to try uploading to the absent platform", diagnose=self.diagnose)

        await self.plat.restart(crash=crash, while_down=while_down)
        await self.connected()
        # The new instance knows the tasks from its state file, and takes new ones.
        self.submit(queued)
        held.release()
        name = "platform crash mid-run (unsaved state lost)" if crash else "platform restart mid-run"
        await self.finish(name, held.expectations + [e for _, _, e in queued])

    def test_platform_restart(self):
        return defer.Deferred.fromCoroutine(self.restart_mid_run(crash=False))

    async def test_platform_down_longer_than_transfer_retries(self):
        """
        The platform stays away longer than the agent's transfer retries
        last ([transfer] retries = 1 here, a short version of the default
        five retries over about 30 s) while outputs are due.  A platform
        upgrade can take minutes: the outputs must still arrive once it is
        back, not be given up with the task FAILED.
        """
        sections = None
        from everest_agent import config as agent_config

        if "retries" in agent_config.SCHEMA.get("transfer", {}):
            sections = {"transfer": {"retries": "1", "retry_initial_delay": "0.2", "retry_max_delay": "0.2"}}
        await self.start_agent(sections)
        held = self.held(RUNNING, count=2)
        self.submit(held.made)
        await eventually(lambda: held.ready_or_fail(self.plat), what="tasks running", diagnose=self.diagnose)
        ids = [e.task_id for e in held.expectations]

        async def while_down():
            failures = self.proxy.upstream_failures.get("http", 0)
            held.release()
            await eventually(lambda: all(self.tasks.ended(t) for t in ids), what="tasks to end")
            await eventually(lambda: self.proxy.upstream_failures.get("http", 0) >= failures + 4, timeout=30,
                             what="the agent to try its uploads more often than its retries allow",
                             diagnose=self.diagnose)
            await sleep(1.0)

        await self.plat.restart(while_down=while_down)
        await self.connected()
        await self.finish("platform down longer than the transfer retries", held.expectations)

    def test_platform_crash(self):
        return defer.Deferred.fromCoroutine(self.restart_mid_run(crash=True))


class DiskFullTests(FaultScenario):
    """The state directory's file system fills up during a run."""

    async def setUp(self):
        await super().setUp()
        if os.geteuid() != 0:
            raise SkipTest("needs root to mount a small tmpfs for the state directory")
        os.makedirs(self.state_dir, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", self.state_dir],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise SkipTest(f"cannot mount a tmpfs: {done.stderr.strip()}")
        self.mounted = self.state_dir

    def fill(self):
        path = os.path.join(self.state_dir, "filler")
        chunk = b"\0" * 65536
        with open(path, "wb", buffering=0) as f:
            while True:
                try:
                    f.write(chunk)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    break
            while True:  # the last few bytes
                try:
                    f.write(b"\0" * 512)
                except OSError:
                    break
        return path

    async def disk_full(self, kill):
        await self.start_agent()
        held = self.held(RUNNING, count=3, exit_codes=[0, 3, 0])
        self.submit(held.made)
        await eventually(lambda: held.ready_or_fail(self.plat), what="tasks running", diagnose=self.diagnose)
        ids = [e.task_id for e in held.expectations]
        filler = self.fill()
        held.release()
        await eventually(lambda: all(self.tasks.ended(t) for t in ids), what="the tasks to end", diagnose=self.diagnose)
        # Keep the disk full for a few of the agent's write retries.
        await sleep(2.5)
        # Whatever reached the platform meanwhile was on disk first (a record
        # may still fit in the slack of a journal's last page).
        written, acked = durable_seqs(self.state_dir)
        for t in ids:
            task = self.plat.task(t)
            for state, info in task.history:
                seq = info.get("seq")
                self.assertTrue(seq is None or seq <= acked or seq in written,
                                f"{t} {state} (seq {seq}) reached the platform but is not in the outbox file")
        if kill:
            await self.kill9()
        os.unlink(filler)
        if kill:
            self.agent.start()
            await self.connected()
        await self.finish("disk full (state_dir)" + (", kill -9, free, restart" if kill else ", then freed"),
                          held.expectations)

    def test_disk_full(self):
        return defer.Deferred.fromCoroutine(self.disk_full(kill=False))

    def test_disk_full_kill9(self):
        return defer.Deferred.fromCoroutine(self.disk_full(kill=True))


def _flood_payloads():
    """
    Random platform messages, drawn by hypothesis with a fixed seed (so CI
    sees the same flood every time): protocol-shaped messages with random
    and wrong fields, random JSON, random text and bytes.  Never a
    well-formed ACK above 0 (that would be a platform acknowledging what it
    never received, not a malformed message), and only harmless commands.
    """
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
    leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                     st.floats(allow_nan=False, allow_infinity=False), text)
    value = st.recursive(leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(text, c, max_size=4),
                         max_leaves=12)
    valid_id = st.from_regex(r"fz[a-z0-9]{1,10}-[0-9]-0", fullmatch=True)
    bad_id = st.one_of(text.filter(lambda s: not P.valid_task_id(s)), st.integers(), st.none(),
                       st.just("../../etc"), st.just(".hidden"), st.just("x" * 129))
    task_id = st.one_of(valid_id, bad_id)
    command = st.one_of(st.sampled_from(["true", "exit 3", ":", "echo fuzz", "", "   ", "true\0x"]), leaf)
    number = st.one_of(st.integers(-5, 10**12), st.floats(allow_nan=False, allow_infinity=False), st.booleans(), text)
    requirements = st.dictionaries(st.sampled_from(["nodes", "coresPerNode", "memoryPerCore", "timeLimit", "x"]),
                                   number, max_size=4)
    spec = st.one_of(
        st.fixed_dictionaries(
            {"command": command},
            optional={
                "environment": st.one_of(st.dictionaries(text, st.one_of(text, leaf), max_size=3), value),
                "inputs": st.one_of(value, st.lists(st.dictionaries(
                    st.sampled_from(["path", "data", "uri", "sha256", "size", "executable"]), value, max_size=4),
                    max_size=3)),
                "outputs": st.one_of(value, st.lists(st.dictionaries(
                    st.sampled_from(["path", "pattern", "optional", "uri"]), value, max_size=3), max_size=3)),
                "resourceRequirements": st.one_of(requirements, value),
            },
        ),
        value,
    )
    kinds = st.sampled_from(["TASK_SUBMIT", "TASK_CANCEL", "TASK_MESSAGE", "ACK", "WELCOME", "HELLO",
                             "TASK_STATE", "ERROR", "RESOURCE_STATE", "", "task_submit"])
    message = st.one_of(
        st.tuples(st.just("TASK_SUBMIT"), task_id, spec).map(list),
        st.tuples(st.just("TASK_SUBMIT"), task_id).map(list),
        st.tuples(st.just("TASK_CANCEL"), task_id).map(list),
        st.tuples(st.just("TASK_MESSAGE"), task_id, value).map(list),
        st.tuples(st.just("ACK"), st.one_of(st.integers(max_value=0), st.floats(allow_nan=False), text,
                                            st.none(), st.booleans(), value)).map(list),
        st.tuples(st.just("WELCOME"), value).map(list),
        st.tuples(kinds, st.lists(value, max_size=4)).map(lambda t: [t[0]] + t[1]),
        value,
    )
    encoded = message.map(lambda m: json.dumps(m, ensure_ascii=False).encode("utf-8"))
    payload = st.one_of(
        encoded, encoded, encoded, encoded,
        text.map(lambda s: s.encode("utf-8")),
        st.binary(max_size=64),
        encoded.map(lambda b: b[: max(1, len(b) // 2)]),  # truncated JSON
    )
    found = []

    @settings(max_examples=300, database=None, derandomize=True, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(payload, st.sampled_from(["text", "text", "text", "text", "binary"]))
    def collect(data, kind):
        found.append((data, kind == "binary"))

    collect()
    return found


class FloodTests(FaultScenario):
    timeout = 180

    async def test_flood(self):
        """
        A flood of malformed, random and oversized messages: every one is
        answered with ERROR or, when it breaks the WebSocket layer (binary
        frame, invalid UTF-8, a frame over 1 MiB), closes the connection with
        the right code and the agent comes back.  Then normal tasks run.
        """
        try:
            payloads = _flood_payloads()
        except ImportError:
            raise SkipTest("hypothesis is not installed")
        oversized = b'["TASK_MESSAGE", "x", "' + b"a" * (1024 * 1024) + b'"]'
        payloads.insert(len(payloads) // 2, (oversized, False))
        payloads.append((oversized, False))
        await self.start_agent()
        expected_codes = []
        closes = []
        for data, binary in payloads:
            closer = None
            if binary:
                closer = 1003
            elif len(data) > P.MAX_FRAME_SIZE:
                closer = 1009
            else:
                try:
                    data.decode("utf-8")
                except UnicodeDecodeError:
                    closer = 1007
            await self.connected()
            session = self.plat.platform.agent().session
            if len(data) > P.MAX_FRAME_SIZE:
                # The platform would refuse to send it: lift its own limit for this one.
                session.connection.maxMessagePayloadSize = 0
            try:
                self.plat.platform.send_raw(None, data, binary=binary)
            except NotConnected:
                continue
            if closer is not None:
                expected_codes.append(closer)
                await with_timeout(session.wait_lost(), 10, f"the agent to close on a {closer} payload")
                closes.append(getattr(session.connection, "remoteCloseCode", None))
            else:
                await sleep(0)
        await self.connected()
        agent_errors = len(self.plat.platform.agent().errors)
        self.assertGreater(agent_errors, 0)  # ERROR is unreliable: replies in flight die with a closed connection
        self.assertTrue(self.agent.alive)
        made = [self.tasks.make("after", exit_code=c) for c in (0, 0, 9)]
        self.submit(made)
        wrong_codes = sorted({(want, got) for want, got in zip(expected_codes, closes) if want != got})
        note = f"{len(expected_codes)} closing payloads, {agent_errors} ERROR replies"
        if wrong_codes:
            note += "; close codes (expected/got): " + ", ".join(f"{w}/{g}" for w, g in wrong_codes)
        await self.finish(f"flood of {len(payloads)} random/malformed/oversized messages",
                          [e for _, _, e in made], ignore_unknown_prefix="fz", timeout=90, note=note)
        self.assertEqual(closes, expected_codes,
                         "the agent must close with 1003 (binary), 1007 (invalid UTF-8), 1009 (over 1 MiB); "
                         "None means it dropped the TCP connection without a close frame")


class _Raw(protocol.Protocol):
    """A second local connection: what a hostile local user opens by hand."""

    def __init__(self):
        self.data = b""
        self.lost = defer.Deferred()

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.lost.callback(None)


async def _connect_raw(port, payload=b""):
    raw = _Raw()
    try:
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), raw)
    except ConnectError:  # refused (reset) as soon as accepted
        raw.lost.callback(None)
        return raw
    if payload:
        raw.transport.write(payload)
    return raw


def _frame(payload):
    return struct.pack(">I", len(payload)) + payload


class HostileLocalUserTests(FaultScenario):
    """
    Issue 11: another local user (a real second loopback connection) goes for
    the task channel and the platform's API while tasks run; a hostile
    WELCOME and deeply nested JSON hit the agent.  Nothing may be forged,
    lost or run.
    """

    def channel_port(self):
        found = re.search(r"Task channel listening on [^ ]+:(\d+)", self.agent.log_text())
        return int(found.group(1)) if found else None

    async def test_channel_intruders(self):
        await self.start_agent({"task_channel": {"enabled": "yes"}})
        await eventually(self.channel_port, what="the task channel to listen", diagnose=self.diagnose)
        port = self.channel_port()
        held = self.held(RUNNING, count=2)
        self.submit(held.made)
        await eventually(lambda: held.ready_or_fail(self.plat), timeout=45, what="tasks held in RUNNING",
                         diagnose=self.diagnose)
        ids = [e.task_id for e in held.expectations]
        intruders = []
        for task_id in ids:  # the ids show in ps; the credential does not
            for opening in (task_id.encode(), f"{task_id}:{'0' * 48}".encode()):
                intruders.append(await _connect_raw(port, _frame(b"\0" + opening) + _frame(b"FORGED")))
        silent = [await _connect_raw(port, struct.pack(">I", 100)) for _ in range(100)]
        for task_id in ids:
            self.plat.platform.send_message(task_id, "for the task only")
        for intruder in intruders:
            await with_timeout(intruder.lost, 10, "the channel to close an intruder")
        await eventually(lambda: sum(1 for s in silent if s.lost.called) >= 100 - 64, timeout=10,
                         what="connections over the limit to be refused", diagnose=self.diagnose)
        refused = sum(1 for s in silent if s.lost.called)
        for s in silent:
            if not s.lost.called:
                s.transport.loseConnection()
        held.release()
        await self.finish("task channel: intruders with task ids, 100 silent connections", held.expectations,
                          note=f"{len(intruders)} intruders closed, {refused}/100 silent refused at the limit")
        self.assertEqual([i.data for i in intruders], [b""] * len(intruders))
        for task_id in ids:
            self.assertNotIn("FORGED", self.plat.platform.tasks[task_id].messages)

    async def test_unauthenticated_api(self):
        await self.start_agent()
        held = self.held(RUNNING, count=2)
        self.submit(held.made)
        await eventually(lambda: held.ready_or_fail(self.plat), timeout=45, what="tasks held in RUNNING",
                         diagnose=self.diagnose)
        marker = os.path.join(self.root, "intruder-ran")
        body = json.dumps({"spec": {"command": f"touch {marker}"}}).encode()
        codes = []
        for port in (self.plat.port, self.proxy.port):
            for auth in (b"", b"Authorization: Bearer " + TOKEN_OF_AGENT.encode() + b"\r\n"):
                raw = await _connect_raw(port, b"POST /api/tasks HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + auth
                                         + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
                await with_timeout(raw.lost, 10, "an answer from the API")
                codes.append(int(raw.data.split(b" ", 2)[1]))
        held.release()
        await self.finish("unauthenticated POST /api/tasks while tasks run", held.expectations,
                          note=f"answers {sorted(set(codes))}")
        self.assertEqual(codes, [401] * 4)
        self.assertEqual(sorted(self.plat.platform.tasks), sorted(e.task_id for e in held.expectations))
        self.assertFalse(os.path.exists(marker))

    async def test_hostile_welcome_and_deep_json(self):
        await self.start_agent()
        self.plat.platform.heartbeat = 0.001
        self.proxy.cut()  # the next WELCOME asks for a report every millisecond
        await self.disconnected()
        await self.connected()
        agent = self.plat.platform.agent()
        before = agent.resource_count
        self.plat.platform.send_raw(None, b"[" * 200000)
        await sleep(3)
        reports = agent.resource_count - before
        await eventually(lambda: any(e.get("code") == "malformed" for e in agent.errors), timeout=10,
                         what="an ERROR for the nested payload", diagnose=self.diagnose)
        made = [self.tasks.make("after", exit_code=c) for c in (0, 4)]
        self.submit(made)
        await self.finish("WELCOME heartbeat 0.001 s, then '[' x 200,000", [e for _, _, e in made],
                          note=f"{reports} RESOURCE_STATE in 3 s")
        self.assertLessEqual(reports, 8)
        self.assertNotIn("RecursionError", self.agent.log_text())
        self.assertNotIn("CRITICAL", self.agent.log_text())


class SlurmFaultScenario(FaultScenario):
    handler_type = "slurm"
    timeout = 400
    patience = 3
    if SLURM_PROBLEM:
        skip = f"SLURM scenarios: {SLURM_PROBLEM}"


class SlurmKillTests(SlurmFaultScenario):
    """kill -9 of the agent in each phase of a SLURM task, then a restart."""

    def test_kill9_accepted(self):
        return defer.Deferred.fromCoroutine(self.kill9_in(ACCEPTED))

    def test_kill9_staging_in(self):
        return defer.Deferred.fromCoroutine(self.kill9_in(STAGING_IN))

    def test_kill9_queued(self):
        return defer.Deferred.fromCoroutine(self.kill9_in(QUEUED))

    def test_kill9_running(self):
        return defer.Deferred.fromCoroutine(self.kill9_in(RUNNING))

    def test_kill9_staging_out(self):
        return defer.Deferred.fromCoroutine(self.kill9_in(STAGING_OUT))

    def test_kill9_terminal_unacked(self):
        return defer.Deferred.fromCoroutine(self.kill9_in(TERMINAL_UNACKED))

    def test_cancel_and_kill9(self):
        return defer.Deferred.fromCoroutine(self.cancel_and_kill9())

    def test_kill_storm(self):
        return defer.Deferred.fromCoroutine(self.kill_storm())

    async def test_kill9_races_the_start(self):
        await self.start_agent()
        made = [self.tasks.make("race", exit_code=c) for c in (0, 2, 0, 4)]
        self.submit(made)
        self.kill_on(made[-1][0], ACCEPTED)
        await self.agent.wait_exit(timeout=30)
        self.keep_state()
        await self.disconnected()
        await self.restart_agent()
        await self.finish(f"{self.label}: kill -9 racing the job's submission", [e for _, _, e in made])


class SlurmCommandFailureTests(SlurmFaultScenario):
    """The scheduler's commands fail, hang, or fail after doing their work."""

    async def setUp(self):
        await super().setUp()
        self.control = os.path.join(self.root, "scheduler-control")
        self.path_prefix = make_scheduler_wrappers(os.path.join(self.root, "bin"), self.control)

    def set_mode(self, command, mode=None):
        path = os.path.join(self.control, command)
        if mode is None:
            if os.path.exists(path):
                os.unlink(path)
            return
        with open(path, "w") as f:
            f.write(mode)

    def calls(self, command):
        try:
            with open(os.path.join(self.control, "calls.log")) as f:
                return [line for line in f.read().splitlines() if line.split()[1:2] == [command]]
        except FileNotFoundError:
            return []

    async def test_status_commands_fail_and_hang(self):
        """
        squeue hangs (killed after command_timeout), then squeue and sacct
        fail while the jobs end, the agent is killed and restarts into the
        same outage; then the scheduler answers again.
        """
        await self.start_agent()
        held = self.held(RUNNING, count=3, exit_codes=[0, 3, 0])
        self.submit(held.made)
        await eventually(lambda: held.ready_or_fail(self.plat), timeout=45 * self.patience, what="jobs running",
                         diagnose=self.diagnose)
        before = len(self.calls("squeue"))
        self.set_mode("squeue", "hang")
        await eventually(lambda: len(self.calls("squeue")) >= before + 2, timeout=20 * self.patience,
                         what="squeue to be called (and hang) twice", diagnose=self.diagnose)
        self.set_mode("squeue", "fail")
        self.set_mode("sacct", "fail")
        held.release()
        ids = [e.task_id for e in held.expectations]
        await eventually(lambda: all(self.tasks.ended(t) for t in ids), timeout=45 * self.patience,
                         what="the jobs to end",
                         diagnose=self.diagnose)
        await self.kill9()
        self.agent.start()
        await self.connected()
        before = len(self.calls("squeue"))
        await eventually(lambda: len(self.calls("squeue")) >= before + 2, timeout=20 * self.patience,
                         what="the restarted agent to poll the failing squeue", diagnose=self.diagnose)
        self.assertFalse(any(self.plat.terminal(t) for t in ids), "a job's end was decided while squeue was down")
        self.set_mode("squeue")
        self.set_mode("sacct")
        await self.finish("slurm: squeue hangs, squeue+sacct fail, kill -9 during the outage", held.expectations)

    async def test_sbatch_fails_after_submitting(self):
        """sbatch submits the job but then fails (a timeout to the controller): the job must run once."""
        await self.start_agent()
        self.set_mode("sbatch", "lie")
        made = [self.tasks.make("lie", exit_code=c) for c in (0, 2)]
        self.submit(made)
        await self.finish("slurm: sbatch fails after submitting", [e for _, _, e in made])
        self.assertGreaterEqual(len(self.calls("sbatch")), 2)

    async def test_sbatch_fails(self):
        """sbatch refuses: the task fails without running; once sbatch works again, tasks run."""
        await self.start_agent()
        self.set_mode("sbatch", "fail")
        refused = self.tasks.make("refused")
        self.submit([refused])
        await eventually(lambda: self.plat.terminal(refused[0]), timeout=30, what="the refused task to end",
                         diagnose=self.diagnose)
        self.set_mode("sbatch")
        made = [self.tasks.make("ok", exit_code=c) for c in (0, 5)]
        self.submit(made)
        refused_expect = Expect(refused[0], ("FAILED",), None, runs=(0,))
        await self.finish("slurm: sbatch fails", [refused_expect] + [e for _, _, e in made])
        self.assertIn("submission failed", self.plat.task(refused[0]).info["reason"])


class SgeFaultScenario(FaultScenario):
    """The scenarios on the real Grid Engine of .ci/setup-sge.sh."""

    handler_type = "sge"
    hold_args = "-h"
    timeout = 400
    patience = 3
    from tests.test_sge import REAL_SGE_PROBLEM, SGE_BIN

    if REAL_SGE_PROBLEM:
        skip = f"Grid Engine scenarios: {REAL_SGE_PROBLEM}"
    release_argv = [os.path.join(SGE_BIN, "qrls")]

    async def start_agent(self, sections=None):
        merged = {"handler": {"command_dir": self.SGE_BIN}}
        for section, keys in (sections or {}).items():
            merged.setdefault(section, {}).update(keys)
        self.addCleanup(qdel_prefix, self.prefix, self.SGE_BIN)
        return await super().start_agent(merged)


class SgeKillTests(SgeFaultScenario, SlurmKillTests):
    """kill -9 of the agent in each phase of a Grid Engine task, then a restart (SlurmKillTests' scenarios)."""


class PilotFaultScenario(SlurmFaultScenario):
    """The SLURM scenarios with [pilot] enabled: tasks run inside two pilots of 2 cores."""

    pilot_mode = True

    async def start_agent(self, sections=None):
        merged = {"pilot": {
            "enabled": "yes", "max_pilots": "2", "cores": "2", "walltime": "600", "idle_timeout": "60",
            "listen": "127.0.0.1:0", "advertise_address": "127.0.0.1", "heartbeat": "1",
            "connect_timeout": "120", "lost_timeout": "20",
        }}
        for section, keys in (sections or {}).items():
            merged.setdefault(section, {}).update(keys)
        self.addCleanup(self._cancel_pilots)
        return await super().start_agent(merged)

    def pilot_jobs(self):
        try:
            with open(os.path.join(self.state_dir, "pilots", "pilots.json")) as f:
                return [p["jobId"] for p in json.load(f)["pilots"].values() if p.get("jobId")]
        except (OSError, ValueError, KeyError):
            return []

    def _is_pilot_worker(self, pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            return False
        return argv[1:3] == [b"-m", b"everest_agent.pilot"] and self.state_dir.encode() in b" ".join(argv)

    def _cancel_pilots(self):
        ids = self.pilot_jobs()
        if ids:
            subprocess.run(["scancel"] + ids, capture_output=True, timeout=20)


class PilotKillTests(PilotFaultScenario, SlurmKillTests):
    """kill -9 of the agent in each phase of a task in a pilot, then a restart (SlurmKillTests' scenarios)."""


class PilotLossTests(PilotFaultScenario):
    """A pilot lost under running tasks; a pilot's link frozen and healed."""

    async def test_pilot_canceled_under_running_tasks(self):
        await self.start_agent({"pilot": {"max_pilots": "1"}})
        made = [self.tasks.make("lost", exit_code=0, gate=True) for _ in range(2)]
        self.submit(made)
        ids = [m[0] for m in made]
        await eventually(lambda: all(self.plat.reached(t, RUNNING) for t in ids), timeout=60 * self.patience,
                         what="two tasks running in the pilot", diagnose=self.diagnose)
        # One ends just before its pilot is canceled: its real exit code counts.
        self.tasks.open_gate(ids[0])
        await eventually(lambda: self.tasks.ended(ids[0]), what="the first task to end")
        self.agent.signal(signal.SIGSTOP)  # it must learn of the end from the pilot's loss
        job_id = self.plat.task(ids[1]).info["jobId"]
        subprocess.run(["scancel", job_id], capture_output=True, timeout=20)
        await sleep(1)
        self.agent.signal(signal.SIGCONT)
        expectations = [Expect(ids[0], ("DONE",), 0),
                        Expect(ids[1], ("FAILED",), None, check_exit=False)]
        await self.finish("pilot: scancel of the pilot under running tasks", expectations)
        reason = self.plat.task(ids[1]).info["reason"]
        self.assertIn(job_id, reason)
        # (the task's id is on its wrapper's command line)
        await none_left(ids[1], what=f"task {ids[1]} of the canceled pilot job {job_id}")

    async def test_pilot_link_frozen_then_healed(self):
        await self.start_agent({"pilot": {"max_pilots": "1"}})
        made = [self.tasks.make("frz", exit_code=c, gate=True) for c in (0, 4)]
        self.submit(made)
        ids = [m[0] for m in made]
        await eventually(lambda: all(self.plat.reached(t, RUNNING) for t in ids), timeout=60 * self.patience,
                         what="two tasks running in the pilot", diagnose=self.diagnose)
        # Freeze the pilot's worker (not its tasks): its link goes silent, a half-open link.
        pids = subprocess.run(["pgrep", "-f", "everest_agent.pilot --agent 127.0.0.1"],
                              capture_output=True, text=True).stdout.split()
        mine = [p for p in pids if self._is_pilot_worker(p)]
        self.assertEqual(len(mine), 1, pids)
        os.kill(int(mine[0]), signal.SIGSTOP)
        await sleep(5)  # several heartbeats
        os.kill(int(mine[0]), signal.SIGCONT)
        for t in ids:
            self.tasks.open_gate(t)
        await self.finish("pilot: its link frozen (half-open) for 5 s, then healed",
                          [Expect(ids[0], ("DONE",), 0), Expect(ids[1], ("FAILED",), 4)])
        log = self.agent.log_text()
        self.assertIn("link lost", log)  # the heartbeats found the silence...
        self.assertEqual(log.count("Submitting pilot"), 1)  # ...and the same pilot came back


    def pilot_worker_pid(self):
        pids = subprocess.run(["pgrep", "-f", "everest_agent.pilot --agent 127.0.0.1"],
                              capture_output=True, text=True).stdout.split()
        mine = [int(p) for p in pids if self._is_pilot_worker(p)]
        self.assertEqual(len(mine), 1, pids)
        return mine[0]

    async def pilot_job_gone(self, job_id):
        def gone():
            out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
            return not out.stdout.strip()

        await eventually(gone, timeout=30 * self.patience, what=f"pilot job {job_id} to leave the queue",
                         diagnose=self.diagnose)

    async def test_pilot_worker_killed(self):
        await self.start_agent({"pilot": {"max_pilots": "1"}})
        # 1. Its worker frozen, then killed: a task that ended meanwhile
        #    (exit-code file, no report) keeps its real outcome; one sent to
        #    it but never started goes back to the queue, to the next pilot.
        ended = self.tasks.make("wk", exit_code=3, gate=True)
        self.submit([ended])
        await self.wait_reached([ended[0]], RUNNING, timeout=60 * self.patience)
        first_job = self.plat.task(ended[0]).info["jobId"]
        worker = self.pilot_worker_pid()
        os.kill(worker, signal.SIGSTOP)
        unsent = self.tasks.make("wk", exit_code=0)
        self.submit([unsent])
        self.tasks.open_gate(ended[0])
        await eventually(lambda: self.tasks.ended(ended[0]), what="the first task to end")
        os.kill(worker, signal.SIGKILL)
        await self.pilot_job_gone(first_job)
        await self.wait_reached([unsent[0]], "DONE", timeout=60 * self.patience)
        self.assertNotEqual(self.plat.task(unsent[0]).info["jobId"], first_job)
        # 2. Killed under a running task: it fails naming the pilot's job,
        #    and does not run on outside the job.
        running = self.tasks.make("wk", exit_code=0, gate=True)
        self.submit([running])
        await self.wait_reached([running[0]], RUNNING, timeout=60 * self.patience)
        second_job = self.plat.task(running[0]).info["jobId"]
        os.kill(self.pilot_worker_pid(), signal.SIGKILL)
        await self.pilot_job_gone(second_job)
        await none_left(running[0], what=f"task {running[0]} of the pilot job {second_job}, its worker killed")
        after = self.tasks.make("wk", exit_code=0)
        self.submit([after])
        expectations = [Expect(ended[0], ("FAILED",), 3), Expect(unsent[0], ("DONE",), 0),
                        Expect(running[0], ("FAILED",), None, check_exit=False), Expect(after[0], ("DONE",), 0)]
        await self.finish("pilot: kill -9 of the pilot's worker (frozen first, then under a running task)",
                          expectations)
        self.assertIn(f"batch job {second_job}", self.plat.task(running[0]).info["reason"])
        self.assertIn(f"batch job {first_job}", self.plat.task(ended[0]).info["reason"])
        self.tasks.open_gate(running[0])  # had it outlived its pilot, it would end now
        await sleep(1)
        self.assertFalse(self.tasks.ended(running[0]), "a task outlived its pilot's job")
        self.assertEqual(self.tasks.runs_of(unsent[0]), 1)

class CheckSelfTests(TestCase):
    """The verdict itself: it must see what it is meant to see."""

    def verdict(self, history, applied, runs=1, expect=None, last_seq=None, outputs=b"ok", reports=None):
        from types import SimpleNamespace

        from everest_agent.platform import Task

        task = Task("t-1-0", "agent", {})
        for state, info in history:
            task.history.append((state, info))
            task.state, task.info = state, info
        platform = SimpleNamespace(tasks={"t-1-0": task})
        recorder = SeqRecorder()
        recorder.applied = applied
        recorder.reports = reports or []
        plat = SimpleNamespace(platform=platform, all_violations=[], recorder=recorder)
        factory = SimpleNamespace(runs_of=lambda t: runs)
        expect = expect or Expect("t-1-0", ("DONE",), 0, [("out", lambda: outputs, b"ok")])
        row = check("self-test", plat, [expect], factory, agent_last_seq=last_seq)
        return row.lost, row.duplicated, row.wrong

    done = [("ACCEPTED", {"seq": 1}), ("DONE", {"seq": 2, "exitCode": 0})]

    def test_clean(self):
        self.assertEqual(self.verdict(self.done, [1, 2], last_seq=2), (0, 0, 0))

    def test_no_terminal_state_is_lost(self):
        self.assertEqual(self.verdict(self.done[:1], [1], last_seq=1), (1, 0, 0))

    def test_seq_gap_is_lost(self):
        self.assertEqual(self.verdict(self.done, [1, 3])[0], 1)
        self.assertEqual(self.verdict(self.done, [1, 2], last_seq=3)[0], 1)
        self.assertEqual(self.verdict(self.done, [2, 3])[0], 1)

    def test_seq_repeated_is_duplicated(self):
        self.assertEqual(self.verdict(self.done, [1, 2, 2])[1], 1)

    def test_second_run_is_duplicated(self):
        self.assertEqual(self.verdict(self.done, [1, 2], runs=2), (0, 1, 0))

    def test_second_terminal_state_is_duplicated(self):
        history = self.done + [("FAILED", {"seq": 3, "exitCode": 0})]
        self.assertEqual(self.verdict(history, [1, 2, 3])[1], 1)

    def test_terminal_sent_twice_is_duplicated(self):
        reports = [(1, "t-1-0", "ACCEPTED"), (2, "t-1-0", "DONE"), (3, "t-1-0", "DONE")]
        self.assertEqual(self.verdict(self.done, [1, 2, 3], reports=reports)[1], 1)

    def test_wrong_exit_code_state_or_bytes(self):
        failed = [("ACCEPTED", {"seq": 1}), ("FAILED", {"seq": 2, "exitCode": 1})]
        self.assertEqual(self.verdict(failed, [1, 2]), (0, 0, 1))
        self.assertEqual(self.verdict(self.done, [1, 2], outputs=b"ko"), (0, 0, 1))
        self.assertEqual(self.verdict(self.done, [1, 2], runs=0), (0, 0, 1))
        platform_made = [("ACCEPTED", {"seq": 1}), ("DONE", {"exitCode": 0, "platform": True})]
        self.assertEqual(self.verdict(platform_made, [1]), (0, 0, 1))


# -- passive mode (contract, section 9): kill -9 under a passive client's tasks ---------


class PassiveFaultScenario(TestCase):
    """
    The agent as a real process (C{twistd everest-agent}) in passive mode
    only, a passive client (Autobahn) in this process.  The agent is killed
    with SIGKILL while the client's tasks are held in a phase, started
    again on the same state directory, and a new session must learn every
    task's single outcome: its real exit code and its output byte for byte,
    each command run once, and no C{seq} seen twice across the agents' lives.
    """

    timeout = 120

    def setUp(self):
        from tests.test_passive_agent import CLIENT_TOKEN

        self.root = os.path.abspath(self.mktemp())
        os.makedirs(self.root)
        with socket_module().socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        tokens = os.path.join(self.root, "client-tokens")
        fd = os.open(tokens, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, (CLIENT_TOKEN + "\n").encode())
        os.close(fd)
        ini = os.path.join(self.root, "agent.ini")
        fd = os.open(ini, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, (
            f"[agent]\nwork_dir = {self.root}/work\nstate_dir = {self.root}/state\nmax_tasks = 2\n"
            f"kill_grace = 1\nhostname = faults\n[handler]\ntype = local\n"
            f"[passive]\nenabled = yes\nlisten = 127.0.0.1:{self.port}\nclient_tokens_file = {tokens}\n"
        ).encode())
        os.close(fd)
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        self.agent = AgentProcess(ini, os.path.join(self.root, "agent.log"), env, self.root)
        self.addCleanup(lambda: self.agent.kill9() if self.agent.alive else None)
        self.base = f"http://127.0.0.1:{self.port}"
        self.gate = os.path.join(self.root, "gate")
        self.runs = os.path.join(self.root, "runs")

    async def session(self):
        from tests.test_passive_agent import Client, credential

        for _ in range(400):  # until the restarted agent listens
            try:
                probe = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), protocol.Protocol())
            except ConnectError:
                await sleep(0.05)
                continue
            probe.transport.loseConnection()
            return await Client(self, self.base, credential("faults")).open()
        raise AssertionError(f"no passive listener on {self.base}\n{self.agent.log_tail()}")

    def command(self, task_id, code):
        return (f"echo {task_id} >> {self.runs}; while [ ! -e {self.gate} ]; do sleep 0.05; done; "
                f"echo out-{task_id} > out.txt; exit {code}")

    async def run_scenario(self, name, phase):
        started = time.monotonic()
        self.agent.start()
        client = await self.session()
        # 2 slots: two tasks RUNNING, the rest QUEUED behind them.
        tasks = {f"p{i}": (0 if i % 2 == 0 else 3) for i in range(4)}
        for task_id, code in tasks.items():
            client.send(["TASK_SUBMIT", task_id, {"command": self.command(task_id, code), "inputData": [],
                                                  "outputData": [{"paths": ["out.txt"]}]}])
        if phase == ACCEPTED:
            await client.wait_state("p3", ACCEPTED)
        else:
            await client.wait_state("p0", RUNNING)
            await client.wait_state("p1", RUNNING)
            await client.wait_state("p3", QUEUED)
        seen = {m[3]["seq"]: (m[1], m[2]) for m in client.received if m[0] == "TASK_STATE"}
        await self.agent.kill9()
        open(self.gate, "w").close()  # the jobs end while the agent is away
        self.agent.start()
        client = await self.session()
        from tests.support import eventually as until

        await until(lambda: all(set(client.states(t)) & set(P.TERMINAL) for t in tasks), 60, "all outcomes")
        row = Row(f"passive: kill -9 in {phase}", tasks=len(tasks))
        with open(self.runs) as f:
            runs = f.read().split()
        for task_id, code in tasks.items():
            terminal = [m for m in client.received if m[0] == "TASK_STATE" and m[1] == task_id
                        and m[2] in P.TERMINAL]
            if not terminal:
                row.lost += 1
                continue
            if len({m[2] for m in terminal}) > 1 or runs.count(task_id) > 1:
                row.duplicated += 1
                row.details.append(f"{task_id}: {[m[2] for m in terminal]}, ran {runs.count(task_id)} times")
            state = terminal[-1][2]
            expected = P.DONE if code == 0 else P.FAILED
            if state != expected or terminal[-1][3].get("exitCode") != code:
                row.wrong += 1
                row.details.append(f"{task_id}: {state} {terminal[-1][3]}")
            response = await treq_get(f"{self.base}/files/{task_id}/out.txt", client)
            if response != f"out-{task_id}\n".encode():
                row.wrong += 1
                row.details.append(f"{task_id}: output {response!r}")
        # A state sent again on reconnecting keeps its seq; a seq naming another message is reused.
        later = {m[3]["seq"]: (m[1], m[2]) for m in client.received if m[0] == "TASK_STATE"}
        reused = {seq for seq, what in later.items() if seq in seen and seen[seq] != what}
        if reused:
            row.duplicated += len(reused)
            row.details.append(f"seq reused after the restart: {sorted(reused)}")
        row.seconds = time.monotonic() - started
        record(row)
        self.assertTrue(row.clean, row.details)

    async def test_kill9_with_passive_tasks_running_and_queued(self):
        await self.run_scenario("running", RUNNING)

    async def test_kill9_with_passive_tasks_just_accepted(self):
        await self.run_scenario("accepted", ACCEPTED)


def socket_module():
    import socket

    return socket


async def treq_get(url, client):
    import treq
    from tests.test_passive_agent import credential

    response = await treq.get(url, headers={"Authorization": credential("faults")}, persistent=False)
    return await response.content()
