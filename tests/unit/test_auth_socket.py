"""
Authentication at the WebSocket upgrade (iii_twisted.worker with an Authenticator):
real Autobahn client and server protocols over in-memory transports.
"""

from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet.address import IPv4Address
from twisted.test import iosim

from iii_twisted.auth import AuthConfig, Authenticator, TokenGrant
from iii_twisted.channels import install_channels

from socket_harness import Client, Harness

TOKEN = "t0ken-" + "x" * 30
WEB = "web-" + "y" * 30


class AuthHarness(Harness):
    def __init__(self, **options):
        Harness.__init__(self, **options)
        self.factory.authenticator = Authenticator(self.engine, AuthConfig(tokens=[
            TokenGrant("backend", TOKEN, {}),
            TokenGrant("web", WEB, {"allowed_functions": ["public::*"]}),
        ]), self.reactor, "workers")

    def connect(self, path="/", headers=None):
        server = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 49134))
        client_factory = WebSocketClientFactory(
            "ws://127.0.0.1:49134" + path, reactor=self.reactor, headers=headers or {})
        client_factory.protocol = Client
        client = client_factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 49134))
        server_transport = iosim.FakeTransport(
            server, isServer=True, hostAddress=IPv4Address("TCP", "127.0.0.1", 49134),
            peerAddress=IPv4Address("TCP", "10.1.2.3", 40000 + len(self.pumps)))
        client_transport = iosim.FakeTransport(client, isServer=False)
        pump = iosim.connect(server, server_transport, client, client_transport, greet=False)
        self.pumps.append(pump)
        self.flush()
        return client, server, client_transport


def test_no_token_is_refused_with_401_before_the_upgrade():
    """Without credentials: HTTP 401, no worker, counted."""
    h = AuthHarness()
    client, server, transport = h.connect("/")
    assert not client.opened
    assert h.engine.workers == {}
    assert client.http_status_line == "HTTP/1.1 401 Unauthorized"
    assert h.engine.auth_stats.refused == 1


def test_wrong_tokens_are_refused_and_others_unharmed():
    h = AuthHarness()
    good, _, _ = h.connect("/", {"Authorization": "Bearer " + TOKEN})
    for headers, path in (({"Authorization": "Bearer nope"}, "/"),
                          ({}, "/?token=nope"),
                          ({"Authorization": "Bearer " + TOKEN}, "/?token=" + WEB),
                          ({}, "/?token=" + "z" * 10000)):
        client, _, _ = h.connect(path, headers)
        assert not client.opened
    assert good.opened and len(h.engine.workers) == 1
    assert h.engine.auth_stats.refused == 4


def test_header_token_makes_a_worker_with_that_session():
    h = AuthHarness()
    client, _, _ = h.connect("/", {"Authorization": "Bearer " + WEB})
    assert client.opened
    [worker] = h.engine.workers.values()
    assert worker.session.name == "web" and worker.session.ip_address == "10.1.2.3"
    client.send({"type": "invokefunction", "invocation_id": "i", "function_id": "state::get",
                 "data": {}})
    h.flush()
    assert client.of_type("invocationresult")[0]["error"]["code"] == "FORBIDDEN"


def test_query_token_works():
    h = AuthHarness()
    client, _, _ = h.connect("/?token=" + TOKEN)
    assert client.opened
    assert [w.session.name for w in h.engine.workers.values()] == ["backend"]


def test_otel_needs_a_token_too():
    h = AuthHarness()
    refused, _, _ = h.connect("/otel")
    accepted, _, _ = h.connect("/otel", {"Authorization": "Bearer " + TOKEN})
    assert not refused.opened and accepted.opened
    assert h.engine.workers == {}


def test_channels_go_by_key_and_refuse_a_wrong_token():
    h = AuthHarness()
    h.factory.channels = install_channels(h.engine, h.reactor)
    results = []
    h.engine.call("engine::channels::create", {}).addCallback(results.append)
    reader = results[0]["reader"]
    path = "/ws/channels/{}?key={}&dir=read".format(reader["channel_id"], reader["access_key"])
    wrong, _, _ = h.connect(path, {"Authorization": "Bearer nope"})
    assert not wrong.opened
    right, _, _ = h.connect(path)
    assert right.opened


# -- the stream socket ----------------------------------------------------------------

STREAM_TOKEN = "stream-" + "s" * 30


def test_stream_socket_tokens():
    """auth: tokens on the stream port: 401 without, a client with; counted."""
    from test_stream import StreamHarness

    h = StreamHarness({"auth": {"tokens": [{"name": "web", "token": STREAM_TOKEN}]}})
    for path in ("/", "/?token=nope"):
        client = h.connect(path)
        h.flush()
        assert not client.opened
    client = h.connect("/?token=" + STREAM_TOKEN)
    h.flush()
    assert client.opened
    [stream_client] = h.module.clients
    assert stream_client.context == {"token": "web"}
    assert h.engine.auth_stats.refused == 2


def test_stream_tokens_then_the_auth_function():
    """With both, the token is checked first; then the auth function gives the context."""
    from test_stream import Handler, StreamHarness

    h = StreamHarness({"auth_function": "auth",
                       "auth": {"tokens": [{"name": "web", "token": STREAM_TOKEN}]}})
    handler = Handler(h.engine, "auth")
    refused = h.connect("/")
    h.flush()
    assert not refused.opened and handler.calls() == []
    client = h.connect("/?token=" + STREAM_TOKEN)
    [auth] = handler.calls()
    handler.answer(auth, {"context": {"user": "u"}})
    h.flush()
    assert client.opened
    assert [c.context for c in h.module.clients] == [{"user": "u"}]
