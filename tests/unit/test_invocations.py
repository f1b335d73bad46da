"""The invocation tracker's timeouts: one timer for all pending calls, each call failing
at its own deadline."""

from twisted.internet.task import Clock

from iii_twisted.invocations import InvocationTracker
from iii_twisted.protocol import InvocationError

WORKER = object()


def outcomes(deferreds):
    """@return: per Deferred, None while pending, else the result or the error code."""
    seen = [None] * len(deferreds)
    for i, d in enumerate(deferreds):
        def done(value, i=i):
            seen[i] = value.value.code if hasattr(value, "value") and isinstance(
                value.value, InvocationError) else value
        d.addBoth(done)
    return seen


def test_each_call_times_out_at_its_own_deadline():
    clock = Clock()
    tracker = InvocationTracker(clock, 10)
    first = tracker.add("a", "f", WORKER)
    clock.advance(4)
    second = tracker.add("b", "f", WORKER)
    clock.advance(3)
    third = tracker.add("c", "f", WORKER)
    seen = outcomes([first, second, third])
    assert len(clock.getDelayedCalls()) == 1  # one timer, whatever the number of calls
    clock.advance(2.9)  # t = 9.9
    assert seen == [None, None, None]
    clock.advance(0.1)  # t = 10: the first call's deadline
    assert seen == ["invocation_timeout", None, None]
    assert tracker.resolve("b", WORKER, {"ok": 1}, None)
    clock.advance(6.9)  # t = 16.9: the second one was answered in time
    assert seen == ["invocation_timeout", {"ok": 1}, None]
    clock.advance(0.1)  # t = 17: the third call's deadline
    assert seen == ["invocation_timeout", {"ok": 1}, "invocation_timeout"]
    assert len(tracker) == 0
    assert clock.getDelayedCalls() == []


def test_no_timer_is_left_once_nothing_is_pending():
    clock = Clock()
    tracker = InvocationTracker(clock, 10)
    d = tracker.add("a", "f", WORKER)
    tracker.add("b", "f", WORKER).cancel()
    seen = outcomes([d])
    assert len(clock.getDelayedCalls()) == 1
    assert tracker.resolve("a", WORKER, None, {"code": "boom", "message": "no"})
    assert seen == ["boom"]
    assert clock.getDelayedCalls() == []


def test_late_result_after_timeout_is_refused():
    clock = Clock()
    tracker = InvocationTracker(clock, 1)
    seen = outcomes([tracker.add("a", "f", WORKER)])
    clock.advance(1)
    assert seen == ["invocation_timeout"]
    assert not tracker.resolve("a", WORKER, 1, None)


def test_without_timeout_no_timer():
    clock = Clock()
    tracker = InvocationTracker(clock, 0)
    tracker.add("a", "f", WORKER)
    assert clock.getDelayedCalls() == []
