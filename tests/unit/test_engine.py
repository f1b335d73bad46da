"""The routing core (iii_twisted.engine) driven through fake worker connections."""

import random

from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from iii_twisted.engine import ACTIVE, FAILED, PENDING, VOID
from iii_twisted.interfaces import IEnqueuer, ITriggerProvider, TriggerError
from iii_twisted.protocol import InvocationError
from iii_twisted.testing import FakeWorkerConnection, make_engine


def invoke(conn, function_id, data=None, invocation_id="inv-1", **extra):
    message = {"type": "invokefunction", "function_id": function_id, "data": data}
    if invocation_id is not None:
        message["invocation_id"] = invocation_id
    message.update(extra)
    conn.receive(message)


def register(conn, function_id, **extra):
    conn.receive(dict({"type": "registerfunction", "id": function_id}, **extra))


def results(conn):
    return conn.sent_of_type("invocationresult")


@implementer(ITriggerProvider)
class RecordingProvider:
    """A module-like provider that records triggers and can refuse them."""

    def __init__(self, refuse=None):
        self.live = {}
        self.refuse = refuse

    def register_trigger(self, trigger):
        if self.refuse:
            raise TriggerError(self.refuse)
        self.live[trigger.id] = trigger
        return succeed(None)

    def unregister_trigger(self, trigger):
        del self.live[trigger.id]
        return succeed(None)


class ConnectTests(SynchronousTestCase):
    def test_workerregistered_is_first_message(self):
        """A new connection gets its worker id before anything else."""
        engine, _ = make_engine()
        conn = FakeWorkerConnection.connect(engine)
        assert conn.sent[0] == {"type": "workerregistered", "worker_id": conn.worker_id,
                                "reattach_token": conn.worker.reattach_token,
                                "features": []}
        assert engine.workers[conn.worker_id] is conn.worker

    def test_ping_is_answered_with_pong(self):
        """A protocol-level ping gets a pong."""
        engine, _ = make_engine()
        conn = FakeWorkerConnection.connect(engine)
        conn.pop_sent()
        conn.receive({"type": "ping"})
        assert conn.sent == [{"type": "pong"}]


class RoutingTests(SynchronousTestCase):
    def setUp(self):
        self.engine, self.clock = make_engine(invocation_timeout=30)
        self.host = FakeWorkerConnection.connect(self.engine)
        self.caller = FakeWorkerConnection.connect(self.engine)
        register(self.host, "math::add", description="adds")
        self.host.pop_sent()
        self.caller.pop_sent()

    def forwarded(self):
        [message] = self.host.sent_of_type("invokefunction")
        return message

    def test_request_response(self):
        """The target gets invokefunction with the caller id injected; the answer goes back."""
        invoke(self.caller, "math::add", {"a": 1}, invocation_id="c-1", traceparent="00-t-s-01")
        sent = self.forwarded()
        assert sent["function_id"] == "math::add"
        assert sent["data"] == {"a": 1, "_caller_worker_id": self.caller.worker_id}
        assert sent["traceparent"] == "00-t-s-01"
        self.host.receive({"type": "invocationresult", "invocation_id": sent["invocation_id"],
                           "function_id": "math::add", "result": {"sum": 3}})
        assert results(self.caller) == [{"type": "invocationresult", "invocation_id": "c-1",
                                         "function_id": "math::add", "result": {"sum": 3}}]
        assert len(self.engine.tracker) == 0

    def test_null_result_has_no_result_key(self):
        """A result of null is sent without a result key, as the reference does."""
        invoke(self.caller, "math::add", {}, invocation_id="c-1")
        self.host.receive({"type": "invocationresult",
                           "invocation_id": self.forwarded()["invocation_id"]})
        assert "result" not in results(self.caller)[0]

    def test_error_is_relayed_verbatim(self):
        """A worker's ErrorBody, stack trace included, reaches the caller unchanged."""
        invoke(self.caller, "math::add", {}, invocation_id="c-1")
        error = {"code": "invocation_failed", "message": "boom", "stacktrace": "Traceback..."}
        self.host.receive({"type": "invocationresult",
                           "invocation_id": self.forwarded()["invocation_id"],
                           "function_id": "math::add", "error": error})
        assert results(self.caller)[0]["error"] == error

    def test_unknown_function_fails_at_once(self):
        """An unknown id is answered with function_not_found without waiting."""
        invoke(self.caller, "nope::x", {}, invocation_id="c-1")
        assert results(self.caller)[0]["error"] == {
            "code": "function_not_found", "message": "Function nope::x not found"}

    def test_void_is_never_answered(self):
        """A void call runs (the target still gets an id) but nothing goes back."""
        invoke(self.caller, "math::add", {"a": 1}, invocation_id="c-1", action={"type": "void"})
        sent = self.forwarded()
        assert sent["invocation_id"]
        self.host.receive({"type": "invocationresult", "invocation_id": sent["invocation_id"],
                           "result": 1})
        invoke(self.caller, "nope::x", {}, invocation_id="c-2", action={"type": "void"})
        assert results(self.caller) == []
        assert len(self.engine.tracker) == 0

    def test_no_invocation_id_is_never_answered(self):
        """Without an invocation_id the result is thrown away."""
        invoke(self.caller, "nope::x", {}, invocation_id=None)
        assert self.caller.sent == []

    def test_non_object_data_is_passed_unchanged(self):
        """Only object payloads get _caller_worker_id; others pass through as they are."""
        invoke(self.caller, "math::add", [1, 2], invocation_id="c-1")
        assert self.forwarded()["data"] == [1, 2]

    def test_enqueue_without_queue_module(self):
        """The enqueue action fails with enqueue_error while no queue module is loaded."""
        invoke(self.caller, "math::add", {}, invocation_id="c-1",
               action={"type": "enqueue", "queue": "q"})
        assert results(self.caller)[0]["error"] == {
            "code": "enqueue_error", "message": "QueueModule not loaded"}

    def test_enqueue_goes_to_the_enqueuer(self):
        """With a queue module, enqueue answers with the receipt id at once."""
        @implementer(IEnqueuer)
        class Enqueuer:
            calls = []

            def enqueue(self, queue, function_id, data, traceparent, baggage):
                self.calls.append((queue, function_id, data))
                return succeed("receipt-1")

        self.engine.enqueuer = enqueuer = Enqueuer()
        invoke(self.caller, "math::add", {"x": 1}, invocation_id="c-1",
               action={"type": "enqueue", "queue": "q"})
        assert results(self.caller)[0]["result"] == {"messageReceiptId": "receipt-1"}
        # Not injected on the enqueue path (engine-core.md §4.1).
        assert enqueuer.calls == [("q", "math::add", {"x": 1})]

    def test_engine_side_timeout(self):
        """An unanswered call fails with invocation_timeout; the late result is dropped."""
        invoke(self.caller, "math::add", {}, invocation_id="c-1")
        forwarded_id = self.forwarded()["invocation_id"]
        self.clock.advance(30)
        assert results(self.caller)[0]["error"]["code"] == "invocation_timeout"
        self.host.receive({"type": "invocationresult", "invocation_id": forwarded_id,
                           "result": 1})
        assert len(results(self.caller)) == 1
        assert self.clock.getDelayedCalls() == []

    def test_result_from_another_worker_is_dropped(self):
        """Only the worker that was asked can answer a call."""
        invoke(self.caller, "math::add", {}, invocation_id="c-1")
        forwarded_id = self.forwarded()["invocation_id"]
        self.caller.receive({"type": "invocationresult", "invocation_id": forwarded_id,
                             "result": "forged"})
        assert results(self.caller) == []
        assert len(self.engine.tracker) == 1

    def test_target_disconnect_stops_its_calls(self):
        """Callers of a worker that disconnects mid-call get invocation_stopped at once."""
        invoke(self.caller, "math::add", {}, invocation_id="c-1")
        self.host.disconnect()
        assert results(self.caller)[0]["error"] == {
            "code": "invocation_stopped", "message": "Invocation stopped"}
        assert self.clock.getDelayedCalls() == []

    def test_active_invocations_counted(self):
        """workers::list counts the calls a worker is running and the calls it awaits."""
        invoke(self.caller, "math::add", {}, invocation_id="c-1")
        d = self.engine.call("engine::workers::list", {})
        workers = {w["id"]: w for w in self.successResultOf(d)["workers"]}
        assert workers[self.host.worker_id]["active_invocations"] == 1
        assert workers[self.caller.worker_id]["active_invocations"] == 1

    def test_messages_take_effect_in_order(self):
        """A registration followed by a call in the same burst is in force for the call."""
        register(self.caller, "late::fn")
        invoke(self.host, "late::fn", {}, invocation_id="h-1")
        [forwarded] = self.caller.sent_of_type("invokefunction")
        assert forwarded["function_id"] == "late::fn"


class InProcessFunctionTests(SynchronousTestCase):
    def setUp(self):
        self.engine, self.clock = make_engine(invocation_timeout=5)
        self.caller = FakeWorkerConnection.connect(self.engine)
        self.caller.pop_sent()

    def test_worker_calls_in_process_function(self):
        """An app's Python function is callable by workers by id."""
        self.engine.register_function("app::double", lambda data: data["n"] * 2)
        invoke(self.caller, "app::double", {"n": 21})
        assert results(self.caller)[0]["result"] == 42

    def test_exception_becomes_invocation_failed(self):
        """A raising function fails the call with invocation_failed and a stack trace."""
        def broken(data):
            raise ValueError("bad input")
        self.engine.register_function("app::broken", broken)
        invoke(self.caller, "app::broken", {})
        error = results(self.caller)[0]["error"]
        assert error["code"] == "invocation_failed"
        assert error["message"] == "bad input"
        assert "ValueError" in error["stacktrace"]
        self.flushLoggedErrors(ValueError)

    def test_invocation_error_keeps_its_code(self):
        """Raising InvocationError chooses the error code the caller sees."""
        def picky(data):
            raise InvocationError("not_allowed", "no")
        self.engine.register_function("app::picky", picky)
        invoke(self.caller, "app::picky", {})
        assert results(self.caller)[0]["error"] == {"code": "not_allowed", "message": "no"}

    def test_coroutine_function(self):
        """Functions may be coroutines."""
        async def coro(data):
            return {"ok": data["v"]}
        self.engine.register_function("app::coro", coro)
        assert self.successResultOf(self.engine.call("app::coro", {"v": 1})) == {"ok": 1}

    def test_slow_in_process_function_times_out(self):
        """In-process functions are bound by the same engine-side timeout."""
        self.engine.register_function("app::never", lambda data: Deferred())
        d = self.engine.call("app::never", {})
        self.clock.advance(5)
        assert self.failureResultOf(d, InvocationError).value.code == "invocation_timeout"
        assert self.clock.getDelayedCalls() == []

    def test_app_calls_worker_function(self):
        """Engine.call reaches a worker's function and fires with its result."""
        host = FakeWorkerConnection.connect(self.engine)
        register(host, "w::echo")
        d = self.engine.call("w::echo", {"v": 1})
        [forwarded] = host.sent_of_type("invokefunction")
        assert forwarded["data"] == {"v": 1}  # no caller worker to inject
        host.receive({"type": "invocationresult", "invocation_id": forwarded["invocation_id"],
                      "result": "pong"})
        assert self.successResultOf(d) == "pong"

    def test_void_call_from_app(self):
        """A void call fires at once with None."""
        self.engine.register_function("app::x", lambda data: 1)
        assert self.successResultOf(self.engine.call("app::x", {}, VOID)) is None

    def test_worker_cannot_replace_engine_function(self):
        """A worker registering an engine function id is refused; the built-in stays."""
        register(self.caller, "engine::functions::list")
        assert self.engine.functions["engine::functions::list"].owner is None


class OwnershipTests(SynchronousTestCase):
    def test_reregistered_function_survives_old_owner_disconnect(self):
        """Last registration wins; the old owner's disconnect leaves the new one alone."""
        engine, _ = make_engine()
        a = FakeWorkerConnection.connect(engine)
        b = FakeWorkerConnection.connect(engine)
        register(a, "svc::fn")
        register(b, "svc::fn")
        a.disconnect()
        assert engine.functions["svc::fn"].owner is b.worker
        a2 = FakeWorkerConnection.connect(engine)
        a2.receive({"type": "unregisterfunction", "id": "svc::fn"})
        assert "svc::fn" in engine.functions
        b.receive({"type": "unregisterfunction", "id": "svc::fn"})
        assert "svc::fn" not in engine.functions


class TriggerTests(SynchronousTestCase):
    def setUp(self):
        self.engine, self.clock = make_engine()
        self.worker = FakeWorkerConnection.connect(self.engine)

    def register_trigger(self, conn, trigger_id, trigger_type, function_id="f::x", config=None):
        conn.receive({"type": "registertrigger", "id": trigger_id, "trigger_type": trigger_type,
                      "function_id": function_id, "config": config})

    def test_module_provider_gets_trigger(self):
        """A trigger of a module's type is handed to the module."""
        provider = RecordingProvider()
        self.engine.register_trigger_type("tick", provider, "ticks")
        self.register_trigger(self.worker, "t1", "tick", config={"every": 1})
        assert provider.live["t1"].config == {"every": 1}
        self.worker.receive({"type": "unregistertrigger", "id": "t1"})
        assert provider.live == {}

    def test_trigger_is_active_once_its_provider_says_it_is_live(self):
        """
        A provider that goes to a server first (a Redis subscription): the trigger is
        listed pending and fires nothing until the provider's Deferred fires; if it is
        unregistered meanwhile, the provider is still told.
        """
        provider = RecordingProvider()
        confirmations = []

        def register_later(trigger):
            provider.live[trigger.id] = trigger
            confirmations.append(Deferred())
            return confirmations[-1]
        provider.register_trigger = register_later
        self.engine.register_trigger_type("topic", provider)
        self.register_trigger(self.worker, "t1", "topic")
        self.register_trigger(self.worker, "t2", "topic")
        listed = self.successResultOf(self.engine.call("engine::triggers::list", {}))
        assert [t["status"] for t in listed["triggers"]] == [PENDING, PENDING]
        assert self.engine.triggers_of_type("topic") == []
        confirmations[0].callback(None)
        assert self.engine.triggers["t1"].status == ACTIVE
        assert self.engine.triggers_of_type("topic") == [self.engine.triggers["t1"]]
        self.worker.receive({"type": "unregistertrigger", "id": "t2"})
        assert set(provider.live) == {"t1"}
        confirmations[1].callback(None)
        assert "t2" not in self.engine.triggers

    def test_refused_trigger_is_answered(self):
        """A provider's refusal removes the trigger and tells the registering worker."""
        self.engine.register_trigger_type("tick", RecordingProvider(refuse="bad config"))
        self.register_trigger(self.worker, "t1", "tick")
        assert "t1" not in self.engine.triggers
        [answer] = self.worker.sent_of_type("triggerregistrationresult")
        assert answer["error"] == {"code": "trigger_registration_failed", "message": "bad config"}

    def test_trigger_waits_for_provider(self):
        """A trigger on a type nobody provides yet is kept and handed over later."""
        self.register_trigger(self.worker, "t1", "webhook", config={"path": "/gh"})
        assert self.engine.triggers["t1"].status == PENDING
        provider = FakeWorkerConnection.connect(self.engine)
        provider.receive({"type": "registertriggertype", "id": "webhook", "description": "hooks"})
        [sent] = provider.sent_of_type("registertrigger")
        assert sent == {"type": "registertrigger", "id": "t1", "trigger_type": "webhook",
                        "function_id": "f::x", "config": {"path": "/gh"}}

    def test_provider_failure_is_recorded(self):
        """A worker provider's error ack is visible in discovery and told to the registrant."""
        provider = FakeWorkerConnection.connect(self.engine)
        provider.receive({"type": "registertriggertype", "id": "webhook", "description": "d"})
        self.register_trigger(self.worker, "t1", "webhook")
        error = {"code": "trigger_registration_failed", "message": "bad path"}
        provider.receive({"type": "triggerregistrationresult", "id": "t1",
                          "trigger_type": "webhook", "function_id": "f::x", "error": error})
        assert self.engine.triggers["t1"].status == FAILED
        listed = self.successResultOf(self.engine.call("engine::triggers::list", {}))
        assert listed["triggers"][0]["error"] == error
        assert self.worker.sent_of_type("triggerregistrationresult")[0]["error"] == error

    def test_provider_disconnect_keeps_others_triggers(self):
        """When a provider leaves, other workers' triggers wait for the next provider."""
        provider = FakeWorkerConnection.connect(self.engine)
        provider.receive({"type": "registertriggertype", "id": "webhook", "description": "d"})
        self.register_trigger(self.worker, "t1", "webhook")
        provider.disconnect()
        assert "webhook" not in self.engine.trigger_types
        assert self.engine.triggers["t1"].status == PENDING
        again = FakeWorkerConnection.connect(self.engine)
        again.receive({"type": "registertriggertype", "id": "webhook", "description": "d"})
        assert [m["id"] for m in again.sent_of_type("registertrigger")] == ["t1"]

    def test_owner_disconnect_unregisters_from_provider(self):
        """A worker's triggers are unregistered from their (worker) provider when it leaves."""
        provider = FakeWorkerConnection.connect(self.engine)
        provider.receive({"type": "registertriggertype", "id": "webhook", "description": "d"})
        self.register_trigger(self.worker, "t1", "webhook")
        self.worker.disconnect()
        assert provider.sent_of_type("unregistertrigger") == [
            {"type": "unregistertrigger", "id": "t1", "trigger_type": "webhook"}]
        assert self.engine.triggers == {}

    def test_worker_cannot_take_over_module_type(self):
        """A worker may not replace a trigger type a module provides."""
        provider = RecordingProvider()
        self.engine.register_trigger_type("http", provider)
        self.worker.receive({"type": "registertriggertype", "id": "http", "description": "x"})
        assert self.engine.trigger_types["http"].provider is provider

    def test_only_owner_unregisters_trigger(self):
        """Another worker's unregistertrigger leaves the trigger in place."""
        provider = RecordingProvider()
        self.engine.register_trigger_type("tick", provider)
        self.register_trigger(self.worker, "t1", "tick")
        other = FakeWorkerConnection.connect(self.engine)
        other.receive({"type": "unregistertrigger", "id": "t1"})
        assert "t1" in provider.live

    def test_unregistertriggertype(self):
        """A provider may withdraw its type; its triggers then wait, pending."""
        self.worker.receive({"type": "registertriggertype", "id": "webhook", "description": "d"})
        self.register_trigger(self.worker, "t1", "webhook")
        self.worker.receive({"type": "unregistertriggertype", "id": "webhook"})
        assert "webhook" not in self.engine.trigger_types
        assert self.engine.triggers["t1"].status == PENDING


class EngineEventTests(SynchronousTestCase):
    def setUp(self):
        self.engine, self.clock = make_engine(functions_available_delay=0.1)
        self.watcher = FakeWorkerConnection.connect(self.engine)
        register(self.watcher, "watch::events")

    def events(self):
        return [m["data"] for m in self.watcher.sent_of_type("invokefunction")]

    def test_workers_available_payloads(self):
        """Connect, metadata update and disconnect each fire engine::workers-available."""
        self.watcher.receive({"type": "registertrigger", "id": "w", "function_id": "watch::events",
                              "trigger_type": "engine::workers-available", "config": {}})
        other = FakeWorkerConnection.connect(self.engine)
        invoke(other, "engine::workers::register",
               {"runtime": "python", "name": "n1", "pid": 7, "version": "0.10.0"},
               invocation_id=None, action={"type": "void"})
        other.disconnect()
        assert self.events() == [
            {"event": "worker_connected", "worker_id": other.worker_id},
            {"event": "worker_metadata_updated", "worker_id": other.worker_id},
            {"event": "worker_disconnected", "worker_id": other.worker_id},
        ]

    def test_functions_available_fires_on_change_only(self):
        """A changed function set fires once after the delay; no change fires nothing."""
        self.watcher.receive({"type": "registertrigger", "id": "f", "function_id": "watch::events",
                              "trigger_type": "engine::functions-available"})
        register(self.watcher, "a::one")
        register(self.watcher, "a::two")
        assert self.events() == []
        self.clock.advance(0.1)
        [event] = self.events()
        assert event["event"] == "functions_changed"
        assert {"a::one", "a::two", "engine::functions::list"} <= {
            f["function_id"] for f in event["functions"]}
        register(self.watcher, "a::one")  # same set again
        self.clock.advance(0.1)
        assert len(self.events()) == 1
        self.engine.stop()
        assert self.clock.getDelayedCalls() == []


class DiscoveryTests(SynchronousTestCase):
    def setUp(self):
        self.engine, _ = make_engine()
        self.worker = FakeWorkerConnection.connect(self.engine, peer_address="10.1.2.3")
        register(self.worker, "svc::fn", description="d", request_format={"type": "object"},
                 metadata={"team": "core"})

    def call(self, function_id, data=None):
        return self.successResultOf(self.engine.call(function_id, data))

    def test_functions_list(self):
        """engine::* ids are listed only on request; every key is present."""
        listed = self.call("engine::functions::list", {})["functions"]
        assert listed == [{"function_id": "svc::fn", "description": "d",
                           "request_format": {"type": "object"}, "response_format": None,
                           "metadata": {"team": "core"}, "namespace": "default",
                           "worker_name": "svc", "host_count": 1}]
        internal = self.call("engine::functions::list", {"include_internal": True})["functions"]
        assert "engine::workers::list" in {f["function_id"] for f in internal}

    def test_null_input_reads_as_empty_object(self):
        """SDKs that send no payload get the default listing."""
        assert len(self.call("engine::functions::list", None)["functions"]) == 1

    def test_wrong_input_type_is_deserialization_error(self):
        """A non-object input is refused with deserialization_error."""
        d = self.engine.call("engine::functions::list", "nope")
        assert self.failureResultOf(d, InvocationError).value.code == "deserialization_error"

    def test_workers_list_with_metadata(self):
        """Metadata sent through engine::workers::register shows in engine::workers::list."""
        invoke(self.worker, "engine::workers::register",
               {"runtime": "python", "version": "0.10.0", "name": "w1", "os": "Linux", "pid": 42,
                "telemetry": {"language": "en"}}, invocation_id=None, action={"type": "void"})
        [info] = self.call("engine::workers::list", {"worker_id": self.worker.worker_id})["workers"]
        assert info["name"] == "w1" and info["runtime"] == "python" and info["pid"] == 42
        assert info["ip_address"] == "10.1.2.3"
        assert info["status"] == "connected"
        assert info["functions"] == ["svc::fn"] and info["function_count"] == 1
        assert info["active_invocations"] == 0
        assert info["latest_metrics"] is None
        assert isinstance(info["connected_at_ms"], int)

    def test_pid_left_out_when_unknown(self):
        """pid is absent (not null) until the worker sends it."""
        [info] = self.call("engine::workers::list", {})["workers"]
        assert "pid" not in info

    def test_triggers_and_types_lists(self):
        """Trigger and trigger-type discovery, internal ones hidden by default."""
        self.worker.receive({"type": "registertriggertype", "id": "webhook", "description": "hooks"})
        self.worker.receive({"type": "registertrigger", "id": "t1", "trigger_type": "webhook",
                             "function_id": "svc::fn", "config": {"p": 1}})
        triggers = self.call("engine::triggers::list", {})["triggers"]
        assert triggers == [{"id": "t1", "trigger_type": "webhook", "function_id": "svc::fn",
                             "config": {"p": 1}, "status": "active"}]
        types = self.call("engine::trigger-types::list", {})["trigger_types"]
        assert types == [{"id": "webhook", "description": "hooks"}]
        internal = self.call("engine::trigger-types::list", {"include_internal": True})
        assert "engine::workers-available" in {t["id"] for t in internal["trigger_types"]}


def test_churn_of_200_workers_leaves_nothing_behind():
    """200 workers registering, calling and dropping at random leave every registry empty."""
    rng = random.Random(1234)
    engine, clock = make_engine(invocation_timeout=60)
    provider = RecordingProvider()
    engine.register_trigger_type("tick", provider)
    live = []
    for n in range(200):
        conn = FakeWorkerConnection.connect(engine)
        live.append(conn)
        register(conn, "w{}::fn".format(n))
        conn.receive({"type": "registertriggertype", "id": "type{}".format(n), "description": "d"})
        conn.receive({"type": "registertrigger", "id": "t{}".format(n), "trigger_type": "tick",
                      "function_id": "w{}::fn".format(n), "config": {}})
        conn.receive({"type": "registertrigger", "id": "u{}".format(n),
                      "trigger_type": "type{}".format(rng.randrange(200)),
                      "function_id": "w{}::fn".format(n), "config": {}})
        for _ in range(3):
            target = rng.choice(live)
            invoke(conn, target.worker.functions and next(iter(target.worker.functions)) or "x",
                   {"n": n}, invocation_id="c{}-{}".format(n, rng.random()))
        if rng.random() < 0.5:
            rng.choice(live).disconnect()
        clock.advance(rng.random())
    for conn in live:
        conn.disconnect()
    assert engine.workers == {}
    assert [f for f in engine.functions if not f.startswith("engine::")] == []
    assert engine.triggers == {}
    assert provider.live == {}
    assert {t for t in engine.trigger_types if not t.startswith("engine::")} == {"tick"}
    assert len(engine.tracker) == 0 and engine.tracker.by_worker == {}
    assert clock.getDelayedCalls() == []


def test_in_process_result_json_cannot_carry_is_an_error_at_once():
    """A worker calling an in-process function that returns a Python object gets an error."""
    import datetime
    engine, clock = make_engine(invocation_timeout=30)
    engine.register_function("app::when", lambda data: {"at": datetime.datetime(2026, 1, 1)})
    conn = FakeWorkerConnection.connect(engine)
    invoke(conn, "app::when", {})
    [answer] = conn.sent_of_type("invocationresult")
    assert answer["invocation_id"] == "inv-1" and "result" not in answer
    assert answer["error"] == {
        "code": "invocation_failed",
        "message": "the result of app::when cannot be sent: it is not JSON"}
    assert clock.getDelayedCalls() == []


def test_data_json_cannot_carry_fails_the_call_at_once():
    """An in-process caller passing a Python object to a worker's function fails now."""
    engine, clock = make_engine(invocation_timeout=30)
    conn = FakeWorkerConnection.connect(engine)
    register(conn, "w::fn")
    failures = []
    engine.call("w::fn", {"items": {1, 2}}).addErrback(failures.append)
    [failure] = failures
    assert failure.value.code == "invocation_failed"
    assert failure.value.message == "the data for w::fn cannot be sent: it is not JSON"
    assert conn.sent_of_type("invokefunction") == []
    assert len(engine.tracker) == 0 and clock.getDelayedCalls() == []
