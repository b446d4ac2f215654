"""
The documentation agrees with the code: every configuration key is in the
reference (and nothing else is), every metric is listed, the pages hang
together, and the examples are valid.
"""

import configparser
import os
import re
import shutil
import subprocess
import types

from twisted.trial.unittest import SynchronousTestCase

from everest_agent import config as agent_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")


def read(*parts):
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


def documented_keys(text):
    """
    C{{(scope, key)}} from the reference: a C{.. config-section: a b} comment
    sets the scopes (C{platform}, C{handler.slurm}...), and each definition
    list term C{``key``} that follows belongs to every one of them.
    """
    found = {}
    scopes = []
    lines = text.splitlines()
    for number, line in enumerate(lines):
        marker = re.match(r"\.\. config-section:\s*(.+)$", line)
        if marker:
            scopes = marker.group(1).split()
            continue
        term = re.match(r"``([a-z_]+)``\s*$", line)
        if term and scopes and number + 1 < len(lines) and lines[number + 1].startswith("    "):
            body = []
            for following in lines[number + 1:]:
                if following and not following.startswith(" "):
                    break
                body.append(following)
            for scope in scopes:
                found[(scope, term.group(1))] = "\n".join(body)
    return found


def code_keys():
    found = {(section, key) for section, keys in agent_config.SCHEMA.items() for key in keys}
    for handler_type, keys in agent_config.HANDLER_KEYS.items():
        found |= {(f"handler.{handler_type}", key) for key in keys}
    return found


class ConfigurationReferenceTests(SynchronousTestCase):
    def setUp(self):
        self.documented = documented_keys(read("docs", "configuration.rst"))

    def test_every_key_is_documented(self):
        missing = sorted(code_keys() - set(self.documented))
        self.assertEqual(
            missing, [],
            "keys in config.SCHEMA/HANDLER_KEYS but not in docs/configuration.rst "
            "(add an entry under the right '.. config-section:')",
        )

    def test_no_stale_keys(self):
        stale = sorted(set(self.documented) - code_keys())
        self.assertEqual(stale, [], "keys documented in docs/configuration.rst that the code does not know")

    def test_each_entry_gives_a_default_and_an_example(self):
        for (scope, key), body in self.documented.items():
            self.assertIn("Default:", body, f"[{scope}] {key}: no 'Default:'")
            self.assertIn("Example", body, f"[{scope}] {key}: no example")

    def test_the_parser_finds_what_it_should(self):
        """The reference's format, as the test reads it: one sample."""
        sample = (
            ".. config-section: a b\n\n``one``\n    Meaning.\n\n    Default: x.\n\n"
            "``not_a_term`` in a sentence.\n\n.. config-section: c\n\n``two``\n    More.\n"
        )
        self.assertEqual(sorted(documented_keys(sample)), [("a", "one"), ("b", "one"), ("c", "two")])

    def test_example_ini_uses_known_keys(self):
        parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";",))
        parser.optionxform = str
        parser.read_string(read("examples", "agent.ini"))
        handler_type = parser.get("handler", "type", fallback="local")
        for section in parser.sections():
            self.assertIn(section, agent_config.SCHEMA)
            known = dict(agent_config.SCHEMA[section])
            if section == "handler":
                known.update(agent_config.HANDLER_KEYS[handler_type])
            for key in parser[section]:
                self.assertIn(key, known, f"examples/agent.ini: [{section}] {key}")


class PagesTests(SynchronousTestCase):
    def pages(self):
        return sorted(name[:-4] for name in os.listdir(DOCS) if name.endswith(".rst"))

    def test_index_lists_every_page(self):
        index = read("docs", "index.rst")
        toctree = re.search(r"\.\. toctree::\n(?:   :\w+:.*\n)*\n((?:   \S.*\n)+)", index)
        self.assertIsNotNone(toctree)
        listed = [line.strip() for line in toctree.group(1).splitlines()]
        self.assertEqual(sorted(listed), sorted(p for p in self.pages() if p != "index"))

    def test_expected_pages(self):
        for page in ("installation", "quickstart", "configuration", "handlers", "protocol",
                     "operations", "security", "benchmarks"):
            self.assertIn(page, self.pages())

    def test_cross_references_resolve(self):
        pages = set(self.pages())
        labels = set()
        texts = {page: read("docs", page + ".rst") for page in pages}
        for text in texts.values():
            labels.update(re.findall(r"^\.\. _([\w-]+):$", text, re.M))
        for page, text in texts.items():
            for target in re.findall(r":doc:`([^`<]+)`", text):
                self.assertIn(target, pages, f"{page}.rst: :doc:`{target}`")
            for target in re.findall(r":ref:`([^`<]+)`", text):
                self.assertIn(target, labels, f"{page}.rst: :ref:`{target}`")

    def test_headings_are_well_formed(self):
        """Each title's underline is at least as long as the title (docutils requires it)."""
        for page in self.pages():
            lines = read("docs", page + ".rst").splitlines()
            self.assertFalse(any("\t" in line for line in lines), f"{page}.rst has tabs")
            for number in range(1, len(lines)):
                underline, title = lines[number], lines[number - 1]
                if re.fullmatch(r"([=\-~^])\1{2,}", underline) and title.strip() and not title.startswith(" "):
                    self.assertGreaterEqual(len(underline), len(title), f"{page}.rst line {number + 1}")

    def test_readme_points_to_the_documentation(self):
        readme = read("README.rst")
        section = readme[readme.index("\nOperations\n----------\n"):]
        for page in ("docs/operations.rst", "docs/configuration.rst", "docs/index.rst"):
            self.assertIn(page, section)
        # The two commands at the top are still there, first.
        self.assertLess(readme.index("everest-agent demo"), readme.index("\nOperations\n"))

    def test_plain_install_commands(self):
        """
        The commands people copy install plainly: no workaround flag for the
        twistd plugins (tests/test_install.py shows none is needed).
        """
        for name in ("README.rst", os.path.join(".ci", "run"), os.path.join("docs", "installation.rst")):
            text = read(name)
            self.assertNotIn("editable_mode", text, name)
            self.assertNotIn("--config-settings", text, name)
        self.assertIn("pip install -e '.[test]' && ", read("README.rst"))

    def test_every_metric_is_listed(self):
        from everest_agent import monitor
        from everest_agent.manager import SlotPool

        outbox = type("Outbox", (), {"last_seq": 0, "acked": 0, "oldest": lambda self: None,
                                     "__len__": lambda self: 0})()
        agent = types.SimpleNamespace(
            handler=types.SimpleNamespace(name="slurm", poll_count=1, poll_failures=0, last_poll_duration=0.1),
            outbox=outbox, wallclock=lambda: 0.0,
            manager=types.SimpleNamespace(registry=types.SimpleNamespace(records={}), pool=SlotPool(1)),
            sender=types.SimpleNamespace(connected=True, sent=0), monitor=types.SimpleNamespace(sent=0),
            stager=object(),
            status=types.SimpleNamespace(connection={"since": 1.0, "connects": 1, "reconnects": 0},
                                         data={"started": 1.0}),
        )
        operations = read("docs", "operations.rst")
        names = set()
        for family in monitor.AgentCollector(agent).collect():
            names.add(family.name + ("_total" if family.type == "counter" else ""))
        self.assertGreater(len(names), 15)
        for name in sorted(names):
            self.assertIn(f"``{name}", operations, f"metric {name} missing from docs/operations.rst")


class ServiceFileTests(SynchronousTestCase):
    def setUp(self):
        self.text = read("examples", "everest-agent.service")
        parser = configparser.ConfigParser(interpolation=None, strict=False)
        parser.optionxform = str
        parser.read_string(self.text)
        self.service = parser["Service"]

    def test_tasks_outlive_a_restart(self):
        self.assertEqual(self.service["KillMode"], "process")

    def test_foreground_twistd(self):
        self.assertEqual(self.service["Type"], "simple")
        argv = self.service["ExecStart"].split()
        self.assertTrue(argv[0].endswith("/twistd"))
        self.assertIn("--nodaemon", argv)
        self.assertIn("--pidfile=", argv)
        self.assertEqual(argv[-3:-1], ["everest-agent", "--config"])

    def test_systemd_accepts_it(self):
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise __import__("unittest").SkipTest("no systemd-analyze")
        twistd = shutil.which("twistd") or "/bin/true"
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        unit = os.path.join(directory, "everest-agent.service")
        with open(unit, "w") as f:
            f.write(self.text.replace("/opt/everest-agent/bin/twistd", twistd))
        result = subprocess.run([analyze, "verify", unit], capture_output=True, text=True, timeout=60)
        problems = [line for line in (result.stdout + result.stderr).splitlines()
                    if "everest-agent.service" in line]
        self.assertEqual(problems, [])


class SphinxBuildTests(SynchronousTestCase):
    """
    The documentation builds with Sphinx, warnings as errors (a broken
    reference, a malformed table, a page outside the toctree all fail).
    """

    def test_html_builds_without_warnings(self):
        try:
            import sphinx  # noqa: F401
        except ImportError:
            raise __import__("unittest").SkipTest(
                "Sphinx is not installed (pip install -e '.[docs]'); the documentation build is not checked")
        import sys

        out = os.path.abspath(self.mktemp())
        result = subprocess.run(
            [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
             "-d", os.path.join(out, "doctrees"), DOCS, os.path.join(out, "html")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
        )
        self.assertEqual(result.returncode, 0, f"sphinx-build -W failed:\n{result.stdout[-4000:]}")
        for page in ("index", "configuration", "operations"):
            self.assertTrue(os.path.exists(os.path.join(out, "html", page + ".html")))

    def test_sphinx_sees_a_broken_reference(self):
        """The build is strict enough to fail on a :doc: to a missing page."""
        try:
            import sphinx  # noqa: F401
        except ImportError:
            raise __import__("unittest").SkipTest("Sphinx is not installed (pip install -e '.[docs]')")
        import sys

        copy = os.path.abspath(self.mktemp())
        docs = os.path.join(copy, "docs")
        shutil.copytree(DOCS, docs, ignore=shutil.ignore_patterns("_build"))
        os.makedirs(os.path.join(copy, "everest_agent"))
        shutil.copy(os.path.join(ROOT, "everest_agent", "__init__.py"), os.path.join(copy, "everest_agent"))
        with open(os.path.join(docs, "quickstart.rst"), "a", encoding="utf-8") as f:
            f.write("\nSee :doc:`no-such-page`.\n")
        result = subprocess.run(
            [sys.executable, "-m", "sphinx", "-W", "-q", "-b", "html", docs, os.path.join(docs, "_build")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("no-such-page", result.stdout)
