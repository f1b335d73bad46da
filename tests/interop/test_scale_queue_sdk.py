"""
The shared queue brokers (Redis, RabbitMQ) with two ``twistd iii`` processes and
iii-sdk 0.10.0 workers: an engine killed with SIGKILL mid-call gives its
unacknowledged messages back, and the other engine processes every one of them.
"""

import threading

import pytest
from iii import TriggerAction

from engine_process import EngineProcess, Waiter

ADAPTERS = {
    "redis": """
        class: modules::queue::RedisAdapter
        config:
          redis_url: "{url}"
          lease_ms: 1000
          poll_interval_ms: 50""",
    "rabbitmq": """
        class: modules::queue::RabbitMQAdapter
        config:
          amqp_url: "{url}"
          poll_interval_ms: 50""",
}

CONFIG = """
port: {{port}}
host: 127.0.0.1
invocation_timeout_ms: 60000
modules:
  - class: modules::queue::QueueModule
    config:
      adapter:{adapter}
      queue_configs:
        orders:
          concurrency: 5
          max_retries: 3
"""


@pytest.fixture(params=["redis", "rabbitmq"])
def broker_config(request):
    """@return: the queue adapter's YAML for a test server of each broker."""
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
    else:
        url = request.getfixturevalue("rabbitmq_server").url
    return ADAPTERS[request.param].format(url=url)


def test_sigkill_of_the_consuming_engine_redelivers_on_the_other(tmp_path, broker_config,
                                                                 sdk_worker):
    engines = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        engines.append(EngineProcess(CONFIG.format(adapter=broker_config), tmp_path / name))
    a, b = engines
    try:
        a.start()
        b.start()
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
    finally:
        for engine in engines:
            engine.stop()
