"""State on Redis: two engines in one process sharing one redis-server."""

import sys

import pytest
import pytest_twisted
from twisted.internet import defer

from iii_twisted.config import ConfigError
from iii_twisted.service import EngineService


@pytest_twisted.ensureDeferred
async def test_two_engines_share_state_and_updates_are_atomic(engines, redis_url):
    a, b = engines.two_on_redis(redis_url, "state")
    await a.engine.call("state::set", {"scope": "s", "key": "k", "value": {"n": 0}})
    assert await b.engine.call("state::get", {"scope": "s", "key": "k"}) == {"n": 0}

    op = {"scope": "s", "key": "k", "ops": [{"type": "increment", "path": "n", "by": 1}]}
    results = await defer.gatherResults(
        [engine.engine.call("state::update", op) for _ in range(200) for engine in (a, b)])
    assert await a.engine.call("state::get", {"scope": "s", "key": "k"}) == {"n": 400}
    # Each update saw a distinct previous value: none was lost or applied twice.
    assert sorted(r["old_value"]["n"] for r in results) == list(range(400))


@pytest_twisted.ensureDeferred
async def test_list_order_exact_json_and_groups(engines, redis_url):
    a, b = engines.two_on_redis(redis_url, "state")
    for key, value in [("c", []), ("a", 12345678901234567), ("b", 3.14159265358979)]:
        await a.engine.call("state::set", {"scope": "s", "key": key, "value": value})
    await b.engine.call("state::set", {"scope": "t", "key": "x", "value": {"e": []}})
    assert await b.engine.call("state::list", {"scope": "s"}) == \
        [[], 12345678901234567, 3.14159265358979]
    assert await a.engine.call("state::list_groups", {}) == {"groups": ["s", "t"]}
    assert await a.engine.call("state::delete", {"scope": "t", "key": "x"}) == {"e": []}
    assert await b.engine.call("state::list_groups", {}) == {"groups": ["s"]}


def test_config_errors(monkeypatch):
    def build(adapter_config, cls="modules::state::adapters::RedisAdapter"):
        return EngineService({"listen": "tcp:0:interface=127.0.0.1", "modules": [
            {"class": "modules::state::StateModule",
             "config": {"adapter": {"class": cls, "config": adapter_config}}}]})

    with pytest.raises(ConfigError) as info:
        build({"redis_url": 6379})
    assert info.value.key == "modules[0].config.adapter.config.redis_url"
    with pytest.raises(ConfigError, match="not a Redis URL"):
        build({"redis_url": "http://localhost"})
    with pytest.raises(ConfigError, match="unknown key 'redis'"):
        build({"redis": "redis://localhost"})
    with pytest.raises(ConfigError, match="RedisAdapter"):
        build({}, cls="modules::state::adapters::Nope")
    # Without txredisapi installed: a start-up error naming the extra.
    monkeypatch.setitem(sys.modules, "txredisapi", None)
    monkeypatch.delitem(sys.modules, "iii_twisted.redis_client", raising=False)
    with pytest.raises(ConfigError) as info:
        build({"redis_url": "redis://localhost"})
    assert "'redis' extra" in str(info.value)
    assert 'pip install "iii-twisted[redis]"' in str(info.value)
    assert info.value.key == "modules[0].config.adapter.class"
