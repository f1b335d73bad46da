"""The state module: functions, result shapes, the ``state`` trigger and its config."""

from twisted.trial.unittest import SynchronousTestCase

from iii_twisted.config import ConfigError
from iii_twisted.modules import build_module
from iii_twisted.protocol import InvocationError
from iii_twisted.testing import FakeWorkerConnection, make_engine


def make_state(config=None):
    engine, clock = make_engine()
    module = build_module("modules::state::StateModule", engine, config or {}, clock)
    return engine, clock, module


class Handler:
    """A fake worker hosting trigger handlers; it answers only when told to."""

    def __init__(self, engine, *function_ids):
        self.conn = FakeWorkerConnection.connect(engine)
        for function_id in function_ids:
            self.conn.receive({"type": "registerfunction", "id": function_id})

    def trigger(self, trigger_id, function_id, config, trigger_type="state"):
        self.conn.receive({"type": "registertrigger", "id": trigger_id,
                           "trigger_type": trigger_type, "function_id": function_id,
                           "config": config})

    def calls(self):
        return self.conn.sent_of_type("invokefunction")

    def answer(self, call, result=None):
        message = {"type": "invocationresult", "invocation_id": call["invocation_id"],
                   "function_id": call["function_id"]}
        if result is not None:
            message["result"] = result
        self.conn.receive(message)

    def answer_all(self, clock, result=None):
        """Answer every call (and those they lead to) until none is waiting."""
        answered = set()
        while True:
            clock.advance(0)
            waiting = [c for c in self.calls() if c["invocation_id"] not in answered]
            if not waiting:
                return
            for call in waiting:
                answered.add(call["invocation_id"])
                self.answer(call, result)


class StateFunctionTests(SynchronousTestCase):
    def setUp(self):
        self.engine, self.clock, self.module = make_state()

    def call(self, function_id, data):
        return self.successResultOf(self.engine.call(function_id, data))

    def error(self, function_id, data):
        return self.failureResultOf(self.engine.call(function_id, data), InvocationError).value

    def test_set_result_shape(self):
        self.assertEqual(self.call("state::set", {"scope": "s", "key": "k", "value": {"a": 1}}),
                         {"old_value": None, "new_value": {"a": 1}})
        self.assertEqual(self.call("state::set", {"scope": "s", "key": "k", "value": 2}),
                         {"old_value": {"a": 1}, "new_value": 2})

    def test_set_accepts_data_alias_and_ignores_extra_keys(self):
        self.call("state::set", {"scope": "s", "key": "k", "data": [1],
                                 "_caller_worker_id": "w"})
        self.assertEqual(self.call("state::get", {"scope": "s", "key": "k"}), [1])

    def test_get_missing_is_none(self):
        self.assertIsNone(self.call("state::get", {"scope": "nope", "key": "k"}))

    def test_delete_returns_previous_value_unwrapped(self):
        self.call("state::set", {"scope": "s", "key": "k", "value": {"v": 1}})
        self.assertEqual(self.call("state::delete", {"scope": "s", "key": "k"}), {"v": 1})
        self.assertIsNone(self.call("state::delete", {"scope": "s", "key": "k"}))
        self.assertIsNone(self.call("state::get", {"scope": "s", "key": "k"}))

    def test_update(self):
        result = self.call("state::update", {"scope": "s", "key": "c", "ops": [
            {"type": "increment", "path": "n", "by": 2}]})
        self.assertEqual(result, {"old_value": None, "new_value": {"n": 2}})
        result = self.call("state::update", {"scope": "s", "key": "c", "ops": [
            {"type": "decrement", "path": "n", "by": 5}, {"type": "set", "path": "x", "value": 1}]})
        self.assertEqual(result, {"old_value": {"n": 2}, "new_value": {"n": -3, "x": 1}})

    def test_malformed_op_names_it(self):
        error = self.error("state::update", {"scope": "s", "key": "k", "ops": [
            {"type": "set", "path": "a", "value": 1}, {"type": "multiply", "path": "a"}]})
        self.assertEqual(error.code, "deserialization_error")
        self.assertIn("state::update", error.message)
        self.assertIn("ops[1]", error.message)
        self.assertIn("'multiply'", error.message)
        self.assertIsNone(self.call("state::get", {"scope": "s", "key": "k"}))
        error = self.error("state::update", {"scope": "s", "key": "k", "ops": [
            {"type": "increment", "path": "a", "by": 0.5}]})
        self.assertIn("integer 'by'", error.message)

    def test_value_json_cannot_carry_is_a_set_error(self):
        """NaN and infinities are not JSON: the store refuses them, the caller is told."""
        for value in (float("nan"), {"a": float("inf")}):
            e = self.error("state::set", {"scope": "s", "key": "k", "value": value})
            self.assertEqual(e.code, "SET_ERROR")
            self.assertTrue(e.message.startswith("Failed to set value: value is not JSON"),
                            e.message)
        self.assertIsNone(self.call("state::get", {"scope": "s", "key": "k"}))

    def test_store_failures_are_the_functions_error_codes(self):
        """A store that fails: each function answers its own code, naming the failure."""
        from twisted.internet.defer import fail

        from iii_twisted.interfaces import KvStoreError
        from iii_twisted.modules.state import StateModule

        class BrokenStore:
            def __getattr__(self, name):
                return lambda *args: fail(KvStoreError("disk on fire"))

        engine, clock = make_engine()
        StateModule(engine, {}, clock, store=BrokenStore())
        for function_id, data, code in [
                ("state::set", {"scope": "s", "key": "k", "value": 1}, "SET_ERROR"),
                ("state::get", {"scope": "s", "key": "k"}, "GET_ERROR"),
                ("state::delete", {"scope": "s", "key": "k"}, "DELETE_ERROR"),
                ("state::update", {"scope": "s", "key": "k", "ops": []}, "UPDATE_ERROR"),
                ("state::list", {"scope": "s"}, "LIST_ERROR"),
                ("state::list_groups", {}, "LIST_GROUPS_ERROR")]:
            e = self.failureResultOf(engine.call(function_id, data), InvocationError).value
            self.assertEqual((e.code, e.message.endswith(": disk on fire")), (code, True),
                             (function_id, e.code, e.message))

    def test_list_and_list_groups(self):
        self.assertEqual(self.call("state::list", {"scope": "empty"}), [])
        self.assertEqual(self.call("state::list_groups", {}), {"groups": []})
        for scope, key in [("b", "1"), ("a", "1"), ("b", "2")]:
            self.call("state::set", {"scope": scope, "key": key, "value": scope + key})
        self.assertEqual(self.call("state::list", {"scope": "b"}), ["b1", "b2"])
        self.assertEqual(self.call("state::list_groups", {}), {"groups": ["a", "b"]})

    def test_bad_input_is_a_clear_error(self):
        for function_id, data, text in [
            ("state::set", {"key": "k", "value": 1}, "missing field `scope`"),
            ("state::set", {"scope": "s", "key": "k"}, "missing field `value`"),
            ("state::get", {"scope": 3, "key": "k"}, "`scope` must be a string"),
            ("state::list", None, "expected an object"),
        ]:
            error = self.error(function_id, data)
            self.assertEqual(error.code, "deserialization_error")
            self.assertIn(text, error.message)
            self.assertIn(function_id, error.message)

    def test_worker_sees_reference_shapes(self):
        conn = FakeWorkerConnection.connect(self.engine)
        conn.receive({"type": "invokefunction", "invocation_id": "1",
                      "function_id": "state::get", "data": {"scope": "s", "key": "x"}})
        conn.receive({"type": "invokefunction", "invocation_id": "2",
                      "function_id": "state::set",
                      "data": {"scope": "s", "key": "x", "value": None}})
        results = conn.sent_of_type("invocationresult")
        self.assertNotIn("result", results[0])  # no value: no result key
        self.assertEqual(results[1]["result"], {"old_value": None, "new_value": None})


class StateTriggerTests(SynchronousTestCase):
    def setUp(self):
        self.engine, self.clock, self.module = make_state()
        self.handler = Handler(self.engine, "on.change", "cond")

    def set(self, scope, key, value):
        return self.successResultOf(self.engine.call(
            "state::set", {"scope": scope, "key": key, "value": value}))

    def test_fires_after_the_result_with_event_payloads(self):
        self.handler.trigger("t", "on.change", {"scope": "s"})
        d = self.engine.call("state::set", {"scope": "s", "key": "k", "value": 1})
        self.successResultOf(d)
        self.assertEqual(self.handler.calls(), [])  # never inline with the write
        self.handler.answer_all(self.clock)
        self.set("s", "k", 2)
        self.successResultOf(self.engine.call("state::update", {
            "scope": "s", "key": "k", "ops": [{"type": "set", "path": "", "value": {"x": 1}}]}))
        self.successResultOf(self.engine.call("state::delete", {"scope": "s", "key": "k"}))
        self.successResultOf(self.engine.call("state::delete", {"scope": "s", "key": "never"}))
        self.handler.answer_all(self.clock)
        events = [c["data"] for c in self.handler.calls()]
        self.assertEqual(events, [
            {"type": "state", "event_type": "state:created", "scope": "s", "key": "k",
             "old_value": None, "new_value": 1},
            {"type": "state", "event_type": "state:updated", "scope": "s", "key": "k",
             "old_value": 1, "new_value": 2},
            {"type": "state", "event_type": "state:updated", "scope": "s", "key": "k",
             "old_value": 2, "new_value": {"x": 1}},
            {"type": "state", "event_type": "state:deleted", "scope": "s", "key": "k",
             "old_value": {"x": 1}, "new_value": None},
            {"type": "state", "event_type": "state:deleted", "scope": "s", "key": "never",
             "old_value": None, "new_value": None},
        ])

    def test_filters(self):
        self.handler.trigger("any", "on.change", {})
        self.handler.trigger("scope", "on.change", {"scope": "s"})
        self.handler.trigger("key", "on.change", {"scope": "s", "key": "k"})
        self.handler.trigger("other", "on.change", {"scope": "t", "key": "k"})
        self.set("s", "k", 1)
        self.handler.answer_all(self.clock)
        self.assertEqual(len(self.handler.calls()), 3)
        self.set("s", "j", 1)
        self.handler.answer_all(self.clock)
        self.assertEqual(len(self.handler.calls()), 5)

    def test_one_call_at_a_time_in_order(self):
        self.handler.trigger("a", "on.change", {"scope": "s"})
        self.handler.trigger("b", "on.change", {"scope": "s"})
        self.set("s", "1", 1)
        self.set("s", "2", 2)
        self.clock.advance(0)
        self.assertEqual(len(self.handler.calls()), 1)
        for expected_key in ["1", "2", "2"]:
            self.handler.answer(self.handler.calls()[-1])
            self.assertEqual(self.handler.calls()[-1]["data"]["key"], expected_key)
        self.handler.answer(self.handler.calls()[-1])
        self.assertEqual(len(self.handler.calls()), 4)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_handler_error_does_not_stop_delivery(self):
        self.handler.trigger("a", "on.change", {"scope": "s"})
        self.set("s", "1", 1)
        self.set("s", "2", 2)
        self.clock.advance(0)
        call = self.handler.calls()[0]
        self.handler.conn.receive({"type": "invocationresult", "invocation_id":
                                   call["invocation_id"], "function_id": "on.change",
                                   "error": {"code": "boom", "message": "no"}})
        self.assertEqual(self.handler.calls()[1]["data"]["key"], "2")

    def test_condition(self):
        self.handler.trigger("t", "on.change", {"scope": "s", "condition_function_id": "cond"})
        self.set("s", "k", 1)
        self.clock.advance(0)
        [condition] = self.handler.calls()
        self.assertEqual(condition["function_id"], "cond")
        self.assertEqual(condition["data"]["event_type"], "state:created")
        self.handler.answer(condition, False)  # exactly false: skipped
        self.assertEqual(len(self.handler.calls()), 1)
        self.set("s", "k", 2)
        self.clock.advance(0)
        self.handler.answer(self.handler.calls()[-1], None)  # no result: proceed
        self.assertEqual(self.handler.calls()[-1]["function_id"], "on.change")

    def test_unregistered_trigger_stops(self):
        self.handler.trigger("t", "on.change", {"scope": "s"})
        self.handler.conn.receive({"type": "unregistertrigger", "id": "t"})
        self.set("s", "k", 1)
        self.clock.advance(0)
        self.assertEqual(self.handler.calls(), [])

    def test_bad_trigger_config_refused(self):
        for config in (["s"], {"scope": 3}, {"condition_function_id": {}}):
            self.handler.trigger("bad", "on.change", config)
            [result] = self.handler.conn.sent_of_type("triggerregistrationresult")
            self.assertIn("state trigger config", result["error"]["message"])
            self.handler.conn.pop_sent()
            self.assertNotIn("bad", self.engine.triggers)

    def test_stop_leaves_no_timers(self):
        self.handler.trigger("t", "on.change", {})
        self.set("s", "k", 1)
        self.module.startService()
        self.successResultOf(self.module.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])


class StateConfigTests(SynchronousTestCase):
    def test_errors_name_the_key(self):
        for config, key in [
            ({"adaptor": {}}, "adaptor"),
            ({"adapter": {"class": "modules::state::adapters::Nope"}}, "adapter.class"),
            ({"adapter": {"class": "modules::state::adapters::KvStore",
                          "config": {"store_method": "disk"}}}, "adapter.config.store_method"),
            ({"adapter": {"class": "modules::state::adapters::KvStore", "extra": 1}},
             "adapter.extra"),
        ]:
            engine, clock = make_engine()
            error = self.assertRaises(
                ConfigError, build_module, "modules::state::StateModule", engine, config, clock)
            self.assertEqual(error.key, key)


class DispatcherBoundTests(SynchronousTestCase):
    def test_events_past_the_bound_are_dropped(self):
        """Slow handlers cannot make waiting events grow without bound."""
        engine, clock, module = make_state()
        module._events._max_pending = 3
        handler = Handler(engine, "on.change")
        handler.trigger("t", "on.change", {})
        for i in range(6):
            self.successResultOf(engine.call(
                "state::set", {"scope": "s", "key": str(i), "value": i}))
        self.assertEqual(module._events.dropped, 3)
        handler.answer_all(clock)
        self.assertEqual([c["data"]["key"] for c in handler.calls()], ["0", "1", "2"])
