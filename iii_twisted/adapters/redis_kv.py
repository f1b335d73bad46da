"""
L{RedisKvStore}: an L{IKvStore} in Redis, shared by every engine that uses the same
Redis (``modules::state::adapters::RedisAdapter``, ``modules::stream::adapters::
RedisAdapter``).

Layout (the reference's, v0.10 ``state/adapters/redis_adapter.rs``): a group is one
hash, ``state:{scope}`` for state and ``stream:{name}:{group}`` for streams; a field
is an item key, its value the item's JSON text. Ours adds, per hash, a sorted set
``iii:order:{hash key}`` that keeps key insertion order (a Redis hash keeps it only
while small), scored from the counter ``iii:kv_seq``. Fields without an order entry
(written by a reference engine) are listed last, sorted by key.

Deviations from the reference, on purpose (docs/scale-out.rst):

- Values are JSON text encoded and decoded in Python, never in Lua: the reference's
  ``cjson`` turns ``[]`` into ``{}`` and rounds integers past 2^53 and long floats.
- ``update`` applies the update ops in Python (L{iii_twisted.adapters.ops}, the same
  code as every other store) and writes with a compare-and-set script that succeeds
  only if the stored text is still the one the ops were applied to; on a conflict it
  reads again and retries. Updates of one key from one store are queued locally, so
  only writers on other engines can make it retry.
- Groups are listed with ``SCAN``, never ``KEYS`` (which blocks the server).
"""

import json

from twisted.internet.defer import Deferred, DeferredLock, fail, succeed
from zope.interface import implementer

from ..interfaces import IKvStore, KvStoreError
from .ops import ABSENT, apply_update_ops, update_result, validate_ops

ORDER_PREFIX = "iii:order:"
SEQ_KEY = "iii:kv_seq"
MAX_UPDATE_ATTEMPTS = 1000

_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)

# KEYS: hash, order zset, seq counter. ARGV: field, JSON. Returns the old JSON or nil.
_SET = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if not old then
  redis.call('ZADD', KEYS[2], 'NX', redis.call('INCR', KEYS[3]), ARGV[1])
end
return old
"""

# KEYS: hash, order zset. ARGV: field. Returns the old JSON or nil.
_DELETE = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old then
  redis.call('HDEL', KEYS[1], ARGV[1])
end
redis.call('ZREM', KEYS[2], ARGV[1])
return old
"""

# KEYS: hash, order zset, seq counter. ARGV: field, '1' if a value is expected (else
# the field must be absent), the expected JSON, the new JSON. Returns 1 if written.
_COMPARE_AND_SET = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if ARGV[2] == '1' then
  if current ~= ARGV[3] then return 0 end
elseif current then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[4])
if not current then
  redis.call('ZADD', KEYS[2], 'NX', redis.call('INCR', KEYS[3]), ARGV[1])
end
return 1
"""

# KEYS: hash, order zset. Returns {HGETALL, ZRANGE} in one consistent read.
_LIST = """
return {redis.call('HGETALL', KEYS[1]), redis.call('ZRANGE', KEYS[2], 0, -1)}
"""


def _encode(value):
    try:
        return _encoder.encode(value)
    except (TypeError, ValueError) as e:
        raise KvStoreError("value is not JSON: {}".format(e))


def _decode(text):
    return None if text is None else json.loads(text)


def _glob_escape(text):
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


@implementer(IKvStore)
class RedisKvStore:
    """
    An L{IKvStore} over a shared L{iii_twisted.redis_client.RedisClient}.

    A group C{g} is the hash C{key_prefix + g}; L{list_groups} lists the groups that
    start with C{group_prefix}. Every failure (Redis unreachable, an error reply) is
    a L{KvStoreError} saying what happened.
    """

    def __init__(self, client, key_prefix="state:", group_prefix="", release=True):
        """
        @param client: the L{RedisClient}; L{close} releases it when C{release}.
        """
        self._client = client
        self._key_prefix = key_prefix
        self._group_prefix = group_prefix
        self._release = release
        self._closed = False
        self._update_locks = {}  # (group, key) -> DeferredLock
        self._set = client.script(_SET)
        self._delete = client.script(_DELETE)
        self._cas = client.script(_COMPARE_AND_SET)
        self._list = client.script(_LIST)

    def health(self):
        """
        Readiness (iii_twisted.health): a Deferred firing None when Redis answers
        PING; failing (the engine's readiness then says why) when it does not.
        """
        return self._client.execute("PING").addCallback(lambda _: None)

    def _keys(self, group):
        key = self._key_prefix + group
        return [key, ORDER_PREFIX + key, SEQ_KEY]

    def _check(self, group, key):
        if self._closed:
            raise KvStoreError("the store is closed")
        if not isinstance(group, str) or not isinstance(key, str):
            raise KvStoreError("group and key must be strings, not {} and {}".format(
                type(group).__name__, type(key).__name__))

    @staticmethod
    def _failed(failure):
        if failure.check(KvStoreError):
            return failure
        from ..redis_client import RedisError
        if failure.check(RedisError):
            raise KvStoreError(failure.getErrorMessage())
        return failure

    # -- IKvStore --------------------------------------------------------------------

    def get(self, group, key):
        try:
            self._check_read(group, key)
        except KvStoreError as e:
            return fail(e)
        d = self._client.execute("HGET", self._key_prefix + group, key)
        return d.addCallback(_decode).addErrback(self._failed)

    def _check_read(self, group, key):
        if not isinstance(group, str) or not isinstance(key, str):
            raise KvStoreError("group and key must be strings")

    def set(self, group, key, value):
        try:
            self._check(group, key)
            text = _encode(value)
        except KvStoreError as e:
            return fail(e)
        d = self._set.call(self._keys(group), [key, text])
        return d.addCallback(lambda old: {"old_value": _decode(old), "new_value": value}) \
            .addErrback(self._failed)

    def delete(self, group, key):
        try:
            self._check(group, key)
        except KvStoreError as e:
            return fail(e)
        d = self._delete.call(self._keys(group)[:2], [key])
        return d.addCallback(lambda old: {"old_value": _decode(old)}).addErrback(self._failed)

    def update(self, group, key, ops):
        try:
            self._check(group, key)
            validate_ops(ops)
        except KvStoreError as e:
            return fail(e)
        lock = self._update_locks.get((group, key))
        if lock is None:
            lock = self._update_locks[(group, key)] = DeferredLock()
        d = lock.run(lambda: Deferred.fromCoroutine(self._update(group, key, ops)))

        def forget(result):
            if not lock.locked and not lock.waiting:
                self._update_locks.pop((group, key), None)
            return result
        return d.addBoth(forget).addErrback(self._failed)

    async def _update(self, group, key, ops):
        keys = self._keys(group)
        for _ in range(MAX_UPDATE_ATTEMPTS):
            text = await self._client.execute("HGET", keys[0], key)
            current = ABSENT if text is None else json.loads(text)
            new, errors = apply_update_ops(current, ops)
            new_text = _encode(new)
            written = await self._cas.call(
                keys, [key, "0" if text is None else "1", text or "", new_text])
            if written == 1:
                return update_result(None if current is ABSENT else current, new, errors)
        raise KvStoreError("update of {!r} gave up after {} conflicting writes".format(
            key, MAX_UPDATE_ATTEMPTS))

    def items(self, group):
        if not isinstance(group, str):
            return fail(KvStoreError("group must be a string"))
        d = self._list.call(self._keys(group)[:2])

        def ordered(reply):
            flat, order = reply
            values = {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}
            result = [(k, json.loads(values.pop(k))) for k in order if k in values]
            result.extend((k, json.loads(values[k])) for k in sorted(values))
            return result
        return d.addCallback(ordered).addErrback(self._failed)

    def list(self, group):
        return self.items(group).addCallback(lambda pairs: [v for _, v in pairs])

    def list_groups(self):
        return Deferred.fromCoroutine(self._scan_groups()).addErrback(self._failed)

    async def _scan_groups(self):
        pattern = _glob_escape(self._key_prefix + self._group_prefix) + "*"
        found = set()
        cursor = "0"
        while True:
            cursor, keys = await self._client.execute(
                "SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
            found.update(k[len(self._key_prefix):] for k in keys)
            if cursor == "0":
                return sorted(found)

    def close(self):
        if self._closed:
            return succeed(None)
        self._closed = True
        if self._release:
            return self._client.release()
        return succeed(None)
