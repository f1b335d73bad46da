"""
Replicas (issue 12 point 3) with two official iii-sdk 0.10.0 workers hosting one
function id and its HTTP route: calls reach both; one leaves; calls and the route keep
working from the other.
"""

import json

from engine_process import http_request, rest_api, v010_config, wait_until

API_CONFIG = v010_config(rest_api(default_timeout=5000))


def _host_count(client, function_id):
    rows = client.trigger({"function_id": "engine::functions::list",
                           "payload": {}})["functions"]
    counts = [row.get("host_count") for row in rows if row["function_id"] == function_id]
    return counts[0] if counts else 0


def test_two_workers_host_one_function_and_one_leaves(start_engine, sdk_worker):
    engine = start_engine(API_CONFIG, http=True)
    base = "http://127.0.0.1:{}".format(engine.ports["http"])
    workers = {}
    for name in ("replica-a", "replica-b"):
        worker = sdk_worker(engine.url, name)
        worker.register_function(
            {"id": "svc::health"},
            (lambda who: lambda data: {"status_code": 200, "body": {"from": who}})(name))
        worker.register_trigger({"type": "http", "function_id": "svc::health",
                                 "config": {"api_path": "health", "http_method": "GET"}})
        workers[name] = worker
    caller = sdk_worker(engine.url, "replica-caller")
    wait_until(lambda: _host_count(caller, "svc::health") == 2, 10.0, "two hosts")

    # Idle hosts take turns: six calls reach both, three each.
    served = [caller.trigger({"function_id": "svc::health", "payload": {}})["body"]["from"]
              for _ in range(6)]
    assert sorted(served) == ["replica-a"] * 3 + ["replica-b"] * 3
    routed = [json.loads(http_request(base + "/health")[2])["from"] for _ in range(4)]
    assert set(routed) == {"replica-a", "replica-b"}

    # B registered last; it leaves. The id and the route stay, served by A.
    workers["replica-b"].shutdown()
    wait_until(lambda: _host_count(caller, "svc::health") == 1, 10.0, "one host")
    for _ in range(4):
        assert caller.trigger({"function_id": "svc::health",
                               "payload": {}})["body"]["from"] == "replica-a"
        status, _, body = http_request(base + "/health")
        assert status == 200 and json.loads(body) == {"from": "replica-a"}
