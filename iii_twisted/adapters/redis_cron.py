"""
L{RedisCronLock}: the lock of ``modules::cron::RedisCronAdapter``, so that a cron job
fires once per tick across every engine sharing a Redis.

Deviation from the reference (v0.10 ``cron/adapters/redis_adapter.rs``), which locks
``cron_lock:{trigger id}`` with ``SET NX PX 30000`` and deletes the lock after the run:
the SDKs give every trigger a random id, so worker replicas on two engines took two
different locks and both fired; and deleting after the run let an engine whose clock
runs late fire the same tick again. Here the lock is per *logical job* (function,
expression and condition, L{iii_twisted.modules.cron.job_key}) and per *tick*: one
script claims the tick if it is later than the job's last claimed tick
(``iii:cron_tick:{job}``, kept 24 h). Each engine never overlaps its own runs; a run
longer than the period on one engine does not stop another engine from claiming the
next tick.
"""

from twisted.internet.defer import succeed
from zope.interface import implementer

from ..interfaces import ICronLock

TICK_PREFIX = "iii:cron_tick:"
TICK_TTL_MS = 24 * 3600 * 1000

# KEYS: the job's tick key. ARGV: tick (seconds), TTL ms. Returns 1 for the claimant.
_CLAIM = """
local last = redis.call('GET', KEYS[1])
if last and tonumber(last) >= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""


@implementer(ICronLock)
class RedisCronLock:
    """An L{ICronLock} in Redis, shared by engines: see the module docstring."""

    shared = True

    def __init__(self, client):
        self._client = client
        self._claim = client.script(_CLAIM)

    def acquire(self, job_id, tick):
        """
        @return: Deferred firing with True for the one claimant of (job, tick);
            failing with L{iii_twisted.redis_client.RedisError} when Redis cannot be
            reached (the tick is then skipped by this engine).
        """
        d = self._claim.call([TICK_PREFIX + job_id], [repr(tick), TICK_TTL_MS])
        return d.addCallback(lambda claimed: claimed == 1)

    def release(self, job_id):
        """
        Nothing to forget: other engines may still run the same job, and removing
        its last tick would let one of them fire that tick again.
        """
        return succeed(None)

    def close(self):
        return self._client.release()
