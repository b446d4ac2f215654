"""
The stager's part of the Everest dialect (contract, section 8), against a
real loopback HTTP server that records every request's headers: an input's
own C{auth} sent verbatim instead of the platform's token (redirects too),
the C{uri} of each file PUT, and outputs kept in the task directory listed
and hashed, confined like every output.
"""

import os
from urllib.parse import quote

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from everest_agent.transfer.stager import Stager
from tests.test_transfer_stager import PLATFORM_TOKEN, FileServer, payload, serve, sha

AUTH = "EverestAgentClientToken run-7:client-secret"


class DialectStagingTests(TestCase):
    timeout = 30

    def setUp(self):
        self.server = FileServer()
        self.base = serve(self, self.server)
        # The platform lives on the same host and port as the file server:
        # the agent's token would go there, were it not for 'auth'.
        self.platform_url = self.base.replace("http://", "ws://") + "/agent/v1"

    def stager(self, **kwargs):
        stager = Stager.with_client(reactor, self.platform_url, PLATFORM_TOKEN, timeout=30.0,
                                    stall_timeout=30.0, retries=2, **kwargs)
        self.addCleanup(stager.close)
        return stager

    def task_dir(self):
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        return path

    def headers_of(self, path):
        return [r.headers for r in self.server.requests if r.path == path]

    async def test_auth_is_sent_verbatim_and_the_token_never(self):
        self.server.files["/files/a"] = b"with its own credentials"
        self.server.files["/files/b"] = b"the platform's own file"
        task = self.task_dir()
        await self.stager().stage_in(task, [
            {"path": "a", "uri": self.base + "/files/a", "authorization": AUTH},
            {"path": "b", "uri": self.base + "/files/b"},
        ])
        with open(os.path.join(task, "a"), "rb") as f:
            self.assertEqual(f.read(), b"with its own credentials")
        [a] = self.headers_of("/files/a")
        self.assertEqual(a["authorization"], AUTH)
        self.assertNotIn(PLATFORM_TOKEN, " ".join(a.values()))
        # (The input without auth gets what it always got: the platform's token.)
        [b] = self.headers_of("/files/b")
        self.assertEqual(b["authorization"], f"Bearer {PLATFORM_TOKEN}")

    async def test_auth_on_a_resumed_download_too(self):
        data = payload(300_000)
        self.server.files["/files/big"] = data
        self.server.plans["/files/big"] = [("cut", 1000), "ok"]
        task = self.task_dir()
        await self.stager(retry_initial_delay=0.01, retry_max_delay=0.01).stage_in(
            task, [{"path": "big", "uri": self.base + "/files/big", "authorization": AUTH}]
        )
        seen = self.headers_of("/files/big")
        self.assertEqual(len(seen), 2)
        self.assertIn("range", seen[1])
        self.assertEqual([h["authorization"] for h in seen], [AUTH, AUTH])

    async def test_a_redirect_elsewhere_carries_neither_auth_nor_token(self):
        other = FileServer()
        other_base = serve(self, other)
        other.files["/y"] = b"moved"
        self.server.plans["/files/jump"] = [("redirect", other_base + "/y")]
        task = self.task_dir()
        await self.stager().stage_in(
            task, [{"path": "y", "uri": self.base + "/files/jump", "authorization": AUTH}]
        )
        with open(os.path.join(task, "y"), "rb") as f:
            self.assertEqual(f.read(), b"moved")
        [first] = self.headers_of("/files/jump")
        self.assertEqual(first["authorization"], AUTH)
        [moved] = [r.headers for r in other.requests]
        self.assertNotIn("authorization", moved)

    async def test_a_same_origin_redirect_keeps_auth_not_the_token(self):
        self.server.files["/files/z"] = b"here"
        self.server.plans["/files/hop"] = [("redirect", self.base + "/files/z")]
        task = self.task_dir()
        await self.stager().stage_in(
            task, [{"path": "z", "uri": self.base + "/files/hop", "authorization": AUTH}]
        )
        for headers in self.headers_of("/files/hop") + self.headers_of("/files/z"):
            self.assertEqual(headers["authorization"], AUTH)

    async def test_auth_refused_fails_the_input_by_name(self):
        self.server.plans["/files/private"] = [401]
        task = self.task_dir()
        from everest_agent.transfer.errors import StagingError

        with self.assertRaises(StagingError) as caught:
            await self.stager().stage_in(
                task, [{"path": "p", "uri": self.base + "/files/private", "authorization": AUTH}]
            )
        self.assertIn("input 'p'", str(caught.exception))
        self.assertIn("401", str(caught.exception))
        self.assertNotIn("client-secret", str(caught.exception))

    async def test_stage_out_gives_the_uri_of_each_file_put(self):
        task = self.task_dir()
        os.makedirs(os.path.join(task, "out"))
        files = {"out/a b.dat": payload(70_000, b"a"), "out/ü%.txt": b"odd name"}
        for rel, data in files.items():
            with open(os.path.join(task, rel), "wb") as f:
                f.write(data)
        uploaded, errors = await self.stager().stage_out(
            task, [{"pattern": "out/*", "uri": self.base + "/up/j1/"}], uris=True
        )
        self.assertEqual(errors, [])
        by_path = {u["path"]: u for u in uploaded}
        self.assertEqual(set(by_path), set(files))
        for rel, data in files.items():
            entry = by_path[rel]
            self.assertEqual(entry["uri"], self.base + "/up/j1/" + quote(rel))
            self.assertEqual((entry["size"], entry["sha256"]), (len(data), sha(data)))
            self.assertEqual(self.server.uploads["/up/j1/" + rel], data)

    async def test_stage_out_without_uris_is_as_before(self):
        task = self.task_dir()
        with open(os.path.join(task, "r"), "wb") as f:
            f.write(b"r")
        uploaded, _ = await self.stager().stage_out(task, [{"path": "r", "uri": self.base + "/up/r"}])
        self.assertEqual(uploaded, [{"path": "r", "size": 1, "sha256": sha(b"r")}])


class KeptOutputTests(TestCase):
    """Outputs without a uri: listed with size and sha256, never leaving the task directory."""

    timeout = 30

    def stager(self):
        stager = Stager.with_client(reactor, "ws://127.0.0.1:1/agent/v1", PLATFORM_TOKEN)
        self.addCleanup(stager.close)
        return stager

    def task_dir(self, files):
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        for rel, data in files.items():
            full = os.path.join(path, rel)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(full, "wb") as f:
                f.write(data)
        return path

    async def test_globs_and_names_are_listed_and_hashed(self):
        big = payload(3 << 20)  # more than one read
        task = self.task_dir({"big.h5": big, "plots/a.png": b"a", "plots/b.png": b"bb", "notes.txt": b"n"})
        files, errors = await self.stager().list_outputs(task, ["big.h5", "plots/*.png", "none-*", "missing"])
        self.assertEqual(errors, [])
        self.assertEqual(files, [
            {"path": "big.h5", "size": len(big), "sha256": sha(big)},
            {"path": "plots/a.png", "size": 1, "sha256": sha(b"a")},
            {"path": "plots/b.png", "size": 2, "sha256": sha(b"bb")},
        ])

    async def test_a_file_matched_twice_is_listed_once(self):
        task = self.task_dir({"r.txt": b"r"})
        files, _ = await self.stager().list_outputs(task, ["r.txt", "*.txt"])
        self.assertEqual([f["path"] for f in files], ["r.txt"])

    async def test_a_link_out_of_the_task_directory_is_refused(self):
        outside = self.task_dir({"secret": b"not yours"})
        task = self.task_dir({"ok": b"ok"})
        os.symlink(os.path.join(outside, "secret"), os.path.join(task, "leak"))
        files, errors = await self.stager().list_outputs(task, ["leak", "*"])
        self.assertEqual([f["path"] for f in files], ["ok"])
        self.assertTrue(errors)
        self.assertTrue(all("leak" in e for e in errors), errors)

    async def test_a_fifo_is_not_an_output(self):
        # As with a native pattern, only regular files match; a FIFO is
        # never opened (nothing here can block on it).
        task = self.task_dir({"r": b"r"})
        os.mkfifo(os.path.join(task, "pipe"))
        files, errors = await self.stager().list_outputs(task, ["pipe", "*"])
        self.assertEqual([f["path"] for f in files], ["r"])
        self.assertEqual(errors, [])

    async def test_nothing_to_list(self):
        task = self.task_dir({})
        self.assertEqual(await self.stager().list_outputs(task, []), ([], []))
        self.assertEqual(await self.stager().list_outputs(task, ["*.dat"]), ([], []))
