"""
L{FileKvStore}: an L{IKvStore} whose every acknowledged write survives a crash.

On disk (in the directory ``file_path`` names)::

    iii-twisted-kv.log    the log: an 8-byte header, then records
    iii-twisted-kv.lock   held with flock while a store has the directory open

Each record is framed as ``length (4 bytes, big-endian) | crc32 (4 bytes) | payload``,
where the payload is the UTF-8 JSON of ``["s", group, key, value]`` (set) or
``["d", group, key]`` (delete). An update is logged as the set of its result.

Durability: a write is applied in memory at once (so later reads see it), appended to
the log and acknowledged only after ``fsync``. Appends and fsyncs run off the reactor
thread, one job at a time; writes that arrive while a job runs are batched into the
next job and share one fsync (group commit).

Recovery: on open the log is replayed; the first record that is short, fails its
checksum or does not decode ends the replay, and the file is truncated there (a write
torn by a crash was never acknowledged, so nothing acknowledged is lost).

Compaction: when the log has grown past twice its size after the last compaction
(and at least ``compact_min_bytes``), the live data is written to a temporary file,
fsynced, and renamed over the log with ``os.replace`` (then the directory is fsynced).
A crash at any point leaves either the old log or the new one, both complete.

After an I/O error while appending the store fails every later write (fail-stop):
memory and disk may disagree, and only a restart (replaying the log) reconciles them.
"""

import json
import os
import struct
import zlib

from twisted.internet.defer import Deferred, fail
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..interfaces import IKvStore, KvStoreError
from .memory import KvStoreBase, encode_record

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX
    fcntl = None

LOG_NAME = "iii-twisted-kv.log"
LOCK_NAME = "iii-twisted-kv.lock"
COMPACT_NAME = LOG_NAME + ".compact"
MAGIC = b"IIIKV\x00\x01\n"
_FRAME = struct.Struct(">II")
MAX_RECORD = 1 << 31


def frame(payload):
    """@return: one framed record: length, crc32, payload."""
    return _FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def read_records(data):
    """
    Decode the records of a log's body (after the header).

    @return: (records, good_length): the decoded records, and the length of the
        valid prefix of C{data} (anything after it is torn or garbled).
    """
    records = []
    offset, end = 0, len(data)
    while offset < end:
        if end - offset < _FRAME.size:
            break
        length, crc = _FRAME.unpack_from(data, offset)
        start = offset + _FRAME.size
        if length > end - start:
            break
        payload = bytes(data[start:start + length])
        if zlib.crc32(payload) != crc:
            break
        try:
            record = json.loads(payload)
        except ValueError:
            break
        except RecursionError:
            # Intact (its CRC matched) but nested deeper than this interpreter reads:
            # skip it rather than stop the replay of everything after it.
            Logger().error("skipped a stored record nested too deeply to read")
            offset = start + length
            continue
        if not _valid_record(record):
            break
        records.append(record)
        offset = start + length
    return records, offset


def _valid_record(record):
    return isinstance(record, list) and (
        (len(record) == 4 and record[0] == "s") or (len(record) == 3 and record[0] == "d")
    ) and isinstance(record[1], str) and isinstance(record[2], str)


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_directory(directory):
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@implementer(IKvStore)
class FileKvStore(KvStoreBase):
    """
    An L{IKvStore} in an append-only log in a directory (see the module docstring).

    @ivar directory: the directory holding the log.
    @ivar log_bytes: the log's current size in bytes.
    @ivar compactions: how many compactions have completed.
    """

    _log = Logger()

    def __init__(self, directory, reactor, run_in_thread=None,
                 compact_min_bytes=8 * 1024 * 1024):
        """
        Open (creating if needed) the store in C{directory} and replay its log. This
        reads the whole log synchronously: do it at start-up, before serving.

        @param reactor: the reactor whose thread pool runs the file I/O.
        @param run_in_thread: C{f(callable, *args) -> Deferred} running the callable
            off the reactor thread; the reactor's thread pool by default (tests may
            pass a synchronous runner).
        @param compact_min_bytes: the log is never compacted while smaller.
        @raise KvStoreError: when another process holds the directory, or the log
            file is not one of ours.
        @raise OSError: when the directory or files cannot be created or read.
        """
        KvStoreBase.__init__(self)
        self.directory = os.path.abspath(directory)
        if run_in_thread is None:
            def run_in_thread(f, *args):
                return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)
        self._run = run_in_thread
        self._compact_min = compact_min_bytes
        self._pending = []  # [(bytes, Deferred)] waiting for the next job
        self._busy = False
        self._broken = None
        self._closing = None
        self.compactions = 0
        if not os.path.isdir(self.directory):
            os.makedirs(self.directory)
            _fsync_directory(os.path.dirname(self.directory))
        self._path = os.path.join(self.directory, LOG_NAME)
        self._lock_fd = self._lock()
        try:
            self._fd = self._open_and_replay()
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._compacted_size = self.log_bytes

    def _lock(self):
        fd = os.open(os.path.join(self.directory, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise KvStoreError("{} is in use by another process".format(self.directory))
        return fd

    def _open_and_replay(self):
        # A compaction interrupted before its rename leaves a partial temp file.
        try:
            os.unlink(os.path.join(self.directory, COMPACT_NAME))
        except FileNotFoundError:
            pass
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            with open(self._path, "rb") as f:
                data = f.read()
            if len(data) < len(MAGIC) and MAGIC.startswith(data):
                # New, or torn while its header was written.
                self.opened_as = "new store"
                os.ftruncate(fd, 0)
                _write_all(fd, MAGIC)
                os.fsync(fd)
                _fsync_directory(self.directory)
                self.log_bytes = len(MAGIC)
                return fd
            if not data.startswith(MAGIC):
                raise KvStoreError("{} is not an iii-twisted key-value log".format(self._path))
            records, good = read_records(memoryview(data)[len(MAGIC):])
            for record in records:
                self._apply_record(record)
            good += len(MAGIC)
            if good < len(data):
                self._log.warn(
                    "{path}: dropped a torn or garbled tail of {count} bytes after "
                    "{records} good records", path=self._path, count=len(data) - good,
                    records=len(records))
                os.ftruncate(fd, good)
                os.fsync(fd)
            self.log_bytes = good
            self.opened_as = "existing store: {} keys, {} bytes".format(
                sum(len(g) for g in self._groups.values()), good)
            return fd
        except BaseException:
            os.close(fd)
            raise

    # -- writing ---------------------------------------------------------------------

    def _persist(self, record_bytes):
        if self._broken is not None:
            return fail(KvStoreError("the store failed after an I/O error and refuses "
                                     "writes until restarted: {}".format(self._broken)))
        d = Deferred()
        self._pending.append((frame(record_bytes), d))
        self._kick()
        return d

    def _kick(self):
        """Start the next job (compaction or a batch of appends) if none is running."""
        if self._busy:
            return
        if self._needs_compaction():
            self._busy = True
            snapshot = [(group, list(items.items())) for group, items in self._groups.items()]
            self._run(self._compact_sync, snapshot).addBoth(self._compacted)
            return
        if self._pending:
            batch, self._pending = self._pending, []
            self._busy = True
            data = b"".join(chunk for chunk, _ in batch)
            self._run(self._append_sync, data).addBoth(self._appended, batch)
            return
        if self._closing is not None:
            self._finish_close()

    def _needs_compaction(self):
        return (self._broken is None and self.log_bytes >= self._compact_min
                and self.log_bytes > 2 * self._compacted_size)

    def _append_sync(self, data):
        _write_all(self._fd, data)
        os.fsync(self._fd)
        return len(data)

    def _appended(self, result, batch):
        self._busy = False
        if isinstance(result, Failure):
            self._broken = result.getErrorMessage()
            self._log.failure("{path}: append failed; the store now refuses writes",
                              result, path=self._path)
            error = KvStoreError("write failed: {}".format(self._broken))
            for _, d in batch:
                d.errback(error)
            for _, d in self._pending:
                d.errback(error)
            self._pending = []
        else:
            self.log_bytes += result
            for _, d in batch:
                d.callback(None)
        self._kick()

    def _compact_sync(self, snapshot):
        temp = os.path.join(self.directory, COMPACT_NAME)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        size = 0
        try:
            chunks, buffered = [MAGIC], len(MAGIC)
            for group, items in snapshot:
                for key, value in items:
                    chunk = frame(encode_record(["s", group, key, value]))
                    chunks.append(chunk)
                    buffered += len(chunk)
                    if buffered > 1 << 20:
                        _write_all(fd, b"".join(chunks))
                        size += buffered
                        chunks, buffered = [], 0
            _write_all(fd, b"".join(chunks))
            size += buffered
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, self._path)
        _fsync_directory(self.directory)
        new_fd = os.open(self._path, os.O_RDWR | os.O_APPEND)
        old_fd, self._fd = self._fd, new_fd
        os.close(old_fd)
        return size

    def _compacted(self, result):
        self._busy = False
        if isinstance(result, Failure):
            # The old log is intact; try again only after it has doubled once more.
            self._log.failure("{path}: compaction failed; the log stays as it is", result,
                              path=self._path)
            self._compacted_size = self.log_bytes
        else:
            self._log.info("{path}: compacted the log from {before} to {after} bytes",
                           path=self._path, before=self.log_bytes, after=result)
            self.log_bytes = self._compacted_size = result
            self.compactions += 1
        self._kick()

    # -- closing ---------------------------------------------------------------------

    def health(self):
        """None when writes can succeed; else why not (broken log, lost directory)."""
        if self._closed:
            return "closed"
        if self._broken is not None:
            return "writes failed, refusing writes until restarted: {}".format(self._broken)
        if not os.path.isdir(self.directory) or not os.access(self.directory, os.W_OK):
            return "directory {} is gone or not writable".format(self.directory)
        return None

    def close(self):
        """
        Finish the pending writes, then close the log and release the lock.

        @return: Deferred firing with None when done.
        """
        if self._closing is None:
            self._closed = True
            self._closing = Deferred()
            closing = self._closing
            self._kick()
            return _chain(closing)
        return _chain(self._closing)

    def _finish_close(self):
        if self._fd is not None:
            os.close(self._fd)
            os.close(self._lock_fd)
            self._fd = None
            if not self._closing.called:
                self._closing.callback(None)


def _chain(d):
    """@return: a new Deferred firing with C{d}'s result, leaving C{d} untouched."""
    result = Deferred()
    if d.called:
        result.callback(None)
    else:
        d.addCallback(lambda r: (result.callback(r), r)[1])
    return result
