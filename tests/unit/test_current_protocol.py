"""
What current SDKs (PyPI iii-sdk 0.25, npm 0.22) rely on since the reference's v0.11:
invocation metadata, trigger metadata at fire time, capabilities, the trigger
lifecycle, discovery, namespaces (../shared/spec/current-reference.md §1, §2).
"""

from twisted.trial.unittest import SynchronousTestCase

from iii_twisted.engine import VOID
from iii_twisted.testing import FakeWorkerConnection, make_engine
from test_engine import invoke, register


class InvocationMetadataTests(SynchronousTestCase):
    def setUp(self):
        self.engine, self.clock = make_engine(invocation_timeout=30)
        self.host = FakeWorkerConnection.connect(self.engine)
        self.caller = FakeWorkerConnection.connect(self.engine)
        register(self.host, "orders::route")
        self.host.pop_sent()
        self.caller.pop_sent()

    def test_metadata_travels_beside_data(self):
        """A caller's ``metadata`` reaches the host as sent, and ``data`` is untouched."""
        invoke(self.caller, "orders::route", {"n": 1}, metadata={"session_id": "s_1"})
        [forwarded] = self.host.sent_of_type("invokefunction")
        assert forwarded["metadata"] == {"session_id": "s_1"}
        assert forwarded["data"]["n"] == 1 and "session_id" not in forwarded["data"]

    def test_no_metadata_no_key(self):
        """A call without metadata is forwarded without the key (as a v0.10 engine)."""
        invoke(self.caller, "orders::route", {"n": 1})
        [forwarded] = self.host.sent_of_type("invokefunction")
        assert "metadata" not in forwarded

    def test_void_call_keeps_metadata(self):
        """Fire-and-forget calls carry it too."""
        invoke(self.caller, "orders::route", {}, invocation_id=None, metadata=[1, "x"])
        [forwarded] = self.host.sent_of_type("invokefunction")
        assert forwarded["metadata"] == [1, "x"]

    def test_engine_call_passes_metadata(self):
        """In-process code (a module firing a trigger) passes it through Engine.call."""
        self.engine.call("orders::route", {}, VOID, metadata={"tenant": "t"})
        [forwarded] = self.host.sent_of_type("invokefunction")
        assert forwarded["metadata"] == {"tenant": "t"}

    def test_trigger_metadata_reaches_handler_each_fire(self):
        """A trigger's ``metadata`` is the invocation metadata of every fire."""
        self.host.receive({"type": "registertrigger", "id": "t1",
                           "trigger_type": "engine::workers-available",
                           "function_id": "orders::route", "config": {},
                           "metadata": {"route": "blue"}})
        self.host.pop_sent()
        FakeWorkerConnection.connect(self.engine)
        FakeWorkerConnection.connect(self.engine)
        fired = self.host.sent_of_type("invokefunction")
        assert len(fired) == 2
        assert [m["metadata"] for m in fired] == [{"route": "blue"}] * 2


def declare(conn, version, **extra):
    """What an SDK sends on connect: its description, as a void call."""
    invoke(conn, "engine::workers::register",
           dict({"runtime": "python", "version": version, "name": "w-" + version},
                **extra), invocation_id=None, action={"type": "void"})


class CapabilityTests(SynchronousTestCase):
    def test_workerregistered_features_are_what_we_implement(self):
        """No engine feature flag we do not implement (none yet): SDKs keep them off."""
        engine, _ = make_engine()
        conn = FakeWorkerConnection.connect(engine)
        assert conn.sent[0]["features"] == []

    def test_declared_features_and_fields_are_kept(self):
        """py 0.25's features, isolation and description are recorded and listed."""
        engine, _ = make_engine()
        conn = FakeWorkerConnection.connect(engine)
        declare(conn, "0.25.0", features=["observe.v1", "large-messages.v1", 3],
                isolation="oci", description="orders")
        assert conn.worker.declared["features"] == ("observe.v1", "large-messages.v1")
        result = engine.call("engine::workers::list", {})
        [row] = result.result["workers"]
        assert (row["isolation"], row["description"], row["namespace"]) == (
            "oci", "orders", "default")


class DiscoveryGenerationTests(SynchronousTestCase):
    """engine::triggers::list: instances for v0.10 SDKs, types for 0.13 and later."""

    def setUp(self):
        self.engine, _ = make_engine()
        self.provider = FakeWorkerConnection.connect(self.engine)
        declare(self.provider, "0.10.0")
        register(self.provider, "svc::fn", description="d")
        self.provider.receive({"type": "registertriggertype", "id": "webhook",
                               "description": "hooks"})
        self.provider.receive({"type": "registertrigger", "id": "t1",
                               "trigger_type": "webhook", "function_id": "svc::fn",
                               "config": {"p": 1}})

    def listed(self, conn, fid="engine::triggers::list", **data):
        conn.pop_sent()
        invoke(conn, fid, data, invocation_id="q")
        [answer] = conn.sent_of_type("invocationresult")
        assert "error" not in answer, answer
        return answer["result"]

    def test_undeclared_and_old_sdks_get_instances(self):
        """A connection that declared nothing, or a 0.10/0.11 SDK, gets v0.10 rows."""
        silent = FakeWorkerConnection.connect(self.engine)
        old = FakeWorkerConnection.connect(self.engine)
        declare(old, "0.11.2")
        for conn in (silent, old, self.provider):
            assert [t["id"] for t in self.listed(conn)["triggers"]] == ["t1"]
        assert self.successResultOf(self.engine.call(
            "engine::triggers::list", {}))["triggers"][0]["function_id"] == "svc::fn"

    def test_current_sdks_get_types(self):
        """npm 0.22 (version) and py 0.25 (features) get trigger-type rows."""
        node = FakeWorkerConnection.connect(self.engine)
        declare(node, "0.22.1")
        py = FakeWorkerConnection.connect(self.engine)
        declare(py, "0.9.9", features=["large-messages.v1"])
        for conn in (node, py):
            assert self.listed(conn) == {"triggers": [
                {"id": "webhook", "namespace": "default", "worker_name": "w-0.10.0",
                 "description": "hooks"}]}
        internal = self.listed(node, include_internal=True)["triggers"]
        assert "engine::workers-available" in {t["id"] for t in internal}

    def test_registered_triggers_and_infos(self):
        """The 0.13 functions answer with the reference's shapes."""
        conn = FakeWorkerConnection.connect(self.engine)
        rows = self.listed(conn, "engine::registered-triggers::list")["registered_triggers"]
        assert rows == [{"id": "t1", "trigger_type": "webhook", "function_id": "svc::fn",
                         "namespace": "default", "worker_name": "w-0.10.0", "config": {"p": 1},
                         "config_summary": '{"p":1}', "status": "active"}]
        info = self.listed(conn, "engine::registered-triggers::info", id="t1")
        assert info["trigger"]["instance_count"] == 1
        assert info["function"]["registered_triggers"] == [
            {"id": "t1", "trigger_type": "webhook", "config": {"p": 1}}]
        detail = self.listed(conn, "engine::functions::info", function_id="svc::fn")
        assert (detail["function_id"], detail["worker_name"], detail["description"]) == (
            "svc::fn", "w-0.10.0", "d")
        batch = self.listed(conn, "engine::functions::info",
                            function_ids=["svc::fn", "nope", "svc::fn"])["functions"]
        assert [b["function_id"] for b in batch] == ["svc::fn", "nope"]
        assert batch[1] == {"function_id": "nope", "error": "not_found"}
        kind = self.listed(conn, "engine::triggers::info", id="webhook")
        assert (kind["worker_name"], kind["instance_count"]) == ("w-0.10.0", 1)
        worker = self.listed(conn, "engine::workers::info", name="w-0.10.0")
        assert worker["worker"]["id"] == self.provider.worker_id
        assert [f["function_id"] for f in worker["functions"]] == ["svc::fn"]
        assert [t["id"] for t in worker["trigger_types"]] == ["webhook"]
        assert [t["id"] for t in worker["registered_triggers"]] == ["t1"]

    def test_errors_are_the_references(self):
        """NOT_FOUND and INVALID_ARGUMENTS, with the reference's messages."""
        conn = FakeWorkerConnection.connect(self.engine)
        cases = [
            ("engine::functions::info", {"function_id": "x"}, "NOT_FOUND",
             "Function 'x' is not registered."),
            ("engine::functions::info", {}, "INVALID_ARGUMENTS",
             "missing field `function_id` (or `function_ids` for a batch)"),
            ("engine::functions::info", {"function_ids": ["a"] * 2 + list("bcdefghijklmnopqrstuvwxyzABCDEFGH")},
             "INVALID_ARGUMENTS", "too many function_ids (max 32)"),
            ("engine::triggers::info", {"id": "x"}, "NOT_FOUND",
             "Trigger type 'x' is not registered in namespace 'default'."),
            ("engine::registered-triggers::info", {"id": "x"}, "NOT_FOUND",
             "Registered trigger 'x' was not found."),
            ("engine::workers::info", {"name": "x"}, "NOT_FOUND",
             "Worker 'x' is not connected."),
        ]
        for function_id, data, code, message in cases:
            conn.pop_sent()
            invoke(conn, function_id, data, invocation_id="q")
            [answer] = conn.sent_of_type("invocationresult")
            assert answer["error"]["code"] == code, (function_id, answer)
            assert answer["error"]["message"] == message


class TriggerLifecycleTests(SynchronousTestCase):
    def setUp(self):
        self.engine, _ = make_engine()
        self.provider = FakeWorkerConnection.connect(self.engine)
        self.user = FakeWorkerConnection.connect(self.engine)
        register(self.user, "svc::fn")

    def bind(self, trigger_id="t1", kind="webhook"):
        self.user.receive({"type": "registertrigger", "id": trigger_id, "trigger_type": kind,
                           "function_id": "svc::fn", "config": {}})

    def test_parked_trigger_is_acknowledged_then_handed_over(self):
        """No provider yet: kept, no error to the worker; the provider then gets it."""
        self.bind()
        assert self.user.sent_of_type("triggerregistrationresult") == []
        assert self.engine.triggers["t1"].status == "pending"
        self.provider.receive({"type": "registertriggertype", "id": "webhook"})
        [handed] = self.provider.sent_of_type("registertrigger")
        assert handed["id"] == "t1"

    def test_provider_error_reaches_the_registering_worker(self):
        """A provider's error is forwarded to the worker that registered the trigger."""
        self.provider.receive({"type": "registertriggertype", "id": "webhook"})
        self.bind()
        error = {"code": "bad_config", "message": "no path"}
        self.provider.receive({"type": "triggerregistrationresult", "id": "t1",
                               "trigger_type": "webhook", "function_id": "svc::fn",
                               "error": error})
        [result] = self.user.sent_of_type("triggerregistrationresult")
        assert (result["id"], result["error"]) == ("t1", error)

    def test_only_the_provider_may_report(self):
        """A result from anyone but the type's provider is ignored."""
        self.provider.receive({"type": "registertriggertype", "id": "webhook"})
        self.bind()
        stranger = FakeWorkerConnection.connect(self.engine)
        stranger.receive({"type": "triggerregistrationresult", "id": "t1",
                          "error": {"code": "x", "message": "spoofed"}})
        assert self.user.sent_of_type("triggerregistrationresult") == []
        assert self.engine.triggers["t1"].status == "active"

    def test_provider_reconnect_replays_bindings(self):
        """A provider that goes and comes back gets every binding of its type again."""
        self.provider.receive({"type": "registertriggertype", "id": "webhook"})
        self.bind("t1")
        self.bind("t2")
        self.provider.disconnect()
        self.engine.detach(self.provider.worker)
        assert {t.status for t in self.engine.triggers.values()} == {"pending"}
        again = FakeWorkerConnection.connect(self.engine)
        again.receive({"type": "registertriggertype", "id": "webhook"})
        assert sorted(m["id"] for m in again.sent_of_type("registertrigger")) == ["t1", "t2"]

    def test_engine_owned_bindings_outlive_the_caller(self):
        """engine::register_trigger binds for the engine; the caller may leave."""
        self.provider.receive({"type": "registertriggertype", "id": "webhook"})
        cli = FakeWorkerConnection.connect(self.engine)
        invoke(cli, "engine::register_trigger", {
            "trigger_type": "webhook", "function_id": "svc::fn", "config": {"p": 1},
            "metadata": {"route": "x"}}, invocation_id="r")
        [answer] = cli.sent_of_type("invocationresult")
        trigger_id = answer["result"]["id"]
        handed = self.provider.sent_of_type("registertrigger")[-1]
        assert (handed["id"], handed["metadata"]) == (trigger_id, {"route": "x"})
        self.engine.detach(cli.worker)
        assert trigger_id in self.engine.triggers
        # A worker's own trigger is not removable through it.
        self.bind("mine")
        other = FakeWorkerConnection.connect(self.engine)
        invoke(other, "engine::unregister_trigger", {"id": "mine"}, invocation_id="u0")
        invoke(other, "engine::unregister_trigger", {"id": trigger_id}, invocation_id="u1")
        invoke(other, "engine::unregister_trigger", {"id": trigger_id}, invocation_id="u2")
        assert [m["result"] for m in other.sent_of_type("invocationresult")] == [
            {"removed": False}, {"removed": True}, {"removed": False}]
        assert "mine" in self.engine.triggers and trigger_id not in self.engine.triggers
        [gone] = self.provider.sent_of_type("unregistertrigger")
        assert gone["id"] == trigger_id

    def test_engine_register_trigger_parks_and_reports_refusals(self):
        """Unknown type: parked, success; a module provider's refusal is an error."""
        d = self.engine.call("engine::register_trigger",
                             {"trigger_type": "later", "function_id": "svc::fn"})
        parked = self.successResultOf(d)["id"]
        assert self.engine.triggers[parked].status == "pending"
        from iii_twisted.interfaces import TriggerError
        from zope.interface import implementer
        from iii_twisted.interfaces import ITriggerProvider

        @implementer(ITriggerProvider)
        class Refuses:
            def register_trigger(self, trigger):
                raise TriggerError("config needs a topic")

            def unregister_trigger(self, trigger):
                pass
        self.engine.register_trigger_type("strict", Refuses())
        d = self.engine.call("engine::register_trigger",
                             {"trigger_type": "strict", "function_id": "svc::fn"})
        failure = self.failureResultOf(d)
        assert failure.value.code == "trigger_registration_failed"
        assert failure.value.message == "config needs a topic"


class NamespaceTests(SynchronousTestCase):
    """Reference 0.23 namespaces; connections that name none behave as in v0.10."""

    def setUp(self):
        self.engine, _ = make_engine()

    def worker(self, name, namespace=None, functions=()):
        """A connection that registers C{functions} first, then declares (as SDKs do)."""
        conn = FakeWorkerConnection.connect(self.engine)
        for function_id in functions:
            register(conn, function_id)
        data = {"runtime": "python", "version": "0.25.0", "name": name}
        if namespace is not None:
            data["namespace"] = namespace
        invoke(conn, "engine::workers::register", data, invocation_id=None,
               action={"type": "void"})
        return conn

    def call(self, conn, function_id, invocation_id="c", **extra):
        conn.pop_sent()
        invoke(conn, function_id, {"n": 1}, invocation_id=invocation_id, **extra)
        return conn.sent

    def test_registrations_before_the_namespace_land_in_it(self):
        """Replayed registrations move into the namespace the connection then names."""
        team = self.worker("orders", "team-a", ["orders::get"])
        assert "orders::get" not in self.engine.functions
        caller = self.worker("caller")
        # Absent namespace = default: strict, with a hint.
        [answer] = self.call(caller, "orders::get")
        assert answer["error"]["code"] == "function_not_found"
        assert "registered in namespace(s): team-a" in answer["error"]["message"]
        self.call(caller, "orders::get", namespace="team-a")
        [forwarded] = team.sent_of_type("invokefunction")
        assert forwarded["function_id"] == "orders::get"  # the plain id
        rows = self.successResultOf(self.engine.call("engine::functions::list", {}))
        assert {(f["function_id"], f["namespace"]) for f in rows["functions"]} == {
            ("orders::get", "team-a")}

    def test_same_id_in_two_namespaces_and_default(self):
        """One id per namespace: each call reaches its own namespace's worker."""
        plain_worker = self.worker("plain", None, ["svc::fn"])
        a = self.worker("a", "team-a", ["svc::fn"])
        b = self.worker("b", "team-b", ["svc::fn"])
        caller = self.worker("caller")
        for conn, extra in ((plain_worker, {}), (a, {"namespace": "team-a"}),
                            (b, {"namespace": "team-b"}), (plain_worker, {"namespace": "default"})):
            conn.pop_sent()
            self.call(caller, "svc::fn", **extra)
            assert len(conn.sent_of_type("invokefunction")) == 1, extra

    def test_a_takeover_before_the_namespace_is_given_back(self):
        """A namespaced worker's replay does not leave default's owner without its function."""
        owner = self.worker("owner", None, ["svc::fn"])
        self.worker("ns", "team-a", ["svc::fn"])
        assert self.engine.functions["svc::fn"].owner is owner.worker
        assert "svc::fn" in owner.worker.functions

    def test_first_live_owner_keeps_an_id_in_a_namespace(self):
        """A second worker's id in a namespace: registrationrejected, connection kept."""
        first = self.worker("first", "team-a", ["svc::fn"])
        second = self.worker("second", "team-a", ["svc::fn"])
        [rejected] = second.sent_of_type("registrationrejected")
        assert rejected == {"type": "registrationrejected",
                            "code": "FUNCTION_NAMESPACE_CONFLICT", "namespace": "team-a",
                            "function_id": "svc::fn", "owner_worker_id": first.worker_id}
        assert second.closed is None
        reserved = self.worker("third", "team-a", ["engine::mine"])
        [rejected] = reserved.sent_of_type("registrationrejected")
        assert (rejected["function_id"], rejected["owner_worker_id"]) == ("engine::mine", "")

    def test_one_live_worker_name_per_namespace(self):
        """A duplicate name in a namespace is refused and closed; in default it is not."""
        self.worker("dup", "team-a")
        again = self.worker("dup", "team-a")
        [rejected] = again.sent_of_type("registrationrejected")
        assert rejected["code"] == "WORKER_NAMESPACE_CONFLICT"
        assert again.closed is not None
        d1, d2 = self.worker("same"), self.worker("same")
        assert d1.closed is None and d2.closed is None

    def test_blank_namespaces_are_refused(self):
        """A blank namespace on a call or a trigger: INVALID_NAMESPACE."""
        conn = self.worker("w", None, ["svc::fn"])
        [answer] = self.call(conn, "svc::fn", namespace="  ")
        assert answer["error"]["code"] == "INVALID_NAMESPACE"
        conn.receive({"type": "registertrigger", "id": "t", "trigger_type": "x",
                      "function_id": "svc::fn", "namespace": ""})
        [result] = conn.sent_of_type("triggerregistrationresult")
        assert result["error"]["code"] == "INVALID_NAMESPACE"

    def test_triggers_target_their_namespace(self):
        """registertrigger.namespace says where the target lives; firing reaches it."""
        team = self.worker("t", "team-a", ["svc::fn"])
        team.receive({"type": "registertrigger", "id": "t1",
                      "trigger_type": "engine::workers-available",
                      "function_id": "svc::fn", "namespace": "team-a", "config": {}})
        team.pop_sent()
        FakeWorkerConnection.connect(self.engine)
        assert len(team.sent_of_type("invokefunction")) == 1
        [row] = self.successResultOf(self.engine.call(
            "engine::registered-triggers::list", {"include_internal": True}))[
                "registered_triggers"]
        assert (row["function_id"], row["namespace"]) == ("svc::fn", "team-a")


class FunctionsAvailableTests(SynchronousTestCase):
    def test_payload_rows_carry_both_generations_keys(self):
        """engine::functions-available rows: v0.10 FunctionInfo keys and 0.13's."""
        engine, clock = make_engine()
        watcher = FakeWorkerConnection.connect(engine)
        register(watcher, "w::on")
        watcher.receive({"type": "registertrigger", "id": "fa",
                         "trigger_type": "engine::functions-available",
                         "function_id": "w::on", "config": {}})
        host = FakeWorkerConnection.connect(engine)
        declare(host, "0.25.0", namespace="team-a")
        register(host, "svc::fn", description="d")
        watcher.pop_sent()
        clock.advance(1)
        [fired] = watcher.sent_of_type("invokefunction")
        rows = {(r["function_id"], r["namespace"]): r for r in fired["data"]["functions"]}
        row = rows[("svc::fn", "team-a")]
        assert (row["worker_name"], row["description"], row["request_format"]) == (
            "w-0.25.0", "d", None)
