"""
The pages: the agent's (on its [monitor] listener) and the reference
platform's, both at C{/}.

Two kinds of tests: the HTTP side (what is served, with which headers, the
JSON the agent's page reads) against a real platform and a real agent; and
the pages in a real headless Chromium driven by Selenium, against a real
run.  The browser tests skip, saying why, where Chromium, chromedriver or
Selenium is missing (C{.ci/run} installs them).

Injection: task ids are restricted to C{[A-Za-z0-9._-]}, so markup is put
in fields an agent or a task controls: the agent's C{[agent] hostname}
(shown on the platform's page, from C{RESOURCE_STATE}) and a task's
failure reason, which names a declared output the task did not make
(shown on both pages).
"""

import io
import json
import os
import re
import shutil
import tempfile
import types

from twisted.internet import error, reactor, threads
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from everest_agent import pages
from everest_agent.platform import page_url
from tests.support import eventually, sleep, start_agent, start_platform
from tests.test_ops import http_get

STATIC = pages.STATIC_DIR

#: Markup that would run if a page put it in as HTML; it is meant to show
#: as text.  No ";" (the INI comment character) in it.
MARKUP = '<img src=x onerror="window.__injected=1"><script>window.__injected=2</script>'

#: A declared output whose name is markup; the task does not make it, so
#: the task fails with a reason naming it.
MARKUP_OUTPUT = "<b>x<script>window.__injected=3<"


def spec(command, **extra):
    return dict({"command": command, "resourceRequirements": {"coresPerNode": 1}}, **extra)


async def connected_agent(test, platform, **kwargs):
    agent = start_agent(test, platform, **kwargs)
    await platform.wait_connected()
    await eventually(lambda: agent.sender.connected, what="the agent to process WELCOME")
    return agent


def page_address(platform):
    """The platform page's address with the platform's API token (if it has one) in the fragment."""
    return platform.http_url + "/#token=" + getattr(platform, "api_token", "")


# -- what is served ----------------------------------------------------------------------------


class StaticFilesTests(TestCase):
    def test_scripts_never_insert_markup(self):
        """
        Data goes into the pages as text only: no script uses innerHTML or
        its relatives, or evaluates strings.
        """
        scripts = [name for name in os.listdir(STATIC) if name.endswith(".js")]
        self.assertEqual(sorted(scripts), ["common.js", "monitor.js", "platform.js"])
        for name in scripts:
            with open(os.path.join(STATIC, name), encoding="utf-8") as f:
                text = f.read()
            for bad in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                        "new Function"):
                self.assertNotIn(bad, text, f"{name} uses {bad}")

    def test_pages_load_nothing_from_elsewhere(self):
        """No CDN: every script and style sheet is the package's own, by a relative path."""
        for name in ("monitor.html", "platform.html"):
            with open(os.path.join(STATIC, name), encoding="utf-8") as f:
                text = f.read()
            self.assertNotIn("//", re.sub(r"<!--.*?-->", "", text).replace("http-equiv", ""))
            for src in re.findall(r'(?:src|href)="([^"]+)"', text):
                self.assertFalse(src.startswith(("http:", "https:", "/")), f"{name}: {src}")
            self.assertNotIn("<script>", text, f"{name}: inline script (the CSP forbids it)")
            for referenced in re.findall(r'(?:src|href)="static/([^"]+)"', text):
                self.assertTrue(os.path.exists(os.path.join(STATIC, referenced)), f"{name}: {referenced}")


class PlatformPageHTTPTests(TestCase):
    timeout = 60

    async def test_page_and_assets(self):
        platform = await start_platform(self)
        code, headers, body = await http_get(platform.http_url + "/")
        self.assertEqual(code, 200)
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"text/html; charset=utf-8"])
        csp = headers.getRawHeaders(b"content-security-policy")[0]
        self.assertIn(b"script-src 'self'", csp)
        self.assertNotIn(b"unsafe-inline", csp)
        self.assertEqual(headers.getRawHeaders(b"x-content-type-options"), [b"nosniff"])
        self.assertIn(b"static/platform.js", body)
        for name, kind in (("platform.js", b"text/javascript"), ("common.js", b"text/javascript"),
                           ("pages.css", b"text/css")):
            code, headers, body = await http_get(f"{platform.http_url}/static/{name}")
            self.assertEqual(code, 200, name)
            self.assertTrue(headers.getRawHeaders(b"content-type")[0].startswith(kind))
            self.assertEqual(body, pages.read_static(name))
        for missing in ("/static/", "/static/nothing.js", "/static/platform.html", "/nothing",
                        "/static/../setup.cfg"):
            code, _, _ = await http_get(platform.http_url + missing)
            self.assertEqual(code, 404, missing)

    async def test_page_url(self):
        platform = await start_platform(self)
        token = getattr(platform, "api_token", "")
        self.assertEqual(page_url(platform), page_address(platform) if token else platform.http_url + "/")
        platform.api_token = "s3cret"
        self.assertEqual(page_url(platform), platform.http_url + "/#token=s3cret")


class MonitorPageHTTPTests(TestCase):
    timeout = 60

    async def test_page_and_status(self):
        platform = await start_platform(self, heartbeat=1)
        agent = await connected_agent(self, platform, sections={"monitor": {"listen": "127.0.0.1:0"}})
        url = agent.monitor_service.url
        code, headers, body = await http_get(url + "/")
        self.assertEqual(code, 200)
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"text/html; charset=utf-8"])
        self.assertIn(b"static/monitor.js", body)
        self.assertIsNotNone(headers.getRawHeaders(b"content-security-policy"))
        code, _, body = await http_get(url + "/static/monitor.js")
        self.assertEqual((code, body), (200, pages.read_static("monitor.js")))

        ok = platform.submit(spec("true"), task_id="ok-1-0")
        bad = platform.submit(spec("exit 4"), task_id="bad-1-0")
        await platform.wait_for(ok)
        await platform.wait_for(bad)
        await eventually(lambda: len(agent.outbox) == 0, what="the acks")

        code, headers, body = await http_get(url + "/status.json")
        self.assertEqual(code, 200)
        self.assertEqual(headers.getRawHeaders(b"cache-control"), [b"no-store"])
        data = json.loads(body)
        self.assertEqual(data["connection"]["state"], "connected")
        self.assertIs(data["connection"]["connected"], True)
        self.assertIsInstance(data["connection"]["since"], float)
        self.assertEqual(data["slots"], {"total": 2, "busy": 0, "waiting": 0})
        self.assertEqual((data["tasks"]["queued"], data["tasks"]["running"], data["tasks"]["finished"]), (0, 0, 2))
        self.assertEqual(data["tasks"]["by_state"], {"DONE": 1, "FAILED": 1})
        self.assertEqual([f["task_id"] for f in data["failures"]], ["bad-1-0"])
        self.assertEqual(data["failures"][0]["exit_code"], 4)
        self.assertTrue(data["failures"][0]["reason"])
        self.assertEqual(data["outbox"]["pending"], 0)
        self.assertEqual(data["handler"], "local")
        self.assertNotIn("pilots", data)
        self.assertNotIn("test-token", body.decode())

        agent.pilot_summary = lambda: [{"name": "p1", "state": "RUNNING", "slots": 4}]
        code, _, body = await http_get(url + "/status.json")
        self.assertEqual(json.loads(body)["pilots"], [{"name": "p1", "state": "RUNNING", "slots": 4}])

    async def test_unacknowledged(self):
        platform = await start_platform(self, heartbeat=1)
        agent = await connected_agent(self, platform, sections={"monitor": {"listen": "127.0.0.1:0"}})
        platform.pause_acks()
        await platform.wait_for(platform.submit(spec("true"), task_id="u-1-0"))
        code, _, body = await http_get(agent.monitor_service.url + "/status.json")
        outbox = json.loads(body)["outbox"]
        self.assertEqual(outbox["pending"], len(agent.outbox))
        self.assertGreater(outbox["pending"], 0)
        self.assertEqual((outbox["oldest"]["type"], outbox["oldest"]["task_id"]), ("TASK_STATE", "u-1-0"))
        self.assertGreaterEqual(outbox["oldest"]["age"], 0)
        platform.resume_acks()
        await eventually(lambda: len(agent.outbox) == 0, what="the acks")
        code, _, body = await http_get(agent.monitor_service.url + "/status.json")
        self.assertEqual(json.loads(body)["outbox"]["pending"], 0)

    async def test_busy_and_queued(self):
        platform = await start_platform(self, heartbeat=1)
        agent = await connected_agent(self, platform, sections={"monitor": {"listen": "127.0.0.1:0"}})
        go = os.path.join(os.path.abspath(self.mktemp()))
        ids = [platform.submit(spec(f"while [ ! -e {go} ]; do sleep 0.05; done"), task_id=f"w-{n}-0")
               for n in range(3)]
        for task_id in ids[:2]:
            await platform.wait_for(task_id, "RUNNING")
        await eventually(lambda: agent.manager.pool.queued == 1, what="the third task to wait for a slot")
        code, _, body = await http_get(agent.monitor_service.url + "/status.json")
        data = json.loads(body)
        self.assertEqual(data["slots"], {"total": 2, "busy": 2, "waiting": 1})
        self.assertEqual((data["tasks"]["queued"], data["tasks"]["running"]), (1, 2))
        open(go, "w").close()
        for task_id in ids:
            await platform.wait_for(task_id)


# -- in a real browser -------------------------------------------------------------------------


def chromium():
    """C{(browser, driver)} executables, or raise SkipTest saying what is missing."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        raise SkipTest("Selenium is not installed (pip install -e '.[browser]'); the pages are not "
                       "checked in a browser")
    browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        raise SkipTest("no Chromium and chromedriver (Debian: apt-get install chromium chromium-driver); "
                       "the pages are not checked in a browser")
    return browser, driver


class Browser:
    """
    A headless Chromium driven by Selenium.  Selenium blocks, so every call
    runs in a thread (L{call}) while the reactor serves the pages.
    """

    def __init__(self, browser, driver_path, profile):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = browser
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--no-first-run",
                     "--disable-dev-shm-usage", "--window-size=1280,900", f"--user-data-dir={profile}"):
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)

    def call(self, f, *args):
        return threads.deferToThread(f, *args)

    def js(self, script, *args):
        return self.call(self.driver.execute_script, script, *args)

    async def until(self, script, what, timeout=30.0):
        """Wait until C{script} (returning a value) is truthy in the page."""
        waited = 0.0
        while True:
            value = await self.js(script)
            if value:
                return value
            if waited >= timeout:
                body = await self.js("return document.body.innerText")
                raise AssertionError(f"timed out waiting for {what}; the page says:\n{body[:3000]}")
            await sleep(0.2)
            waited += 0.2

    async def console_errors(self):
        entries = await self.call(self.driver.get_log, "browser")
        return [e for e in entries if e.get("level") == "SEVERE"]

    async def screenshot(self, path):
        await self.call(self.driver.save_screenshot, path)

    def quit(self):
        return self.call(self.driver.quit)


class BrowserTestCase(TestCase):
    timeout = 180

    async def setUp(self):
        browser, driver = chromium()
        self.profile = tempfile.mkdtemp(prefix="everest-chromium-")
        self.addCleanup(shutil.rmtree, self.profile, True)
        self.browser = await threads.deferToThread(Browser, browser, driver, self.profile)
        self.addCleanup(self.browser.quit)
        self.shots = os.path.abspath(self.mktemp())
        os.makedirs(self.shots)

    async def open(self, url):
        await self.browser.call(self.browser.driver.get, url)

    async def assertNoConsoleErrors(self):
        self.assertEqual(await self.browser.console_errors(), [])

    async def assertNotInjected(self):
        self.assertIsNone(await self.browser.js("return window.__injected === undefined ? null : window.__injected"))


class PlatformPageBrowserTests(BrowserTestCase):
    async def test_a_real_run(self):
        platform = await start_platform(self, heartbeat=1)
        agent = await connected_agent(self, platform, sections={"agent": {"hostname": MARKUP}})
        go = os.path.abspath(self.mktemp())
        quick = [platform.submit(spec("echo hi > out.txt", outputs=[
            {"path": "out.txt", "uri": platform.file_url(f"run/q-{n}-0/out.txt")}]), task_id=f"q-{n}-0")
            for n in range(3)]
        slow = platform.submit(spec(f"while [ ! -e {go} ]; do sleep 0.05; done"), task_id="slow-1-0")
        marked = platform.submit(spec("true", outputs=[
            {"path": MARKUP_OUTPUT, "uri": platform.file_url("run/marked/x")}]), task_id="marked-1-0")
        for task_id in quick + [marked]:
            await platform.wait_for(task_id)
        await platform.wait_for(slow, "RUNNING")
        await eventually(lambda: (platform.agent().resource or {}).get("hostname") == MARKUP,
                         what="a RESOURCE_STATE with the hostname")

        await self.open(page_address(platform))
        await self.browser.until("return document.querySelectorAll('#tasks tr[data-task]').length === 5",
                                 "the five tasks in the table")
        text = await self.browser.js("return document.body.innerText")
        self.assertIn("agent", await self.browser.js("return document.querySelector('#agents td').textContent"))
        self.assertIn("connected", await self.browser.js("return document.querySelector('#agents').textContent"))
        # The hostname and the failure reason show as text, markup and all.
        self.assertIn(MARKUP, await self.browser.js("return document.querySelector('#agents').textContent"))
        reason = await self.browser.js(
            "return document.querySelector('tr[data-task=\"marked-1-0\"]').textContent")
        self.assertIn(MARKUP_OUTPUT, reason)
        self.assertEqual(await self.browser.js("return document.querySelectorAll('main img, main b, main script').length"), 0)
        await self.assertNotInjected()
        for task_id in quick:
            self.assertEqual(await self.browser.js(
                f"return document.querySelector('tr[data-task=\"{task_id}\"]').dataset.state"), "DONE")
            self.assertIn(task_id, text)
        self.assertEqual(await self.browser.js(
            "return document.querySelector('tr[data-task=\"slow-1-0\"]').dataset.state"), "RUNNING")
        links = await self.browser.js(
            "return [...document.querySelectorAll('tr[data-task=\"q-0-0\"] .outputs a')].map(a => a.textContent)")
        self.assertEqual(len(links), 1)
        self.assertTrue(links[0].startswith("out.txt"))
        await self.browser.screenshot(os.path.join(self.shots, "platform-running.png"))

        # It updates by itself when a task finishes.
        open(go, "w").close()
        await platform.wait_for(slow)
        await self.browser.until(
            "return document.querySelector('tr[data-task=\"slow-1-0\"]').dataset.state === 'DONE'",
            "the slow task to show DONE")
        # ... and when a task is submitted through the API.
        more = platform.submit(spec("true"), task_id="more-1-0")
        await platform.wait_for(more)
        await self.browser.until("return document.querySelector('tr[data-task=\"more-1-0\"]')", "the new task")
        await self.browser.screenshot(os.path.join(self.shots, "platform-done.png"))
        await self.assertNotInjected()
        await self.assertNoConsoleErrors()
        self.assertTrue(agent.running)

    async def test_filter_and_token(self):
        """
        The filter; and the token in the address's fragment goes to the API
        as C{Authorization: Bearer}, on every request.
        """
        from everest_agent.platform import api

        platform = await start_platform(self, heartbeat=1)
        await connected_agent(self, platform)
        if not getattr(platform, "api_token", None):
            platform.api_token = "page-token-0123"
        seen = []
        render = api.Api.render

        def recording(resource, request):
            seen.append(request.getHeader(b"authorization"))
            return render(resource, request)

        self.patch(api.Api, "render", recording)
        for n in range(3):
            await platform.wait_for(platform.submit(spec("true"), task_id=f"ok-{n}-0"))
        await platform.wait_for(platform.submit(spec("exit 1"), task_id="no-1-0"))
        await self.open(page_address(platform))
        await self.browser.until("return document.querySelectorAll('#tasks tr[data-task]').length === 4", "the tasks")
        await self.browser.js("const s = document.getElementById('state-filter'); s.value = 'FAILED';"
                              "s.dispatchEvent(new Event('change'))")
        shown = await self.browser.js(
            "return [...document.querySelectorAll('#tasks tr[data-task]')].filter(r => !r.hidden).map(r => r.dataset.task)")
        self.assertEqual(shown, ["no-1-0"])
        await self.assertNoConsoleErrors()
        self.assertGreaterEqual(len(seen), 2)
        self.assertEqual(set(seen), {f"Bearer {platform.api_token}".encode()})


    async def test_without_the_token(self):
        """Opened without the API's token, or with a wrong one, the page says how to open it."""
        platform = await start_platform(self, heartbeat=1)
        await self.open(platform.http_url + "/")
        problem = await self.browser.until(
            "const p = document.getElementById('problem'); return !p.hidden && p.textContent", "the explanation")
        self.assertIn("needs its token (401): open this page as /#token=", problem)
        await self.open(platform.http_url + "/#token=wrong")
        await self.browser.call(self.browser.driver.refresh)
        problem = await self.browser.until(
            "const p = document.getElementById('problem'); return !p.hidden && p.textContent", "the explanation")
        self.assertIn("refused this page's token", problem)
        await self.open(page_address(platform))
        await self.browser.call(self.browser.driver.refresh)
        await self.browser.until("return document.getElementById('problem').hidden && "
                                 "document.querySelector('#agents td.id')", "the page with the right token")


class MonitorPageBrowserTests(BrowserTestCase):
    async def test_a_real_run(self):
        platform = await start_platform(self, heartbeat=1)
        agent = await connected_agent(self, platform, sections={"monitor": {"listen": "127.0.0.1:0"}})
        await self.open(agent.monitor_service.url + "/")
        await self.browser.until("return document.getElementById('connection').textContent === 'connected'",
                                 "the connection state")
        self.assertEqual(await self.browser.js("return document.getElementById('finished').textContent"), "0")
        self.assertIn("since", await self.browser.js("return document.getElementById('connection-since').textContent"))

        go = os.path.abspath(self.mktemp())
        slow = platform.submit(spec(f"while [ ! -e {go} ]; do sleep 0.05; done"), task_id="slow-1-0")
        marked = platform.submit(spec("true", outputs=[
            {"path": MARKUP_OUTPUT, "uri": platform.file_url("run/marked/x")}]), task_id="marked-1-0")
        await platform.wait_for(marked)
        await platform.wait_for(slow, "RUNNING")
        await self.browser.until("return document.getElementById('slots').textContent === '1 / 2'", "one slot busy")
        await self.browser.until("return document.getElementById('running').textContent === '1'", "one running")
        await self.browser.until("return document.querySelector('#failures td.id')", "the failure")
        failures = await self.browser.js("return document.getElementById('failures').textContent")
        self.assertIn("marked-1-0", failures)
        self.assertIn(MARKUP_OUTPUT, failures)
        self.assertEqual(await self.browser.js("return document.querySelectorAll('main img, main b, main script').length"), 0)
        await self.assertNotInjected()
        await self.browser.screenshot(os.path.join(self.shots, "monitor-running.png"))

        # Messages the platform has not acknowledged, then acknowledged.
        platform.pause_acks()
        await platform.wait_for(platform.submit(spec("true"), task_id="unacked-1-0"))
        await self.browser.until("return document.getElementById('outbox').textContent !== '0'", "unacknowledged")
        self.assertIn("TASK_STATE unacked-1-0",
                      await self.browser.js("return document.getElementById('outbox-oldest').textContent"))
        platform.resume_acks()
        await self.browser.until("return document.getElementById('outbox').textContent === '0'", "all acknowledged")

        open(go, "w").close()
        await platform.wait_for(slow)
        await self.browser.until("return document.getElementById('finished').textContent === '3'", "three finished")
        await self.browser.until("return document.getElementById('slots').textContent === '0 / 2'", "no slot busy")
        self.assertEqual(await self.browser.js("return document.getElementById('pilots-section').hidden"), True)

        agent.pilot_summary = lambda: [{"name": "pilot-1", "state": "RUNNING", "slots": 4, "host": MARKUP}]
        await self.browser.until("return !document.getElementById('pilots-section').hidden", "the pilots")
        self.assertIn(MARKUP, await self.browser.js("return document.getElementById('pilots').textContent"))
        await self.assertNotInjected()
        await self.browser.screenshot(os.path.join(self.shots, "monitor-done.png"))
        await self.assertNoConsoleErrors()

    async def test_shows_a_lost_connection(self):
        platform = await start_platform(self, heartbeat=1)
        agent = await connected_agent(self, platform, sections={"monitor": {"listen": "127.0.0.1:0"}})
        await self.open(agent.monitor_service.url + "/")
        await self.browser.until("return document.getElementById('connection').textContent === 'connected'",
                                 "connected")
        await platform.close()
        await self.browser.until("return document.getElementById('connection').textContent === 'disconnected'",
                                 "disconnected")
        await self.assertNoConsoleErrors()


# -- the demo ----------------------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self):
        return True


class DemoProgressTests(SynchronousTestCase):
    def platform(self, states):
        return types.SimpleNamespace(tasks={
            f"t-{n}-0": types.SimpleNamespace(state=state, history=[(state, {})] if state else [])
            for n, state in enumerate(states)})

    def test_terminal_line(self):
        from everest_agent import demo

        clock = Clock()
        platform = self.platform(["DONE", "DONE", "FAILED", "RUNNING", None])
        out = _Terminal()
        progress = demo.Progress(platform, sorted(platform.tasks), out, clock=clock.seconds)
        clock.advance(2.0)
        progress.update()
        self.assertEqual(
            out.getvalue(),
            "\r[##############..........] 3/5 done  1.5 tasks/s  1 failed  (running 1  submitted 1)\x1b[K")
        platform.tasks["t-3-0"].state = "DONE"
        platform.tasks["t-4-0"].state = "DONE"
        clock.advance(3.0)
        progress.finish()
        self.assertTrue(out.getvalue().endswith("] 5/5 done  1.0 tasks/s  1 failed\x1b[K\n"))

    def test_plain_lines_when_not_a_terminal(self):
        from everest_agent import demo

        platform = self.platform(["DONE", None])
        out = io.StringIO()
        demo.Progress(platform, sorted(platform.tasks), out).update()
        self.assertEqual(out.getvalue(), "t-0-0      DONE\n")


class DemoKeepTests(TestCase):
    timeout = 120

    async def test_keep_leaves_platform_and_agent_running(self):
        import treq
        from twisted.web.client import HTTPConnectionPool

        from everest_agent import demo

        pool = HTTPConnectionPool(reactor, persistent=False)
        out = io.StringIO()
        stop = Deferred()
        running = Deferred.fromCoroutine(demo.run_demo(reactor, tasks=13, out=out, keep=True, stop=stop))

        def cleanup():
            if not stop.called:
                stop.callback(None)
            return running.addErrback(lambda failure: None)

        self.addCleanup(cleanup)
        await eventually(lambda: "Ctrl-C stops them" in out.getvalue() or running.called, timeout=90,
                         what="the demo to finish its sweep")
        text = out.getvalue()
        self.assertFalse(running.called, text)
        self.assertIn("watch it in a browser: http://127.0.0.1:", text)
        self.assertNotIn("PROBLEM", text)
        page = re.search(r"platform page: (\S+)", text).group(1)
        base, _, fragment = page.partition("#")
        base = base.rstrip("/")
        token = fragment[len("token="):] if fragment.startswith("token=") else ""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        code, _, body = await http_get(base + "/")
        self.assertEqual(code, 200)
        self.assertIn(b"platform.js", body)
        agent_page = re.search(r"agent page: +(\S+)", text).group(1)
        code, _, body = await http_get(agent_page + "status.json")
        self.assertEqual(json.loads(body)["connection"]["state"], "connected")

        header_file = re.search(r"curl (?:-H @(\S+) )?-H", text).group(1)
        if token:
            with open(header_file) as f:
                self.assertEqual(f.read(), f"Authorization: Bearer {token}\n")
            self.assertEqual(os.stat(header_file).st_mode & 0o777, 0o600)
            self.assertNotIn(token, text.split("platform page:")[1].split("\n", 1)[1])
        response = await treq.post(base + "/api/tasks", json={"spec": {"command": "echo more"}}, headers=headers,
                                    pool=pool)
        self.assertEqual(response.code, 201)
        task_id = (await response.json())["taskId"]
        state = None
        for _ in range(200):
            response = await treq.get(f"{base}/api/tasks/{task_id}", headers=headers, pool=pool)
            state = (await response.json())["state"]
            if state == "DONE":
                break
            await sleep(0.05)
        self.assertEqual(state, "DONE")

        stop.callback(None)
        self.assertEqual(await running, 0)
        self.assertIn("files kept in", out.getvalue())
        root = re.search(r"files kept in (\S+)", out.getvalue()).group(1)
        self.addCleanup(shutil.rmtree, root, True)
        with self.assertRaises(error.ConnectionRefusedError):
            await http_get(base + "/")
