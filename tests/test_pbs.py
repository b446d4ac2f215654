"""
The TORQUE and PBS Pro handlers (L{everest_agent.handlers.pbs}).

No TORQUE or PBS server can be installed here, so:

 - parsers and the state/exit-status tables are tested on output samples
   (C{tests/data/torque_*}, C{pbspro_*}, written from the schedulers'
   documentation; C{slurm_wrapper_*} captured from SLURM's PBS wrappers);
 - the handlers run on a fake clock against a fake C{qsub}/C{qstat}/C{qdel}
   that answers with those samples;
 - L{WrapperTests} runs L{TorqueTaskHandler} for real through Debian's
   C{slurm-wlm-torque} (C{qsub}/C{qstat}/C{qdel} over the real SLURM of
   C{.ci/setup-slurm.sh}); skipped, saying why, elsewhere.
"""

import os
import shutil
import subprocess
import uuid
from types import SimpleNamespace

from twisted.application.service import IService
from twisted.internet import defer, reactor as global_reactor
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from everest_agent.handlers import pbs
from everest_agent.handlers.batch import ENDED, QUEUED, RUNNING, UNKNOWN, SubmitError
from everest_agent.handlers.command import CommandTimeout
from everest_agent.handlers.pbs import PbsProTaskHandler, TorqueTaskHandler
from everest_agent.interfaces import IJob, ITaskHandler, JobRequest, JobResult
from tests import test_slurm as helpers

data = helpers.data
write_exit_code = helpers.write_exit_code

TORQUE_UNKNOWN = "qstat: Unknown Job Id Error {}\n"
PBSPRO_UNKNOWN = "qstat: Unknown Job Id {}\n"


def qstat_answer(sample, unknown_message):
    """
    A fake qstat that prints C{sample} for the ids it holds and
    C{unknown_message} (status 153) for the others, like the real ones.
    """

    def qstat(argv, stdin):
        ids = [a for a in argv[1:] if a[:1].isdigit()]
        text = data(sample) if isinstance(sample, str) else sample()
        printed = text
        missing = [i for i in ids if i not in text]
        err = "".join(unknown_message.format(i) for i in missing)
        return printed, err, 153 if missing else 0

    return qstat


class Mixin:
    handler_class = TorqueTaskHandler
    sample = "torque_qstat_f.txt"
    unknown = TORQUE_UNKNOWN

    def setUp(self):
        self.clock = MemoryReactorClock()
        self.run = helpers.FakeRun()
        self.submitted = []
        self.run.programs["qsub"] = self.qsub
        self.run.programs["qstat"] = qstat_answer(self.sample, self.unknown)
        self.run.programs["qdel"] = lambda argv, stdin: ("", "", 0)
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        self.handler = self.make_handler()
        self.handler.startService()
        self.addCleanup(self.handler.stopService)

    def make_handler(self, **kwargs):
        kwargs.setdefault("poll_interval", 10)
        kwargs.setdefault("user", "everest")
        return self.handler_class(self.clock, run=self.run, **kwargs)

    def qsub(self, argv, stdin):
        self.submitted.append(argv)
        return f"{1300 + len(self.submitted)}.headnode.cluster.local\n", "", 0

    def request(self, task_id="t1", command="true", **requirements):
        directory = os.path.join(self.base, task_id)
        os.makedirs(directory, exist_ok=True)
        return JobRequest(task_id, directory, command, {"EVEREST_TASK_ID": task_id}, requirements)

    def attach(self, job_id, exit_code=None, time_limit=600):
        request = self.request(f"task-{job_id.split('.')[0]}", timeLimit=time_limit)
        if exit_code is not None:
            write_exit_code(request.directory, exit_code)
        return self.successResultOf(self.handler.reattach(request, job_id))

    def poll(self):
        self.clock.advance(self.handler.poll_interval)


class InterfaceTests(Mixin, SynchronousTestCase):
    def test_provides(self):
        for cls, name in ((TorqueTaskHandler, "torque"), (PbsProTaskHandler, "pbs")):
            handler = cls(self.clock, run=self.run)
            verifyObject(ITaskHandler, handler)
            verifyObject(IService, handler)
            self.assertEqual(handler.name, name)
        job = self.successResultOf(self.handler.submit(self.request()))
        verifyObject(IJob, job)
        self.assertEqual(job.job_id, "1301.headnode.cluster.local")
        self.assertTrue(job.batch)

    def test_from_config(self):
        handler_section = SimpleNamespace(
            type="torque", poll_interval=5.0, command_timeout=20.0, max_submit=3, extra_args=["-A", "proj"],
            queue="batch", qstat_format="xml",
        )
        config = SimpleNamespace(agent=SimpleNamespace(work_dir=self.base), handler=handler_section)
        torque = TorqueTaskHandler.from_config(config, self.clock)
        self.assertEqual((torque.poll_interval, torque.queue, torque.qstat_format, torque.extra_args),
                         (5.0, "batch", "xml", ["-A", "proj"]))
        del handler_section.qstat_format
        handler_section.type = "pbs"
        pbspro = PbsProTaskHandler.from_config(config, self.clock)
        self.assertEqual((pbspro.max_submit, pbspro.queue, pbspro.command_timeout), (3, "batch", 20.0))
        self.assertRaises(ValueError, TorqueTaskHandler, self.clock, qstat_format="yaml")

    def test_job_name_starts_with_a_letter(self):
        self.assertEqual(self.handler.job_name(self.request("5f3a-1-0")), "e5f3a-1-0")


class SubmitTests(Mixin, SynchronousTestCase):
    def test_torque_options(self):
        handler = self.make_handler(queue="batch", extra_args=["-A", "proj1"])
        request = self.request("t1", nodes=2, coresPerNode=4, memoryPerCore=1000, timeLimit=90)
        self.successResultOf(handler.submit(request))
        out = os.path.join(request.directory, ".everest", "job.out")
        script = os.path.join(request.directory, ".everest", "job.sh")
        self.assertEqual(
            self.submitted[0],
            ["qsub", "-N", "et1", "-S", "/bin/sh", "-j", "oe", "-o", out, "-q", "batch",
             "-l", "nodes=2:ppn=4,walltime=00:01:30,mem=8000mb", "-A", "proj1", script],
        )
        self.assertTrue(os.path.exists(script))

    def test_torque_minimal(self):
        self.successResultOf(self.handler.submit(self.request()))
        self.assertNotIn("-l", self.submitted[0])
        self.assertNotIn("-q", self.submitted[0])

    def test_pbspro_options(self):
        handler = PbsProTaskHandler(self.clock, run=self.run, queue="workq")
        request = self.request("t1", nodes=2, coresPerNode=4, memoryPerCore=1000, timeLimit=3725)
        self.successResultOf(handler.submit(request))
        argv = self.submitted[0]
        self.assertEqual(argv[argv.index("-q") + 1], "workq")
        self.assertEqual(
            [argv[i + 1] for i, a in enumerate(argv) if a == "-l"],
            ["select=2:ncpus=4:mem=4000mb", "walltime=01:02:05"],
        )

    def test_submit_output(self):
        parse = self.handler.parse_submit_output
        self.assertEqual(parse("1234.headnode.cluster.local\n"), "1234.headnode.cluster.local")
        self.assertEqual(parse("qsub: warning: option -S is ignored\n77\n"), "77")
        self.assertEqual(parse("12[].pbsserver\n"), "12[].pbsserver")
        for bad in ("", "qsub: Bad UID for job execution\n"):
            self.assertRaises(ValueError, parse, bad)

    def test_refused(self):
        self.run.programs["qsub"] = lambda argv, stdin: ("", "qsub: Unknown queue MSG=requested queue not found\n", 170)
        self.run.programs["qselect"] = lambda argv, stdin: ("", "", 0)
        failure = self.failureResultOf(self.handler.submit(self.request()), SubmitError)
        self.assertEqual(
            str(failure.value),
            "submission failed: qsub exited with status 170: qsub: Unknown queue MSG=requested queue not found",
        )

    def test_timeout_but_submitted(self):
        def hung(argv, stdin):
            raise CommandTimeout(argv, "qsub did not finish within 60 s; killed it")

        self.run.programs["qsub"] = hung
        self.run.programs["qselect"] = lambda argv, stdin: ("1208.headnode.cluster.local\n", "", 0)
        request = self.request("5f3a9c0-8-0")
        job = self.successResultOf(self.handler.submit(request))
        self.assertEqual(job.job_id, "1208.headnode.cluster.local")
        self.assertEqual(job.phase, QUEUED)


class StatusTestsMixin(Mixin):
    """Status, cancel and name tests every flavor passes, on its sample."""

    expected = {}  # job number -> JobResult
    exit_files = {}  # job number -> exit code in its exit-code file
    active = {}  # job number -> phase
    suffix = ""
    running_number = None
    done_number = None

    def test_states_and_exit_statuses(self):
        jobs = {}
        for number in list(self.expected) + list(self.active):
            jobs[number] = self.attach(number + self.suffix, self.exit_files.get(number))
        self.poll()
        self.assertEqual(len(self.run.of("qstat")), 1)  # one command for all
        for number, result in self.expected.items():
            self.assertEqual(self.successResultOf(jobs[number].result), result, number)
        for number, phase in self.active.items():
            self.assertEqual(jobs[number].phase, phase, number)
            self.assertNoResult(jobs[number].result)
        self.assertEqual(sorted(self.handler.jobs), sorted(n + self.suffix for n in self.active))

    def test_unknown_jobs_are_gone_not_an_error(self):
        job = self.attach("9999" + self.suffix, exit_code=0)
        running = self.attach(self.running_number + self.suffix)
        self.poll()
        self.assertEqual(self.successResultOf(job.result), JobResult(0))
        self.assertEqual(running.phase, RUNNING)

    def test_qstat_failing_changes_nothing(self):
        running = self.attach(self.running_number + self.suffix)
        self.clock.advance(0)
        self.assertEqual(running.phase, RUNNING)
        done = self.attach(self.done_number + self.suffix, exit_code=0)
        real = self.run.programs["qstat"]
        for answer in (
            ("", "Connection refused\nqstat: cannot connect to server headnode (errno=111) Connection refused\n", 2),
            ("", self.unknown.format("9999" + self.suffix) + "qstat: Error (15033 - No permission)\n", 153),
            ("", "", CommandTimeout(["qstat"], "qstat did not finish within 60 s; killed it")),
        ):
            if isinstance(answer[2], Exception):
                def fail(argv, stdin, error=answer[2]):
                    raise error
                self.run.programs["qstat"] = fail
            else:
                self.run.programs["qstat"] = lambda argv, stdin, answer=answer: answer
            self.poll()
            self.assertNoResult(done.result)
            self.assertEqual(running.phase, RUNNING)
        self.run.programs["qstat"] = real
        self.poll()
        self.assertEqual(self.successResultOf(done.result), JobResult(0))

    def test_cancel(self):
        job = self.attach(self.running_number + self.suffix)
        self.clock.advance(0)
        self.successResultOf(job.cancel())
        self.assertEqual(self.run.of("qdel"), [["qdel", self.running_number + self.suffix]])
        self.run.programs["qstat"] = lambda argv, stdin: ("", self.unknown.format(argv[-1]), 153)
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(job.result), JobResult(None, "canceled", canceled=True))

    def test_cancel_gone_messages(self):
        says_gone = self.handler.cancel_says_gone
        self.assertTrue(says_gone("", "qdel: Unknown Job Id Error 12.server\n", 153))
        self.assertTrue(says_gone("", "qdel: Unknown Job Id 12.server\n", 153))
        self.assertTrue(says_gone("", "qdel: Invalid state for job - COMPLETE 12.server\n", 170))
        self.assertTrue(says_gone("", "qdel: Job has finished 12.server\n", 35))
        self.assertTrue(says_gone("", "", 1))  # SLURM's wrapper
        self.assertFalse(says_gone("", "qdel: cannot connect to server headnode (errno=111)\n", 2))

    def test_find_by_name_with_qselect(self):
        self.run.programs["qselect"] = lambda argv, stdin: (self.running_number + self.suffix + "\n", "", 0)
        # The samples' job number N has the name e5f3a9c0-<N's last digits>-0.
        task_id = f"5f3a9c0-{int(self.running_number[2:])}-0"
        job = self.successResultOf(self.handler.reattach(self.request(task_id), None))
        self.assertEqual((job.job_id, job.phase), (self.running_number + self.suffix, RUNNING))
        self.assertEqual(self.run.of("qselect")[0][:5], ["qselect", "-N", "e" + task_id, "-u", "everest"])
        self.assertEqual(self.submitted, [])

    def test_qselect_finds_other_names_only(self):
        # qselect answered with a job of another name: not this task's.
        self.run.programs["qselect"] = lambda argv, stdin: (self.running_number + self.suffix + "\n", "", 0)
        job = self.successResultOf(self.handler.reattach(self.request("other-task"), None))
        self.assertEqual(len(self.submitted), 1)
        self.assertNotEqual(job.job_id, self.running_number + self.suffix)


class TorqueStatusTests(StatusTestsMixin, SynchronousTestCase):
    expected = {
        "1201": JobResult(0),
        "1202": JobResult(3, "exit code 3"),
        "1203": JobResult(None, "TIMEOUT: time limit of 600 s exceeded (TORQUE exit_status -11: job exceeded a walltime limit)"),
        "1204": JobResult(None, "TIMEOUT: time limit of 600 s exceeded (killed by signal 15 (SIGTERM), exit_status 271)"),
        "1205": JobResult(
            None,
            "KILLED: the job was killed (killed by signal 15 (SIGTERM), exit_status 271; "
            "qdel outside the agent, or a resource limit)",
        ),
        "1206": JobResult(None, "OUT_OF_MEMORY: the job exceeded its memory limit (TORQUE exit_status -10: job exceeded a memory limit)"),
        "1211": JobResult(
            None,
            "EXEC_FAILED: the scheduler could not run the job (exit_status -9: could not create/open stdout stderr files)",
        ),
    }
    exit_files = {"1201": 0, "1202": 3}
    active = {"1207": RUNNING, "1208": QUEUED, "1209": QUEUED, "1210": RUNNING}
    suffix = ".headnode.cluster.local"
    running_number = "1207"
    done_number = "1201"

    def test_text_argv(self):
        self.assertEqual(self.handler.status_argv(["1.s", "2.s"]), ["qstat", "-f", "1.s", "2.s"])

    def test_find_by_name_without_qselect(self):
        request = self.request("5f3a9c0-8-0")
        job = self.successResultOf(self.handler.reattach(request, None))
        self.assertEqual(job.job_id, "1208.headnode.cluster.local")
        self.assertEqual(self.run.of("qstat")[0], ["qstat", "-f"])
        self.assertEqual(self.submitted, [])
        # qselect is not tried again.
        self.successResultOf(self.handler.reattach(self.request("5f3a9c0-9-0"), None))
        self.assertEqual(len(self.run.of("qselect")), 1)

    def test_find_by_name_filters_owner(self):
        handler = self.make_handler(user="someone-else")
        self.successResultOf(handler.reattach(self.request("5f3a9c0-8-0"), None))
        self.assertEqual(len(self.submitted), 1)  # not found, so submitted

    def test_resource_info(self):
        self.run.programs["qstat"] = lambda argv, stdin: (data("torque_qstat_Q_f.txt"), "", 0)
        handler = self.make_handler(queue="batch")
        info = self.successResultOf(handler.resource_info())
        self.assertEqual(
            info,
            {
                "queue": "batch",
                "enabled": True,
                "started": True,
                "totalJobs": 57,
                "jobs": {"transit": 0, "queued": 12, "held": 3, "waiting": 0, "running": 40, "exiting": 0, "complete": 2},
                "agentJobs": {"queued": 0, "running": 0},
            },
        )
        self.assertEqual(self.run.of("qstat")[0], ["qstat", "-Q", "-f", "batch"])
        everything = self.successResultOf(self.handler.resource_info())
        self.assertEqual([q["queue"] for q in everything["queues"]], ["batch", "long"])
        self.assertFalse(everything["queues"][1]["started"])


class TorqueXmlStatusTests(StatusTestsMixin, SynchronousTestCase):
    sample = "torque_qstat_x.xml"
    expected = {k: v for k, v in TorqueStatusTests.expected.items() if k in ("1201", "1202", "1203")}
    exit_files = {"1201": 0, "1202": 3}
    active = {"1207": RUNNING, "1208": QUEUED}
    suffix = ".headnode.cluster.local"
    running_number = "1207"
    done_number = "1201"

    def make_handler(self, **kwargs):
        kwargs.setdefault("qstat_format", "xml")
        return Mixin.make_handler(self, **kwargs)

    def test_xml_argv(self):
        self.assertEqual(self.handler.status_argv(["1.s", "2.s"]), ["qstat", "-x", "1.s", "2.s"])

    def test_bad_xml_changes_nothing(self):
        job = self.attach("1201" + self.suffix, exit_code=0)
        self.run.programs["qstat"] = lambda argv, stdin: ("<Data><Job>", "", 0)
        self.poll()
        self.assertNoResult(job.result)


class PbsProStatusTests(StatusTestsMixin, SynchronousTestCase):
    handler_class = PbsProTaskHandler
    sample = "pbspro_qstat_f_json.json"
    unknown = PBSPRO_UNKNOWN
    suffix = ".pbsserver"
    running_number = "3106"
    done_number = "3101"
    expected = {
        "3101": JobResult(0),
        "3102": JobResult(3, "exit code 3"),
        "3103": JobResult(None, "TIMEOUT: time limit of 600 s exceeded (PBS exit_status -29: job exceeded walltime)"),
        "3104": JobResult(
            None,
            "KILLED: the job was killed (killed by signal 15 (SIGTERM), exit_status 271; "
            "qdel outside the agent, or a resource limit)",
        ),
        "3105": JobResult(None, "OUT_OF_MEMORY: the job exceeded its memory limit (PBS exit_status -27: job exceeded mem)"),
        "3111": JobResult(
            None, "EXEC_FAILED: the scheduler could not run the job (exit_status -1: job exec failed, before files, no retry)"
        ),
    }
    exit_files = {"3101": 0, "3102": 3}
    active = {"3106": RUNNING, "3107": QUEUED, "3108": QUEUED, "3110": RUNNING}

    def qsub(self, argv, stdin):
        self.submitted.append(argv)
        return f"{3300 + len(self.submitted)}.pbsserver\n", "", 0

    def test_json_argv(self):
        self.assertEqual(self.handler.status_argv(["1.s"]), ["qstat", "-f", "-F", "json", "-x", "1.s"])
        self.assertEqual(self.handler.select_argv("ex"), ["qselect", "-N", "ex", "-u", "everest", "-x"])

    def test_deleted_while_queued(self):
        job = self.attach("3109" + self.suffix)
        for _ in range(3):
            self.poll()
        self.assertEqual(
            self.successResultOf(job.result).reason,
            "the job ended without recording an exit status "
            "(scheduler state F, comment: Job deleted by everest@login1; see .everest/job.out)",
        )

    def test_unescaped_backslashes(self):
        self.run.programs["qstat"] = lambda argv, stdin: (data("pbspro_qstat_bad_escape.json"), "", 0)
        job = self.attach("3201" + self.suffix, exit_code=0)
        self.poll()
        self.assertEqual(self.successResultOf(job.result), JobResult(0))

    def test_bad_json_changes_nothing(self):
        job = self.attach("3101" + self.suffix, exit_code=0)
        self.run.programs["qstat"] = lambda argv, stdin: ('{"Jobs": {"3101.pbsserver": {', "", 0)
        self.poll()
        self.assertNoResult(job.result)

    def test_find_by_name_without_qselect(self):
        job = self.successResultOf(self.handler.reattach(self.request("5f3a9c0-7-0"), None))
        self.assertEqual(job.job_id, "3107.pbsserver")
        self.assertEqual(self.run.of("qstat")[0], ["qstat", "-f", "-F", "json", "-x"])
        self.assertEqual(self.submitted, [])

    def test_resource_info(self):
        self.run.programs["qstat"] = lambda argv, stdin: (data("pbspro_qstat_Q_f_json.json"), "", 0)
        handler = self.make_handler(queue="workq")
        info = self.successResultOf(handler.resource_info())
        self.assertEqual(info["queue"], "workq")
        self.assertEqual(info["totalJobs"], 1041)
        self.assertEqual(info["jobs"]["running"], 805)
        self.assertEqual(self.run.of("qstat")[0], ["qstat", "-Q", "-f", "-F", "json", "workq"])
        missing = self.make_handler(queue="nope")
        self.assertIn("does not list queue nope", self.successResultOf(missing.resource_info())["error"])


class ParserTests(SynchronousTestCase):
    def test_torque_text(self):
        jobs = dict(pbs.parse_qstat_text(data("torque_qstat_f.txt")))
        self.assertEqual(len(jobs), 11)
        first = jobs["1201.headnode.cluster.local"]
        self.assertEqual(first["Job_Name"], "e5f3a9c0-1-0")
        self.assertEqual(first["exit_status"], "0")
        # Continuation lines are joined.
        self.assertEqual(first["Output_Path"], "login1.cluster.local:/home/everest/tasks/5f3a9c0-1-0/.everest/job.out")
        self.assertTrue(first["Variable_List"].endswith("PBS_O_HOST=login1.cluster.local,PBS_O_SERVER=headnode"))
        self.assertIn("PBS_O_PATH=/usr/local/bin:/usr/bin:/bin,", first["Variable_List"])
        self.assertEqual(first["resources_used.walltime"], "00:00:05")

    def test_pbspro_text(self):
        jobs = dict(pbs.parse_qstat_text(data("pbspro_qstat_f.txt")))
        self.assertEqual(sorted(jobs), ["3101.pbsserver", "3103.pbsserver", "3106.pbsserver"])
        failed = pbs.pbs_status("3103.pbsserver", jobs["3103.pbsserver"], "pbspro")
        self.assertEqual((failed.phase, failed.failure), (ENDED, "TIMEOUT"))
        self.assertTrue(jobs["3101.pbsserver"]["Submit_arguments"].endswith("/.everest/job.sh"))
        self.assertEqual(pbs.pbs_status("3106.pbsserver", jobs["3106.pbsserver"], "pbspro").phase, RUNNING)

    def test_pbspro_json_matches_text(self):
        from_json = dict(pbs.parse_qstat_json(data("pbspro_qstat_f_json.json")))
        from_text = dict(pbs.parse_qstat_text(data("pbspro_qstat_f.txt")))
        for job_id, attrs in from_text.items():
            for key in ("Job_Name", "job_state", "Exit_status", "resources_used.walltime", "Resource_List.walltime", "comment"):
                if key in attrs:
                    self.assertEqual(str(from_json[job_id][key]), attrs[key], (job_id, key))

    def test_torque_xml(self):
        jobs = dict(pbs.parse_qstat_xml(data("torque_qstat_x.xml")))
        self.assertEqual(len(jobs), 5)
        attrs = jobs["1203.headnode.cluster.local"]
        self.assertEqual((attrs["job_state"], attrs["exit_status"]), ("C", "-11"))
        self.assertEqual(attrs["Resource_List.walltime"], "00:10:00")
        self.assertEqual(attrs["resources_used.walltime"], "00:10:04")
        self.assertEqual(attrs["Variable_List"], "PBS_O_QUEUE=batch,PBS_O_HOME=/home/everest,X=<a&b>")
        self.assertEqual(pbs.parse_qstat_xml(""), [])

    def test_slurm_wrapper_text(self):
        jobs = pbs.parse_qstat_text(data("slurm_wrapper_qstat_f.txt"))
        self.assertEqual([job_id for job_id, _ in jobs], ["16", "17"])
        statuses = [pbs.pbs_status(job_id, attrs, "torque") for job_id, attrs in jobs]
        self.assertEqual([(s.phase, s.name, s.failure, s.exit_code) for s in statuses],
                         [(RUNNING, "eTask-run", None, None), (ENDED, "eTask-done", None, None)])
        queues = pbs.parse_queues_text(data("slurm_wrapper_qstat_Q_f.txt"))
        self.assertEqual(pbs.queue_info("debug", queues["debug"]), {"queue": "debug", "enabled": True, "started": True})

    def test_states(self):
        for flavor, letters in (("torque", "QHWTRESC"), ("pbspro", "QHWTMRESBUFX")):
            for letter in letters:
                status = pbs.pbs_status("1", {"job_state": letter}, flavor)
                expected = QUEUED if letter in "QHWTM" else ENDED if letter in "CFX" else RUNNING
                self.assertEqual(status.phase, expected, (flavor, letter))
        self.assertEqual(pbs.pbs_status("1", {"job_state": "C"}, "pbspro").phase, UNKNOWN)
        self.assertEqual(pbs.pbs_status("1", {"job_state": "F"}, "torque").phase, UNKNOWN)
        self.assertEqual(pbs.pbs_status("1", {}, "torque").phase, UNKNOWN)

    def test_exit_statuses(self):
        def failure(status, **attrs):
            return pbs.exit_status_failure(status, attrs, pbs.PBSPRO_EXIT)[0]

        self.assertEqual(failure(None), None)
        self.assertEqual(failure(0), None)
        self.assertEqual(failure(255), None)
        self.assertEqual(failure(-29), "TIMEOUT")
        self.assertEqual(failure(-26), "OUT_OF_MEMORY")
        self.assertEqual(failure(-28), "CPU_LIMIT")
        self.assertEqual(failure(-20), "NODE_FAIL")
        self.assertEqual(failure(-99), "EXEC_FAILED")
        self.assertEqual(failure(265), "KILLED")
        walltime = {"resources_used.walltime": "01:00:03", "Resource_List.walltime": "01:00:00"}
        self.assertEqual(failure(271, **walltime), "TIMEOUT")
        self.assertEqual(pbs.exit_status_failure(-12, {}, pbs.TORQUE_EXIT)[0], "CPU_LIMIT")

    def test_seconds(self):
        self.assertEqual(pbs.seconds_of("01:02:03"), 3723)
        self.assertEqual(pbs.seconds_of("90"), 90)
        self.assertEqual(pbs.seconds_of("2:00"), 120)
        self.assertIsNone(pbs.seconds_of("soon"))

    def test_state_count(self):
        self.assertEqual(
            pbs.parse_state_count("Transit:0 Queued:165 Held:70 Waiting:0 Running:805 Exiting:1 Begun:0 "),
            {"transit": 0, "queued": 165, "held": 70, "waiting": 0, "running": 805, "exiting": 1, "begun": 0},
        )

    def test_id_matching(self):
        jobs = [("12.head.cluster.local", {"a": 1}), ("13.head", {"a": 2})]
        self.assertEqual(
            pbs._match_ids(["12.head.cluster.local", "13.head.cluster.local", "14.head"], jobs),
            {"12.head.cluster.local": {"a": 1}, "13.head.cluster.local": {"a": 2}},
        )


# ----------------------------------------------------------------------
# For real, through SLURM's PBS wrappers.


def _wrapper_problem():
    if helpers.REAL_SLURM_PROBLEM:
        return helpers.REAL_SLURM_PROBLEM
    paths = [shutil.which(tool) for tool in ("qsub", "qstat", "qdel")]
    if None in paths:
        return "SLURM's PBS wrappers (Debian package slurm-wlm-torque) are not installed"
    with open(paths[0], "rb") as f:
        if b"sbatch" not in f.read():
            return f"{paths[0]} is not SLURM's qsub wrapper"
    return None


WRAPPER_PROBLEM = _wrapper_problem()


class WrapperTests(TestCase):
    """
    L{TorqueTaskHandler} with the real C{qsub}/C{qstat}/C{qdel} of
    C{slurm-wlm-torque} over the real SLURM.  These wrappers show neither
    C{exit_status} nor a reason for a killed job, so the exit-code file
    decides everything here.
    """

    timeout = 120
    if WRAPPER_PROBLEM:
        skip = WRAPPER_PROBLEM

    def setUp(self):
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        self.job_ids = []
        self.handlers = []

    def tearDown(self):
        for handler in self.handlers:
            if handler.running:
                handler.stopService()
        if self.job_ids:
            subprocess.run(["scancel"] + [i.split(".")[0] for i in self.job_ids], capture_output=True)

    def handler(self, **kwargs):
        kwargs.setdefault("poll_interval", 0.2)
        kwargs.setdefault("command_timeout", 20)
        handler = TorqueTaskHandler(global_reactor, **kwargs)
        handler.startService()
        self.handlers.append(handler)
        return handler

    def request(self, name, command, environment=None, **requirements):
        task_id = f"{name}-{uuid.uuid4().hex[:10]}"
        directory = os.path.join(self.base, task_id)
        os.makedirs(directory)
        return JobRequest(task_id, directory, command, dict(environment or {}, EVEREST_TASK_ID=task_id), requirements)

    @defer.inlineCallbacks
    def submit(self, handler, request):
        job = yield handler.submit(request)
        self.job_ids.append(job.job_id)
        return job

    @defer.inlineCallbacks
    def test_success_and_failure(self):
        handler = self.handler()
        value = "a'b \"$c\" `d`\nnext"
        good = self.request("tq-ok", 'printf "%s" "$V"', {"V": value}, nodes=1, coresPerNode=1, timeLimit=300, memoryPerCore=50)
        bad = self.request("tq-bad", "exit 3")
        jobs = [(yield self.submit(handler, good)), (yield self.submit(handler, bad))]
        verifyObject(IJob, jobs[0])
        self.assertEqual((yield jobs[0].result), JobResult(0))
        self.assertEqual((yield jobs[1].result), JobResult(3, "exit code 3"))
        with open(os.path.join(good.directory, "stdout")) as f:
            self.assertEqual(f.read(), value)
        # The resources reached SLURM through the wrapper.
        limit = subprocess.run(["squeue", "-h", "-t", "all", "-j", jobs[0].job_id, "-o", "%l|%j"],
                               capture_output=True, text=True).stdout.strip()
        self.assertEqual(limit, f"5:00|e{good.task_id}")

    @defer.inlineCallbacks
    def test_cancel(self):
        handler = self.handler()
        job = yield self.submit(handler, self.request("tq-cancel", "sleep 300"))
        yield job.running
        yield job.cancel()
        result = yield job.result
        self.assertTrue(result.canceled)

    @defer.inlineCallbacks
    def test_restart_reattaches_by_id_and_by_name(self):
        first = self.handler()
        by_id = self.request("tq-re-id", "sleep 2")
        by_name = self.request("tq-re-name", "sleep 2; exit 4")
        job_a = yield self.submit(first, by_id)
        job_b = yield self.submit(first, by_name)
        yield first.stopService()
        second = self.handler()
        again_a = yield second.reattach(by_id, job_a.job_id)
        again_b = yield second.reattach(by_name, None)  # no qselect here: qstat -f, filtered
        self.assertEqual((again_a.job_id, again_b.job_id), (job_a.job_id, job_b.job_id))
        self.assertEqual((yield again_a.result), JobResult(0))
        self.assertEqual((yield again_b.result), JobResult(4, "exit code 4"))
        names = subprocess.run(["squeue", "-h", "-t", "all", f"--name=e{by_name.task_id}", "-o", "%i"],
                               capture_output=True, text=True).stdout.split()
        self.assertEqual(names, [job_b.job_id])

    @defer.inlineCallbacks
    def test_resource_info(self):
        info = yield self.handler().resource_info()
        self.assertTrue(info["queues"])
        self.assertTrue(all(q["enabled"] for q in info["queues"]))
