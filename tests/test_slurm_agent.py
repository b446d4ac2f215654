"""
The whole agent on a real single-node SLURM, against the reference
platform: the states a batch task goes through, its files, its cancel.
"""

from twisted.trial.unittest import TestCase

from tests.support import eventually, start_agent, start_platform
from tests.test_slurm import REAL_SLURM_PROBLEM


class SlurmAgentTests(TestCase):
    timeout = 120
    if REAL_SLURM_PROBLEM:
        skip = REAL_SLURM_PROBLEM

    async def setUp(self):
        self.platform = await start_platform(self, heartbeat=1)
        self.agent = start_agent(self, self.platform, sections={
            "handler": {"type": "slurm", "poll_interval": "0.3", "command_timeout": "20"},
            "agent": {"max_tasks": "8"},
        })
        await self.platform.wait_connected()

    async def test_batch_task_with_files(self):
        self.platform.put_file("in.txt", b"21\n")
        task_id = self.platform.submit({
            "command": "echo $(( $(cat in.txt) * 2 )) > out.txt; echo \"$EVEREST_TASK_ID\"",
            "inputs": [{"path": "in.txt", "uri": self.platform.file_url("in.txt")}],
            "outputs": [{"path": "out.txt", "uri": self.platform.file_url("s/out.txt")},
                        {"path": "stdout", "uri": self.platform.file_url("s/stdout")}],
            "resourceRequirements": {"nodes": 1, "coresPerNode": 1, "timeLimit": 120},
        })
        record = await self.platform.wait_for(task_id)
        self.assertEqual(record.state, "DONE", record.info)
        states = record.states
        self.assertEqual(states[:3], ["ACCEPTED", "STAGING_IN", "QUEUED"])
        self.assertEqual(states[-2:], ["STAGING_OUT", "DONE"])
        queued = dict(record.history)["QUEUED"]
        self.assertTrue(queued["jobId"].isdigit())
        self.assertEqual(record.info["jobId"], queued["jobId"])
        self.assertEqual(self.platform.get_file("s/out.txt"), b"42\n")
        self.assertEqual(self.platform.get_file("s/stdout"), task_id.encode() + b"\n")
        await eventually(lambda: (self.platform.agent().resource or {}).get("handler") == "slurm",
                         what="a RESOURCE_STATE from the SLURM agent")
        self.assertIn("nodes", self.platform.agent().resource["scheduler"])
        self.assertEqual(self.platform.violations, [])

    async def test_batch_failure_and_cancel(self):
        failing = self.platform.submit({"command": "exit 3"})
        sleeping = self.platform.submit({"command": "sleep 300"})
        record = await self.platform.wait_for(failing)
        self.assertEqual((record.state, record.info["exitCode"]), ("FAILED", 3))
        await self.platform.wait_for(sleeping, "RUNNING")
        job_id = self.platform.task(sleeping).info["jobId"]
        self.platform.cancel(sleeping)
        record = await self.platform.wait_for(sleeping)
        self.assertEqual(record.state, "CANCELED")
        self.assertEqual(record.info["jobId"], job_id)
        self.assertEqual(self.platform.violations, [])
