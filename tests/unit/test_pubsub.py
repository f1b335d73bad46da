"""The pub/sub module: `publish` and `subscribe` triggers."""

import pytest
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from iii_twisted.config import ConfigError
from iii_twisted.interfaces import IPubSubAdapter, TriggerError
from iii_twisted.modules.pubsub import LocalAdapter, PubSubModule
from iii_twisted.protocol import InvocationError
from iii_twisted.testing import FakeWorkerConnection, make_engine


def make(config=None):
    engine, clock = make_engine()
    module = PubSubModule(engine, config or {}, clock)
    module.startService()
    return engine, clock, module


def recorder(engine, function_id):
    calls = []
    engine.register_function(function_id, lambda data: calls.append(data))
    return calls


class PubSubTests(SynchronousTestCase):
    def test_publish_reaches_every_subscriber_of_the_topic_only(self):
        """Each subscriber of the topic gets exactly `data`; other topics get nothing."""
        engine, clock, module = make()
        a, b, other = recorder(engine, "a"), recorder(engine, "b"), recorder(engine, "o")
        self.successResultOf(engine.register_trigger("ta", "subscribe", "a", {"topic": "t"}))
        self.successResultOf(engine.register_trigger("tb", "subscribe", "b", {"topic": "t"}))
        self.successResultOf(engine.register_trigger("to", "subscribe", "o", {"topic": "u"}))
        result = self.successResultOf(engine.call(
            "publish", {"topic": "t", "data": {"message": "hi", "n": 1.5}}))
        assert result is None
        assert a == b == [{"message": "hi", "n": 1.5}]
        assert other == []

    def test_unsubscribing_one_keeps_the_others(self):
        """Removing one subscription leaves the topic's other subscriptions alone."""
        engine, clock, module = make()
        a, b = recorder(engine, "a"), recorder(engine, "b")
        self.successResultOf(engine.register_trigger("ta", "subscribe", "a", {"topic": "t"}))
        self.successResultOf(engine.register_trigger("tb", "subscribe", "b", {"topic": "t"}))
        engine.unregister_trigger("ta")
        self.successResultOf(engine.call("publish", {"topic": "t", "data": 1}))
        assert (a, b) == ([], [1])

    def test_worker_subscription_removed_when_it_leaves(self):
        """A worker's subscriptions go with it."""
        engine, clock, module = make()
        conn = FakeWorkerConnection.connect(engine)
        conn.receive({"type": "registerfunction", "id": "w"})
        conn.receive({"type": "registertrigger", "id": "s", "trigger_type": "subscribe",
                      "function_id": "w", "config": {"topic": "t"}})
        self.successResultOf(engine.call("publish", {"topic": "t", "data": {"x": 1}}))
        [call] = conn.sent_of_type("invokefunction")
        assert call["data"] == {"x": 1}
        conn.disconnect()
        assert module.adapter.subscriptions("t") == {}

    def test_failing_subscriber_does_not_stop_the_others(self):
        """Fire and forget: one subscriber's error does not reach the publisher."""
        engine, clock, module = make()

        def broken(data):
            raise InvocationError("boom", "no")

        engine.register_function("bad", broken)
        good = recorder(engine, "good")
        self.successResultOf(engine.register_trigger("t1", "subscribe", "bad", {"topic": "t"}))
        self.successResultOf(engine.register_trigger("t2", "subscribe", "good", {"topic": "t"}))
        assert self.successResultOf(engine.call("publish", {"topic": "t", "data": 2})) is None
        assert good == [2]

    def test_topic_not_set(self):
        engine, clock, module = make()
        f = self.failureResultOf(engine.call("publish", {"data": 1}), InvocationError)
        assert (f.value.code, f.value.message) == ("topic_not_set", "Topic is not set")
        f = self.failureResultOf(engine.call("publish", "x"), InvocationError)
        assert f.value.code == "deserialization_error"

    def test_subscribe_without_topic_is_refused(self):
        """A subscribe trigger with no topic is a registration error, not a silent no-op."""
        engine, clock, module = make()
        self.failureResultOf(engine.register_trigger("s", "subscribe", "f", {}), TriggerError)
        conn = FakeWorkerConnection.connect(engine)
        conn.receive({"type": "registertrigger", "id": "s2", "trigger_type": "subscribe",
                      "function_id": "f"})
        [answer] = conn.sent_of_type("triggerregistrationresult")
        assert "topic" in answer["error"]["message"]

    def test_config_is_strict(self):
        engine, clock = make_engine()
        with pytest.raises(ConfigError) as info:
            PubSubModule(engine, {"adaptor": {}}, clock)
        assert info.value.key == "adaptor"
        with pytest.raises(ConfigError) as info:
            PubSubModule(engine, {"adapter": {"class": "modules::pubsub::Nope"}}, clock)
        assert info.value.key == "adapter.class"

    def test_local_adapter_provides_the_interface(self):
        verifyObject(IPubSubAdapter, LocalAdapter(lambda f, d: None))


def test_redis_adapters_name_an_unknown_key():
    """The pub/sub and cron Redis adapters take redis_url only, and say so by key."""
    import pytest
    from twisted.internet.task import Clock

    from iii_twisted.config import ConfigError
    from iii_twisted.engine import Engine
    from iii_twisted.modules.cron import CronModule
    from iii_twisted.modules.pubsub import PubSubModule

    for module, adapter in ((PubSubModule, "modules::pubsub::RedisAdapter"),
                            (CronModule, "modules::cron::RedisCronAdapter")):
        with pytest.raises(ConfigError) as e:
            module(Engine(Clock()), {"adapter": {"class": adapter, "config": {"colour": 1}}},
                   reactor=Clock())
        assert e.value.key == "adapter.config.colour"
        assert "known keys: redis_url" in str(e.value)
