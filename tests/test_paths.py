"""
Keeping a task's files inside its directory (L{everest_agent.paths}, the
one walker): input targets, temporary files, output paths and output
patterns, against symbolic links planted in the task directory, real
FIFOs, sockets and directories, real rename races, and a table of what a
hostile task plants.
"""

import contextlib
import os
import re
import shutil
import signal
import socket
import tempfile
import threading

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from everest_agent import paths


@contextlib.contextmanager
def no_hang(seconds=10):
    """Fail, rather than hang, if the body blocks (a FIFO opened for a blocking read)."""

    def alarm(signum, frame):
        raise AssertionError(f"blocked for more than {seconds} s")

    if threading.current_thread() is not threading.main_thread():
        yield  # (signals go to the main thread only)
        return

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def read(found):
    """The contents of what L{paths.open_output} returned (closed after)."""
    fd, size = found
    try:
        data = os.pread(fd, 1000, 0)
    finally:
        os.close(fd)
    assert len(data) == size, (data, size)
    return data


class PathsTestCase(SynchronousTestCase):
    def setUp(self):
        self.task = os.path.realpath(self.mktemp())
        os.makedirs(self.task)
        self.outside = os.path.realpath(self.mktemp())
        os.makedirs(self.outside)
        with open(os.path.join(self.outside, "secret"), "w") as f:
            f.write("secret")

    def make(self, *names):
        for name in names:
            full = os.path.join(self.task, name)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(full, "w") as f:
                f.write(name)


class InputTargetTests(PathsTestCase):
    def test_creates_parents(self):
        target = paths.input_target(self.task, "a/b/c.txt")
        self.assertEqual(target, os.path.join(self.task, "a", "b", "c.txt"))
        self.assertTrue(os.path.isdir(os.path.join(self.task, "a", "b")))

    def test_normalises(self):
        self.assertEqual(paths.input_target(self.task, "a/./b/../c"), os.path.join(self.task, "a", "c"))

    def test_lexical_escapes(self):
        for bad in ("../x", "a/../../x", "/etc/passwd", "..", "."):
            self.assertRaises(paths.PathEscape, paths.input_target, self.task, bad)
        self.assertFalse(os.path.exists(os.path.join(os.path.dirname(self.task), "x")))

    def test_symlinked_parent_outside(self):
        os.symlink(self.outside, os.path.join(self.task, "link"))
        self.assertRaises(paths.PathEscape, paths.input_target, self.task, "link/x")
        self.assertRaises(paths.PathEscape, paths.input_target, self.task, "link/new/x")
        self.assertEqual(sorted(os.listdir(self.outside)), ["secret"])

    def test_symlinked_parent_inside(self):
        os.makedirs(os.path.join(self.task, "real"))
        os.symlink("real", os.path.join(self.task, "alias"))
        self.assertEqual(paths.input_target(self.task, "alias/x"), os.path.join(self.task, "real", "x"))

    def test_directory_target(self):
        os.makedirs(os.path.join(self.task, "d"))
        self.assertRaises(paths.PathEscape, paths.input_target, self.task, "d")

    def test_link_at_target_is_allowed(self):
        # It is replaced by the rename, never followed.
        os.symlink(os.path.join(self.outside, "secret"), os.path.join(self.task, "x"))
        self.assertEqual(paths.input_target(self.task, "x"), os.path.join(self.task, "x"))


class CreateExclusiveTests(PathsTestCase):
    def test_replaces_planted_link(self):
        tmp = os.path.join(self.task, ".x.part")
        os.symlink(os.path.join(self.outside, "secret"), tmp)
        fd = paths.create_exclusive(tmp)
        os.write(fd, b"new")
        os.close(fd)
        with open(os.path.join(self.outside, "secret")) as f:
            self.assertEqual(f.read(), "secret")
        self.assertFalse(os.path.islink(tmp))

    def test_replaces_stale_file(self):
        tmp = os.path.join(self.task, ".x.part")
        with open(tmp, "w") as f:
            f.write("stale")
        fd = paths.create_exclusive(tmp, 0o600)
        os.close(fd)
        self.assertEqual(os.path.getsize(tmp), 0)
        self.assertEqual(os.stat(tmp).st_mode & 0o777, 0o600 & ~_umask())

    def test_replace_into_refuses_a_directory_swapped_for_a_link(self):
        # Written while d/ was a directory, renamed after a task made it a link.
        target = paths.input_target(self.task, "d/x")
        tmp = paths.temporary_for(target)
        os.close(paths.create_exclusive(tmp))
        os.rename(os.path.join(self.task, "d"), os.path.join(self.task, "d.real"))
        os.symlink(self.outside, os.path.join(self.task, "d"))
        with open(os.path.join(self.outside, ".x.part"), "w") as f:
            f.write("planted")
        self.assertRaisesRegex(paths.PathEscape, "'d' is a symbolic link", paths.replace_into, tmp, target)
        self.assertEqual(sorted(os.listdir(self.outside)), [".x.part", "secret"])
        os.unlink(os.path.join(self.task, "d"))
        os.rename(os.path.join(self.task, "d.real"), os.path.join(self.task, "d"))
        os.symlink(os.path.join(self.outside, "secret"), target)  # a link at the target is replaced
        paths.replace_into(tmp, target)
        self.assertFalse(os.path.islink(target))
        self.assertEqual(os.listdir(os.path.join(self.task, "d")), ["x"])

    def test_link_exclusive_replaces_a_planted_link(self):
        source = os.path.join(self.task, "cached")
        with open(source, "w") as f:
            f.write("content")
        tmp = os.path.join(self.task, ".x.part")
        os.symlink(os.path.join(self.outside, "secret"), tmp)
        paths.link_exclusive(source, tmp)
        self.assertEqual(os.stat(tmp, follow_symlinks=False).st_ino, os.stat(source).st_ino)
        with open(os.path.join(self.outside, "secret")) as f:
            self.assertEqual(f.read(), "secret")
        os.symlink(self.outside, os.path.join(self.task, "link"))
        self.assertRaises(paths.PathEscape, paths.link_exclusive, source, os.path.join(self.task, "link", "y"))
        self.assertEqual(os.listdir(self.outside), ["secret"])

    def test_temporary_name(self):
        self.assertEqual(paths.temporary_for("/t/a/b.txt"), "/t/a/.b.txt.part")

    def test_remove_file_never_through_a_link(self):
        # A directory on the way swapped for a link: nothing is removed
        # where the link points.
        os.makedirs(os.path.join(self.task, "d"))
        with open(os.path.join(self.task, "d", ".x.part"), "w") as f:
            f.write("partial")
        os.rename(os.path.join(self.task, "d"), os.path.join(self.task, "d.real"))
        os.symlink(self.outside, os.path.join(self.task, "d"))
        paths.remove_file(os.path.join(self.task, "d", "secret"))
        self.assertEqual(os.listdir(self.outside), ["secret"])
        # A link at the name itself is removed, not what it points to.
        planted = os.path.join(self.task, "d.real", ".x.part")
        os.unlink(planted)
        os.symlink(os.path.join(self.outside, "secret"), planted)
        paths.remove_file(planted)
        self.assertFalse(os.path.lexists(planted))
        self.assertEqual(os.listdir(self.outside), ["secret"])
        # Nothing there, or no such directory: nothing to do, no error.
        paths.remove_file(planted)
        paths.remove_file(os.path.join(self.task, "nowhere", "x"))


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


class OpenOutputTests(PathsTestCase):
    def test_regular(self):
        self.make("r.txt", "a/b/r")
        self.assertEqual(read(paths.open_output(self.task, "r.txt")), b"r.txt")
        self.assertEqual(read(paths.open_output(self.task, "a/b/r")), b"a/b/r")
        self.assertEqual(read(paths.open_output(self.task, "a/./b/../b/r")), b"a/b/r")

    def test_through_a_file_is_missing(self):
        self.make("a/b/r")
        self.assertIsNone(paths.open_output(self.task, "a/none"))
        self.assertIsNone(paths.open_output(self.task, "a/b/r/deeper"))

    def test_missing(self):
        self.assertIsNone(paths.open_output(self.task, "nope"))

    def test_link_outside(self):
        os.symlink(os.path.join(self.outside, "secret"), os.path.join(self.task, "r"))
        self.assertRaises(paths.PathEscape, paths.open_output, self.task, "r")

    def test_dangling_link_outside(self):
        os.symlink("/nonexistent/everest", os.path.join(self.task, "r"))
        self.assertRaises(paths.PathEscape, paths.open_output, self.task, "r")

    def test_link_inside(self):
        self.make("real.txt")
        os.symlink("real.txt", os.path.join(self.task, "alias"))
        self.assertEqual(read(paths.open_output(self.task, "alias")), b"real.txt")

    def test_links_inside_followed_outside_refused(self):
        self.make("real/x")
        os.symlink("real", os.path.join(self.task, "rel"))
        os.symlink(os.path.join(self.task, "real", "x"), os.path.join(self.task, "abs"))
        os.symlink("../" + os.path.basename(self.outside), os.path.join(self.task, "up"))
        os.symlink(self.outside, os.path.join(self.task, "out"))
        os.symlink("loop", os.path.join(self.task, "loop"))
        self.assertEqual(read(paths.open_output(self.task, "rel/x")), b"real/x")
        self.assertEqual(read(paths.open_output(self.task, "abs")), b"real/x")
        self.assertEqual(read(paths.open_output(self.task, "real/../real/x")), b"real/x")
        for rel in ("up/secret", "out/secret", "../" + os.path.basename(self.outside) + "/secret"):
            self.assertRaisesRegex(paths.PathEscape, "leads outside", paths.open_output, self.task, rel)
        self.assertRaisesRegex(paths.PathEscape, "too many levels", paths.open_output, self.task, "loop")

    def test_fifo_fails_without_blocking(self):
        # The first open() blocked until someone opened the FIFO's other end.
        os.mkfifo(os.path.join(self.task, "stdout"))
        with no_hang(), self.assertRaises(paths.NotRegular) as caught:
            paths.open_output(self.task, "stdout")
        self.assertEqual(str(caught.exception), "output 'stdout' is a FIFO, not a regular file")

    def test_socket_and_directory_fail(self):
        task = tempfile.mkdtemp(prefix="ea-")  # short enough for a socket's name
        self.addCleanup(shutil.rmtree, task, True)
        s = socket.socket(socket.AF_UNIX)
        self.addCleanup(s.close)
        s.bind(os.path.join(task, "sock"))
        os.makedirs(os.path.join(task, "dir"))
        os.symlink("dir", os.path.join(task, "dir-link"))
        self.assertRaisesRegex(paths.NotRegular, "output 'sock' is a socket", paths.open_output, task, "sock")
        self.assertRaisesRegex(paths.NotRegular, "output 'dir' is a directory", paths.open_output, task, "dir")
        self.assertRaisesRegex(paths.NotRegular, "is a directory", paths.open_output, task, "dir-link")
        self.assertRaisesRegex(paths.NotRegular, "is a directory", paths.open_output, task, "dir/..")

    def test_character_device_fails(self):
        os.symlink("/dev/null", os.path.join(self.task, "null"))  # outside: refused for that
        self.assertRaisesRegex(paths.PathEscape, "leads outside", paths.open_output, self.task, "null")
        try:
            os.mknod(os.path.join(self.task, "zero"), 0o600 | 0o020000, os.makedev(1, 5))
        except PermissionError:
            raise SkipTest("needs the right to make a device node")
        self.assertRaisesRegex(paths.NotRegular, "a character device", paths.open_output, self.task, "zero")

    def test_symlinked_task_directory_refused(self):
        link = self.task + "-link"
        os.symlink(self.outside, link)
        self.assertRaisesRegex(paths.PathEscape, "is a symbolic link", paths.open_output, link, "secret")

    def test_parent_link_outside(self):
        os.symlink(self.outside, os.path.join(self.task, "d"))
        self.assertRaises(paths.PathEscape, paths.open_output, self.task, "d/secret")

    def test_directory(self):
        os.makedirs(os.path.join(self.task, "d"))
        self.assertRaises(paths.PathEscape, paths.open_output, self.task, "d")


class FindOutputsTests(PathsTestCase):
    def test_star_does_not_cross_slash(self):
        self.make("out/a.dat", "out/b.dat", "out/sub/c.dat", "out/x.txt", "top.dat")
        self.assertEqual(paths.find_outputs(self.task, "out/*.dat"), (["out/a.dat", "out/b.dat"], []))
        self.assertEqual(paths.find_outputs(self.task, "*.dat"), (["top.dat"], []))

    def test_double_star(self):
        self.make("a.dat", "out/b.dat", "out/sub/c.dat", "out/sub/deeper/d.dat", "out/e.txt")
        found, errors = paths.find_outputs(self.task, "**/*.dat")
        self.assertEqual(found, ["a.dat", "out/b.dat", "out/sub/c.dat", "out/sub/deeper/d.dat"])
        self.assertEqual(paths.find_outputs(self.task, "out/**")[0],
                         ["out/b.dat", "out/e.txt", "out/sub/c.dat", "out/sub/deeper/d.dat"])
        self.assertEqual(paths.find_outputs(self.task, "out/**/c.dat")[0], ["out/sub/c.dat"])

    def test_hidden_files(self):
        self.make(".hidden.dat", "seen.dat", ".dir/x.dat")
        self.assertEqual(paths.find_outputs(self.task, "*.dat")[0], ["seen.dat"])
        self.assertEqual(paths.find_outputs(self.task, ".*.dat")[0], [".hidden.dat"])
        self.assertEqual(paths.find_outputs(self.task, "**/x.dat")[0], [])
        self.assertEqual(paths.find_outputs(self.task, ".dir/*")[0], [".dir/x.dat"])

    def test_literal_and_character_classes(self):
        self.make("r1.txt", "r2.txt", "r10.txt", "a b/[x].txt")
        self.assertEqual(paths.find_outputs(self.task, "r?.txt")[0], ["r1.txt", "r2.txt"])
        self.assertEqual(paths.find_outputs(self.task, "r[12]*.txt")[0], ["r1.txt", "r10.txt", "r2.txt"])
        self.assertEqual(paths.find_outputs(self.task, "a b/*")[0], ["a b/[x].txt"])
        self.assertEqual(paths.find_outputs(self.task, "r1.txt")[0], ["r1.txt"])
        self.assertEqual(paths.find_outputs(self.task, "nope.txt"), ([], []))

    def test_escaping_links_reported_not_followed(self):
        self.make("out/good.dat")
        os.symlink(os.path.join(self.outside, "secret"), os.path.join(self.task, "out", "bad.dat"))
        os.symlink(self.outside, os.path.join(self.task, "out", "dir"))
        found, errors = paths.find_outputs(self.task, "out/*")
        self.assertEqual(found, ["out/good.dat"])
        self.assertEqual(len(errors), 2)
        self.assertTrue(all("outside" in e for e in errors))
        found, errors = paths.find_outputs(self.task, "out/dir/*")
        self.assertEqual((found, len(errors)), ([], 1))

    def test_links_inside_followed_except_by_double_star(self):
        self.make("real/x.dat")
        os.symlink("real", os.path.join(self.task, "alias"))
        os.symlink("real/x.dat", os.path.join(self.task, "file-alias.dat"))
        self.assertEqual(paths.find_outputs(self.task, "alias/*.dat")[0], ["alias/x.dat"])
        self.assertEqual(paths.find_outputs(self.task, "**/*.dat")[0], ["file-alias.dat", "real/x.dat"])

    def test_link_loops_end(self):
        self.make("a/x.dat")
        os.symlink(".", os.path.join(self.task, "a", "self"))
        os.symlink("..", os.path.join(self.task, "a", "up"))
        found, errors = paths.find_outputs(self.task, "**/*.dat")
        self.assertEqual((found, errors), (["a/x.dat"], []))

    def test_pattern_leaving_the_directory(self):
        found, errors = paths.find_outputs(self.task, "../*")
        self.assertEqual(found, [])
        self.assertEqual(len(errors), 1)
        self.assertRaises(paths.PathEscape, paths.match_outputs, self.task, "../*")

    def test_match_outputs_raises_on_escape(self):
        os.symlink(os.path.join(self.outside, "secret"), os.path.join(self.task, "s.dat"))
        self.assertRaises(paths.PathEscape, paths.match_outputs, self.task, "*.dat")

    def test_each_entry_counts_once_against_the_bound(self):
        # many/ holds sub/ and 60 files: 61 entries, and sub/ 60 more.
        os.makedirs(os.path.join(self.task, "many", "sub"))
        for i in range(60):
            open(os.path.join(self.task, "many", f"{i}.dat"), "wb").close()
            open(os.path.join(self.task, "many", "sub", f"{i}.dat"), "wb").close()
        for pattern in ("many/**/*.dat", "many/**/**/*.dat", "many/**"):
            matches, errors = paths.find_outputs(self.task, pattern, max_entries=121)
            self.assertEqual((len(matches), errors), (120, []), pattern)
            matches, errors = paths.find_outputs(self.task, pattern, max_entries=120)
            self.assertEqual(matches, [], pattern)
            self.assertIn("more than 120 entries", errors[0])

    def test_bounds(self):
        os.makedirs(os.path.join(self.task, "many", "sub"))
        for i in range(60):
            open(os.path.join(self.task, "many", "sub", f"{i}.dat"), "wb").close()
        matches, errors = paths.find_outputs(self.task, "many/**/*.dat", max_entries=1000, max_matches=1000)
        self.assertEqual((len(matches), errors), (60, []))
        matches, errors = paths.find_outputs(self.task, "many/**", max_entries=50)
        self.assertEqual(matches, [])
        self.assertIn("more than 50 entries", errors[0])
        self.assertIn("max_output_entries", errors[0])
        matches, errors = paths.find_outputs(self.task, "many/sub/*.dat", max_matches=10)
        self.assertEqual(matches, [])
        self.assertIn("matches more than 10 files", errors[0])
        self.assertIn("max_output_files", errors[0])

    def test_depth_bounded(self):
        deep = os.path.join(self.task, *["d"] * (paths.MAX_DEPTH + 1))
        os.makedirs(deep)
        open(os.path.join(deep, "x.dat"), "wb").close()
        matches, errors = paths.find_outputs(self.task, "**/*.dat")
        self.assertEqual(matches, [])
        self.assertIn(f"goes more than {paths.MAX_DEPTH} directories deep", errors[0])

    def test_fifo_not_matched(self):
        os.mkfifo(os.path.join(self.task, "a.out"))
        os.symlink("a.out", os.path.join(self.task, "c.out"))
        open(os.path.join(self.task, "b.out"), "wb").close()
        with no_hang():
            self.assertEqual(paths.find_outputs(self.task, "*.out"), (["b.out"], []))

    def test_entries_typed_without_a_stat_each(self):
        # (scandir's d_type; a file system that gives none makes this fail.)
        os.makedirs(os.path.join(self.task, "many"))
        for i in range(500):
            open(os.path.join(self.task, "many", f"{i}.dat"), "wb").close()
        calls = []
        real_stat = os.stat

        def counting(*args, **kwargs):
            calls.append(args)
            return real_stat(*args, **kwargs)

        self.patch(os, "stat", counting)
        self.assertEqual(len(paths.find_outputs(self.task, "many/*.dat")[0]), 500)
        self.assertLess(len(calls), 5)

    def test_missing_or_symlinked_task_directory(self):
        self.assertRaises(FileNotFoundError, paths.find_outputs, self.task + "-none", "*")
        os.symlink(self.task, self.task + "-link")
        self.assertRaisesRegex(paths.PathEscape, "is a symbolic link", paths.find_outputs, self.task + "-link", "*")


class RaceTests(PathsTestCase):
    """A task that swaps a directory and a link while the agent reads and writes (issue 11, item 5)."""

    def flipper(self, victim):
        """
        Start another process that swaps directory C{victim} and a link to
        the outside as fast as it can (what a hostile task does during
        stage-out); @return: a function that stops it and returns its count
        of rounds.
        """
        import subprocess
        import sys

        code = (
            "import os, sys\n"
            "victim, outside = sys.argv[1], sys.argv[2]\n"
            "real, n = victim + '.real', 0\n"
            "while True:\n"
            "    try:\n"
            "        os.rename(victim, real); os.symlink(outside, victim)\n"
            "        os.unlink(victim); os.rename(real, victim)\n"
            "    except OSError:\n"
            "        # the agent made a directory in a gap: put it away, go on\n"
            "        try:\n"
            "            if os.path.islink(victim): os.unlink(victim)\n"
            "            elif os.path.isdir(real) and os.path.lexists(victim):\n"
            "                os.rename(victim, victim + '.made%d' % n)\n"
            "            if os.path.isdir(real): os.rename(real, victim)\n"
            "        except OSError: pass\n"
            "    n += 1\n"
            "    if n == 100: print('flipping', flush=True)\n"
        )
        process = subprocess.Popen(
            [sys.executable, "-c", code, victim, self.outside], stdout=subprocess.PIPE
        )
        self.addCleanup(lambda: process.poll() is None and (process.kill(), process.wait()))
        self.assertEqual(process.stdout.readline(), b"flipping\n")

        def finish():
            alive = process.poll() is None
            process.kill()
            process.wait()
            process.stdout.close()
            self.assertTrue(alive, "the race loop stopped early")

        return finish

    def test_open_output_never_reads_outside(self):
        self.make("d/secret")  # same name as the outside file, other content
        finish = self.flipper(os.path.join(self.task, "d"))
        seen, refused = [], 0
        for _ in range(60000):
            if len(seen) >= 1000:
                break
            try:
                found = paths.open_output(self.task, "d/secret")
            except (paths.PathEscape, OSError):
                refused += 1  # (the old code also failed in the gaps)
                continue
            if found is not None:
                seen.append(read(found))
        finish()
        self.assertNotIn(b"secret", seen)
        self.assertTrue(set(seen) <= {b"d/secret"})

    def test_rename_race(self):
        """
        A task flips d/ between a directory and a link to the outside by
        renames while its outputs are opened: no open may ever reach the
        outside file.  (Resolving with realpath, then opening by name, let
        some through.)
        """
        d = os.path.join(self.task, "d")
        self.make("d/secret")
        os.symlink(self.outside, d + ".link")
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
                    found = paths.open_output(self.task, "d/secret")
                except paths.PathEscape:
                    key = "refused"
                else:
                    key = "missing" if found is None else read(found).decode()
                seen[key] = seen.get(key, 0) + 1
        finally:
            stop.set()
            flipper.join()
        self.assertGreater(flips[0], 10)
        self.assertNotIn("secret", seen)
        self.assertIn("d/secret", seen)

    def test_input_target_and_create_never_write_outside(self):
        os.makedirs(os.path.join(self.task, "d"))
        finish = self.flipper(os.path.join(self.task, "d"))
        for i in range(3000):
            try:
                target = paths.input_target(self.task, f"d/in{i}")
                fd = paths.create_exclusive(paths.temporary_for(target))
                os.close(fd)
                paths.replace_into(paths.temporary_for(target), target)
            except (paths.PathEscape, OSError):
                pass
        finish()
        self.assertEqual(sorted(os.listdir(self.outside)), ["secret"])


class DescriptorApiTests(PathsTestCase):
    def setUp(self):
        super().setUp()
        self.fd = os.open(self.task, os.O_RDONLY | os.O_DIRECTORY)
        self.addCleanup(os.close, self.fd)

    def test_fifo_refused_without_blocking(self):
        os.mkfifo(os.path.join(self.task, "stdout"))
        with no_hang():
            self.assertRaisesRegex(paths.NotRegular, "'stdout' is a FIFO", paths.open_file, self.fd, "stdout")
            # Written without O_CREAT (which would replace it), it does not block either.
            self.assertRaisesRegex(paths.NotRegular, "'stdout' is a FIFO", paths.open_file, self.fd, "stdout",
                                   os.O_WRONLY)

    def test_link_above_the_root_refused(self):
        os.makedirs(os.path.join(self.task, "a"))
        os.symlink("../..", os.path.join(self.task, "a", "up"))
        self.assertRaises(paths.PathEscape, paths.open_file, self.fd, "a/up/" + os.path.basename(self.outside) + "/secret")

    def test_absolute_link_inside_followed(self):
        self.make("real/x")
        os.symlink(os.path.join(self.task, "real"), os.path.join(self.task, "abs"))
        fd = paths.open_file(self.fd, "abs/x")
        with os.fdopen(fd, "rb") as f:
            self.assertEqual(f.read(), b"real/x")

    def test_writing_never_follows_the_last_link(self):
        os.symlink(os.path.join(self.outside, "secret"), os.path.join(self.task, "out"))
        fd = paths.open_file(self.fd, "out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.write(fd, b"mine")
        os.close(fd)
        with open(os.path.join(self.outside, "secret")) as f:
            self.assertEqual(f.read(), "secret")
        self.assertFalse(os.path.islink(os.path.join(self.task, "out")))
        # Without O_CREAT, a link is refused rather than replaced.
        os.symlink(os.path.join(self.outside, "secret"), os.path.join(self.task, "out2"))
        self.assertRaises(paths.PathEscape, paths.open_file, self.fd, "out2", os.O_WRONLY)

    def test_open_dir_creates_inside_only(self):
        os.symlink(self.outside, os.path.join(self.task, "link"))
        self.assertRaises(paths.PathEscape, paths.open_dir, self.fd, "link/new", create=True)
        self.assertEqual(os.listdir(self.outside), ["secret"])
        fd = paths.open_dir(self.fd, "a/b", create=True)
        os.close(fd)
        self.assertTrue(os.path.isdir(os.path.join(self.task, "a", "b")))

    def test_link_loop_ends(self):
        os.symlink("loop2", os.path.join(self.task, "loop1"))
        os.symlink("loop1", os.path.join(self.task, "loop2"))
        self.assertRaises(paths.PathEscape, paths.open_file, self.fd, "loop1")
        self.assertRaises(paths.PathEscape, paths.open_dir, self.fd, "loop1/x")


class TaskDirTests(PathsTestCase):
    """A task directory taken over by a planted link or another user (issue 11, item 4)."""

    def setUp(self):
        super().setUp()
        self.work = self.task  # a work_dir

    def test_creates_and_reopens(self):
        fd = paths.open_task_dir(self.work, "t-1")
        os.close(fd)
        with open(os.path.join(self.work, "t-1", "kept"), "w"):
            pass
        fd = paths.open_task_dir(self.work, "t-1")
        self.assertEqual(os.listdir(fd), ["kept"])
        os.close(fd)

    def test_planted_link_moved_aside(self):
        # What a task did: ln -s /elsewhere ../victim-2-0
        os.symlink(self.outside, os.path.join(self.work, "victim-2-0"))
        fd = paths.open_task_dir(self.work, "victim-2-0")
        with open(os.open("stdout", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "w") as f:
            f.write("out")
        os.close(fd)
        self.assertEqual(os.listdir(self.outside), ["secret"])
        self.assertFalse(os.path.islink(os.path.join(self.work, "victim-2-0")))
        aside = os.path.join(self.work, paths.QUARANTINE, "victim-2-0.1")
        self.assertEqual(os.readlink(aside), self.outside)

    def test_someone_elses_directory_moved_aside(self):
        import pwd

        try:
            nobody = pwd.getpwnam("nobody")
        except KeyError:
            raise SkipTest("no user nobody")
        if os.geteuid() != 0:
            raise SkipTest("needs root to make a directory owned by nobody")
        theirs = os.path.join(self.work, "t-2")
        os.makedirs(theirs)
        with open(os.path.join(theirs, "run.sh"), "w") as f:
            f.write("their script")
        os.chown(theirs, nobody.pw_uid, nobody.pw_gid)
        fd = paths.open_task_dir(self.work, "t-2")
        self.assertEqual(os.fstat(fd).st_uid, os.geteuid())
        self.assertEqual(os.listdir(fd), [])
        os.close(fd)
        self.assertTrue(os.path.isdir(os.path.join(self.work, paths.QUARANTINE, "t-2.1")))

    def test_a_file_in_its_place_moved_aside(self):
        with open(os.path.join(self.work, "t-3"), "w"):
            pass
        os.close(paths.open_task_dir(self.work, "t-3"))
        self.assertTrue(os.path.isdir(os.path.join(self.work, "t-3")))
        self.assertTrue(os.path.isfile(os.path.join(self.work, paths.QUARANTINE, "t-3.1")))

    def test_bad_names(self):
        for bad in ("", ".", "..", "a/b"):
            self.assertRaises(paths.PathEscape, paths.open_task_dir, self.work, bad)


class HostileTests(PathsTestCase):
    """
    What a hostile task plants, each through every way in: an output
    opened for reading (stage-out, the passive file server), the output
    glob, and an input's target made and written.  Each case is a clear
    error (or, for an output, nothing there), and nothing outside the
    task directory is read or written.

    A row: C{(case, plant, output, pattern, input)}; C{plant(test)} sets
    the task directory up and returns the task directory to use (None: the
    usual one); C{output}, C{pattern} and C{input} are C{(path, expected)},
    C{expected} a regex of the error, C{None} for "nothing there", or the
    whole row entry C{None} when that way in does not apply.
    """

    MANY = 100_000

    def plant_passwd(self):
        os.symlink("/etc/passwd", os.path.join(self.task, "out.txt"))

    def plant_dir_link(self):
        os.symlink(self.outside, os.path.join(self.task, "d"))

    def plant_dir(self):
        os.makedirs(os.path.join(self.task, "a", "dir"))

    def plant_fifo(self):
        os.mkfifo(os.path.join(self.task, "fifo"))

    def plant_many(self):
        many = os.path.join(self.task, "many")
        os.makedirs(many)
        for i in range(self.MANY):
            os.close(os.open(os.path.join(many, str(i)), os.O_WRONLY | os.O_CREAT, 0o644))

    def plant_task_link(self):
        self.make("r.txt")
        link = self.task + "-link"
        os.symlink(self.task, link)
        return link

    def plant_file(self):
        self.make("a.txt")

    def rows(self):
        outside = os.path.basename(self.outside)
        o, full = re.escape(outside), re.escape(self.outside)
        escape = "leads outside the task directory"
        return [
            ("a link to /etc/passwd as an output", self.plant_passwd,
             ("out.txt", f"^output 'out.txt' {escape}$"),
             ("*.txt", f"^output 'out.txt' \\(from pattern '\\*.txt'\\) {escape}$"),
             ("out.txt/x", escape)),
            ("a link to a directory outside", self.plant_dir_link,
             ("d/secret", f"^output 'd/secret' {escape}$"),
             ("d/*", escape),
             ("d/new/x", f"^input 'd/new/x' {escape}$")),
            ("'..' segments", self.plant_dir,
             (f"a/../../{outside}/secret", f"^output 'a/\\.\\./\\.\\./{o}/secret' {escape}$"),
             (f"a/../../{outside}/*", f"^output pattern 'a/\\.\\./\\.\\./{o}/\\*' {escape}$"),
             (f"a/dir/../../../{outside}/new", escape)),
            ("an absolute path", None,
             (os.path.join(self.outside, "secret"), f"^output '{full}/secret' {escape}$"),
             (os.path.join(self.outside, "*"), escape),
             (os.path.join(self.outside, "new"), f"^input '{full}/new' {escape}$")),
            ("a FIFO as an output", self.plant_fifo,
             ("fifo", "^output 'fifo' is a FIFO, not a regular file$"),
             ("fif*", None),
             ("fifo/x", "^input 'fifo/x' has 'fifo', which is not a directory$")),
            ("a directory as an output", self.plant_dir,
             ("a/dir", "^output 'a/dir' is a directory, not a regular file$"),
             ("a/di*", None),
             ("a/dir", "^input 'a/dir' names a directory$")),
            (f"a glob over {self.MANY} entries", self.plant_many,
             None,
             ("many/*", f"^output pattern 'many/\\*' matches more than {self.MANY - 1} files"),
             None),
            ("a task directory that is itself a link", self.plant_task_link,
             ("r.txt", "^the task directory .*-link is a symbolic link, not a directory$"),
             ("*", "^the task directory .*-link is a symbolic link, not a directory$"),
             ("x", "^the task directory .*-link is a symbolic link, not a directory$")),
            ("a path through a regular file", self.plant_file,
             ("a.txt/b", None),
             ("a.txt/*", None),
             ("a.txt/b", "^input 'a.txt/b' has 'a.txt', which is not a directory$")),
        ]

    def outcome_of_output(self, task, rel):
        try:
            found = paths.open_output(task, rel)
        except paths.PathEscape as e:
            return str(e)
        if found is not None:
            os.close(found[0])
            return "opened"
        return None

    def outcome_of_pattern(self, task, pattern):
        try:
            found, errors = paths.find_outputs(task, pattern, max_matches=self.MANY - 1)
        except paths.PathEscape as e:  # (the stager reports it as the pattern's error)
            return str(e)
        self.assertEqual(found, [])
        self.assertLessEqual(len(errors), 1)
        return errors[0] if errors else None

    def outcome_of_input(self, task, rel):
        try:
            target = paths.input_target(task, rel)
        except paths.PathEscape as e:
            return str(e)
        fd = paths.create_exclusive(paths.temporary_for(target))
        os.close(fd)
        return f"written at {target}"

    def test_hostile_cases(self):
        for case, plant, output, pattern, input_ in self.rows():
            shutil.rmtree(self.task)
            os.makedirs(self.task)
            for leftover in (self.task + "-link",):
                if os.path.lexists(leftover):
                    os.unlink(leftover)
            task = (plant() if plant else None) or self.task
            for way, entry, outcome in (("output", output, self.outcome_of_output),
                                        ("pattern", pattern, self.outcome_of_pattern),
                                        ("input", input_, self.outcome_of_input)):
                if entry is None:
                    continue
                rel, expected = entry
                with no_hang():
                    got = outcome(task, rel)
                if expected is None:
                    self.assertIsNone(got, f"{case}, {way} {rel!r}")
                else:
                    self.assertIsNotNone(got, f"{case}, {way} {rel!r}")
                    self.assertRegex(got, expected, f"{case}, {way} {rel!r}")
                self.assertEqual(os.listdir(self.outside), ["secret"], case)
                with open(os.path.join(self.outside, "secret")) as f:
                    self.assertEqual(f.read(), "secret", case)

    def test_bounded_glob_of_many_entries(self):
        self.plant_many()
        found, errors = paths.find_outputs(self.task, "many/*", max_entries=self.MANY - 1)
        self.assertEqual(found, [])
        self.assertRegex(errors[0], f"^output pattern 'many/\\*' looked at more than {self.MANY - 1} entries")
        self.assertEqual(len(paths.find_outputs(self.task, "many/*")[0]), self.MANY)
