"""
What current SDKs (PyPI iii-sdk 0.25, npm 0.22) rely on since the reference's v0.11:
invocation metadata, trigger metadata at fire time, capabilities, the trigger
lifecycle, discovery, namespaces (../shared/spec/current-reference.md §1, §2).
"""

from twisted.trial.unittest import SynchronousTestCase

from iii_twisted.engine import VOID
from iii_twisted.testing import FakeWorkerConnection, make_engine


def invoke(conn, function_id, data=None, invocation_id="inv-1", **extra):
    message = {"type": "invokefunction", "function_id": function_id, "data": data}
    if invocation_id is not None:
        message["invocation_id"] = invocation_id
    message.update(extra)
    conn.receive(message)


def register(conn, function_id, **extra):
    conn.receive(dict({"type": "registerfunction", "id": function_id}, **extra))


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
