"""
L{MemoryKvStore}: an L{IKvStore} in memory, and L{KvStoreBase}, the in-memory logic
that the file store shares (it adds durability through L{KvStoreBase._persist}).
"""

import json

from twisted.internet.defer import fail, succeed
from zope.interface import implementer

from ..interfaces import IKvStore, KvStoreError
from .ops import ABSENT, apply_update_ops, update_result, validate_ops

_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def encode_record(record):
    """
    @return: the UTF-8 JSON of a log record (a list).
    @raise KvStoreError: when it holds something JSON cannot represent.
    """
    try:
        return _encoder.encode(record).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise KvStoreError("value is not JSON: {}".format(e))


class KvStoreBase:
    """
    Groups of ordered keys in dicts (a dict keeps insertion order, and overwriting a
    key keeps its place), with every write turned into a record for L{_persist}.

    Records are lists: C{["s", group, key, value]} (set) or C{["d", group, key]}
    (delete); an update is recorded as the set of its result.
    """

    def __init__(self):
        self._groups = {}
        self._closed = False

    def health(self):
        """
        For readiness (iii_twisted.health): None when the store is usable, else why
        not.
        """
        return "closed" if self._closed else None

    # -- what subclasses provide -----------------------------------------------------

    def _persist(self, record_bytes):
        """
        Make one encoded record durable.

        @return: Deferred firing with None once it is, or failing with KvStoreError.
        """
        raise NotImplementedError

    # -- IKvStore --------------------------------------------------------------------

    def get(self, group, key):
        items = self._groups.get(group)
        return succeed(None if items is None else items.get(key))

    def list(self, group):
        items = self._groups.get(group)
        return succeed([] if items is None else list(items.values()))

    def items(self, group):
        items = self._groups.get(group)
        return succeed([] if items is None else list(items.items()))

    def list_groups(self):
        return succeed(sorted(self._groups))

    def set(self, group, key, value):
        try:
            self._check_write(group, key)
            record = encode_record(["s", group, key, value])
        except KvStoreError as e:
            return fail(e)
        old = self._store(group, key, value)
        return self._persist(record).addCallback(
            lambda _: {"old_value": old, "new_value": value})

    def update(self, group, key, ops):
        try:
            self._check_write(group, key)
            validate_ops(ops)
            items = self._groups.get(group)
            current = ABSENT if items is None else items.get(key, ABSENT)
            new, errors = apply_update_ops(current, ops)
            record = encode_record(["s", group, key, new])
        except KvStoreError as e:
            return fail(e)
        self._store(group, key, new)
        old = None if current is ABSENT else current
        return self._persist(record).addCallback(
            lambda _: update_result(old, new, errors))

    def delete(self, group, key):
        try:
            self._check_write(group, key)
        except KvStoreError as e:
            return fail(e)
        items = self._groups.get(group)
        if items is None or key not in items:
            return succeed({"old_value": None})
        old = items.pop(key)
        if not items:
            del self._groups[group]
        return self._persist(encode_record(["d", group, key])).addCallback(
            lambda _: {"old_value": old})

    def close(self):
        self._closed = True
        return succeed(None)

    # -- helpers ---------------------------------------------------------------------

    def _check_write(self, group, key):
        if self._closed:
            raise KvStoreError("the store is closed")
        if not isinstance(group, str) or not isinstance(key, str):
            raise KvStoreError("group and key must be strings, not {} and {}".format(
                type(group).__name__, type(key).__name__))

    def _store(self, group, key, value):
        """@return: the previous value (None if there was none)."""
        items = self._groups.get(group)
        if items is None:
            items = self._groups[group] = {}
        old = items.get(key)
        items[key] = value
        return old

    def _apply_record(self, record):
        """Apply one decoded record (replaying a log)."""
        if record[0] == "s":
            self._store(record[1], record[2], record[3])
        else:
            items = self._groups.get(record[1])
            if items is not None:
                items.pop(record[2], None)
                if not items:
                    del self._groups[record[1]]


@implementer(IKvStore)
class MemoryKvStore(KvStoreBase):
    """An L{IKvStore} that keeps everything in memory: gone when the process ends."""

    def _persist(self, record_bytes):
        return succeed(None)
