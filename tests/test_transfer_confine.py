"""
Outputs found and opened without leaving the task directory
(L{everest_agent.transfer.confine}), against real FIFOs, sockets,
directories, planted links and a real rename race.
"""

import os
import shutil
import tempfile
import socket
import threading

from twisted.trial.unittest import SynchronousTestCase

from everest_agent.paths import PathEscape
from everest_agent.transfer import confine
from everest_agent.transfer.urls import same_origin


class Dirs:
    def make(self):
        task = os.path.abspath(self.mktemp())
        outside = os.path.abspath(self.mktemp())
        os.makedirs(task)
        os.makedirs(outside)
        with open(os.path.join(outside, "f"), "wb") as f:
            f.write(b"secret")
        return task, outside

    def read(self, found):
        fd, size = found
        try:
            return os.pread(fd, 100, 0)
        finally:
            os.close(fd)


class OpenOutputTests(Dirs, SynchronousTestCase):
    def test_regular_file(self):
        task, _ = self.make()
        os.makedirs(os.path.join(task, "a", "b"))
        with open(os.path.join(task, "a", "b", "r"), "wb") as f:
            f.write(b"result")
        self.assertEqual(self.read(confine.open_output(task, "a/b/r")), b"result")
        self.assertIsNone(confine.open_output(task, "a/none"))
        self.assertIsNone(confine.open_output(task, "a/b/r/deeper"))

    def test_fifo_fails_without_blocking(self):
        # The old open() blocked until someone opened the FIFO's other end.
        task, _ = self.make()
        os.mkfifo(os.path.join(task, "stdout"))
        with self.assertRaises(confine.NotRegular) as caught:
            confine.open_output(task, "stdout")
        self.assertIn("output 'stdout' is a FIFO", str(caught.exception))

    def test_socket_and_directory_fail(self):
        task = tempfile.mkdtemp(prefix="ea-")  # short enough for a socket's name
        self.addCleanup(shutil.rmtree, task, True)
        s = socket.socket(socket.AF_UNIX)
        self.addCleanup(s.close)
        s.bind(os.path.join(task, "sock"))
        os.makedirs(os.path.join(task, "dir"))
        self.assertRaisesRegex(confine.NotRegular, "a socket", confine.open_output, task, "sock")
        self.assertRaisesRegex(confine.NotRegular, "a directory", confine.open_output, task, "dir")

    def test_links_inside_followed_outside_refused(self):
        task, outside = self.make()
        os.makedirs(os.path.join(task, "real"))
        with open(os.path.join(task, "real", "x"), "wb") as f:
            f.write(b"inside")
        os.symlink("real", os.path.join(task, "rel"))
        os.symlink(os.path.join(task, "real", "x"), os.path.join(task, "abs"))
        os.symlink("../" + os.path.basename(outside), os.path.join(task, "up"))
        os.symlink(outside, os.path.join(task, "out"))
        os.symlink("loop", os.path.join(task, "loop"))
        self.assertEqual(self.read(confine.open_output(task, "rel/x")), b"inside")
        self.assertEqual(self.read(confine.open_output(task, "abs")), b"inside")
        self.assertEqual(self.read(confine.open_output(task, "real/../real/x")), b"inside")
        for rel in ("up/f", "out/f", "../" + os.path.basename(outside) + "/f"):
            self.assertRaisesRegex(PathEscape, "leads outside", confine.open_output, task, rel)
        self.assertRaisesRegex(PathEscape, "too many levels", confine.open_output, task, "loop")

    def test_symlinked_task_directory_refused(self):
        task, outside = self.make()
        link = task + "-link"
        os.symlink(outside, link)
        self.assertRaisesRegex(PathEscape, "is a symbolic link", confine.open_output, link, "f")

    def test_rename_race(self):
        """
        A task flips d/ between a directory and a link to the outside while
        its outputs are opened: no open may ever reach the outside file.
        (Resolving with realpath, then opening by name, let some through.)
        """
        task, outside = self.make()
        d = os.path.join(task, "d")
        os.makedirs(d)
        with open(os.path.join(d, "f"), "wb") as f:
            f.write(b"mine")
        os.symlink(outside, d + ".link")
        stop = threading.Event()
        flips = [0]

        def flip():
            while not stop.is_set():
                try:
                    os.rename(d, d + ".real")
                    os.rename(d + ".link", d)
                    os.rename(d, d + ".link")
                    os.rename(d + ".real", d)
                    flips[0] += 1
                except OSError:
                    pass

        flipper = threading.Thread(target=flip)
        flipper.start()
        seen = {}
        try:
            for _ in range(10000):
                try:
                    found = confine.open_output(task, "d/f")
                except PathEscape:
                    key = "refused"
                else:
                    key = "missing" if found is None else self.read(found).decode()
                seen[key] = seen.get(key, 0) + 1
        finally:
            stop.set()
            flipper.join()
        self.assertGreater(flips[0], 10)
        self.assertNotIn("secret", seen)
        self.assertIn("mine", seen)


class FindOutputsTests(Dirs, SynchronousTestCase):
    def test_bounds(self):
        task, _ = self.make()
        os.makedirs(os.path.join(task, "many", "sub"))
        for i in range(60):
            open(os.path.join(task, "many", "sub", f"{i}.dat"), "wb").close()
        matches, errors = confine.find_outputs(task, "many/**/*.dat", max_entries=1000, max_matches=1000)
        self.assertEqual((len(matches), errors), (60, []))
        matches, errors = confine.find_outputs(task, "many/**", max_entries=50)
        self.assertEqual(matches, [])
        self.assertIn("more than 50 entries", errors[0])
        matches, errors = confine.find_outputs(task, "many/sub/*.dat", max_matches=10)
        self.assertEqual(matches, [])
        self.assertIn("matches more than 10 files", errors[0])

    def test_fifo_not_matched(self):
        task, _ = self.make()
        os.mkfifo(os.path.join(task, "a.out"))
        open(os.path.join(task, "b.out"), "wb").close()
        self.assertEqual(confine.find_outputs(task, "*.out"), (["b.out"], []))


class SameOriginTests(SynchronousTestCase):
    def test_scheme_counts(self):
        self.assertTrue(same_origin("wss://p.example/agent", "https://p.example/files/x"))
        self.assertTrue(same_origin("ws://p.example:8080/a", "http://P.EXAMPLE:8080/f"))
        # The token of a wss:// platform never travels in clear text.
        self.assertFalse(same_origin("wss://p.example/agent", "http://p.example:443/f"))
        self.assertFalse(same_origin("ws://p.example:8080/a", "https://p.example:8080/f"))
