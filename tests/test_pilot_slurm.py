"""
Pilot mode on the real single-node SLURM, against the reference platform:
tasks inside pilot jobs end to end, cancel, time limit, packing of
multi-core tasks, a pilot canceled under running tasks (no process of the
task left after: the pilot's guard), idle pilots ending, and a pilot that
cannot connect back; the same through the TORQUE-style wrappers and on
Grid Engine.
"""

import os
import subprocess

from twisted.trial.unittest import TestCase

from tests.support import eventually, none_left, sleep, sleep_marker, start_agent, start_platform
from tests.test_slurm import REAL_SLURM_PROBLEM


#: A long task that ignores SIGTERM (its shell and its sleep; the marker is
#: the sleep's seconds): SLURM's SIGKILL, KillWait seconds after its SIGTERM,
#: ends it only if it is still in the job's process tree, Grid Engine's kill
#: of the job's process group not at all; the pilot's guard keeps it in the
#: tree and kills it.
TERM_IGNORING = "trap '' TERM; sleep {}"


def pilot_sections(handler_type="slurm", **pilot):
    values = {"enabled": "yes", "max_pilots": "2", "cores": "2", "walltime": "300",
              "idle_timeout": "30", "listen": "127.0.0.1:0", "advertise_address": "127.0.0.1",
              "heartbeat": "2", "connect_timeout": "60"}
    values.update(pilot)
    return {
        "handler": {"type": handler_type, "poll_interval": "0.5", "command_timeout": "20"},
        "agent": {"max_tasks": "8", "kill_grace": "1"},
        "pilot": values,
    }


class PilotSlurmCase(TestCase):
    timeout = 180
    handler_type = "slurm"
    cancel_command = "scancel"
    if REAL_SLURM_PROBLEM:
        skip = REAL_SLURM_PROBLEM

    async def start(self, **pilot):
        self.platform = await start_platform(self, heartbeat=1)
        self.agent = start_agent(self, self.platform, sections=pilot_sections(self.handler_type, **pilot))
        self.addCleanup(self.cancel_pilots)
        await self.platform.wait_connected()
        return self.agent.handler

    async def exit_codes_and_cancel(self, handler):
        """Real exit codes through one pilot, each reported with its job id; then a cancel."""
        ids = [self.platform.submit({"command": f"exit {i % 2}"}) for i in range(6)]
        for i, task_id in enumerate(ids):
            record = await self.platform.wait_for(task_id)
            self.assertEqual(record.info["exitCode"], i % 2)
            self.assertEqual(record.info["jobId"], list(handler.pilots.values())[0].job_id)
        sleeping = self.platform.submit({"command": "sleep 300"})
        await self.platform.wait_for(sleeping, "RUNNING")
        self.platform.cancel(sleeping)
        record = await self.platform.wait_for(sleeping)
        self.assertEqual(record.state, "CANCELED")

    async def lose_pilot_under_a_task(self):
        """
        The pilot's job canceled with C{cancel_command} under a running
        task: the task fails naming the job, and no process of it is left
        within 20 s (the pilot's guard, everest_agent.pilot.guard).
        """
        mark = sleep_marker()
        lost = self.platform.submit({"command": TERM_IGNORING.format(mark)})
        await self.platform.wait_for(lost, "RUNNING")
        job_id = self.platform.task(lost).info["jobId"]
        subprocess.run([self.cancel_command, job_id], check=False, capture_output=True)
        record = await self.platform.wait_for(lost)
        self.assertEqual(record.state, "FAILED")
        self.assertIn(job_id, record.info["reason"])
        await none_left(mark, what=f"task {lost} of the canceled pilot job {job_id}")

    def cancel_pilots(self):
        ids = [r.job_id for r in self.agent.handler.pilots.values() if r.job_id]
        if ids:
            subprocess.run([self.cancel_command, *ids], check=False, capture_output=True)


class PilotSlurmTests(PilotSlurmCase):

    async def test_tasks_in_pilots(self):
        handler = await self.start()
        self.platform.put_file("in.txt", b"21\n")
        first = self.platform.submit({
            "command": "echo $(( $(cat in.txt) * 2 )) > out.txt",
            "inputs": [{"path": "in.txt", "uri": self.platform.file_url("in.txt")}],
            "outputs": [{"path": "out.txt", "uri": self.platform.file_url("s/out.txt")}],
        })
        record = await self.platform.wait_for(first)
        self.assertEqual(record.state, "DONE", record.info)
        self.assertEqual(self.platform.get_file("s/out.txt"), b"42\n")
        running = dict(record.history)["RUNNING"]
        self.assertTrue(running["jobId"].isdigit())
        self.assertEqual(record.info["jobId"], running["jobId"])
        self.assertIn(running["jobId"], [r.job_id for r in handler.pilots.values()])
        # Many more, failing ones too: all in the pilots already there.
        ids = [self.platform.submit({"command": f"exit {i % 3}"}) for i in range(40)]
        for i, task_id in enumerate(ids):
            record = await self.platform.wait_for(task_id)
            self.assertEqual(record.info["exitCode"], i % 3)
            self.assertEqual(record.state, "DONE" if i % 3 == 0 else "FAILED")
        self.assertLessEqual(handler.submitted_pilots, 2)
        await eventually(lambda: "pilots" in ((self.platform.agent().resource or {}).get("scheduler") or {}),
                         timeout=30, what="pilots in RESOURCE_STATE")
        pilots = self.platform.agent().resource["scheduler"]["pilots"]
        self.assertTrue(all(p["coresTotal"] == 2 for p in pilots), pilots)
        self.assertEqual(self.platform.violations, [])

    async def test_cancel_time_limit_and_packing(self):
        handler = await self.start()
        sleeping = self.platform.submit({"command": "sleep 300"})
        limited = self.platform.submit({"command": "sleep 300", "resourceRequirements": {"timeLimit": 2}})
        await self.platform.wait_for(sleeping, "RUNNING")
        self.platform.cancel(sleeping)
        record = await self.platform.wait_for(sleeping)
        self.assertEqual(record.state, "CANCELED")
        record = await self.platform.wait_for(limited)
        self.assertEqual(record.state, "FAILED")
        self.assertIn("time limit", record.info["reason"])
        wide = [self.platform.submit({"command": "sleep 1", "resourceRequirements": {"coresPerNode": 2}})
                for _ in range(3)]
        for task_id in wide:
            record = await self.platform.wait_for(task_id)
            self.assertEqual(record.state, "DONE", record.info)
        too_big = self.platform.submit({"command": "true", "resourceRequirements": {"coresPerNode": 3}})
        record = await self.platform.wait_for(too_big)
        self.assertEqual(record.state, "FAILED")
        self.assertIn("[pilot] cores", record.info["reason"])
        too_long = self.platform.submit({"command": "true", "resourceRequirements": {"timeLimit": 1000}})
        record = await self.platform.wait_for(too_long)
        self.assertIn("walltime", record.info["reason"])
        self.assertLessEqual(len([r for r in handler.pilots.values()]), 2 + handler.submitted_pilots)

    async def test_scancel_of_a_pilot_under_running_tasks(self):
        await self.start(max_pilots="1")
        quick = self.platform.submit({"command": "true"})
        await self.platform.wait_for(quick)
        mark = sleep_marker()
        slow = self.platform.submit({"command": TERM_IGNORING.format(mark)})
        await self.platform.wait_for(slow, "RUNNING")
        job_id = self.platform.task(slow).info["jobId"]
        subprocess.run(["scancel", job_id], check=True)
        record = await self.platform.wait_for(slow)
        self.assertEqual(record.state, "FAILED")
        # Killed by the scancel (its pilot said the scheduler was ending it),
        # or left running when the pilot went (the scheduler's word is in it).
        self.assertIn(f"batch job {job_id}", record.info["reason"])
        self.assertEqual(record.info["jobId"], job_id)
        await none_left(mark, what=f"task {slow} of the canceled pilot job {job_id}")
        # A replacement pilot runs what comes next.
        after = self.platform.submit({"command": "true"})
        record = await self.platform.wait_for(after)
        self.assertEqual(record.state, "DONE")
        self.assertNotEqual(record.info["jobId"], job_id)

    async def test_idle_pilot_ends(self):
        handler = await self.start(idle_timeout="1")
        task_id = self.platform.submit({"command": "true"})
        await self.platform.wait_for(task_id)
        await eventually(lambda: not handler.pilot_summary(), timeout=60, what="the idle pilots to end")
        self.assertEqual(self.agent.manager.pool.capacity, 0)

    async def test_pilot_that_cannot_connect_back(self):
        handler = await self.start(advertise_address="127.0.0.2", connect_timeout="3", max_pilots="1")
        handler.advertise_address = "127.0.0.1"
        handler.port = 1  # nothing listens there
        task_id = self.platform.submit({"command": "true"})
        await eventually(lambda: handler.unreachable >= 1, timeout=120, what="an unreachable pilot")
        await sleep(2)
        self.assertEqual(handler.submitted_pilots, 1)  # backing off, no loop of submissions
        info = await handler.resource_info()
        self.assertEqual(info["pilotsUnreachable"], 1)
        self.assertEqual(self.platform.task(task_id).state, "QUEUED")


class PilotRestartTests(PilotSlurmCase):
    """The agent stops (tasks left running) and starts again on the same state."""

    async def test_restart_takes_every_task_up_again(self):
        await self.start(max_pilots="1")
        warm = self.platform.submit({"command": "true"})
        await self.platform.wait_for(warm)
        quick = self.platform.submit({"command": "sleep 1; exit 7"})
        slow = self.platform.submit({"command": "sleep 4"})
        await self.platform.wait_for(slow, "RUNNING")
        job_id = self.platform.task(slow).info["jobId"]
        ini = self.agent.config.path
        await self.agent.stopService()
        await sleep(2)  # quick ends while no agent is there
        self.agent = start_agent(self, ini=ini)
        await self.platform.wait_connected()
        record = await self.platform.wait_for(quick)
        self.assertEqual((record.state, record.info["exitCode"]), ("FAILED", 7))
        self.assertEqual(record.info["jobId"], job_id)
        record = await self.platform.wait_for(slow)
        self.assertEqual((record.state, record.info["exitCode"]), ("DONE", 0))
        self.assertEqual(record.info["jobId"], job_id)
        self.assertEqual(self.platform.task(slow).states.count("RUNNING"), 1)
        again = self.platform.submit({"command": "true"})
        record = await self.platform.wait_for(again)
        self.assertEqual(record.info["jobId"], job_id)  # the same pilot, reconnected
        self.assertEqual(self.agent.handler.submitted_pilots, 0)
        self.assertEqual(self.platform.violations, [])


class PilotTorqueWrapperTests(PilotSlurmCase):
    """The same, with pilots submitted through SLURM's TORQUE-style qsub/qstat/qdel."""

    from tests.test_pbs import WRAPPER_PROBLEM

    if WRAPPER_PROBLEM:
        skip = WRAPPER_PROBLEM
    handler_type = "torque"
    cancel_command = "qdel"

    async def test_tasks_cancel_and_loss_through_torque_pilots(self):
        handler = await self.start(max_pilots="1")
        self.assertEqual(handler.name, "torque")
        await self.exit_codes_and_cancel(handler)
        # qdel of the pilot under a running task.
        await self.lose_pilot_under_a_task()
        self.assertEqual(handler.submitted_pilots, 1)
        self.assertEqual(self.platform.violations, [])


class PilotSgeTests(PilotSlurmCase):
    """The same on the real Grid Engine: pilots are ordinary jobs of the sge handler."""

    from tests.test_sge import REAL_SGE_PROBLEM, SGE_BIN

    skip = REAL_SGE_PROBLEM or None
    handler_type = "sge"
    cancel_command = os.path.join(SGE_BIN, "qdel")

    async def start(self, **pilot):
        self.platform = await start_platform(self, heartbeat=1)
        sections = pilot_sections(self.handler_type, **pilot)
        sections["handler"]["command_dir"] = self.SGE_BIN
        # (Grid Engine passes the job none of the agent's environment: the
        # pilot's job script sets PYTHONPATH to the agent's own package,
        # the tree under test, itself.)
        self.agent = start_agent(self, self.platform, sections=sections)
        self.addCleanup(self.cancel_pilots)
        await self.platform.wait_connected()
        return self.agent.handler

    async def test_tasks_cancel_and_loss_through_sge_pilots(self):
        handler = await self.start(max_pilots="1")
        self.assertEqual(handler.name, "sge")
        await self.exit_codes_and_cancel(handler)
        # qdel of the pilot under a running task (Grid Engine kills the job's process group).
        await self.lose_pilot_under_a_task()
        self.assertEqual(handler.submitted_pilots, 1)
        self.assertEqual(self.platform.violations, [])

    async def test_h_rt_of_a_pilot_under_a_task(self):
        """The pilot's walltime (h_rt, a kill of the job's process group) ends it under a running task."""
        await self.start(max_pilots="1", walltime="15")
        mark = sleep_marker()
        lost = self.platform.submit({"command": TERM_IGNORING.format(mark)})
        await self.platform.wait_for(lost, "RUNNING")
        job_id = self.platform.task(lost).info["jobId"]
        record = await self.platform.wait_for(lost)
        self.assertEqual(record.state, "FAILED")
        self.assertIn(job_id, record.info["reason"])
        await none_left(mark, what=f"task {lost} of the pilot job {job_id}, ended by h_rt")
