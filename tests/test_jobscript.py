"""
The job script (L{everest_agent.jobscript}): quoting, the exit-code file,
and the script run for real by /bin/sh.
"""

import json
import os
import stat
import subprocess
import sys
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from everest_agent import jobscript
from everest_agent.interfaces import JobRequest

# A stand-in for /bin/sh that records how it was called: its "-c" argument
# and its environment, as JSON, into the file the RECORD variable names (or
# record.json in the working directory).
RECORDER = f"""#!{sys.executable}
import json, os, sys
path = os.environ.get("RECORD_TO") or "record.json"
with open(path, "w") as f:
    json.dump({{"argv": sys.argv[1:], "env": dict(os.environ), "cwd": os.getcwd()}}, f)
"""

# Text a task could hold: anything but NUL, with the shell's special
# characters made likely.
SPECIAL = "'\"$`\\\n\t !;&|<>(){}[]*?~#=%-"
TEXT = st.text(
    alphabet=st.one_of(st.sampled_from(SPECIAL), st.characters(blacklist_characters="\0", blacklist_categories=("Cs",))),
    max_size=40,
)
NAMES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True).filter(
    lambda n: n not in ("RECORD_TO", "PWD", "SHLVL", "OLDPWD", "_")
)


def run_script(path, env=None):
    return subprocess.run(
        ["/bin/sh", path],
        env=dict(env if env is not None else {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        timeout=30,
    ).returncode


class ScriptTextTests(SynchronousTestCase):
    def request(self, command="true", environment=None, directory="/work/tasks/t1"):
        return JobRequest("t1", directory, command, environment or {}, {})

    def test_structure(self):
        text = jobscript.job_script(self.request("echo hi", {"A": "1"}))
        lines = text.splitlines()
        self.assertEqual(lines[0], "#!/bin/sh")
        self.assertIn("cd /work/tasks/t1 || exit 90", lines)
        self.assertIn("A=1; export A", lines)
        self.assertIn("exec /bin/sh -c 'echo hi'", lines)
        self.assertIn(") </dev/null >stdout 2>stderr", lines)
        # The exit status is written last, by the one writer of that file.
        self.assertEqual(
            lines[-2],
            "printf '%11d\\n' \"$everest_status\" 1<>.everest/exitcode",
        )
        self.assertEqual(lines[-1], 'exit "$everest_status"')

    def test_directory_quoted(self):
        text = jobscript.job_script(self.request(directory="/tmp/a b'c$d"))
        self.assertIn("cd '/tmp/a b'\"'\"'c$d' || exit 90", text)

    def test_task_id_in_comment_cannot_break_out(self):
        text = jobscript.job_script(JobRequest("x\nrm -rf /", "/d", "true"))
        self.assertNotIn("\nrm -rf /", text)

    def test_bad_input_refused(self):
        for environment in ({"": "x"}, {"A=B": "x"}, {"A": "x\0y"}, {"A\0": "x"}):
            self.assertRaises(ValueError, jobscript.job_script, self.request(environment=environment))
        self.assertRaises(ValueError, jobscript.job_script, self.request(command="a\0b"))

    def test_odd_names_through_env(self):
        text = jobscript.job_script(self.request(environment={"A-B": "x y"}))
        self.assertIn("exec env -- 'A-B=x y' /bin/sh -c true", text)


class ExitCodeFileTests(SynchronousTestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(lambda: subprocess.run(["rm", "-rf", self.dir]))
        os.mkdir(os.path.join(self.dir, ".everest"))

    def write(self, text):
        with open(os.path.join(self.dir, jobscript.EXIT_CODE_FILE), "w") as f:
            f.write(text)

    def test_missing(self):
        self.assertIsNone(jobscript.read_exit_code(self.dir))

    def test_values(self):
        for text, code in (("0\n", 0), ("3\n", 3), ("255\n", 255), (" 137 \n", 137)):
            self.write(text)
            self.assertEqual(jobscript.read_exit_code(self.dir), code)

    def test_not_written_yet(self):
        # The one writer puts the number and its newline in one write: a
        # file without the newline is being written, not damaged.
        for text in ("", "3", "25"):
            self.write(text)
            self.assertIsNone(jobscript.read_exit_code(self.dir))

    def test_garbage(self):
        for text in ("\n", "x\n", "3 4\n", "1" * 20 + "\n"):
            self.write(text)
            self.assertRaises(ValueError, jobscript.read_exit_code, self.dir)

    def test_began_is_told_from_never_began(self):
        """Only the wrapper's mark, or a status, says the command began; an emptied file does not."""
        self.assertEqual(jobscript.read_exit_status(self.dir), (None, False))
        for text, status in (("", (None, False)),
                             ("          3 ", (None, False)),  # a status with its newline taken back
                             ("    started", (None, True)),
                             ("    started ", (None, True)),  # marked over an emptied status
                             ("          3\n", (3, True))):
            self.write(text)
            self.assertEqual(jobscript.read_exit_status(self.dir), status, text)

    def test_the_shell_writers_make_what_is_read(self):
        """The mark and then the status, written by /bin/sh over an emptied file, read as meant."""
        self.write("        137 ")
        mark = subprocess.run(["/bin/sh", "-c", jobscript.started_writer()], cwd=self.dir)
        self.assertEqual(mark.returncode, 0)
        self.assertEqual(jobscript.read_exit_status(self.dir), (None, True))
        status = subprocess.run(["/bin/sh", "-c", "s=4; " + jobscript.exit_code_writer("s")], cwd=self.dir)
        self.assertEqual(status.returncode, 0)
        self.assertEqual(jobscript.read_exit_status(self.dir), (4, True))
        with open(os.path.join(self.dir, jobscript.EXIT_CODE_FILE)) as f:
            self.assertEqual(len(f.read()), jobscript.EXIT_CODE_SIZE)


class RealScriptTests(SynchronousTestCase):
    """The script run by /bin/sh, as a scheduler would (but synchronously)."""

    def setUp(self):
        self.base = tempfile.mkdtemp()
        self.addCleanup(lambda: subprocess.run(["rm", "-rf", self.base]))
        self.dir = os.path.join(self.base, "task dir $x")
        os.mkdir(self.dir)
        self.recorder = os.path.join(self.base, "recorder")
        with open(self.recorder, "w") as f:
            f.write(RECORDER)
        os.chmod(self.recorder, 0o755)

    def request(self, command, environment=None):
        return JobRequest("t1", self.dir, command, environment or {}, {})

    def read(self, name):
        with open(os.path.join(self.dir, name)) as f:
            return f.read()

    def test_runs_and_records_exit_code(self):
        script = jobscript.write_job_script(
            self.request('echo "out $V"; echo err >&2; pwd; exit 3', {"V": "it's $HOME `x`"})
        )
        self.assertEqual(script, os.path.join(self.dir, ".everest", "job.sh"))
        self.assertTrue(os.stat(script).st_mode & stat.S_IXUSR)
        self.assertEqual(run_script(script), 3)
        self.assertEqual(self.read("stdout"), f"out it's $HOME `x`\n{self.dir}\n")
        self.assertEqual(self.read("stderr"), "err\n")
        self.assertEqual(jobscript.read_exit_code(self.dir), 3)
        self.assertTrue(jobscript.job_started(self.dir))
        self.assertFalse(os.path.exists(os.path.join(self.dir, jobscript.EXIT_CODE_FILE + ".tmp")))

    def test_success(self):
        script = jobscript.write_job_script(self.request("true"))
        self.assertEqual(run_script(script), 0)
        self.assertEqual(jobscript.read_exit_code(self.dir), 0)

    def test_killed_command(self):
        script = jobscript.write_job_script(self.request("kill -9 $$"))
        self.assertEqual(run_script(script), 137)
        self.assertEqual(jobscript.read_exit_code(self.dir), 137)

    def test_stdin_is_empty(self):
        script = jobscript.write_job_script(self.request("cat; echo done"))
        self.assertEqual(run_script(script), 0)
        self.assertEqual(self.read("stdout"), "done\n")

    def test_task_environment_cannot_break_the_script(self):
        # A task's PATH or IFS applies to the task, not to the script's end.
        script = jobscript.write_job_script(
            self.request("exit 4", {"PATH": "/nonexistent", "IFS": "x", "everest_status": "9"})
        )
        self.assertEqual(run_script(script), 4)
        self.assertEqual(jobscript.read_exit_code(self.dir), 4)

    def test_rewrite_clears_old_run(self):
        script = jobscript.write_job_script(self.request("exit 5"))
        run_script(script)
        with open(os.path.join(self.dir, jobscript.JOB_OUTPUT_FILE), "w") as f:
            f.write("old")
        jobscript.write_job_script(self.request("true"))
        self.assertIsNone(jobscript.read_exit_code(self.dir))
        self.assertFalse(jobscript.job_started(self.dir))
        self.assertFalse(os.path.exists(os.path.join(self.dir, jobscript.JOB_OUTPUT_FILE)))

    def test_requeued_run_clears_exit_code_first(self):
        # A job that runs again (requeued) must not leave the old status
        # visible while the command runs.
        script = jobscript.write_job_script(self.request(f"test ! -e {jobscript.EXIT_CODE_FILE}"))
        self.write_exit_code("1")
        self.assertEqual(run_script(script), 0)
        self.assertEqual(jobscript.read_exit_code(self.dir), 0)

    def write_exit_code(self, text):
        with open(os.path.join(self.dir, jobscript.EXIT_CODE_FILE), "w") as f:
            f.write(text)

    def test_missing_directory(self):
        jobscript.write_job_script(self.request("true"))
        moved = self.dir + "-moved"
        os.rename(self.dir, moved)
        self.assertEqual(run_script(os.path.join(moved, jobscript.SCRIPT_FILE)), jobscript.CD_FAILED)
        self.assertIsNone(jobscript.read_exit_code(moved))

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(command=TEXT, environment=st.dictionaries(NAMES, TEXT, max_size=4))
    def test_any_text_arrives_unchanged(self, command, environment):
        """
        Whatever the command and the environment hold (quotes, $, backticks,
        backslashes, newlines...), the shell running the task gets exactly
        that: the recorder standing in for /bin/sh sees it.
        """
        request = self.request(command, environment)
        script = jobscript.write_job_script(request, shell=self.recorder)
        record_to = os.path.join(self.base, "record.json")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "RECORD_TO": record_to}
        self.assertEqual(run_script(script, env), 0)
        with open(record_to) as f:
            record = json.load(f)
        self.assertEqual(record["argv"], ["-c", command])
        self.assertEqual(os.path.realpath(record["cwd"]), os.path.realpath(self.dir))
        for name, value in environment.items():
            self.assertEqual(record["env"].get(name), value, name)
