"""
``reattach`` (engine-core.md §11): a newer SDK that reconnects names its previous
connection first, with the token ``workerregistered`` gave it; the engine retires that
connection if it still holds it. Older SDKs ignore the token.
"""

from twisted.trial.unittest import SynchronousTestCase

from iii_twisted.testing import FakeWorkerConnection, make_engine


def _register(conn, function_id):
    conn.receive({"type": "registerfunction", "id": function_id})


class ReattachTests(SynchronousTestCase):
    def setUp(self):
        self.engine, self.clock = make_engine(invocation_timeout=30)
        self.old = FakeWorkerConnection.connect(self.engine)
        _register(self.old, "svc::fn")
        self.caller = FakeWorkerConnection.connect(self.engine)
        # A call the old connection will never answer (its socket is half-open).
        self.caller.receive({"type": "invokefunction", "invocation_id": "c-1",
                             "function_id": "svc::fn", "data": {}})
        self.token = self.old.sent[0]["reattach_token"]
        self.new = FakeWorkerConnection.connect(self.engine)

    def reattach(self, **message):
        self.new.receive(dict({"type": "reattach"}, **message))

    def test_workerregistered_carries_a_token_per_connection(self):
        """Each connection gets its own unguessable token along with its id."""
        first = self.old.sent[0]
        assert set(first) == {"type", "worker_id", "reattach_token", "features"}
        assert len(self.token) >= 32
        assert self.new.sent[0]["reattach_token"] not in (self.token, None)

    def test_reattach_retires_the_previous_connection(self):
        """The old connection is closed and detached; its calls fail at once."""
        self.reattach(previous_worker_id=self.old.worker_id, reattach_token=self.token)
        assert self.old.closed == (1000, "reattached")
        assert self.old.worker_id not in self.engine.workers
        assert "svc::fn" not in self.engine.functions
        [result] = self.caller.sent_of_type("invocationresult")
        assert result["error"]["code"] == "invocation_stopped"
        # The replay that follows lands on a clean slate.
        _register(self.new, "svc::fn")
        assert self.engine.functions["svc::fn"].host is self.new.worker.host
        assert self.new.closed is None
        self.clock.advance(60)
        assert self.clock.getDelayedCalls() == []

    def test_wrong_or_missing_token_is_ignored(self):
        """Worker ids are listable: without its token nobody can kick a worker."""
        self.reattach(previous_worker_id=self.old.worker_id, reattach_token="x" * 32)
        self.reattach(previous_worker_id=self.old.worker_id)
        self.reattach(previous_worker_id=self.old.worker_id,
                      reattach_token=self.new.sent[0]["reattach_token"])
        assert self.old.closed is None and self.old.worker_id in self.engine.workers
        assert "svc::fn" in self.engine.functions

    def test_unknown_or_own_id_is_ignored(self):
        """After an engine restart the previous id is unknown: nothing happens."""
        self.reattach(previous_worker_id="3c0f5d7e-8a51-4c2b-9d3a-6e7f8091a2b3",
                      reattach_token=self.token)
        self.reattach(previous_worker_id=self.new.worker_id,
                      reattach_token=self.new.sent[0]["reattach_token"])
        assert self.new.closed is None and self.old.closed is None
        assert len(self.engine.workers) == 3
