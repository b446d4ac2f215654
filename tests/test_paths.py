"""
Keeping a task's files inside its directory: input targets, temporary
files, output paths and output patterns, with symbolic links planted in the
task directory.
"""

import os

from twisted.trial.unittest import SynchronousTestCase

from everest_agent import paths


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

    def test_temporary_name(self):
        self.assertEqual(paths.temporary_for("/t/a/b.txt"), "/t/a/.b.txt.part")


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


class OpenOutputTests(PathsTestCase):
    def test_regular(self):
        self.make("r.txt")
        with paths.open_output(self.task, "r.txt") as f:
            self.assertEqual(f.read(), b"r.txt")

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
        with paths.open_output(self.task, "alias") as f:
            self.assertEqual(f.read(), b"real.txt")

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
