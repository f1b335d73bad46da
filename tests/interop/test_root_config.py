"""The root iii-config.yaml is the documented seed config, and twistd -n iii serves it."""

import json
import os
import shutil
import urllib.request

import yaml

from engine_process import EngineProcess

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

# The seed config the product documents (README "Configuration"): workers on 49134, the
# REST API on 3111, state in files under ./data/state, the builtin queue, observability
# in memory. Written out here so the test needs nothing outside the checkout.
SEED = {
    "port": 49134,
    "modules": [
        {"class": "modules::rest_api::RestApiModule", "config": {"port": 3111}},
        {"class": "modules::state::StateModule",
         "config": {"adapter": {"class": "modules::state::adapters::KvStore",
                                "config": {"store_method": "file_based",
                                           "file_path": "./data/state"}}}},
        {"class": "modules::queue::QueueModule",
         "config": {"adapter": {"class": "modules::queue::BuiltinQueueAdapter"}}},
        {"class": "modules::observability::ObservabilityModule",
         "config": {"exporter": "memory"}},
    ],
}


def test_root_config_is_the_seed():
    """iii-config.yaml holds the seed the product documents."""
    with open(os.path.join(ROOT, "iii-config.yaml")) as f:
        assert yaml.safe_load(f) == SEED


def test_twistd_serves_the_root_config(tmp_path, sdk_worker):
    """With the root config, workers connect on 49134, HTTP on 3111 and state works."""
    engine = EngineProcess("", tmp_path)
    shutil.copy(os.path.join(ROOT, "iii-config.yaml"), engine.config_path)
    engine.port = 49134
    engine.url = "ws://127.0.0.1:49134"
    engine.ports = {"http": 3111}
    engine.start()
    try:
        worker = sdk_worker(engine.url, "seed")
        worker.register_function({"id": "seed::hello"}, lambda data: {"status_code": 200,
                                                                      "body": {"hello": True}})
        worker.register_trigger({"type": "http", "function_id": "seed::hello",
                                 "config": {"api_path": "/hello", "http_method": "GET"}})
        set_result = worker.trigger({"function_id": "state::set",
                                     "payload": {"scope": "s", "key": "k", "value": 1}})
        assert set_result["new_value"] == 1
        body = None
        for _ in range(100):  # the route is live within moments of registration
            try:
                with urllib.request.urlopen("http://127.0.0.1:3111/hello", timeout=5) as r:
                    body = json.loads(r.read())
                    break
            except urllib.error.HTTPError as e:
                assert e.code == 404
        assert body == {"hello": True}
        assert os.path.isdir(tmp_path / "data")  # file-based state under ./data
    finally:
        engine.stop()
