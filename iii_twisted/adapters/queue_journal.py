"""
Storage behind the queue module (L{iii_twisted.interfaces.IQueueStore}).

L{MemoryQueueStore} keeps nothing (the reference's default, ``store_method:
in_memory``). L{JournalQueueStore} (``store_method: file_based``) is an append-only
journal of framed records::

    frame  = length (4 bytes, big endian) + crc32 of payload (4 bytes) + payload
    payload = one JSON object, UTF-8

Appends are batched: while one batch is being written and fsync'd in a thread, new
records wait, and all of them go out in the next single write + fsync. An append's
Deferred fires only after the fsync that covers it, so a message is acknowledged only
once it is on disk. On open the journal is replayed; a torn or corrupt tail (a crash in
the middle of a write) is cut off. When dead records outnumber live ones the journal is
compacted: the live state is written to a temporary file, fsync'd, and moved over the
journal with ``os.replace`` (atomic), then the directory is fsync'd.
"""

import json
import os
import struct
import zlib

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..interfaces import IQueueStore

_HEADER = struct.Struct(">II")
MAX_RECORD = 256 * 1024 * 1024  # a length beyond this is garbage, not a record
JOURNAL_NAME = "queue.journal"


def encode_record(record):
    """@return: the frame (bytes) of one JSON record."""
    payload = json.dumps(record, separators=(",", ":")).encode("utf-8")
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def decode_frames(blob):
    """
    Decode a journal's bytes.

    @return: (records, good_length): the records of every intact frame up to the
        first torn or corrupt one, and the byte length they span.
    """
    records = []
    offset = 0
    size = len(blob)
    while offset + _HEADER.size <= size:
        length, crc = _HEADER.unpack_from(blob, offset)
        start = offset + _HEADER.size
        end = start + length
        if length > MAX_RECORD or end > size:
            break
        payload = blob[start:end]
        if zlib.crc32(payload) != crc:
            break
        try:
            record = json.loads(payload.decode("utf-8"))
        except ValueError:
            break
        except RecursionError:
            # Intact (its CRC matched) but nested deeper than this interpreter reads:
            # skip it rather than stop the replay of everything after it.
            offset = end
            continue
        records.append(record)
        offset = end
    return records, offset


# fdatasync skips metadata that replay does not need (mtime) but still covers the
# file's new length; macOS has no fdatasync.
_datasync = getattr(os, "fdatasync", os.fsync)


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@implementer(IQueueStore)
class MemoryQueueStore:
    """Keeps nothing: messages live as long as the process."""

    durable = False

    def open(self, snapshot):
        return []

    def append(self, records):
        return succeed(None)

    def close(self):
        return succeed(None)


def thread_runner(reactor):
    """
    @return: a C{run(f, *args) -> Deferred} that runs C{f} in the reactor's thread
        pool (the journal's blocking writes and fsyncs go there).
    """
    from twisted.internet.threads import deferToThreadPool

    def run(f, *args):
        return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)
    return run


@implementer(IQueueStore)
class JournalQueueStore:
    """
    A file-backed journal in C{directory}/queue.journal.

    @ivar compactions: how many times the journal was compacted (for tests and stats).
    """

    durable = True
    _log = Logger()

    def __init__(self, directory, run_in_thread, compact_min_records=1000):
        """
        @param run_in_thread: C{run(f, *args) -> Deferred} running blocking work off the
            reactor thread (L{thread_runner}); tests pass a synchronous one.
        @param compact_min_records: compact only once the journal holds at least this
            many records, and four times as many as the live state.
        """
        # Absolute at once: a relative file_path follows the working directory of
        # the process at start-up, and the report says where that was.
        self.directory = os.path.abspath(directory)
        self.path = os.path.join(self.directory, JOURNAL_NAME)
        self._run = run_in_thread
        self._compact_min = compact_min_records
        self._file = None
        self._snapshot = None
        self._pending = []  # (frame bytes, Deferred)
        self._flushing = False
        self._closing = None
        self._records = 0  # records in the file now
        self._live = 0  # records the last snapshot held
        self.compactions = 0

    def open(self, snapshot):
        """
        Create the directory if needed, replay the journal and cut off a torn tail.
        Runs at start-up, before the engine serves anything, so it reads synchronously.

        @return: the replayed records.
        @raise OSError: when the directory or file cannot be used.
        """
        self._snapshot = snapshot
        os.makedirs(self.directory, exist_ok=True)
        records = []
        self.opened_as = "new journal"
        if os.path.exists(self.path):
            with open(self.path, "rb") as f:
                blob = f.read()
            self.opened_as = "existing journal: {} bytes".format(len(blob))
            records, good = decode_frames(blob)
            if good < len(blob):
                self._log.warn(
                    "queue journal {path}: cut {count} bytes of torn or corrupt data at "
                    "offset {offset} (kept {records} records)",
                    path=self.path, count=len(blob) - good, offset=good,
                    records=len(records))
                with open(self.path, "r+b") as f:
                    f.truncate(good)
                    f.flush()
                    os.fsync(f.fileno())
        self._file = open(self.path, "ab")
        _fsync_dir(self.directory)
        self._records = self._live = len(records)
        self._maybe_flush()
        return records

    def append(self, records):
        if self._closing is not None:
            return fail(OSError("the queue journal is closed"))
        d = Deferred()
        self._pending.append((b"".join(encode_record(r) for r in records), len(records), d))
        self._maybe_flush()
        return d

    def close(self):
        if self._closing is None:
            self._closing = Deferred()
            if self._file is None:  # never opened
                self._closing.callback(None)
            else:
                self._maybe_flush()
        result = Deferred()
        self._closing.addBoth(lambda r: (result.callback(None), r)[1])
        return result

    def _maybe_flush(self):
        if self._flushing or self._file is None:
            return
        if not self._pending:
            if self._closing is not None and not self._closing.called:
                self._file.close()
                self._file = None
                self._closing.callback(None)
            return
        batch, self._pending = self._pending, []
        self._flushing = True
        count = sum(n for _, n, _ in batch)
        if self._records + count >= max(self._compact_min, 4 * (self._live + 1)):
            # The snapshot is taken now, in the reactor thread: it already holds the
            # effect of every record of this batch, so the batch itself is not written.
            snapshot = self._snapshot()
            d = self._run(self._compact, [encode_record(r) for r in snapshot])
            d.addCallback(self._compacted, len(snapshot))
        else:
            d = self._run(self._write, b"".join(frame for frame, _, _ in batch))
            d.addCallback(self._written, count)
        d.addBoth(self._batch_done, batch)

    def _written(self, _, count):
        self._records += count

    def _compacted(self, new_file, live):
        self._file = new_file
        self._records = self._live = live
        self.compactions += 1
        self._log.info("queue journal {path} compacted to {live} records",
                       path=self.path, live=live)

    def health(self):
        """None when the journal can be written; else why not (iii_twisted.health)."""
        if self._last_error is not None:
            return "last journal write failed: {}".format(self._last_error)
        if not os.path.isdir(self.directory) or not os.access(self.directory, os.W_OK):
            return "directory {} is gone or not writable".format(self.directory)
        return None

    _last_error = None

    def _batch_done(self, result, batch):
        self._flushing = False
        failed = isinstance(result, Failure)
        self._last_error = result.getErrorMessage() if failed else None
        if failed:
            self._log.error("queue journal {path}: write failed: {error}", path=self.path,
                            error=result.getErrorMessage())
        for _, _, d in batch:
            if failed:
                d.errback(result)
            else:
                d.callback(None)
        self._maybe_flush()

    # -- blocking work, run in a thread ----------------------------------------------

    def _write(self, blob):
        self._file.write(blob)
        self._file.flush()
        _datasync(self._file.fileno())

    def _compact(self, frames):
        tmp = self.path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(b"".join(frames))
            f.flush()
            os.fsync(f.fileno())
        old = self._file
        os.replace(tmp, self.path)
        _fsync_dir(self.directory)
        old.close()
        return open(self.path, "ab")
