"""Cron expressions (iii format) and the cron module, on a task.Clock."""

import calendar

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from iii_twisted.config import ConfigError
from iii_twisted.cronexpr import CronError, CronSchedule
from iii_twisted.interfaces import ICronLock, TriggerError
from iii_twisted.modules.cron import CronModule, MemoryCronLock
from iii_twisted.protocol import InvocationError
from iii_twisted.testing import FakeWorkerConnection, make_engine


def ts(*args):
    return calendar.timegm(args + (0,) * (6 - len(args)))


# Thursday 26 November 2026, 17:30:15 UTC
NOW = ts(2026, 11, 26, 17, 30, 15)


@pytest.mark.parametrize("expression, expected", [
    ("* * * * * *", ts(2026, 11, 26, 17, 30, 16)),
    ("0 * * * * *", ts(2026, 11, 26, 17, 31)),
    ("*/10 * * * * *", ts(2026, 11, 26, 17, 30, 20)),
    ("15/20 * * * * *", ts(2026, 11, 26, 17, 30, 35)),
    ("0 0-10/5 18 * * *", ts(2026, 11, 26, 18, 0)),
    ("0 0 9 * * MON-FRI", ts(2026, 11, 27, 9)),
    ("0 0 9 * * 1", ts(2026, 11, 29, 9)),  # 1 = Sunday
    ("0 0 9 * * 7", ts(2026, 11, 28, 9)),  # 7 = Saturday
    ("0 0 9 * * sunday", ts(2026, 11, 29, 9)),
    ("0 0 0 1 jan ?", ts(2027, 1, 1)),
    ("0 0 0 1 1 * 2030", ts(2030, 1, 1)),
    ("0 0 0 13 * FRI", ts(2027, 8, 13)),  # day of month AND day of week
    ("0 0 0 29 2 *", ts(2028, 2, 29)),
    ("0 30,45 17 * * *", ts(2026, 11, 26, 17, 45)),
    ("  1 2 3 4 5 *  ", ts(2027, 5, 4, 3, 2, 1)),
    ("@hourly", ts(2026, 11, 26, 18)),
    ("@daily", ts(2026, 11, 27)),
    ("@weekly", ts(2026, 11, 29)),
    ("@monthly", ts(2026, 12, 1)),
    ("@yearly", ts(2027, 1, 1)),
])
def test_next_fire_time(expression, expected):
    assert CronSchedule(expression).next_after(NOW) == expected


def test_next_is_strictly_after():
    """A time that matches exactly is not its own next time; fractions round down."""
    s = CronSchedule("0 * * * * *")
    assert s.next_after(ts(2026, 1, 1, 0, 1)) == ts(2026, 1, 1, 0, 2)
    assert s.next_after(ts(2026, 1, 1, 0, 1) + 0.5) == ts(2026, 1, 1, 0, 2)


def test_never():
    assert CronSchedule("0 0 0 30 2 *").next_after(NOW) is None
    assert CronSchedule("0 0 0 1 1 * 2020").next_after(NOW) is None


@pytest.mark.parametrize("expression, message", [
    ("* * * * *", "expected 6 or 7 fields"),
    ("* * * * * * * *", "expected 6 or 7 fields"),
    ("0 0 0 * * 0", "0 is out of range for days of week (1-7)"),
    ("60 * * * * *", "out of range for seconds"),
    ("0 0 24 * * *", "out of range for hours"),
    ("0 0 0 0 * *", "out of range for days of month"),
    ("0 0 0 * 13 *", "out of range for months"),
    ("0 0 0 * * * 1969", "out of range for years"),
    ("x * * * * *", "'x' is not a number in the seconds field"),
    ("0 0 0 * foo *", "is not a number or a name in the months field"),
    ("*/0 * * * * *", "must be a positive number"),
    ("5-1 * * * * *", "goes backwards"),
    ("? * * * * *", "'?' is only allowed"),
    ("1,,2 * * * * *", "empty list item"),
    ("0 0 0 L * *", "is not a number"),
    ("@often", "expected 6 or 7 fields"),
])
def test_invalid_expressions(expression, message):
    with pytest.raises(CronError) as info:
        CronSchedule(expression)
    assert message in str(info.value)


def make(config=None, lock=None, start=True):
    engine, clock = make_engine(invocation_timeout=0)
    clock.advance(NOW)
    module = CronModule(engine, config or {}, clock, lock=lock)
    if start:
        module.startService()
    return engine, clock, module


class CronModuleTests(SynchronousTestCase):
    def test_fires_every_tick_with_the_payload(self):
        """A seconds-first expression fires on the clock with the spec's payload."""
        engine, clock, module = make()
        calls = []
        engine.register_function("job", calls.append)
        self.successResultOf(engine.register_trigger(
            "every-2s", "cron", "job", {"expression": "*/2 * * * * *"}))
        clock.advance(0.5)
        assert calls == []
        clock.advance(0.5)  # 17:30:16
        assert calls == [{
            "trigger": "cron", "job_id": "every-2s",
            "scheduled_time": "2026-11-26T17:30:16+00:00",
            "actual_time": "2026-11-26T17:30:16+00:00",
        }]
        clock.advance(2)
        clock.advance(2)
        assert [c["scheduled_time"] for c in calls] == [
            "2026-11-26T17:30:16+00:00", "2026-11-26T17:30:18+00:00",
            "2026-11-26T17:30:20+00:00"]
        module.stopService()
        assert clock.getDelayedCalls() == []

    def test_a_long_run_skips_the_ticks_it_overlaps(self):
        """While a run is going, its ticks pass without firing; then it resumes."""
        engine, clock, module = make()
        runs = []

        def slow(data):
            d = Deferred()
            runs.append((data["scheduled_time"], d))
            return d

        engine.register_function("slow", slow)
        self.successResultOf(engine.register_trigger(
            "s", "cron", "slow", {"expression": "* * * * * *"}))
        clock.advance(1)  # fires for :16
        assert len(runs) == 1
        assert clock.getDelayedCalls() == []  # nothing scheduled while it runs
        clock.advance(3.5)  # :17 :18 :19 pass
        assert len(runs) == 1
        runs[0][1].callback(None)  # ends at :19.5
        clock.advance(0.5)
        assert [r[0][-14:-6] for r in runs] == ["17:30:16", "17:30:20"]
        runs[1][1].callback(None)
        module.stopService()
        assert clock.getDelayedCalls() == []

    def test_handler_failure_does_not_stop_the_job(self):
        engine, clock, module = make()
        count = []

        def broken(data):
            count.append(1)
            raise InvocationError("boom", "no")

        engine.register_function("b", broken)
        self.successResultOf(engine.register_trigger("b", "cron", "b",
                                                     {"expression": "* * * * * *"}))
        clock.advance(1)
        clock.advance(1)
        assert len(count) == 2
        module.stopService()

    def test_condition_false_skips_the_call(self):
        engine, clock, module = make()
        calls = []
        engine.register_function("job", calls.append)
        engine.register_function("cond", lambda data: data["scheduled_time"].endswith("18+00:00"))
        self.successResultOf(engine.register_trigger(
            "c", "cron", "job", {"expression": "* * * * * *", "condition_function_id": "cond"}))
        for _ in range(4):
            clock.advance(1)
        assert [c["scheduled_time"] for c in calls] == ["2026-11-26T17:30:18+00:00"]
        module.stopService()

    def test_lock_lets_one_engine_fire_a_tick(self):
        """Two schedulers sharing a lock: each tick runs once."""
        lock = MemoryCronLock()
        engine1, clock, module1 = make(lock=lock)
        module2 = CronModule(engine1, {}, clock, lock=lock)
        module2.startService()
        calls = []
        engine1.register_function("job", calls.append)
        from iii_twisted.engine import Trigger
        trigger = Trigger("shared", "cron", "job", {"expression": "* * * * * *"})
        self.successResultOf(module1.register_trigger(trigger))
        self.successResultOf(module2.register_trigger(trigger))
        clock.advance(1)
        clock.advance(1)
        assert len(calls) == 2
        module1.stopService()
        module2.stopService()
        assert clock.getDelayedCalls() == []

    def test_unregister_stops_and_releases(self):
        released = []

        @implementer(ICronLock)
        class Lock(MemoryCronLock):
            def release(self, job_id):
                released.append(job_id)
                return succeed(None)

        engine, clock, module = make(lock=Lock())
        calls = []
        engine.register_function("job", calls.append)
        self.successResultOf(engine.register_trigger("j", "cron", "job",
                                                     {"expression": "* * * * * *"}))
        engine.unregister_trigger("j")
        clock.advance(5)
        assert calls == [] and released == ["j"]
        assert clock.getDelayedCalls() == []

    def test_triggers_registered_before_start_begin_on_start(self):
        engine, clock, module = make(start=False)
        calls = []
        engine.register_function("job", calls.append)
        self.successResultOf(engine.register_trigger("j", "cron", "job",
                                                     {"expression": "* * * * * *"}))
        clock.advance(3)
        assert calls == []
        module.startService()
        clock.advance(1)
        assert len(calls) == 1
        module.stopService()
        assert clock.getDelayedCalls() == []

    def test_bad_expressions_are_refused_with_reasons(self):
        """No expression, an invalid one, one that never fires: TriggerError, worker told."""
        engine, clock, module = make()
        f = self.failureResultOf(engine.register_trigger("a", "cron", "f", {}), TriggerError)
        assert f.value.message == "Cron expression is required"
        f = self.failureResultOf(engine.register_trigger(
            "b", "cron", "f", {"expression": "* * * * *"}), TriggerError)
        assert f.value.message.startswith("Invalid cron expression '* * * * *': expected 6 or 7")
        f = self.failureResultOf(engine.register_trigger(
            "c", "cron", "f", {"expression": "0 0 0 30 2 *"}), TriggerError)
        assert "never" in f.value.message
        conn = FakeWorkerConnection.connect(engine)
        conn.receive({"type": "registertrigger", "id": "w", "trigger_type": "cron",
                      "function_id": "f", "config": {"expression": "0 0 0 * * 0"}})
        [answer] = conn.sent_of_type("triggerregistrationresult")
        assert "days of week" in answer["error"]["message"]
        assert "w" not in engine.triggers
        assert clock.getDelayedCalls() == []

    def test_config_is_strict(self):
        engine, clock = make_engine()
        with pytest.raises(ConfigError) as info:
            CronModule(engine, {"interval": 1}, clock)
        assert info.value.key == "interval"
        with pytest.raises(ConfigError) as info:
            CronModule(engine, {"adapter": {"class": "modules::cron::Nope"}}, clock)
        assert info.value.key == "adapter.class"
        with pytest.raises(ConfigError) as info:
            CronModule(engine, {"adapter": {"config": {"lock_ttl_ms": "x"}}}, clock)
        assert info.value.key == "adapter.config.lock_ttl_ms"

    def test_memory_lock_interface(self):
        lock = MemoryCronLock()
        verifyObject(ICronLock, lock)
        assert self.successResultOf(lock.acquire("j", 10)) is True
        assert self.successResultOf(lock.acquire("j", 10)) is False
        assert self.successResultOf(lock.acquire("j", 11)) is True


def test_random_expressions_parse_or_refuse_and_next_is_later():
    """Seeded random expressions: CronError or a schedule whose next tick is later."""
    import random

    rng = random.Random(3)
    good = [["*", "0", "30", "*/15", "1-5", "0,30", "59"], ["*", "0", "59", "*/5", "10-20"],
            ["*", "0", "23", "*/6", "9-17"], ["*", "1", "31", "30", "29", "?", "*/10"],
            ["*", "1", "2", "12", "JAN", "feb", "*/3", "2-3"],
            ["*", "0", "7", "MON-FRI", "sun", "?", "6"],
            ["*", "2026", "2030", "1970-2099", "2024/4", "1999"]]
    bad = ["60", "-1", "5-1", "*/0", "x", "", "1-", "99999999999999999999", "L", "1#2"]
    accepted = 0
    for _ in range(3000):
        fields = [rng.choice(good[i]) if rng.random() < 0.93 else rng.choice(bad)
                  for i in range(rng.choice([5, 6, 6, 7]))]
        try:
            schedule = CronSchedule(" ".join(fields))
        except CronError:
            continue
        accepted += 1
        start = rng.random() * 4e9
        tick = schedule.next_after(start)
        assert tick is None or tick > start
    assert accepted > 500
