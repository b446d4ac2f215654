"""
The content cache's index: layout, LRU eviction, pins, verification stamps,
reopening.  Synchronous: the cache does no I/O beyond stat, rename, unlink.
"""

import hashlib
import os

from twisted.trial.unittest import SynchronousTestCase

from everest_agent.cache import ContentCache, hash_file, parse_size


def sha(data):
    return hashlib.sha256(data).hexdigest()


class FakeTime:
    def __init__(self):
        self.now = 1_700_000_000.0

    def __call__(self):
        self.now += 1
        return self.now


class CacheTests(SynchronousTestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        self.time = FakeTime()
        self.cache = self.open()

    def open(self, size=1000):
        cache = ContentCache(self.dir, size, clock=self.time)
        cache.open()
        self.addCleanup(cache.close)
        return cache

    def add(self, data, executable=False, cache=None):
        cache = cache or self.cache
        tmp = cache.temporary()
        with open(tmp, "wb") as f:
            f.write(data)
        entry = self.successResultOf(cache.add(sha(data), executable, tmp, len(data)))
        cache.unpin(entry)
        return entry

    def test_layout_and_modes(self):
        data = b"a" * 10
        entry = self.add(data)
        self.assertEqual(entry.path, os.path.join(self.dir, "sha256", sha(data)[:2], sha(data)))
        self.assertEqual(os.stat(entry.path).st_mode & 0o777, 0o444)
        x = self.add(data, executable=True)
        self.assertEqual(x.path, entry.path + ".x")
        self.assertEqual(os.stat(x.path).st_mode & 0o777, 0o555)
        self.assertEqual(self.cache.total, 20)
        self.assertEqual(os.listdir(self.cache.tmp_dir), [])

    def test_lru_eviction(self):
        a, b, c = (self.add(bytes([n]) * 400) for n in (1, 2, 3))
        self.assertTrue(a.gone)  # 1200 > 1000: the oldest goes
        self.assertFalse(os.path.exists(a.path))
        self.cache.touch(b)  # b is now more recent than c
        d = self.add(b"\4" * 400)
        self.assertTrue(c.gone)
        self.assertFalse(b.gone or d.gone)
        self.assertEqual(self.cache.total, 800)

    def test_pinned_entries_are_never_evicted(self):
        a = self.add(b"\1" * 400)
        b = self.add(b"\2" * 400)
        self.cache.pin(a)
        self.cache.pin(b)
        tmp = self.cache.temporary()
        with open(tmp, "wb") as f:
            f.write(b"\3" * 400)
        c = self.successResultOf(self.cache.add(sha(b"\3" * 400), False, tmp, 400))  # comes back pinned
        self.assertFalse(a.gone or b.gone or c.gone)
        self.assertEqual(self.cache.total, 1200)  # over the limit while all are in use
        self.cache.unpin(b)
        self.assertTrue(b.gone)  # the least recently used one not in use
        self.assertTrue(os.path.exists(a.path))
        self.assertEqual(self.cache.total, 800)
        self.cache.unpin(c)
        self.assertFalse(c.gone)
        self.cache.make_room(500)  # only c can go; a is still in use
        self.assertTrue(c.gone)
        self.assertFalse(a.gone)
        self.cache.unpin(a)
        self.assertFalse(a.gone)

    def test_new_entry_dropped_when_everything_else_is_in_use(self):
        a = self.add(b"\1" * 600)
        self.cache.pin(a)
        c = self.add(b"\3" * 600)  # fits only by evicting a, which is in use
        self.assertTrue(c.gone)
        self.assertFalse(a.gone)
        self.cache.unpin(a)

    def test_oversized_content_is_transient(self):
        small = self.add(b"s" * 100)
        tmp = self.cache.temporary()
        with open(tmp, "wb") as f:
            f.write(b"B" * 2000)
        big = self.successResultOf(self.cache.add(sha(b"B" * 2000), False, tmp, 2000))
        self.assertFalse(small.gone)  # nothing evicted for it
        self.assertEqual(self.cache.total, 100)
        self.assertTrue(os.path.exists(big.path))
        self.cache.unpin(big)
        self.assertTrue(big.gone)
        self.assertFalse(os.path.exists(big.path))

    def test_check_and_verification(self):
        data = b"content"
        entry = self.add(data)
        self.assertEqual(self.successResultOf(self.cache.check(entry)), "ok")
        # Changed behind the cache's back: must be hashed again.
        os.chmod(entry.path, 0o644)
        with open(entry.path, "r+b") as f:
            f.write(b"CONTENT")
        self.assertEqual(self.successResultOf(self.cache.check(entry)), "verify")
        self.assertEqual(os.stat(entry.path).st_mode & 0o777, 0o444)  # mode restored
        self.assertFalse(self.cache.mark_verified(entry, *hash_file(entry.path)))
        self.assertTrue(entry.gone)
        self.assertFalse(os.path.exists(entry.path))
        self.assertIsNone(self.cache.get(sha(data), False))

    def test_intact_entry_verified_again(self):
        entry = self.add(b"content")
        entry.verified = False
        self.assertEqual(self.successResultOf(self.cache.check(entry)), "verify")
        self.assertTrue(self.cache.mark_verified(entry, *hash_file(entry.path)))
        self.assertEqual(self.successResultOf(self.cache.check(entry)), "ok")

    def test_missing_file(self):
        entry = self.add(b"content")
        os.unlink(entry.path)
        self.assertEqual(self.successResultOf(self.cache.check(entry)), "missing")
        self.assertIsNone(self.cache.get(entry.digest, False))
        self.assertEqual(self.cache.total, 0)

    def test_reopen_keeps_order_and_needs_verification(self):
        a = self.add(b"\1" * 300)
        b = self.add(b"\2" * 300)
        self.cache.touch(a)  # a is the most recent now
        tmp_leftover = os.path.join(self.dir, "tmp", "stale.part")
        with open(tmp_leftover, "wb") as f:
            f.write(b"x")
        stray = os.path.join(self.dir, "sha256", "zz")
        os.makedirs(stray)
        bogus = os.path.join(self.dir, "sha256", b.digest[:2], "not-a-digest")
        with open(bogus, "wb") as f:
            f.write(b"?")
        again = self.open(size=400)
        self.assertFalse(os.path.exists(tmp_leftover))
        self.assertFalse(os.path.exists(bogus))
        self.assertIsNone(again.get(b.digest, False))  # least recently used: evicted to fit
        entry = again.get(a.digest, False)
        self.assertIsNotNone(entry)
        self.assertEqual(self.successResultOf(again.check(entry)), "verify")
        self.assertEqual(again.total, 300)

    def test_replace_same_key(self):
        data = b"same"
        first = self.add(data)
        second = self.add(data)
        self.assertTrue(first.gone)
        self.assertIs(self.cache.get(sha(data), False), second)
        self.assertEqual(self.cache.total, 4)


class ParseSizeTests(SynchronousTestCase):
    def test_values(self):
        cases = {
            "0": 0, "1000": 1000, "10G": 10 << 30, "10g": 10 << 30, "512M": 512 << 20,
            "64KiB": 64 << 10, "1KB": 1024, "100 MB": 100 << 20, "1.5T": int(1.5 * (1 << 40)), "5B": 5,
        }
        for text, value in cases.items():
            self.assertEqual(parse_size(text), value, text)

    def test_bad(self):
        for text in ("", "x", "-1", "10Q", "1..2G", "G"):
            self.assertRaises(ValueError, parse_size, text)


class SharedDirectoryTests(SynchronousTestCase):
    """Two agents with one work_dir open one cache directory."""

    def test_opening_keeps_the_other_agents_downloads(self):
        directory = os.path.abspath(self.mktemp())
        first = ContentCache(directory, 1 << 20)
        first.open()
        self.addCleanup(first.close)
        in_flight = first.temporary()
        with open(in_flight, "wb") as f:
            f.write(b"half a download")
        second = ContentCache(directory, 1 << 20)
        second.open()
        self.addCleanup(second.close)
        self.assertTrue(os.path.exists(in_flight))
        self.assertNotEqual(first.tmp_dir, second.tmp_dir)
        # first still completes its download into the shared store.
        entry = self.successResultOf(first.add(sha(b"half a download"), False, in_flight, 15))
        first.unpin(entry)
        self.assertTrue(os.path.exists(entry.path))

    def test_what_a_gone_agent_left_is_removed(self):
        directory = os.path.abspath(self.mktemp())
        gone = ContentCache(directory, 1 << 20)
        gone.open()
        leftover = gone.temporary()
        with open(leftover, "wb") as f:
            f.write(b"x")
        # The process died: its lock is released, its files stay behind.
        os.close(gone._lock)
        gone._lock = None
        again = ContentCache(directory, 1 << 20)
        again.open()
        self.addCleanup(again.close)
        self.assertFalse(os.path.exists(leftover))
        self.assertEqual(sorted(os.listdir(os.path.join(directory, "tmp"))),
                         sorted([os.path.basename(again.tmp_dir), os.path.basename(again.tmp_dir) + ".lock"]))
