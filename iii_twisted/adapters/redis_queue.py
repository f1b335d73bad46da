"""
L{RedisQueueBroker}: ``modules::queue::RedisAdapter``, a durable queue of our own in
Redis, shared by every engine that uses the same Redis (an L{IQueueBroker}).

The reference's Redis queue is Redis pub/sub: nothing is stored, messages of named
queues are published and never consumed, and there are no retries or dead letters.
Ours keeps every message until it is settled. Per queue key ``Q`` (``iii:q:{Q}:``...):

- ``jobs`` (hash id -> the job's JSON), ``groups`` (hash id -> FIFO group);
- ``ready`` (list of ids, oldest first), ``delayed`` (sorted set id -> due ms),
  ``inflight`` (sorted set id -> lease deadline ms);
- ``glock`` (hash group -> the id that holds the group), for FIFO queues (messages
  without a group, those of topic queues, are the group ``''``);
- ``dlq`` (sorted set id -> failed_at ms) and ``dead`` (hash id -> error JSON).

Claims, acks, retries and dead-lettering are each one Lua script, so a message is
always in exactly one place. A claim first moves due ``delayed`` messages and
messages whose lease lapsed (their engine died mid-call) back to the head of
``ready``. An engine renews the leases of the messages it holds every third of the
lease. Times come from the Redis server's clock (``TIME``), so engines' clocks do not
matter. A publish wakes consumers at once through ``iii:q:{Q}:wake``; they also poll
every ``poll_interval_ms``. Lua never parses JSON (the module does, in Python).

Durability is Redis's: with ``appendonly yes`` an acknowledged publish survives a
Redis restart; without persistence, a Redis restart loses the queues.
"""

import json

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from ..interfaces import IQueueBroker

PREFIX = "iii:q:"
_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: jobs, ready, groups. ARGV: id, job JSON, group ('' for none), wake channel.
_PUBLISH = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[3], ARGV[1], ARGV[3]) end
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('PUBLISH', ARGV[4], '')
return 1
"""

# KEYS: ready, jobs, delayed, inflight, glock, groups.
# ARGV: lease ms, max messages, '1' for FIFO, how far FIFO looks into ready.
# Returns {id, job JSON, id, job JSON, ...}.
_CLAIM = _NOW + """
local due = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)
for i = #due, 1, -1 do
  redis.call('ZREM', KEYS[3], due[i])
  redis.call('LPUSH', KEYS[1], due[i])
end
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now)
for i = #lapsed, 1, -1 do
  redis.call('ZREM', KEYS[4], lapsed[i])
  redis.call('LPUSH', KEYS[1], lapsed[i])
end
local lease = now + tonumber(ARGV[1])
local max = tonumber(ARGV[2])
local out = {}
if ARGV[3] == '1' then
  local ids = redis.call('LRANGE', KEYS[1], 0, tonumber(ARGV[4]) - 1)
  local taken = {}
  for _, id in ipairs(ids) do
    if #out >= 2 * max then break end
    local job = redis.call('HGET', KEYS[2], id)
    if not job then
      redis.call('LREM', KEYS[1], 1, id)
    else
      local group = redis.call('HGET', KEYS[6], id) or ''
      local holder = redis.call('HGET', KEYS[5], group)
      if not ((holder and holder ~= id) or taken[group]) then
        redis.call('HSET', KEYS[5], group, id)
        taken[group] = true
        redis.call('LREM', KEYS[1], 1, id)
        redis.call('ZADD', KEYS[4], lease, id)
        out[#out + 1] = id
        out[#out + 1] = job
      end
    end
  end
else
  while #out < 2 * max do
    local id = redis.call('LPOP', KEYS[1])
    if not id then break end
    local job = redis.call('HGET', KEYS[2], id)
    if job then
      redis.call('ZADD', KEYS[4], lease, id)
      out[#out + 1] = id
      out[#out + 1] = job
    end
  end
end
return out
"""

# KEYS: inflight, jobs, glock, groups. ARGV: id.
_ACK = """
redis.call('ZREM', KEYS[1], ARGV[1])
local group = redis.call('HGET', KEYS[4], ARGV[1]) or ''
if redis.call('HGET', KEYS[3], group) == ARGV[1] then
  redis.call('HDEL', KEYS[3], group)
end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
return 1
"""

# KEYS: inflight, jobs, delayed. ARGV: id, job JSON, delay ms. The FIFO group stays
# held by this message, so later messages of its group wait for it.
_RETRY = _NOW + """
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[3]), ARGV[1])
return 1
"""

# KEYS: inflight, jobs, dlq, dead, glock, groups. ARGV: id, job JSON, dead JSON, at ms.
_DEAD = """
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[3], tonumber(ARGV[4]), ARGV[1])
redis.call('HSET', KEYS[4], ARGV[1], ARGV[3])
local group = redis.call('HGET', KEYS[6], ARGV[1]) or ''
if redis.call('HGET', KEYS[5], group) == ARGV[1] then
  redis.call('HDEL', KEYS[5], group)
end
return 1
"""

# KEYS: dlq, dead, jobs, ready, wake channel as ARGV[3]. ARGV: id, job JSON.
_REDRIVE = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
redis.call('RPUSH', KEYS[4], ARGV[1])
redis.call('PUBLISH', ARGV[3], '')
return 1
"""

# KEYS: dlq, dead, jobs, groups. ARGV: id.
_DISCARD = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
return 1
"""

# KEYS: inflight. ARGV: lease ms, ids... Renews only leases still held.
_RENEW = _NOW + """
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[i])
end
return 1
"""

# KEYS: ready, delayed, inflight, dlq.
_STATS = """
return {redis.call('LLEN', KEYS[1]), redis.call('ZCARD', KEYS[2]),
        redis.call('ZCARD', KEYS[3]), redis.call('ZCARD', KEYS[4])}
"""


def _keys(queue):
    base = PREFIX + queue + ":"
    return {name: base + name for name in (
        "jobs", "groups", "ready", "delayed", "inflight", "glock", "dlq", "dead", "wake")}


class _Consumer:
    __slots__ = ("queue", "prefetch", "fifo", "held", "claiming", "again", "scheduled")

    def __init__(self, queue, prefetch, fifo):
        self.queue = queue
        self.prefetch = prefetch
        self.fifo = fifo
        self.held = set()  # ids handed out and not settled yet
        self.claiming = False
        self.again = False
        self.scheduled = False  # a kick is due on the next reactor turn


@implementer(IQueueBroker)
class RedisQueueBroker:
    """
    An L{IQueueBroker} in Redis; see the module docstring.

    @param client: the shared L{iii_twisted.redis_client.RedisClient}.
    @param job_from_record: builds a Job from its JSON object.
    @param lease_ms: how long a handed-out message stays this engine's without a
        renewal; a consumer that dies gives its messages back after at most this.
    @param poll_interval_ms: how often idle consumers look for due retries and
        lapsed leases.
    """

    broker_type = "redis"
    fifo_window = 1000  # how many ready messages a FIFO claim looks through
    _log = Logger()

    def __init__(self, client, reactor, job_from_record, lease_ms=30000,
                 poll_interval_ms=100):
        self._client = client
        self._reactor = reactor
        self._job_from_record = job_from_record
        self.lease_ms = lease_ms
        self.poll_interval_ms = poll_interval_ms
        self._consumers = {}
        self._arrived = None
        self._poller = None
        self._renewer = None
        self._stopped = False
        s = client.script
        self._publish, self._claim, self._ack = s(_PUBLISH), s(_CLAIM), s(_ACK)
        self._retry, self._dead, self._redrive = s(_RETRY), s(_DEAD), s(_REDRIVE)
        self._discard, self._renew, self._stats = s(_DISCARD), s(_RENEW), s(_STATS)

    # -- life ------------------------------------------------------------------------

    def health(self):
        """Readiness (iii_twisted.health): fires None when Redis answers PING."""
        return self._client.execute("PING").addCallback(lambda _: None)

    def start(self, arrived):
        self._arrived = arrived
        self._stopped = False
        self._poller = LoopingCall(self._poll)
        self._poller.clock = self._reactor
        self._poller.start(self.poll_interval_ms / 1000.0, now=False)
        self._renewer = LoopingCall(self._renew_leases)
        self._renewer.clock = self._reactor
        self._renewer.start(self.lease_ms / 3000.0, now=False)
        return succeed(None)

    def stop(self):
        self._stopped = True
        for call in (self._poller, self._renewer):
            if call is not None and call.running:
                call.stop()
        for queue in list(self._consumers):
            self.stop_consuming(queue)
        return self._client.release()

    # -- consuming -------------------------------------------------------------------

    def consume(self, queue, prefetch, fifo):
        consumer = self._consumers.get(queue)
        if consumer is None:
            consumer = self._consumers[queue] = _Consumer(queue, prefetch, fifo)
            self._client.subscribe(_keys(queue)["wake"], self._woken).addErrback(
                lambda f: self._log.warn("queue {queue}: wake-ups wait for Redis: {error}",
                                         queue=queue, error=f.getErrorMessage()))
        consumer.prefetch, consumer.fifo = prefetch, fifo
        self._kick(consumer)

    def stop_consuming(self, queue):
        if self._consumers.pop(queue, None) is not None:
            self._client.unsubscribe(_keys(queue)["wake"], self._woken)

    def _woken(self, channel, message):
        queue = channel[len(PREFIX):-len(":wake")]
        consumer = self._consumers.get(queue)
        if consumer is not None:
            self._kick(consumer)

    def _poll(self):
        for consumer in list(self._consumers.values()):
            self._kick(consumer)

    def _kick(self, consumer):
        if self._stopped or self._consumers.get(consumer.queue) is not consumer:
            return
        if consumer.claiming:
            consumer.again = True
            return
        free = consumer.prefetch - len(consumer.held)
        if free <= 0:
            return
        consumer.claiming = True
        consumer.again = False
        k = _keys(consumer.queue)
        d = self._claim.call(
            [k["ready"], k["jobs"], k["delayed"], k["inflight"], k["glock"], k["groups"]],
            [self.lease_ms, free, "1" if consumer.fifo else "0", self.fifo_window])

        def claimed(reply):
            consumer.claiming = False
            for i in range(0, len(reply), 2):
                job = self._job_from_record(json.loads(reply[i + 1]))
                consumer.held.add(job.id)
                try:
                    self._arrived(job)
                except Exception:
                    self._log.failure("queue {queue}: handing out {job_id} failed",
                                      queue=consumer.queue, job_id=job.id)
            if consumer.again or len(reply) // 2 == free:
                self._kick(consumer)

        def failed(failure):
            consumer.claiming = False
            self._log.warn("queue {queue}: claiming failed: {error}", queue=consumer.queue,
                           error=failure.getErrorMessage())
        d.addCallbacks(claimed, failed)

    def _renew_leases(self):
        for consumer in list(self._consumers.values()):
            if consumer.held:
                k = _keys(consumer.queue)
                self._renew.call([k["inflight"]], [self.lease_ms] + sorted(consumer.held)) \
                    .addErrback(lambda f: self._log.warn(
                        "queue: renewing leases failed: {error}", error=f.getErrorMessage()))

    def _settled(self, job):
        consumer = self._consumers.get(job.queue)
        if consumer is not None:
            consumer.held.discard(job.id)
            if not consumer.scheduled:
                # One claim for every message settled in this reactor turn.
                consumer.scheduled = True
                self._reactor.callLater(0, self._scheduled_kick, consumer)

    def _scheduled_kick(self, consumer):
        consumer.scheduled = False
        self._kick(consumer)

    # -- messages --------------------------------------------------------------------

    def publish(self, job):
        k = _keys(job.queue)
        return self._publish.call(
            [k["jobs"], k["ready"], k["groups"]],
            [job.id, _encoder.encode(job.record()), job.group or "", k["wake"]]) \
            .addCallback(lambda _: None)

    def add_fanout(self, topic, queue):
        return self._client.execute("SADD", PREFIX + "fanout:" + topic, queue) \
            .addCallback(lambda _: None)

    async def _publish_fanout(self, topic, job):
        queues = await self._client.execute("SMEMBERS", PREFIX + "fanout:" + topic)
        for queue in sorted(queues):
            job.queue = queue
            await self.publish(job)

    def publish_fanout(self, topic, job):
        return Deferred.fromCoroutine(self._publish_fanout(topic, job))

    def remove_fanout(self, topic, queue):
        """
        Keeps the record: another engine may still subscribe the queue, and a durable
        subscription collects messages while its subscriber is away.
        """
        return succeed(None)

    def ack(self, job):
        k = _keys(job.queue)
        d = self._ack.call([k["inflight"], k["jobs"], k["glock"], k["groups"]], [job.id])
        return d.addBoth(self._after, job)

    def retry(self, job, delay_ms):
        k = _keys(job.queue)
        d = self._retry.call([k["inflight"], k["jobs"], k["delayed"]],
                             [job.id, _encoder.encode(job.record()), int(delay_ms)])
        return d.addBoth(self._after, job)

    requeue = retry  # the module did not count an attempt

    def dead(self, job, error, failed_at):
        k = _keys(job.queue)
        d = self._dead.call(
            [k["inflight"], k["jobs"], k["dlq"], k["dead"], k["glock"], k["groups"]],
            [job.id, _encoder.encode(job.record()),
             _encoder.encode({"error": error, "failed_at": failed_at}), int(failed_at)])
        return d.addBoth(self._after, job)

    def _after(self, result, job):
        # Settled (or not: then the lease lapses and the message comes back).
        self._settled(job)
        return result

    # -- dead letters and stats ------------------------------------------------------

    async def _dlq(self, queue):
        k = _keys(queue)
        ids = await self._client.execute("ZRANGE", k["dlq"], 0, -1)
        if not ids:
            return []
        jobs = await self._client.execute("HMGET", k["jobs"], *ids)
        dead = await self._client.execute("HMGET", k["dead"], *ids)
        entries = []
        for job_text, dead_text in zip(jobs, dead):
            if job_text is None:
                continue
            info = json.loads(dead_text) if dead_text else {}
            entries.append((self._job_from_record(json.loads(job_text)),
                            info.get("error"), info.get("failed_at")))
        return entries

    def dlq_messages(self, queue):
        return Deferred.fromCoroutine(self._dlq(queue))

    async def _redrive_all(self, queue, ids):
        k = _keys(queue)
        moved = []
        for job, _, _ in await self._dlq(queue):
            if ids is not None and job.id not in ids:
                continue
            job.attempts = 0
            done = await self._redrive.call(
                [k["dlq"], k["dead"], k["jobs"], k["ready"]],
                [job.id, _encoder.encode(job.record()), k["wake"]])
            if done == 1:
                moved.append(job.id)
        return moved

    def redrive(self, queue, ids):
        return Deferred.fromCoroutine(self._redrive_all(queue, ids))

    async def _discard_all(self, queue, ids):
        k = _keys(queue)
        if ids is None:
            ids = await self._client.execute("ZRANGE", k["dlq"], 0, -1)
        dropped = []
        for job_id in ids:
            done = await self._discard.call([k["dlq"], k["dead"], k["jobs"], k["groups"]],
                                            [job_id])
            if done == 1:
                dropped.append(job_id)
        return dropped

    def discard(self, queue, ids):
        return Deferred.fromCoroutine(self._discard_all(queue, ids))

    def stats(self, queue):
        k = _keys(queue)
        d = self._stats.call([k["ready"], k["delayed"], k["inflight"], k["dlq"]])
        return d.addCallback(lambda r: {"ready": r[0], "delayed": r[1], "in_flight": r[2],
                                        "dlq": r[3]})

    async def _dlq_queues(self):
        found = {}
        cursor = "0"
        while True:
            cursor, keys = await self._client.execute(
                "SCAN", cursor, "MATCH", PREFIX + "*:dlq", "COUNT", 1000)
            for key in keys:
                found[key[len(PREFIX):-len(":dlq")]] = None
            if cursor == "0":
                break
        queues = sorted(found)
        counts = await gatherResults([self._client.execute("ZCARD", PREFIX + q + ":dlq")
                                      for q in queues]) if queues else []
        return {q: n for q, n in zip(queues, counts) if n}

    def dlq_queues(self):
        return Deferred.fromCoroutine(self._dlq_queues())


    # -- what this process holds: nothing (the messages are on the server) ----------

    def local_queues(self):
        return []

    def local_counts(self, queue):
        return {"ready": 0, "delayed": 0, "dlq": 0}
