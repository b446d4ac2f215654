"""
The package installs the ways people install it, and twistd finds its
plugins after each: C{pip install .}, a plain C{pip install -e .} and a
wheel built by C{pip wheel}.

Each test makes a fresh virtualenv and installs a copy of this checkout
into it (the dependencies come from the package index), so these tests
are slow (tens of seconds each).  They skip, saying why, where there is no
venv/pip or the package index cannot be reached.
"""

import os
import shutil
import subprocess
import sys

from twisted.trial.unittest import SkipTest, SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: What is not copied from the checkout: built things, caches, virtualenvs.
IGNORED = shutil.ignore_patterns(
    ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", "*.pyc",
    "_trial_temp*", "dropin.cache", "_build",
)

PIP_TIMEOUT = 600

def checkout_packages():
    """Every package of the checkout's everest_agent tree (a directory with __init__.py)."""
    found = []
    for directory, dirs, files in os.walk(os.path.join(ROOT, "everest_agent")):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        if "__init__.py" in files:
            found.append(os.path.relpath(directory, ROOT).replace(os.sep, "."))
    return sorted(found)


class PackageListTests(SynchronousTestCase):
    """setup.cfg names every package, or an install leaves one out."""

    def test_every_package_is_installed(self):
        import configparser

        parser = configparser.ConfigParser()
        parser.read(os.path.join(ROOT, "setup.cfg"))
        listed = set(parser.get("options", "packages").split())
        self.assertEqual(sorted(set(checkout_packages()) - listed), [])


_index_problem = []  # [] not probed yet; [None] reachable; [reason] not


def _env():
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.pop("PYTHONHOME", None)
    env.pop("VIRTUAL_ENV", None)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _run(argv, cwd, timeout=PIP_TIMEOUT):
    return subprocess.run(argv, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=timeout, text=True)


def _tail(text, lines=15):
    return "\n".join(text.strip().splitlines()[-lines:])


class InstallTests(SynchronousTestCase):
    def setUp(self):
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        self.source = os.path.join(self.base, "everest-agent")
        shutil.copytree(ROOT, self.source, ignore=IGNORED, symlinks=True)

    def venv(self, name):
        """A fresh virtualenv; its bin directory."""
        path = os.path.join(self.base, name)
        result = _run([sys.executable, "-m", "venv", path], self.base, timeout=120)
        if result.returncode != 0:
            raise SkipTest(f"cannot make a virtualenv with {sys.executable} -m venv: {_tail(result.stdout, 3)}")
        bin_dir = os.path.join(path, "bin")
        self.probe_index(bin_dir)
        return bin_dir

    def probe_index(self, bin_dir):
        """Skip unless pip can fetch from the package index (once per run)."""
        if not _index_problem:
            result = _run([os.path.join(bin_dir, "python"), "-m", "pip", "download", "--no-deps",
                           "--dest", os.path.join(self.base, "probe"), "setuptools>=64"], self.base, timeout=300)
            _index_problem.append(None if result.returncode == 0 else _tail(result.stdout, 3))
        if _index_problem[0] is not None:
            raise SkipTest(f"pip cannot fetch from the package index (no network?): {_index_problem[0]}")

    def pip(self, bin_dir, *args):
        result = _run([os.path.join(bin_dir, "python"), "-m", "pip", *args], self.base)
        self.assertEqual(result.returncode, 0, f"pip {' '.join(args)} failed:\n{_tail(result.stdout)}")

    def assertPluginsFound(self, bin_dir):
        """
        twistd, run away from the checkout, knows both plugins and loads the
        agent's options.
        """
        elsewhere = os.path.join(self.base, "elsewhere")
        os.makedirs(elsewhere, exist_ok=True)
        twistd = os.path.join(bin_dir, "twistd")
        result = _run([twistd, "everest-agent", "--help"], elsewhere, timeout=120)
        self.assertEqual(result.returncode, 0, f"twistd everest-agent --help failed:\n{_tail(result.stdout)}")
        self.assertIn("--config", result.stdout)
        self.assertNotIn("Unknown command", result.stdout)
        result = _run([twistd, "--help"], elsewhere, timeout=120)
        self.assertIn("everest-agent", result.stdout)
        self.assertIn("everest-platform", result.stdout)
        result = _run([os.path.join(bin_dir, "everest-agent"), "version"], elsewhere, timeout=120)
        self.assertEqual(result.returncode, 0, result.stdout)

    def assertAgentImports(self, bin_dir):
        """Every module of the installed package imports, away from the checkout."""
        elsewhere = os.path.join(self.base, "elsewhere")
        os.makedirs(elsewhere, exist_ok=True)
        script = ("import pkgutil, importlib, everest_agent\n"
                  "for m in pkgutil.walk_packages(everest_agent.__path__, 'everest_agent.'):\n"
                  "    if not m.name.endswith('__main__'):\n"
                  "        importlib.import_module(m.name)\n"
                  "print(everest_agent.__file__)\n")
        result = _run([os.path.join(bin_dir, "python"), "-c", script], elsewhere, timeout=120)
        self.assertEqual(result.returncode, 0, f"importing the installed package failed:\n{_tail(result.stdout)}")
        self.assertNotIn(self.source, result.stdout)

    def test_install(self):
        """C{pip install .}"""
        bin_dir = self.venv("v")
        self.pip(bin_dir, "install", "-q", self.source)
        self.assertPluginsFound(bin_dir)
        self.assertAgentImports(bin_dir)

    def test_editable(self):
        """
        A plain C{pip install -e .}, no extra settings; the installed agent
        is the checkout's own code.
        """
        bin_dir = self.venv("v")
        self.pip(bin_dir, "install", "-q", "-e", self.source)
        self.assertPluginsFound(bin_dir)
        result = _run([os.path.join(bin_dir, "python"), "-c", "import everest_agent; print(everest_agent.__file__)"],
                      os.path.join(self.base, "elsewhere"), timeout=120)
        self.assertEqual(result.stdout.strip(), os.path.join(self.source, "everest_agent", "__init__.py"))

    def test_wheel(self):
        """C{pip wheel .}, then the wheel installed; the pages' files are in it."""
        bin_dir = self.venv("v")
        wheels = os.path.join(self.base, "wheels")
        self.pip(bin_dir, "wheel", "-q", "--no-deps", "--wheel-dir", wheels, self.source)
        [wheel] = [name for name in os.listdir(wheels) if name.endswith(".whl")]
        import zipfile

        with zipfile.ZipFile(os.path.join(wheels, wheel)) as z:
            names = set(z.namelist())
        for package in checkout_packages():
            self.assertIn(package.replace(".", "/") + "/__init__.py", names)
        for expected in ("twisted/plugins/everest_agent_plugin.py", "twisted/plugins/everest_platform_plugin.py",
                         "everest_agent/static/pages.css", "everest_agent/static/monitor.html",
                         "everest_agent/static/platform.html"):
            self.assertIn(expected, names)
        self.assertFalse([n for n in names if n.startswith(("tests/", "benchmarks/", "docs/"))],
                         "the wheel carries files that are not the package's")
        self.pip(bin_dir, "install", "-q", os.path.join(wheels, wheel))
        self.assertPluginsFound(bin_dir)
        self.assertAgentImports(bin_dir)
