"""
The configuration file: every mistake gives one line naming file, section and key.
"""

import os
import signal
import textwrap

from twisted.trial.unittest import SynchronousTestCase

from everest_agent import config


class ConfigTests(SynchronousTestCase):
    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.token_file = os.path.join(self.dir, "token")
        with open(self.token_file, "w") as f:
            f.write("s3cret-token\n")
        os.chmod(self.token_file, 0o600)

    def write(self, text, mode=0o600):
        path = os.path.join(self.dir, "agent.ini")
        with open(path, "w") as f:
            f.write(textwrap.dedent(text))
        os.chmod(path, mode)
        return path

    def good(self, extra=""):
        return self.write(f"""
            [platform]
            url = wss://everest.example.org/compute/agent/v1
            token_file = {self.token_file}   ; a comment
            [agent]
            work_dir = {self.dir}/tasks
            state_dir = {self.dir}/state
            max_tasks = 4
            [handler]
            type = local
            [security]
            allowed_commands =
                echo .*
                bash run-task\\.sh \\d+
            """ + extra)

    def error(self, path):
        e = self.assertRaises(config.ConfigError, config.load, path)
        message = str(e)
        self.assertNotIn("\n", message)
        self.assertTrue(message.startswith(path), message)
        return message

    def test_good(self):
        c = config.load(self.good())
        self.assertEqual(c.platform.token, "s3cret-token")
        self.assertEqual(c.agent.max_tasks, 4)
        self.assertEqual(c.handler.type, "local")
        self.assertEqual([p.pattern for p in c.security.allowed_commands], ["echo .*", r"bash run-task\.sh \d+"])
        self.assertEqual(c.platform.ping_interval, 30.0)
        self.assertTrue(c.agent.hostname)

    def test_example_config_parses(self):
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        with open(os.path.join(here, "examples", "agent.ini")) as f:
            text = f.read()
        text = text.replace("/etc/everest-agent/token", self.token_file)
        c = config.load(self.write(text))
        self.assertEqual(c.handler.type, "local")

    def test_missing_file(self):
        message = self.error(os.path.join(self.dir, "nope.ini"))
        self.assertIn("no such configuration file", message)

    def test_unknown_section(self):
        message = self.error(self.good("[plaform]\nurl = x\n"))
        self.assertIn("[plaform]: unknown section", message)

    def test_unknown_key(self):
        message = self.error(self.good("[agent]\n"))  # duplicate section
        self.assertIn("agent", message)
        path = self.write(open(self.good()).read().replace("max_tasks", "max_task"))
        message = self.error(path)
        self.assertIn("[agent] max_task: unknown key", message)

    def test_bad_values(self):
        for key, value, words in [
            ("max_tasks", "0", "at least 1"),
            ("max_tasks", "many", "bad value 'many'"),
            ("kill_grace", "-1", "positive"),
        ]:
            path = self.write(open(self.good()).read().replace("max_tasks = 4", f"{key} = {value}"))
            message = self.error(path)
            self.assertIn(f"[agent] {key}: bad value", message)
            self.assertIn(words, message)

    def test_bad_regex(self):
        path = self.write(open(self.good()).read().replace("echo .*", "echo ("))
        self.assertIn("[security] allowed_commands: bad value", self.error(path))

    def test_bad_handler(self):
        path = self.write(open(self.good()).read().replace("type = local", "type = condor"))
        self.assertIn("[handler] type: bad value 'condor'", self.error(path))

    def test_handler_keys_depend_on_type(self):
        path = self.write(open(self.good()).read().replace("type = local", "type = local\npartition = debug"))
        self.assertIn("[handler] partition: unknown key", self.error(path))
        path = self.write(open(self.good()).read().replace("type = local", "type = slurm\npartition = debug"))
        self.assertEqual(config.load(path).handler.partition, "debug")

    def test_token_rules(self):
        text = open(self.good()).read()
        self.assertIn("neither is set", self.error(self.write(text.replace(f"token_file = {self.token_file}", ""))))
        both = text.replace("[platform]", "[platform]\ntoken = abc")
        self.assertIn("both are set", self.error(self.write(both)))
        os.chmod(self.token_file, 0o644)
        message = self.error(self.write(text))
        self.assertIn("[platform] token_file", message)
        self.assertIn("others can read it (mode 0644)", message)
        self.assertNotIn("s3cret", message)
        os.chmod(self.token_file, 0o600)
        with open(self.token_file, "w") as f:
            f.write("\n")
        self.assertIn("the file is empty", self.error(self.write(text)))
        os.unlink(self.token_file)
        self.assertIn("no such file", self.error(self.write(text)))

    def _within(self, seconds, f, *args):
        """Call C{f}, failing (not hanging) if it blocks for C{seconds}."""
        def expired(signum, frame):
            raise AssertionError(f"blocked for more than {seconds} s")

        previous = signal.signal(signal.SIGALRM, expired)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            return f(*args)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

    def test_token_file_fifo_does_not_hang(self):
        os.unlink(self.token_file)
        os.mkfifo(self.token_file, 0o600)
        path = self.write(open(self.good()).read())
        message = self._within(5, self.error, path)
        self.assertIn("[platform] token_file", message)
        self.assertIn("not a regular file", message)

    def test_token_file_device_or_huge_file_refused_unread(self):
        text = open(self.good()).read()
        message = self._within(5, self.error, self.write(text.replace(self.token_file, "/dev/zero")))
        self.assertIn("not a regular file", message)
        with open(self.token_file, "wb") as f:
            f.truncate(64 * 1024 * 1024)  # sparse: nothing to read but its size
        message = self._within(5, self.error, self.write(text))
        self.assertIn("too big for a token file", message)

    def test_token_file_symlink_refused(self):
        link = os.path.join(self.dir, "link")
        os.symlink(self.token_file, link)
        text = open(self.good()).read().replace(self.token_file, link)
        self.assertIn("is a symbolic link", self.error(self.write(text)))

    def test_token_file_mode_checked_before_reading(self):
        os.chmod(self.token_file, 0o640)
        real_read = os.read
        reads = []

        def read(fd, n):
            reads.append(fd)
            return real_read(fd, n)

        self.patch(os, "read", read)
        self.assertIn("others can read it (mode 0640)", self.error(self.write(open(self.good()).read())))
        self.assertEqual(reads, [])

    def test_non_ascii_token_never_shown(self):
        text = open(self.good()).read()
        for token in ("s3cr\u00e9t-token", "abc\u20acdef", "tab\there", "zero\u200bwidth"):
            with open(self.token_file, "w", encoding="utf-8") as f:
                f.write(token + "\n")
            message = self.error(self.write(text))
            self.assertIn("printable ASCII", message)
            for part in (token, token[3:], token[:4], "position", "\u00e9", "\u20ac", "\\x", "\\u"):
                self.assertNotIn(part, message)
            inline = text.replace(f"token_file = {self.token_file}", f"token = {token}")
            message = self.error(self.write(inline))
            self.assertIn("printable ASCII", message)
            self.assertNotIn(token, message)

    def test_loopback_only_by_address(self):
        for host in ("localhost", "127.0.0.1", "127.5.6.7", "::1", "[::1]", "LOCALHOST", "localhost."):
            self.assertTrue(config.is_loopback(host), host)
        for host in ("127.0.0.1.nip.io", "127.example.org", "localhost.evil.org", "::ffff:8.8.8.8",
                     "128.0.0.1", "", None, "0.0.0.0"):
            self.assertFalse(config.is_loopback(host), host)
        text = open(self.good()).read()
        path = self.write(text.replace("wss://everest.example.org", "ws://127.0.0.1.nip.io:8080"))
        self.assertIn("plain ws:// to 127.0.0.1.nip.io", self.error(path))

    def test_inline_token_needs_private_config(self):
        text = open(self.good()).read().replace(f"token_file = {self.token_file}", "token = abc")
        self.assertEqual(config.load(self.write(text)).platform.token, "abc")
        self.assertIn("others can read it", self.error(self.write(text, mode=0o644)))

    def test_insecure_ws(self):
        text = open(self.good()).read()
        path = self.write(text.replace("wss://everest.example.org", "ws://everest.example.org"))
        self.assertIn("[platform] url: plain ws:// to everest.example.org", self.error(path))
        path = self.write(text.replace("wss://everest.example.org", "ws://127.0.0.1:8080"))
        self.assertEqual(config.load(path).platform.url, "ws://127.0.0.1:8080/compute/agent/v1")
        path = self.write(
            text.replace("wss://everest.example.org", "ws://everest.example.org").replace(
                "[platform]", "[platform]\nallow_insecure = yes"
            )
        )
        self.assertTrue(config.load(path).platform.allow_insecure)

    def test_bad_url(self):
        text = open(self.good()).read()
        path = self.write(text.replace("wss://everest.example.org", "https://everest.example.org"))
        self.assertIn("[platform] url: 'https://", self.error(path))

    def test_missing_url(self):
        text = open(self.good()).read().replace("url = wss://everest.example.org/compute/agent/v1", "")
        self.assertIn("[platform] url: missing", self.error(self.write(text)))

    def test_ca_file_must_exist(self):
        text = open(self.good()).read().replace("[platform]", "[platform]\nca_file = /nonexistent/ca.pem")
        self.assertIn("[platform] ca_file: /nonexistent/ca.pem: no such file", self.error(self.write(text)))
