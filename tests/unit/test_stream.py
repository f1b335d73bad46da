"""The stream module: functions, custom streams, triggers, and the client socket."""

import json

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from iii_twisted.config import ConfigError
from iii_twisted.engine import Engine
from iii_twisted.modules import build_module
from iii_twisted.modules.stream import StreamModule
from iii_twisted.protocol import InvocationError
from iii_twisted.testing import FakeWorkerConnection

import socket_harness
from test_state import Handler

CFG = {"host": "127.0.0.1", "port": 0}


def make_stream(config=None):
    reactor = MemoryReactorClock()
    engine = Engine(reactor, invocation_timeout=30)
    module = build_module("modules::stream::StreamModule", engine,
                          dict(CFG, **(config or {})), reactor)
    return engine, reactor, module


def ids(group="g", item="i", name="s"):
    return {"stream_name": name, "group_id": group, "item_id": item}


class Client(socket_harness.Client):
    def join(self, sub, group, item=None, name="s", kind="join"):
        data = {"subscriptionId": sub, "streamName": name, "groupId": group}
        if item is not None:
            data["id"] = item
        self.send({"type": kind, "data": data})


class StreamHarness:
    def __init__(self, config=None):
        self.engine, self.reactor, self.module = make_stream(config)
        self.pumps = []

    def connect(self, path="/"):
        client, _, _, pump = socket_harness.pump_client(
            self.module.factory, self.reactor, 3112, path, Client,
            ("127.0.0.1", 40000 + len(self.pumps)))
        self.pumps.append(pump)
        self.flush()
        return client

    def flush(self):
        for _ in range(10):
            self.reactor.advance(0)
            for pump in self.pumps:
                pump.flush()

    def call(self, function_id, data):
        d = self.engine.call(function_id, data)
        self.flush()
        return d


class StreamFunctionTests(SynchronousTestCase):
    def setUp(self):
        self.engine, self.reactor, self.module = make_stream()

    def call(self, function_id, data):
        return self.successResultOf(self.engine.call(function_id, data))

    def error(self, function_id, data):
        return self.failureResultOf(self.engine.call(function_id, data), InvocationError).value

    def test_set_get_delete_shapes(self):
        self.assertEqual(self.call("stream::set", dict(ids(), data={"a": 1})),
                         {"old_value": None, "new_value": {"a": 1}})
        self.assertEqual(self.call("stream::set", dict(ids(), data=2)),
                         {"old_value": {"a": 1}, "new_value": 2})
        self.assertEqual(self.call("stream::get", ids()), 2)
        self.assertEqual(self.call("stream::delete", ids()), {"old_value": 2})
        self.assertEqual(self.call("stream::delete", ids()), {"old_value": None})
        self.assertIsNone(self.call("stream::get", ids()))

    def test_list_list_groups_list_all(self):
        self.assertEqual(self.call("stream::list", {"stream_name": "s", "group_id": "g"}), [])
        for name, group, item in [("s", "g2", "b"), ("s", "g1", "a"), ("s", "g2", "a"),
                                  ("we:ird", "x", "1")]:
            self.call("stream::set", dict(ids(group, item, name), data=group + item))
        self.assertEqual(self.call("stream::list", {"stream_name": "s", "group_id": "g2"}),
                         ["g2b", "g2a"])
        self.assertEqual(self.call("stream::list_groups", {"stream_name": "s"}), ["g1", "g2"])
        self.assertEqual(self.call("stream::list_groups", {"stream_name": "we"}), [])
        self.assertEqual(self.call("stream::list_all", {}), {"stream": [
            {"id": "s", "groups": ["g1", "g2"]}, {"id": "we:ird", "groups": ["x"]}],
            "count": 2})

    def test_update(self):
        self.assertEqual(self.call("stream::update", dict(ids(), ops=[
            {"type": "merge", "value": {"a": 1}}])), {"old_value": None, "new_value": {"a": 1}})
        error = self.error("stream::update", dict(ids(), ops=[{"type": "increment", "path": "a"}]))
        self.assertEqual(error.code, "deserialization_error")
        self.assertIn("ops[0]: increment needs an integer 'by'", error.message)

    def test_bad_input(self):
        error = self.error("stream::set", {"stream_name": "s", "group_id": "g"})
        self.assertEqual(error.code, "deserialization_error")
        self.assertIn("item_id", error.message)
        error = self.error("stream::send", {"stream_name": "s", "group_id": "g"})
        self.assertIn("missing field `type`", error.message)


class CustomStreamTests(SynchronousTestCase):
    """A worker's stream::<op>(<name>) functions take over that stream."""

    def setUp(self):
        self.engine, self.reactor, self.module = make_stream()
        self.worker = FakeWorkerConnection.connect(self.engine)
        for op in ("get", "set", "delete", "list", "list_groups", "update"):
            self.worker.receive({"type": "registerfunction", "id": "stream::{}(c)".format(op)})

    def answer(self, result=None, error=None):
        call = self.worker.sent_of_type("invokefunction")[-1]
        message = {"type": "invocationresult", "invocation_id": call["invocation_id"],
                   "function_id": call["function_id"]}
        if result is not None:
            message["result"] = result
        if error is not None:
            message["error"] = error
        self.worker.receive(message)
        return call

    def test_set_is_delegated_with_the_input_struct(self):
        d = self.engine.call("stream::set", dict(ids(name="c"), data=5, _caller_worker_id="w"))
        call = self.answer({"old_value": None, "new_value": 5, "extra": 1})
        self.assertEqual(call["function_id"], "stream::set(c)")
        self.assertEqual(call["data"], dict(ids(name="c"), data=5))
        self.assertEqual(self.successResultOf(d), {"old_value": None, "new_value": 5})
        # The adapter was not touched.
        self.assertIsNone(self.successResultOf(self.module.store.get("stream:c:g", "i")))

    def test_get_list_results_pass_as_is(self):
        d = self.engine.call("stream::get", ids(name="c"))
        self.answer()
        self.assertIsNone(self.successResultOf(d))
        d = self.engine.call("stream::list", {"stream_name": "c", "group_id": "g"})
        self.answer([1, 2])
        self.assertEqual(self.successResultOf(d), [1, 2])
        d = self.engine.call("stream::list_groups", {"stream_name": "c"})
        self.answer(error={"code": "MINE", "message": "custom failure"})
        self.assertEqual(self.failureResultOf(d, InvocationError).value.code, "MINE")

    def test_bad_custom_results(self):
        d = self.engine.call("stream::set", dict(ids(name="c"), data=5))
        self.answer()
        error = self.failureResultOf(d, InvocationError).value
        self.assertEqual(error.code, "STREAM_SET_ERROR")
        self.assertIn("Function returned no result", error.message)
        d = self.engine.call("stream::update", dict(ids(name="c"), ops=[]))
        self.answer([1])
        self.assertEqual(self.failureResultOf(d, InvocationError).value.code, "JSON_ERROR")
        d = self.engine.call("stream::delete", ids(name="c"))
        self.answer({"old_value": 3})
        self.assertEqual(self.successResultOf(d), {"old_value": 3})

    def test_other_streams_use_the_adapter(self):
        self.successResultOf(self.engine.call("stream::set", dict(ids(name="other"), data=1)))
        self.assertEqual(self.worker.sent_of_type("invokefunction"), [])


class StreamTriggerTests(SynchronousTestCase):
    def setUp(self):
        self.engine, self.reactor, self.module = make_stream()
        self.handler = Handler(self.engine, "on.stream", "cond")

    def test_events_and_filters(self):
        self.handler.trigger("all", "on.stream", {"stream_name": "s"}, "stream")
        self.handler.trigger("group", "on.stream", {"stream_name": "s", "group_id": "g",
                                                    "item_id": ""}, "stream")
        self.handler.trigger("item", "on.stream", {"stream_name": "s", "item_id": "j"}, "stream")
        self.handler.trigger("other", "on.stream", {"stream_name": "t"}, "stream")
        self.successResultOf(self.engine.call("stream::set", dict(ids(), data=1)))
        self.assertEqual(self.handler.calls(), [])  # after the answer, not inline
        self.handler.answer_all(self.reactor)
        self.successResultOf(self.engine.call("stream::set", dict(ids("h", "j"), data=2)))
        self.successResultOf(self.engine.call("stream::delete", dict(ids("h", "j"))))
        self.successResultOf(self.engine.call("stream::delete", dict(ids("h", "nothing"))))
        self.successResultOf(self.engine.call("stream::send", {
            "stream_name": "s", "group_id": "g", "type": "ping", "data": {"x": 1}}))
        self.handler.answer_all(self.reactor)
        events = [(c["data"]["groupId"], c["data"]["id"], c["data"]["event"])
                  for c in self.handler.calls()]
        self.assertEqual(events, [
            ("g", "i", {"type": "create", "data": 1}),
            ("g", "i", {"type": "create", "data": 1}),
            ("h", "j", {"type": "create", "data": 2}),
            ("h", "j", {"type": "create", "data": 2}),
            ("h", "j", {"type": "delete", "data": 2}),
            ("h", "j", {"type": "delete", "data": 2}),
            ("g", None, {"type": "event", "event": {"type": "ping", "data": {"x": 1}}}),
            ("g", None, {"type": "event", "event": {"type": "ping", "data": {"x": 1}}}),
        ])
        first = self.handler.calls()[0]["data"]
        self.assertEqual(set(first), {"type", "timestamp", "streamName", "groupId", "id", "event"})
        self.assertEqual(first["type"], "stream")
        self.assertEqual(first["streamName"], "s")

    def test_condition(self):
        self.handler.trigger("t", "on.stream", {"stream_name": "s",
                                                "condition_function_id": "cond"}, "stream")
        self.successResultOf(self.engine.call("stream::set", dict(ids(), data=1)))
        self.reactor.advance(0)
        [condition] = self.handler.calls()
        self.assertEqual(condition["function_id"], "cond")
        self.handler.answer(condition, False)
        self.assertEqual(len(self.handler.calls()), 1)

    def test_bad_config_refused(self):
        for config in ({}, {"stream_name": 1}, None, {"stream_name": "s", "group_id": 2}):
            self.handler.trigger("bad", "on.stream", config, "stream")
            [result] = self.handler.conn.sent_of_type("triggerregistrationresult")
            self.assertIn("stream", result["error"]["message"])
            self.handler.conn.pop_sent()


class StreamSocketTests(SynchronousTestCase):
    def setUp(self):
        self.h = StreamHarness()

    def test_stopping_closes_clients_going_away_without_an_error(self):
        """
        Stopping the module closes each client with 1001 (going away); Autobahn's
        sendClose refuses that code, which used to log an unhandled error per client.
        """
        from iii_twisted.testing import logged_failures

        client = self.h.connect()
        self.h.module.startService()
        with logged_failures() as failures:
            self.h.module.stopService()
            self.h.flush()
        self.assertEqual(failures, [])
        self.assertEqual(client.closed_with, 1001)

    def test_join_group_gets_sync_and_pushes(self):
        self.successResultOf(self.h.call("stream::set", dict(ids("g", "a"), data=1)))
        client = self.h.connect()
        self.assertTrue(client.opened)
        client.join("sub1", "g")
        self.h.flush()
        [sync] = client.received
        self.assertEqual(sync["event"], {"type": "sync", "data": [1]})
        self.assertEqual((sync["type"], sync["streamName"], sync["groupId"], sync["id"]),
                         ("stream", "s", "g", None))
        self.h.call("stream::set", dict(ids("g", "b"), data=2))
        self.h.call("stream::set", dict(ids("other", "b"), data=2))
        self.h.call("stream::update", dict(ids("g", "b"), ops=[{"type": "set", "path": "", "value": 3}]))
        self.h.call("stream::delete", dict(ids("g", "a")))
        self.h.call("stream::send", {"stream_name": "s", "group_id": "g", "type": "t", "data": 0})
        events = [(m["id"], m["event"]) for m in client.received[1:]]
        self.assertEqual(events, [
            ("b", {"type": "create", "data": 2}),
            ("b", {"type": "update", "data": 3}),
            ("a", {"type": "delete", "data": 1}),
            (None, {"type": "event", "event": {"type": "t", "data": 0}}),
        ])

    def test_item_subscription_and_leave(self):
        client = self.h.connect()
        client.join("one", "g", "i")
        self.h.flush()
        self.assertEqual(client.received[0]["event"], {"type": "sync", "data": None})
        self.assertEqual(client.received[0]["id"], "i")
        self.h.call("stream::set", dict(ids("g", "i"), data=1))
        self.h.call("stream::set", dict(ids("g", "x"), data=1))
        self.h.call("stream::send", {"stream_name": "s", "group_id": "g", "type": "t"})
        self.assertEqual([m["id"] for m in client.received], ["i", "i"])
        client.join("one", "g", "i", kind="leave")
        self.h.flush()
        self.h.call("stream::set", dict(ids("g", "i"), data=2))
        self.assertEqual(len(client.received), 2)

    def test_join_and_leave_triggers(self):
        handler = Handler(self.h.engine, "on.join", "on.leave")
        handler.trigger("j", "on.join", None, "stream:join")
        handler.trigger("l", "on.leave", None, "stream:leave")
        client = self.h.connect()
        client.join("sub", "g", "i")
        self.h.flush()
        [join] = handler.calls()
        self.assertEqual(join["data"], {"subscription_id": "sub", "stream_name": "s",
                                        "group_id": "g", "id": "i", "context": None})
        self.assertEqual(client.received, [])  # waits for the join trigger
        handler.answer(join, {"unauthorized": True})
        self.h.flush()
        self.assertEqual(client.received[0]["event"], {"type": "unauthorized"})
        self.h.call("stream::set", dict(ids("g", "i"), data=1))
        self.assertEqual(len(client.received), 1)  # not subscribed
        client.join("sub2", "g")
        self.h.flush()
        handler.answer(handler.calls()[-1], {"unauthorized": False})
        self.h.flush()
        self.assertEqual(client.received[-1]["event"]["type"], "sync")
        client.sendClose()
        self.h.flush()
        leave = handler.calls()[-1]
        self.assertEqual(leave["function_id"], "on.leave")
        self.assertEqual(leave["data"]["subscription_id"], "sub2")
        self.assertEqual(self.h.module._subscribers, {})

    def test_bad_messages_are_ignored(self):
        client = self.h.connect()
        client.sendMessage(b"not json")
        client.sendMessage(b"[" * 30000 + b"]" * 30000)  # under the 64 KiB limit
        client.send({"type": "dance"})
        client.send({"type": "join", "data": {"streamName": "s"}})
        client.send([1, 2])
        client.join("ok", "g")
        self.h.flush()
        self.assertEqual(len(client.received), 1)
        self.assertIsNone(client.closed_with)

    def test_random_frames_leave_every_client_connected(self):
        """Seeded random client messages (valid shapes, wrong fields, junk) close nothing."""
        import random
        rng = random.Random(11)
        values = [None, 1, -1, "", "s", "g", "x" * 300, [], {}, [1], {"a": 1}, True, 2.5]
        noisy, quiet = self.h.connect(), self.h.connect()
        quiet.join("q1", "g")
        for _ in range(400):
            roll = rng.random()
            if roll < 0.2:
                # (Invalid UTF-8 in a text frame fails the connection, as RFC 6455 says.)
                junk = bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
                if rng.random() < 0.5:
                    noisy.sendMessage(junk, isBinary=True)
                else:
                    noisy.sendMessage(junk.decode("latin-1").encode("utf-8"))
                continue
            data = {k: rng.choice(values) for k in rng.sample(
                ["subscriptionId", "streamName", "groupId", "id", "x"], rng.randrange(6))}
            if rng.random() < 0.5:
                data = {**data, "subscriptionId": "n{}".format(rng.randrange(5)),
                        "streamName": "s", "groupId": rng.choice(["g", "h"])}
            noisy.send({"type": rng.choice(["join", "leave", "dance", None, 3]),
                        "data": rng.choice([data, data, None, [], "x"])})
            if rng.random() < 0.05:
                self.h.flush()
        self.h.flush()
        self.h.call("stream::set", dict(ids("g", "z"), data=9))
        self.h.flush()
        self.assertIsNone(noisy.closed_with)
        self.assertIsNone(quiet.closed_with)
        self.assertEqual(quiet.received[-1]["event"], {"type": "create", "data": 9})

    def test_push_json_cannot_carry_is_dropped_not_sent(self):
        """A browser's JSON.parse throws on NaN: such a push is dropped (and logged)."""
        client = self.h.connect()
        client.join("sub1", "g")
        self.h.flush()
        before = len(client.received)
        self.successResultOf(self.h.call("stream::send", {
            "stream_name": "s", "group_id": "g", "type": "t", "data": float("nan")}))
        self.h.call("stream::send", {"stream_name": "s", "group_id": "g", "type": "t",
                                     "data": 1})
        self.h.flush()
        self.assertEqual([m["event"] for m in client.received[before:]],
                         [{"type": "event", "event": {"type": "t", "data": 1}}])
        self.assertIsNone(client.closed_with)

    def test_pushes_may_exceed_the_inbound_limit(self):
        client = self.h.connect()
        client.join("sub", "g")
        self.h.flush()
        self.h.call("stream::set", dict(ids("g", "big"), data="x" * (200 * 1024)))
        self.assertEqual(len(client.received[-1]["event"]["data"]), 200 * 1024)

    def test_other_paths_are_404(self):
        client = self.h.connect("/stream/s/g")
        self.h.flush()
        self.assertFalse(client.opened)

    def test_oversized_message_closes(self):
        client = self.h.connect()
        client.sendMessage(b" " * (70 * 1024))
        self.h.flush()
        self.assertEqual(client.closed_with, 1009)

    def test_slow_consumer_is_dropped(self):
        self.h.module.factory.max_outbound_bytes = 10000
        client = self.h.connect()
        client.join("s", "g")
        self.h.flush()
        server = self.h.pumps[0].server
        # The transport says its buffer is full: what follows waits in the backlog.
        server._gate.pauseProducing()
        for i in range(5):
            self.h.engine.call("stream::set", dict(ids("g", str(i)), data="x" * 1000))
        self.assertEqual(len(server._backlog), 5)
        server._gate.resumeProducing()
        self.h.flush()
        self.assertEqual(len(client.received), 6)
        server._gate.pauseProducing()
        for i in range(20):
            self.h.engine.call("stream::set", dict(ids("g", str(i)), data="x" * 1000))
        self.h.flush()
        self.assertEqual(server._backlog_bytes, 0)
        self.assertIsNotNone(client.closed_with)
        self.assertEqual(self.h.module.clients, set())


class AuthTests(SynchronousTestCase):
    def setUp(self):
        self.h = StreamHarness({"auth_function": "auth"})
        self.handler = Handler(self.h.engine, "auth", "on.join")
        self.handler.trigger("j", "on.join", None, "stream:join")

    def test_context_reaches_join_triggers(self):
        client = self.h.connect("/?token=a%20b&x=1&x=2&=skip")
        [auth] = self.handler.calls()
        self.assertEqual(auth["data"]["path"], "/")
        self.assertEqual(auth["data"]["query_params"], {"token": ["a%20b"], "x": ["1", "2"]})
        self.assertEqual(auth["data"]["addr"], "127.0.0.1:40000")
        self.assertIn("host", auth["data"]["headers"])
        self.assertFalse(client.opened)
        self.handler.answer(auth, {"context": {"user": "u1"}})
        self.h.flush()
        self.assertTrue(client.opened)
        client.join("sub", "g")
        self.h.flush()
        self.assertEqual(self.handler.calls()[-1]["data"]["context"], {"user": "u1"})

    def test_refusals(self):
        for answer in ({"unauthorized": True}, False,
                       {"error": {"code": "x", "message": "down"}}):
            client = self.h.connect()
            auth = self.handler.calls()[-1]
            if isinstance(answer, dict) and "error" in answer:
                self.handler.conn.receive({
                    "type": "invocationresult", "invocation_id": auth["invocation_id"],
                    "function_id": "auth", "error": answer["error"]})
            else:
                self.handler.answer(auth, answer)
            self.h.flush()
            self.assertFalse(client.opened)
        self.assertEqual(self.h.module.clients, set())


class StreamConfigTests(SynchronousTestCase):
    def test_errors_name_the_key(self):
        for config, key in [
            ({"prot": 1}, "prot"),
            ({"port": "x"}, "port"),
            ({"port": 70000}, "port"),
            ({"host": "localhost"}, "host"),
            ({"auth_function": 3}, "auth_function"),
            ({"adapter": {"class": "modules::stream::adapters::Nope"}}, "adapter.class"),
            ({"adapter": {"class": "modules::stream::adapters::KvStore",
                          "config": {"channel_size": 0}}}, "adapter.config.channel_size"),
            ({"adapter": {"class": "modules::stream::adapters::KvStore",
                          "config": {"nope": 0}}}, "adapter.config.nope"),
        ]:
            reactor = MemoryReactorClock()
            engine = Engine(reactor)
            error = self.assertRaises(ConfigError, StreamModule, engine, config, reactor)
            self.assertEqual(error.key, key)

    def test_listens_where_configured_and_stops_cleanly(self):
        engine, reactor, module = make_stream({"port": 3999, "host": "127.0.0.1"})
        module.startService()
        [(port, factory, _, interface)] = reactor.tcpServers
        self.assertEqual((port, interface), (3999, "127.0.0.1"))
        self.assertIs(factory, module.factory)
        self.successResultOf(module.stopService())
        self.assertEqual(reactor.getDelayedCalls(), [])


class FakeConnection:
    """What a StreamClient sends through, without a socket."""

    def __init__(self):
        self.sent = []
        self.paused = False
        self.pauses = 0

    def send_payload(self, payload):
        self.sent.append(json.loads(payload))

    def disconnect(self, code=1000, reason=None):
        pass

    def pause_reading(self):
        self.paused = True
        self.pauses += 1

    def resume_reading(self):
        self.paused = False


class StreamClientTests(SynchronousTestCase):
    def test_reading_pauses_while_messages_pile_up(self):
        """Messages waiting behind a slow join trigger pause reading, then resume it."""
        from iii_twisted.modules.stream import MAX_INBOX, StreamClient

        engine, reactor, module = make_stream()
        handler = Handler(engine, "on.join")
        handler.trigger("j", "on.join", None, "stream:join")
        connection = FakeConnection()
        client = StreamClient(module, connection)
        for i in range(MAX_INBOX + 1):
            client.received({"type": "join", "data": {
                "subscriptionId": str(i), "streamName": "s", "groupId": "g"}})
        self.assertTrue(connection.paused)
        self.assertEqual(len(handler.calls()), 1)  # one message handled at a time
        while len(handler.calls()) < MAX_INBOX + 1:
            handler.answer(handler.calls()[-1])
        handler.answer(handler.calls()[-1])
        self.assertFalse(connection.paused)
        self.assertEqual(connection.pauses, 1)
        self.assertEqual(len(connection.sent), MAX_INBOX + 1)
        self.assertEqual(len(client.subscriptions), MAX_INBOX + 1)
        client.closed()
        self.assertEqual(module._subscribers, {})
