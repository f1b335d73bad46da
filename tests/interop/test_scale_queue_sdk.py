"""
The shared queue brokers (Redis, RabbitMQ) with two ``twistd iii`` processes and
iii-sdk 0.10.0 workers: an engine killed with SIGKILL mid-call gives its
unacknowledged messages back, and the other engine processes every one of them.
"""

import threading

import pytest
from iii import TriggerAction

from engine_process import LISTEN, Waiter, queue_module, v010_config


@pytest.fixture(params=["redis", "rabbitmq"])
def broker_config(request):
    """@return: the queue adapter for a test server of each broker."""
    if request.param == "redis":
        return {"class": "modules::queue::RedisAdapter",
                "config": {"redis_url": request.getfixturevalue("redis_url"),
                           "lease_ms": 1000, "poll_interval_ms": 50}}
    return {"class": "modules::queue::RabbitMQAdapter",
            "config": {"amqp_url": request.getfixturevalue("rabbitmq_server").url,
                       "poll_interval_ms": 50}}


def test_sigkill_of_the_consuming_engine_redelivers_on_the_other(start_engine, broker_config,
                                                                 sdk_worker):
    config = v010_config(
        queue_module({"orders": {"concurrency": 5, "max_retries": 3}}, adapter=broker_config),
        head=LISTEN + "invocation_timeout_ms: 60000\n")
    a, b = start_engine(config, workdir="a"), start_engine(config, workdir="b")
    release = threading.Event()
    held_on_a = Waiter()

    def hang(data):
        held_on_a.add(data["n"])
        release.wait(60)  # never answered before the engine is killed
        return None
    wa = sdk_worker(a.url, "on-a")
    wa.register_function({"id": "orders::work"}, hang)
    for n in range(10):
        wa.trigger({"function_id": "orders::work", "payload": {"n": n},
                    "action": TriggerAction.Enqueue(queue="orders")})
    held = held_on_a.wait_for(lambda v: len(v) == 5, timeout=20)  # concurrency 5

    done_on_b = Waiter()
    wb = sdk_worker(b.url, "on-b")
    wb.register_function({"id": "orders::work"}, lambda d: done_on_b.add(d["n"]))
    done_on_b.wait_for(lambda v: len(v) >= 5, timeout=20)  # those A did not take
    a.kill()
    values = done_on_b.wait_for(lambda v: len(set(v)) == 10, timeout=20)
    assert set(values) == set(range(10))
    assert set(held) <= set(values)  # every message A held ran again on B
    release.set()
