"""
Bad input is expected input: seeded random messages from several workers against an
engine with every module loaded (memory adapters, on a MemoryReactorClock).

Whatever they send, the engine must not raise out of ``handle_message`` (a frame that
does not decode is refused by the decoder, as on the socket), must not log a failure
(a failure is an engine bug, not a bad-input drop), must answer every call it accepted
(an ``invocationresult`` for each ``invokefunction`` with an id that is not ``void``,
once the clock has passed the timeout), and must leave nothing behind when the workers go.
"""

import random

import pytest
from twisted.internet.testing import MemoryReactorClock

from iii_twisted import protocol as P
from iii_twisted.service import EngineService
from iii_twisted.testing import FakeWorkerConnection, logged_failures

CONFIG = {
    "port": 49134,
    "invocation_timeout_ms": 5000,
    "modules": [
        {"class": "modules::api::RestApiModule", "config": {"port": 3111}},
        {"class": "modules::state::StateModule",
         "config": {"adapter": {"class": "modules::state::adapters::KvStore",
                                "config": {"store_method": "in_memory"}}}},
        {"class": "modules::stream::StreamModule", "config": {"port": 3112}},
        {"class": "modules::queue::QueueModule",
         "config": {"queue_configs": {"q": {"max_retries": 2, "backoff_ms": 10},
                                      "f": {"type": "fifo", "message_group_field": "g"}}}},
        {"class": "modules::pubsub::PubSubModule"},
        {"class": "modules::cron::CronModule"},
        {"class": "modules::observability::OtelModule",
         "config": {"exporter": "memory", "logs_console_output": False, "level": "off"}},
        {"class": "modules::http_functions::HttpFunctionsModule"},
    ],
}

TRIGGER_TYPES = ["http", "state", "stream", "queue", "subscribe", "cron", "log",
                 "engine::workers-available", "engine::functions-available", "nope"]


def random_value(rng, depth=0):
    """A JSON value: scalars, strings of odd sizes, nested lists and objects."""
    kind = rng.randrange(10 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 1, 2 ** 63, -(2 ** 70), 7])
    if kind == 3:
        return rng.choice([0.5, -1e308, 1e-300, 3.0])
    if kind == 4:
        return rng.choice(["", "x", "a::b", "* * * * * *", "0 0 * * * * *", "../..",
                           "\u0000\ud7ff", "é" * 50, "s" * 70000, ":id", "/a/:b"])
    if kind == 5:
        return "f{}".format(rng.randrange(8))
    if kind in (6, 7):
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["scope", "key", "value", "ops", "stream_name", "group_id", "item_id", "data",
            "topic", "queue", "api_path", "http_method", "expression", "level", "url",
            "function_id", "payload", "include_internal", "worker_id", "buffer_size",
            "op_type", "path", "type", "message", "offset", "limit", "id", "g"]
    return {rng.choice(keys): random_value(rng, depth + 1) for _ in range(rng.randrange(5))}


PLAUSIBLE = {
    "scope": ["s", "t"], "key": ["k", "j"], "stream_name": ["st"], "group_id": ["g"],
    "item_id": ["i"], "topic": ["news", "q"], "queue": ["q", "f", "nope"],
    "api_path": ["a/:id", "b", "/c/d", ":x"], "http_method": ["GET", "POST", "TRACE"],
    "expression": ["* * * * * *", "0 0 * * * *", "61 * * * * *", "bad"],
    "level": ["all", "info", "shout"], "op_type": ["set", "merge", "increment", "remove"],
    "ops": [[{"type": "set", "path": "a", "value": 1}], [{"type": "increment", "path": "n",
                                                          "by": 2}], [{"type": "zap"}]],
    "function_id": ["f1", "engine::functions::list"], "include_internal": [True, False],
    "limit": [0, 5, -1], "offset": [0, 3], "buffer_size": [1, 0, -5],
}


def plausible_object(rng):
    """An object with the keys module functions and trigger configs read."""
    result = {}
    for key in rng.sample(sorted(PLAUSIBLE), rng.randrange(1, 7)):
        result[key] = (rng.choice(PLAUSIBLE[key]) if rng.random() < 0.8
                       else random_value(rng))
    if rng.random() < 0.5:
        result["value"] = random_value(rng)
        result["data"] = random_value(rng)
    return result


def random_message(rng, function_ids, trigger_ids):
    """A message of a known type with fields that are right, wrong or missing."""
    kind = rng.choice(sorted(P.MESSAGE_TYPES) + ["teleport"]
                      + [P.INVOKE_FUNCTION] * 12 + [P.REGISTER_TRIGGER] * 4
                      + [P.REGISTER_FUNCTION] * 2)
    message = {"type": kind}
    likely = {
        "id": lambda: rng.choice(function_ids + trigger_ids + ["f1", "t1"]),
        "function_id": lambda: rng.choice(function_ids),
        "result": lambda: random_value(rng),
        "trigger_type": lambda: rng.choice(TRIGGER_TYPES),
        "invocation_id": lambda: "i{}".format(rng.randrange(50)),
        "action": lambda: rng.choice([None, {"type": "void"}, {"type": "enqueue"},
                                      {"type": "enqueue", "queue": "q"},
                                      {"type": "enqueue", "queue": "f"},
                                      {"type": "teleport"}]),
        "error": lambda: rng.choice([None, {"code": "x", "message": "y"}, {}]),
        "invocation": lambda: rng.choice([None, {"url": "http://127.0.0.1:1/x"},
                                          {"url": 5}, {}]),
        "data": lambda: plausible_object(rng),
        "config": lambda: plausible_object(rng),
    }
    for field in ("id", "function_id", "trigger_type", "invocation_id", "data", "config",
                  "result", "error", "action", "description", "metadata", "invocation",
                  "previous_worker_id", "reattach_token", "traceparent"):
        roll = rng.random()
        if roll < 0.7 and field in likely:
            message[field] = likely[field]()
        elif roll < 0.75:
            message[field] = random_value(rng)
    return message


@pytest.mark.parametrize("seed", range(4))
def test_random_messages_never_break_the_engine(seed):
    rng = random.Random(seed)
    reactor = MemoryReactorClock()
    service = EngineService(CONFIG, reactor=reactor)
    service.privilegedStartService()
    service.startService()
    engine = service.engine
    with logged_failures() as failures:
        workers = [FakeWorkerConnection.connect(engine) for _ in range(4)]
        asked = {id(w): set() for w in workers}
        for step in range(3000):
            worker = rng.choice(workers)
            function_ids = sorted(engine.functions) + ["f{}".format(i) for i in range(8)]
            trigger_ids = sorted(engine.triggers)
            message = random_message(rng, function_ids, trigger_ids)
            try:
                decoded = P.decode(P.encode(message))
            except P.ProtocolError:
                continue  # the socket drops it before the engine sees it
            if (decoded["type"] == P.INVOKE_FUNCTION and decoded["invocation_id"]
                    and (decoded["action"] or {}).get("type") != "void"):
                asked[id(worker)].add(decoded["invocation_id"])
            engine.handle_message(worker.worker, decoded)
            if step % 50 == 0:
                reactor.advance(rng.random() * 2)
        # Every accepted call is answered, at the latest by the engine-side timeout.
        reactor.advance(10)
        for worker in workers:
            answered = {m["invocation_id"] for m in worker.sent_of_type("invocationresult")}
            assert asked[id(worker)] <= answered
        assert failures == [], [e.get("log_format") for e in failures]
        for worker in workers:
            worker.disconnect()
        reactor.advance(10)
        assert engine.workers == {}
        assert len(engine.tracker) == 0
        assert [t for t in engine.triggers.values() if t.worker is not None] == []
        service.stopService()
        reactor.advance(60)
        assert reactor.getDelayedCalls() == []
