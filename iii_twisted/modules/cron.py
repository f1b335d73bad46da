"""
The cron module, ``modules::cron::CronModule`` (../shared/spec/modules.md §8).

A ``cron`` trigger ``{expression, condition_function_id?}`` calls its function at
every time its expression matches (L{iii_twisted.cronexpr}: seconds first, 6 or 7
fields, Sunday = 1, UTC), with::

    {"trigger": "cron", "job_id": <trigger id>,
     "scheduled_time": "<RFC 3339>", "actual_time": "<RFC 3339>"}

Each job waits for its call to finish before it schedules the next tick, so a run that
is still going skips the ticks it overlaps (no catch-up, no overlap). Before a run the
job claims its tick through the adapter's L{ICronLock}, so that engines sharing a lock
store would fire it once; the in-memory lock of L{KvCronAdapter} serves one engine.
Every timer is on the injected clock and is cancelled on C{stopService}.
"""

from datetime import datetime, timezone

from twisted.application.service import Service
from twisted.internet.defer import fail, maybeDeferred, succeed
from twisted.logger import Logger
from zope.interface import implementer

from ..adapters import KV_STORE_SCHEMA, REDIS_SCHEMA
from ..config import ConfigError, get_option
from ..schema import Adapter, Adapters, Key, Section
from ..cronexpr import CronError, CronSchedule
from ..interfaces import ICronLock, IModule, ITriggerProvider, TriggerError

KV_CRON_ADAPTER = "modules::cron::KvCronAdapter"
REDIS_CRON_ADAPTER = "modules::cron::RedisCronAdapter"
ADAPTERS = (KV_CRON_ADAPTER, REDIS_CRON_ADAPTER)
_ADAPTER_KEYS = {"lock_ttl_ms", "lock_index", "store_method", "file_path",
                 "save_interval_ms"}

# Every key of the module's config (iii_twisted/schema.py says how to add one).
CONFIG_SCHEMA = Section(
    adapter=Key(Adapters(
        Adapter("kv", (KV_CRON_ADAPTER,), KV_STORE_SCHEMA.extend(
            lock_ttl_ms=Key(int, 30000, "how long a job's lock is held, ms", min=0),
            lock_index=Key(str, "cron_locks", "name of the lock table"))),
        Adapter("redis", (REDIS_CRON_ADAPTER,), REDIS_SCHEMA),
    ), None, "where job locks are kept (default: kv in memory)"),
)


@implementer(ICronLock)
class MemoryCronLock:
    """Claims ticks in this process: the first claim of a (job, tick) wins."""

    shared = False  # claims are keyed by trigger id

    def __init__(self):
        self._claims = {}  # job id -> latest claimed tick

    def acquire(self, job_id, tick):
        last = self._claims.get(job_id)
        if last is not None and last >= tick:
            return succeed(False)
        self._claims[job_id] = tick
        return succeed(True)

    def release(self, job_id):
        self._claims.pop(job_id, None)
        return succeed(None)


class KvCronAdapter:
    """
    The default adapter: its lock (an L{ICronLock}) is in memory.

    Config keys (all optional): ``lock_ttl_ms`` (30000), ``lock_index``
    (``cron_locks``), and the KV store keys ``store_method``, ``file_path``,
    ``save_interval_ms``, accepted for compatibility; locks are process-local, as in
    the reference.
    """

    _log = Logger()

    def __init__(self, config):
        """@raise ConfigError: for a key of the wrong type."""
        prefix = "adapter.config."
        for key in set(config) - _ADAPTER_KEYS:
            self._log.warn("cron adapter: unknown config key {key} ignored", key=prefix + key)
        self.lock_ttl_ms = get_option(config, "lock_ttl_ms", int, 30000, prefix)
        self.lock_index = get_option(config, "lock_index", str, "cron_locks", prefix)
        get_option(config, "store_method", str, "in_memory", prefix)
        get_option(config, "file_path", str, None, prefix)
        get_option(config, "save_interval_ms", int, 5000, prefix)
        self.lock = MemoryCronLock()


class RedisCronAdapter:
    """
    ``modules::cron::RedisCronAdapter``: its lock (L{iii_twisted.adapters.redis_cron.
    RedisCronLock}) is in Redis, so a job fires once per tick across engines.

    Config: ``redis_url`` (default ``redis://localhost:6379``); other keys refused.
    """

    def __init__(self, config, reactor):
        """@raise ConfigError: naming the key, or the missing ``redis`` extra."""
        from ..extras import redis_adapter_client, require_extra

        client = redis_adapter_client(config, REDIS_CRON_ADAPTER, reactor)
        redis_cron = require_extra("iii_twisted.adapters.redis_cron", REDIS_CRON_ADAPTER)
        self.lock = redis_cron.RedisCronLock(client)


def job_key(trigger):
    """
    @return: the identity of a cron job across engines: a digest of its function,
        expression and condition (not its trigger id, which SDKs make random), so
        that replicas of one worker on several engines share one lock.
    """
    from hashlib import sha1

    config = trigger.config if isinstance(trigger.config, dict) else {}
    text = "\x00".join([trigger.function_id, str(config.get("expression")),
                        str(config.get("condition_function_id") or "")])
    return sha1(text.encode("utf-8")).hexdigest()


def _rfc3339(seconds):
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat()


class _CronJob:
    """One trigger's schedule loop."""

    _log = Logger()

    def __init__(self, module, trigger, schedule):
        self.module = module
        self.trigger = trigger
        self.schedule = schedule
        # The lock's name for this job: the trigger id, or the logical job when the
        # lock is shared between engines.
        self.lock_id = job_key(trigger) if getattr(module.lock, "shared", False) \
            else trigger.id
        self.call = None  # the IDelayedCall of the next tick
        self.running = False  # a run is in progress
        self.stopped = True

    def start(self):
        self.stopped = False
        if not self.running:
            self._schedule(self.module.clock.seconds())

    def stop(self):
        self.stopped = True
        if self.call is not None:
            self.call.cancel()
            self.call = None

    def _schedule(self, after):
        if self.stopped:
            return
        tick = self.schedule.next_after(after)
        if tick is None:
            self._log.warn("cron job {job_id}: {expression!r} has no more times to fire",
                           job_id=self.trigger.id, expression=self.schedule.expression)
            return
        clock = self.module.clock
        self.call = clock.callLater(max(0.0, tick - clock.seconds()), self._fire, tick)

    def _fire(self, tick):
        self.call = None
        self.running = True
        module = self.module
        job_id = self.trigger.id
        d = maybeDeferred(module.lock.acquire, self.lock_id, tick)
        d.addCallback(self._run, tick)
        d.addErrback(lambda f: self._log.warn(
            "cron job {job_id} (function {function_id}) failed: {error}", job_id=job_id,
            function_id=self.trigger.function_id, error=f.getErrorMessage()))
        d.addBoth(self._done, tick)

    def _run(self, acquired, tick):
        if not acquired:
            self._log.debug("cron job {job_id}: tick {tick} taken by another engine",
                            job_id=self.trigger.id, tick=tick)
            return None
        engine = self.module.engine
        payload = {
            "trigger": "cron",
            "job_id": self.trigger.id,
            "scheduled_time": _rfc3339(tick),
            "actual_time": _rfc3339(self.module.clock.seconds()),
        }
        d = engine.check_condition(self.trigger, payload)

        def proceed(ok):
            if ok:
                return engine.call(self.trigger.function_id, payload,
                                   metadata=self.trigger.metadata)
        return d.addCallback(proceed)

    def _done(self, _, tick):
        self.running = False
        try:
            self._schedule(max(self.module.clock.seconds(), tick))
        except Exception:
            self._log.failure("cron job {job_id}: scheduling failed", job_id=self.trigger.id)


@implementer(IModule, ITriggerProvider)
class CronModule(Service):
    """
    The ``cron`` trigger type.

    @ivar jobs: trigger id -> L{_CronJob}.
    """

    iii_class = None
    config_schema = CONFIG_SCHEMA
    _log = Logger()

    def __init__(self, engine, config, reactor, lock=None):
        """
        @param lock: an L{ICronLock} to use instead of the adapter's (tests, or engines
            sharing a store).
        @raise ConfigError: for an unknown key (the reference rejects them), an unknown
            adapter or a malformed adapter config.
        """
        self.engine = engine
        self.clock = reactor
        for key in config:
            if key != "adapter":
                raise ConfigError("unknown field `{}`, expected `adapter`".format(key), key)
        spec = get_option(config, "adapter", dict, {})
        cls = get_option(spec, "class", str, KV_CRON_ADAPTER, "adapter.")
        if cls not in ADAPTERS:
            raise ConfigError("Adapter factory '{}' not found. Available: [{}]".format(
                cls, ", ".join(ADAPTERS)), "adapter.class")
        adapter_config = get_option(spec, "config", dict, {}, "adapter.")
        if cls == REDIS_CRON_ADAPTER:
            self.adapter = RedisCronAdapter(adapter_config, reactor)
        else:
            self.adapter = KvCronAdapter(adapter_config)
        self.lock = lock if lock is not None else self.adapter.lock
        self.jobs = {}
        engine.register_trigger_type(
            "cron", self, "Call a function on a schedule (cron expression, seconds first, UTC)")

    def startService(self):
        Service.startService(self)
        for job in self.jobs.values():
            job.start()

    def stopService(self):
        """Cancel every job's timer (and release a shared lock's connection)."""
        Service.stopService(self)
        for job in self.jobs.values():
            job.stop()
        close = getattr(self.adapter.lock, "close", None)
        if close is not None:
            return close()

    def register_trigger(self, trigger):
        """
        @return: Deferred firing with None once the job is scheduled, or failing with
            L{TriggerError}: no expression, an invalid one, or a job id already
            registered.
        """
        config = trigger.config
        expression = config.get("expression") if isinstance(config, dict) else None
        if expression is None or expression == "":
            return fail(TriggerError("Cron expression is required"))
        try:
            schedule = CronSchedule(expression)
        except CronError as e:
            return fail(TriggerError("Invalid cron expression '{}': {}".format(expression, e)))
        if schedule.next_after(self.clock.seconds()) is None:
            return fail(TriggerError(
                "Invalid cron expression '{}': it never matches a future time".format(
                    expression)))
        if trigger.id in self.jobs:
            return fail(TriggerError("Cron job {} already registered".format(trigger.id)))
        job = self.jobs[trigger.id] = _CronJob(self, trigger, schedule)
        if self.running:
            job.start()
        return succeed(None)

    def unregister_trigger(self, trigger):
        """Stop the job and release its lock. @return: Deferred firing with None."""
        job = self.jobs.pop(trigger.id, None)
        if job is None:
            return succeed(None)
        job.stop()
        return maybeDeferred(self.lock.release, job.lock_id)
