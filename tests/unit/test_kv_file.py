"""The file-based key-value store: replay, torn tails, group commit, compaction, locks."""

import os
import shutil
import tempfile

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.trial.unittest import SynchronousTestCase

from iii_twisted.adapters import kv_store_from_config
from iii_twisted.adapters.file import LOG_NAME, MAGIC, FileKvStore, frame
from iii_twisted.adapters.memory import MemoryKvStore
from iii_twisted.config import ConfigError
from iii_twisted.interfaces import KvStoreError


def run_now(f, *args):
    return maybeDeferred(f, *args)



def temp_path(case):
    """@return: a path (not yet existing) in a temporary directory removed after the test."""
    parent = tempfile.mkdtemp(prefix="iii-kv-")
    case.addCleanup(shutil.rmtree, parent, True)
    return os.path.join(parent, "store")

class ManualRunner:
    """Holds each file job until the test runs it, as a busy disk would."""

    def __init__(self):
        self.jobs = []

    def __call__(self, f, *args):
        d = Deferred()
        self.jobs.append((f, args, d))
        return d

    def run_one(self):
        f, args, d = self.jobs.pop(0)
        maybeDeferred(f, *args).chainDeferred(d)


class FileKvStoreTests(SynchronousTestCase):
    def setUp(self):
        self.dir = temp_path(self)
        self.stores = []

    def tearDown(self):
        for store in self.stores:
            store.close()

    def open(self, runner=run_now, **kwargs):
        store = FileKvStore(self.dir, None, run_in_thread=runner, **kwargs)
        self.stores.append(store)
        return store

    def reopen(self, store):
        self.successResultOf(store.close())
        return self.open()

    def log_path(self):
        return os.path.join(self.dir, LOG_NAME)

    def test_survives_reopen(self):
        store = self.open()
        for i in range(5):
            self.successResultOf(store.set("g", "k{}".format(i), {"i": i}))
        self.successResultOf(store.delete("g", "k1"))
        self.successResultOf(store.update("g", "k2", [{"type": "increment", "path": "i", "by": 10}]))
        self.successResultOf(store.set("other", "x", None))
        store = self.reopen(store)
        self.assertEqual(self.successResultOf(store.items("g")),
                         [("k0", {"i": 0}), ("k2", {"i": 12}), ("k3", {"i": 3}),
                          ("k4", {"i": 4})])
        self.assertEqual(self.successResultOf(store.list_groups()), ["g", "other"])
        self.assertEqual(self.successResultOf(store.items("other")), [("x", None)])

    def test_torn_tail_is_truncated(self):
        store = self.open()
        self.successResultOf(store.set("g", "a", 1))
        self.successResultOf(store.set("g", "b", 2))
        self.successResultOf(store.close())
        size = os.path.getsize(self.log_path())
        with open(self.log_path(), "ab") as f:  # half of a third record
            f.write(frame(b'["s","g","c",3]')[:9])
        store = self.open()
        self.assertEqual(self.successResultOf(store.list("g")), [1, 2])
        self.assertEqual(os.path.getsize(self.log_path()), size)
        # And it appends cleanly after the cut.
        self.successResultOf(store.set("g", "d", 4))
        store = self.reopen(store)
        self.assertEqual(self.successResultOf(store.list("g")), [1, 2, 4])

    def test_garbled_tail_is_truncated(self):
        store = self.open()
        self.successResultOf(store.set("g", "a", 1))
        self.successResultOf(store.set("g", "b", "two"))
        self.successResultOf(store.close())
        with open(self.log_path(), "r+b") as f:
            data = f.read()
            f.seek(len(data) - 3)
            f.write(b"XYZ")  # corrupt the last record's payload: the crc catches it
        store = self.open()
        self.assertEqual(self.successResultOf(store.items("g")), [("a", 1)])

    def test_valid_crc_but_bad_record_is_truncated(self):
        store = self.open()
        self.successResultOf(store.set("g", "a", 1))
        self.successResultOf(store.close())
        with open(self.log_path(), "ab") as f:
            f.write(frame(b'["x"]') + frame(b'["s","g","b",2]'))
        store = self.open()
        self.assertEqual(self.successResultOf(store.list("g")), [1])

    def test_torn_header(self):
        os.makedirs(self.dir)
        with open(self.log_path(), "wb") as f:
            f.write(MAGIC[:3])
        store = self.open()
        self.assertEqual(self.successResultOf(store.list_groups()), [])
        self.successResultOf(store.set("g", "k", 1))
        store = self.reopen(store)
        self.assertEqual(self.successResultOf(store.get("g", "k")), 1)

    def test_foreign_file_refused(self):
        os.makedirs(self.dir)
        with open(self.log_path(), "wb") as f:
            f.write(b"this is not a log at all")
        self.assertRaises(KvStoreError, self.open)
        with open(self.log_path(), "rb") as f:
            self.assertEqual(f.read(), b"this is not a log at all")

    def test_second_opener_refused(self):
        self.open()
        error = self.assertRaises(KvStoreError, self.open)
        self.assertIn("in use by another process", str(error))

    def test_ack_waits_for_the_write(self):
        runner = ManualRunner()
        store = self.open(runner)
        d = store.set("g", "k", 1)
        self.assertNoResult(d)
        # Visible to readers at once, acknowledged once written.
        self.assertEqual(self.successResultOf(store.get("g", "k")), 1)
        runner.run_one()
        self.assertEqual(self.successResultOf(d), {"old_value": None, "new_value": 1})

    def test_group_commit(self):
        runner = ManualRunner()
        store = self.open(runner)
        first = store.set("g", "a", 1)
        batched = [store.set("g", "b", 2), store.delete("g", "a"), store.set("g", "c", 3)]
        self.assertEqual(len(runner.jobs), 1)  # one job in flight, the rest wait
        runner.run_one()
        self.successResultOf(first)
        self.assertEqual(len(runner.jobs), 1)  # the three waiting writes: one job
        for d in batched:
            self.assertNoResult(d)
        runner.run_one()
        for d in batched:
            self.successResultOf(d)
        self.assertEqual(runner.jobs, [])
        store = self.reopen(store)
        self.assertEqual(self.successResultOf(store.items("g")), [("b", 2), ("c", 3)])

    def test_close_waits_for_pending_writes(self):
        runner = ManualRunner()
        store = self.open(runner)
        d = store.set("g", "a", 1)
        closed = store.close()
        self.assertNoResult(closed)
        runner.run_one()
        self.successResultOf(d)
        self.successResultOf(closed)
        store = self.open()
        self.assertEqual(self.successResultOf(store.get("g", "a")), 1)

    def test_compaction(self):
        store = self.open(compact_min_bytes=1)
        for i in range(50):
            self.successResultOf(store.set("g", "same", i))
        self.successResultOf(store.set("g", "other", "x"))
        self.assertGreater(store.compactions, 0)
        self.assertLess(os.path.getsize(self.log_path()), 200)
        self.assertEqual(os.path.getsize(self.log_path()), store.log_bytes)
        store = self.reopen(store)
        self.assertEqual(self.successResultOf(store.items("g")),
                         [("same", 49), ("other", "x")])
        self.assertFalse(os.path.exists(self.log_path() + ".compact"))

    def test_writes_during_compaction_are_kept(self):
        runner = ManualRunner()
        store = self.open(runner, compact_min_bytes=1)
        self.assertEqual(store.compactions, 0)
        d1 = store.set("g", "a", 1)
        runner.run_one()  # append a=1
        self.successResultOf(d1)
        d2 = store.set("g", "a", 2)  # the log has grown: compaction runs first
        d3 = store.delete("g", "a")
        self.assertEqual(len(runner.jobs), 1)
        runner.run_one()  # compaction (its snapshot already has a deleted)
        self.assertEqual(store.compactions, 1)
        runner.run_one()  # then the two waiting writes
        self.successResultOf(d2)
        self.successResultOf(d3)
        while runner.jobs:
            runner.run_one()
        self.successResultOf(store.close())
        store = self.open()
        self.assertIsNone(self.successResultOf(store.get("g", "a")))

    def test_leftover_compaction_file_is_removed(self):
        store = self.open()
        self.successResultOf(store.set("g", "a", 1))
        self.successResultOf(store.close())
        with open(self.log_path() + ".compact", "wb") as f:
            f.write(MAGIC + b"partial")
        store = self.open()
        self.assertEqual(self.successResultOf(store.get("g", "a")), 1)
        self.assertFalse(os.path.exists(self.log_path() + ".compact"))

    def test_io_error_fails_write_and_later_writes(self):
        store = self.open()
        self.successResultOf(store.set("g", "a", 1))
        os.close(store._fd)  # the next append fails with EBADF
        store._fd = os.open(os.devnull, os.O_RDONLY)
        self.failureResultOf(store.set("g", "b", 2), KvStoreError)
        failure = self.failureResultOf(store.set("g", "c", 3), KvStoreError)
        self.assertIn("refuses writes", str(failure.value))
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)


class KvConfigTests(SynchronousTestCase):
    def test_default_is_memory(self):
        self.assertIsInstance(kv_store_from_config(None, None), MemoryKvStore)
        self.assertIsInstance(kv_store_from_config({"store_method": "in_memory"}, None),
                              MemoryKvStore)

    def test_file_based(self):
        path = temp_path(self)
        store = kv_store_from_config({"store_method": "file_based", "file_path": path,
                                      "save_interval_ms": 100}, None)
        self.addCleanup(store.close)
        self.assertIsInstance(store, FileKvStore)
        self.assertTrue(os.path.isdir(path))

    def test_errors_name_the_key(self):
        for config, key in [
            ({"store_method": "file"}, "store_method"),
            ({"store_method": 3}, "store_method"),
            ({"file_pth": "x"}, "file_pth"),
            ({"save_interval_ms": "soon"}, "save_interval_ms"),
        ]:
            error = self.assertRaises(ConfigError, kv_store_from_config, config, None)
            self.assertEqual(error.key, key)

    def test_unusable_directory(self):
        path = temp_path(self)
        with open(path, "w") as f:
            f.write("a file, not a directory")
        error = self.assertRaises(ConfigError, kv_store_from_config,
                                  {"store_method": "file_based", "file_path": path}, None)
        self.assertEqual(error.key, "file_path")
