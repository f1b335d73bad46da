"""
Sessions and grants (iii_twisted.auth): the patterns, the grant rules, the config,
the authenticator, and the engine's checks of calls, registrations and ownership,
driven through fake worker connections on a task.Clock.
"""

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from iii_twisted.auth import (
    AuthConfig, Authenticator, AuthRefused, FunctionFilter, Session, TokenGrant,
    parse_auth_config, session_from_answer, wildcard_match,
)
from iii_twisted.config import ConfigError, parse_config
from iii_twisted.engine import VOID
from iii_twisted.protocol import InvocationError
from iii_twisted.testing import FakeWorkerConnection, make_engine
from test_engine import invoke


# -- patterns -----------------------------------------------------------------------


@pytest.mark.parametrize("pattern,value,expected", [
    ("hello::world", "hello::world", True),
    ("hello::world", "hello::worl", False),
    ("hello::world", "hello::worldx", False),
    ("*", "anything::at::all", True),
    ("*", "", True),
    ("public::*", "public::hello", True),
    ("public::*", "public::", True),
    ("public::*", "publicx::hello", False),
    ("public::*", "state::get", False),
    ("*::get", "state::get", True),
    ("*::get", "state::get::x", False),
    ("a*b*c", "aXbYc", True),
    ("a*b*c", "abc", True),
    ("a*b*c", "acb", False),
    ("a*a", "a", False),
    ("a*a", "aa", True),
    ("**", "x", True),
])
def test_wildcard(pattern, value, expected):
    """``*`` matches any run of characters; no ``*`` means exactly equal."""
    assert wildcard_match(pattern, value) is expected


def test_compiled_grants_answer_as_each_pattern():
    """Session's one-regex check gives grant_matches' answers, on random patterns."""
    import random

    from iii_twisted.auth import compile_grants, grant_matches

    rng = random.Random(13)
    alphabet = "ab:*.+?()[]\\$^"
    for _ in range(2000):
        grants = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6)))
                  for _ in range(rng.randint(1, 3))]
        value = "".join(rng.choice("ab:.+?()[]\\$^\n") for _ in range(rng.randint(0, 7)))
        compiled = compile_grants(grants)
        assert bool(compiled.match(value)) == any(grant_matches(g, value) for g in grants), (
            grants, value)


def test_metadata_filter():
    """A metadata filter matches functions whose metadata has every key, exactly or by pattern."""
    f = FunctionFilter.parse({"metadata": {"public": True, "team": 'match("web-*")'}}, "k")
    assert f.matches("x", {"public": True, "team": "web-a", "other": 1})
    assert not f.matches("x", {"public": True, "team": "core"})
    assert not f.matches("x", {"public": "true", "team": "web-a"})
    assert not f.matches("x", {"team": "web-a"})
    assert not f.matches("x", None)
    assert FunctionFilter.parse('match("public::*")', "k").matches("public::a")
    assert FunctionFilter.parse({"match": "a::*"}, "k").matches("a::b")
    for bad in ({"match": "a", "metadata": {"x": 1}}, {}, {"glob": "a"}, 3, {"metadata": {}}):
        with pytest.raises(ConfigError):
            FunctionFilter.parse(bad, "k")


# -- the grant rules ----------------------------------------------------------------


def test_session_without_lists_may_call_everything():
    """A token with no allowed_functions (and no expose list) may call anything."""
    s = Session(name="backend")
    assert s.may_call("state::get") and s.may_call("anything")
    assert not s.restricted


def test_allowed_functions_restrict_with_infrastructure_carve_out():
    """With allowed_functions, only those and the engine's infrastructure functions."""
    s = Session(name="web", allowed_functions=["public::*", "exact::one"])
    assert s.restricted
    assert s.may_call("public::hello")
    assert s.may_call("exact::one")
    assert not s.may_call("exact::one2")
    assert not s.may_call("state::get")
    assert not s.may_call("engine::functions::list")
    for infra in ("engine::workers::register", "engine::channels::create",
                  "engine::log::info", "engine::baggage::get"):
        assert s.may_call(infra)


def test_forbidden_wins_even_over_infrastructure():
    """forbidden_functions beat allowed_functions and the carve-out."""
    s = Session(name="t", allowed_functions=["*"],
                forbidden_functions=["secret::*", "engine::log::info"])
    assert s.may_call("public::x")
    assert not s.may_call("secret::charge")
    assert not s.may_call("engine::log::info")
    assert s.may_call("engine::log::warn")


def test_expose_functions_for_auth_function_sessions():
    """An auth function's session sees the listener's exposed functions plus its own grants."""
    expose = [FunctionFilter.parse('match("api::*")', "k"),
              FunctionFilter.parse({"metadata": {"public": True}}, "k")]
    s = session_from_answer({"allowed_functions": ["extra::one"]}, "1.2.3.4", expose)
    assert s.may_call("api::x")
    assert s.may_call("extra::one")
    assert s.may_call("other::f", {"public": True})
    assert not s.may_call("other::f", {"public": False})
    assert not s.may_call("other::f")


def test_denial_messages():
    """FORBIDDEN with the reference's text (a token's names its own config key)."""
    rbac = session_from_answer({"forbidden_functions": ["x::y"]})
    e = rbac.denial("a::b")
    assert (e.code, e.message) == (
        "FORBIDDEN", "function 'a::b' not allowed (add to rbac.expose_functions)")
    assert rbac.denial("x::y").message == \
        "function 'x::y' not allowed (remove from rbac.forbidden_functions)"
    token = Session(name="web", allowed_functions=[])
    assert token.denial("a::b").message == \
        "function 'a::b' not allowed (add to allowed_functions of token 'web')"


def test_auth_answer_defaults_are_the_references():
    """Absent keys take the reference's defaults; anything else than the shape is refused."""
    s = session_from_answer({})
    assert s.allowed_functions == () and s.forbidden_functions == ()
    assert s.allowed_trigger_types is None
    assert s.allow_function_registration is True
    assert s.allow_trigger_type_registration is False
    assert s.context == {} and s.function_registration_prefix is None
    s = session_from_answer({"context": {"user": "alice"}, "allowed_trigger_types": ["http"],
                             "function_registration_prefix": "alice"})
    assert s.context == {"user": "alice"} and s.may_register_trigger("http")
    assert not s.may_register_trigger("cron")
    assert s.registration_id("f") == "alice::f" and s.local_id("alice::f") == "f"
    for garbage in (None, [], "yes", 1, {"allowed_functions": "x"},
                    {"allowed_functions": [1]}, {"allow_function_registration": "no"},
                    {"function_registration_prefix": 3}):
        with pytest.raises(ValueError):
            session_from_answer(garbage)


def test_principals():
    """Same token name, or same auth context, is the same principal."""
    assert Session(name="a").same_principal(Session(name="a", ip_address="x"))
    assert not Session(name="a").same_principal(Session(name="b"))
    assert session_from_answer({"context": {"u": 1}}).same_principal(
        session_from_answer({"context": {"u": 1}}))
    assert not session_from_answer({"context": {"u": 1}}).same_principal(
        session_from_answer({"context": {"u": 2}}))


# -- config -------------------------------------------------------------------------


def test_config_reads_tokens_from_the_environment():
    """auth: tokens come through ${ENV}; the listener gets them."""
    config = parse_config(
        "port: 0\nauth:\n  tokens:\n    - name: backend\n      token: ${B}\n"
        "    - name: web\n      token: ${W}\n      allowed_functions: ['public::*']\n"
        "      allow_function_registration: false\n",
        environ={"B": "b" * 32, "W": "w" * 32})
    [listener] = config.listeners
    assert [t.name for t in listener.auth.tokens] == ["backend", "web"]
    assert listener.auth.tokens[1].grants["allow_function_registration"] is False


def test_config_without_auth_has_an_open_listener():
    config = parse_config("port: 0\n")
    assert [(l.name, l.auth) for l in config.listeners] == [("iii-worker-manager", None)]


@pytest.mark.parametrize("auth,key", [
    ("{tokens: [{name: a, token: ''}]}", "auth.tokens[0].token"),
    ("{tokens: [{name: a}]}", "auth.tokens[0].token"),
    ("{tokens: [{token: abcdefabcdefabcdef}]}", "auth.tokens[0].name"),
    ("{tokens: [{name: a, token: 'has space inside it'}]}", "auth.tokens[0].token"),
    ("{tokens: [{name: a, token: 'n\u00f6n-ascii-token-value'}]}", "auth.tokens[0].token"),
    ("{tokens: [{name: a, token: aaaaaaaaaaaaaaaaaaa}, {name: a, token: bbbbbbbbbbbbbbbbbb}]}",
     "auth.tokens[1].name"),
    ("{tokens: [{name: a, token: aaaaaaaaaaaaaaaaaaa}, {name: b, token: aaaaaaaaaaaaaaaaaaa}]}",
     "auth.tokens[1].token"),
    ("{tokens: [{name: a, token: aaaaaaaaaaaaaaaaaaa, allowed_functions: x}]}",
     "auth.tokens[0].allowed_functions"),
    ("{tokens: [{name: a, token: aaaaaaaaaaaaaaaaaaa, colour: red}]}", "auth.tokens[0].colour"),
    ("{}", "auth"),
    ("{secret: x, auth_function_id: f}", "auth.secret"),
    ("{auth_function_id: f, auth_timeout_ms: 0}", "auth.auth_timeout_ms"),
    ("[1]", "auth"),
])
def test_config_errors_name_the_key(auth, key):
    """Every wrong auth: is a ConfigError naming its key."""
    with pytest.raises(ConfigError) as e:
        parse_config("auth: " + auth + "\n")
    assert e.value.key == key


@pytest.mark.parametrize("auth,key,meant", [
    ("{tokens: [{name: a, token: aaaaaaaaaaaaaaaaaaa, allowed_function: [x]}]}",
     "auth.tokens[0].allowed_function", "allowed_functions"),
    ("{token: [], auth_function_id: f}", "auth.token", "tokens"),
])
def test_a_misspelt_auth_key_names_the_key_meant(auth, key, meant):
    """As everywhere in the config: the closest known key is named."""
    with pytest.raises(ConfigError) as e:
        parse_config("auth: " + auth + "\n")
    assert e.value.key == key
    assert "did you mean {!r}?".format(meant) in str(e.value)


def test_current_format_rbac_and_several_worker_managers():
    """Each iii-worker-manager entry is a listener; rbac: and middleware as the reference."""
    config = parse_config(
        "workers:\n"
        "  - name: iii-worker-manager\n    config: {listen: 'unix:/tmp/t.sock'}\n"
        "  - name: iii-worker-manager\n    config:\n      port: 0\n"
        "      middleware_function_id: mw::all\n"
        "      rbac: {auth_function_id: my::auth, expose_functions: ['match(\"api::*\")']}\n")
    first, second = config.listeners
    assert (first.name, first.listen, first.auth) == (
        "iii-worker-manager", "unix:/tmp/t.sock", None)
    assert second.name == "iii-worker-manager#2"
    assert second.auth.auth_function_id == "my::auth"
    assert second.auth.middleware_function_id == "mw::all"
    assert second.auth.expose_functions[0].matches("api::x")
    open_rbac = parse_config("workers:\n  - name: iii-worker-manager\n    config:\n"
                             "      rbac: {expose_functions: ['match(\"api::*\")']}\n")
    assert open_rbac.listeners[0].auth.admit_anyone


def test_several_listeners():
    """listeners: replaces the default port; each has its own endpoint and auth."""
    config = parse_config(
        "listeners:\n"
        "  - name: trusted\n    listen: unix:/tmp/iii.sock\n"
        "  - name: public\n    listen: tcp:0\n"
        "    auth: {tokens: [{name: web, token: abcdefghijklmnopq}]}\n")
    assert [(l.name, l.listen, l.auth is None) for l in config.listeners] == [
        ("trusted", "unix:/tmp/iii.sock", True), ("public", "tcp:0", False)]
    for text, key in (("listeners: [{name: a, auth: {tokens: []}}]", "listeners[0].auth"),
                      ("listeners: [{name: a}]\nport: 1", "port"),
                      ("listeners: [{listen: 'tcp:1', colour: 3}]", "listeners[0].colour"),
                      ("listeners: [{listen: 'tcp:1', name: a}, {listen: 'tcp:2', name: a}]",
                       "listeners[1].name"),
                      ("listeners: []", "listeners")):
        with pytest.raises(ConfigError) as e:
            parse_config(text)
        assert e.value.key == key


# -- the authenticator --------------------------------------------------------------

WEB = "w" * 40
BACKEND = "b" * 40


def authenticator(engine, clock, **options):
    config = AuthConfig(tokens=[
        TokenGrant("backend", BACKEND, {}),
        TokenGrant("web", WEB, {"allowed_functions": ["public::*"],
                                "allow_function_registration": False}),
    ], **options)
    return Authenticator(engine, config, clock, "workers")


class AuthenticatorTests(SynchronousTestCase):
    def setUp(self):
        self.engine, self.clock = make_engine()
        self.auth = authenticator(self.engine, self.clock)

    def session(self, headers=None, params=None):
        return self.successResultOf(self.auth.authenticate(headers or {}, params or {},
                                                           "10.0.0.1"))

    def refused(self, headers=None, params=None, auth=None):
        d = (auth or self.auth).authenticate(headers or {}, params or {}, "10.0.0.1")
        return self.failureResultOf(d, AuthRefused).value.reason

    def test_bearer_header(self):
        s = self.session({"authorization": "Bearer " + WEB})
        assert s.name == "web" and s.ip_address == "10.0.0.1"
        assert not s.may_call("state::get") and not s.allow_function_registration
        assert self.session({"authorization": "bearer " + BACKEND}).name == "backend"

    def test_query_token(self):
        assert self.session(params={"token": [BACKEND]}).name == "backend"

    def test_header_and_query_must_agree(self):
        assert self.session({"authorization": "Bearer " + WEB}, {"token": [WEB]}).name == "web"
        assert "different" in self.refused({"authorization": "Bearer " + WEB},
                                           {"token": [BACKEND]})
        assert "more than once" in self.refused(params={"token": [WEB, WEB]})

    def test_bad_credentials_are_refused_and_counted(self):
        cases = [
            ({}, {}),
            ({"authorization": "Bearer wrong"}, {}),
            ({"authorization": "Basic " + WEB}, {}),
            ({"authorization": "Bearer "}, {}),
            ({}, {"token": [""]}),
            ({}, {"token": ["x" * 100000]}),
            ({}, {"token": ["t\u00f6ken"]}),
            ({"authorization": "Bearer " + WEB + "\u00e9"}, {}),
            ({}, {"token": [WEB[:-1]]}),
            ({}, {"token": [WEB + "w"]}),
        ]
        for headers, params in cases:
            self.refused(headers, params)
        assert self.engine.auth_stats.refused == len(cases)

    def test_a_thousand_failures_are_logged_at_a_bounded_rate(self):
        """Each refusal is counted; only a burst per minute is logged, then a summary."""
        events = []
        globalLogPublisher.addObserver(events.append)
        try:
            for _ in range(1000):
                self.refused({"authorization": "Bearer nope"})
            self.clock.advance(61)
            self.refused({"authorization": "Bearer nope"})
        finally:
            globalLogPublisher.removeObserver(events.append)
        lines = [e for e in events if "refused" in e.get("log_format", "")]
        assert 10 <= len(lines) <= 13
        assert any(e.get("count") == 990 for e in lines)
        assert all(e["log_level"] == LogLevel.warn for e in lines)
        assert self.engine.auth_stats.refused == 1001
        assert self.session({"authorization": "Bearer " + WEB}).name == "web"

    def test_auth_function_decides_without_a_token(self):
        """The auth function gets headers, query and address; its answer is the session."""
        seen = []

        def auth(data):
            seen.append(data)
            return {"allowed_functions": ["mine::*"], "context": {"user": "u1"}}
        self.engine.register_function("my::auth", auth)
        a = authenticator(self.engine, self.clock, auth_function_id="my::auth")
        s = self.successResultOf(a.authenticate({"x-key": "k"}, {"a": ["1", "2"]}, "10.0.0.2"))
        assert seen == [{"headers": {"x-key": "k"}, "query_params": {"a": ["1", "2"]},
                         "ip_address": "10.0.0.2"}]
        assert s.context == {"user": "u1"} and s.may_call("mine::x")
        assert not s.may_call("public::x")
        # A valid token still wins, without asking the function.
        s = self.successResultOf(a.authenticate({}, {"token": [WEB]}, "10.0.0.2"))
        assert s.name == "web" and len(seen) == 1

    def test_auth_function_that_throws_or_answers_garbage(self):
        def throws(data):
            raise InvocationError("nope", "bad credentials")
        self.engine.register_function("auth::throws", throws)
        self.engine.register_function("auth::garbage", lambda d: ["not", "an", "object"])
        self.engine.register_function("auth::null", lambda d: None)
        for fn in ("auth::throws", "auth::garbage", "auth::null", "auth::missing"):
            a = authenticator(self.engine, self.clock, auth_function_id=fn)
            assert fn in self.refused(auth=a)

    def test_auth_function_that_hangs_times_out(self):
        self.engine.register_function("auth::hangs", lambda d: Deferred())
        a = authenticator(self.engine, self.clock, auth_function_id="auth::hangs",
                          auth_timeout=2.0)
        d = a.authenticate({}, {}, "10.0.0.3")
        self.assertNoResult(d)
        self.clock.advance(2)
        assert "timed out" in self.failureResultOf(d, AuthRefused).value.reason


# -- the engine's checks ------------------------------------------------------------


def connect(engine, session):
    conn = FakeWorkerConnection(engine)
    conn.worker = engine.attach(conn, session)
    conn.pop_sent()
    return conn


class EngineGrantTests(SynchronousTestCase):
    def setUp(self):
        self.engine, self.clock = make_engine(invocation_timeout=30)
        self.engine.register_function("public::hello", lambda d: "hi")
        self.engine.register_function("state::get", lambda d: "secret")
        self.web = connect(self.engine, Session(
            name="web", allowed_functions=["public::*"], allow_function_registration=False,
            allow_trigger_type_registration=False, allowed_trigger_types=["cron"]))
        self.backend = connect(self.engine, Session(name="backend"))

    def test_denied_call_is_forbidden_with_the_reference_message(self):
        invoke(self.web, "state::get")
        [answer] = self.web.sent_of_type("invocationresult")
        assert answer["error"] == {
            "code": "FORBIDDEN",
            "message": "function 'state::get' not allowed (add to allowed_functions of "
                       "token 'web')"}
        invoke(self.web, "public::hello", invocation_id="i2")
        assert self.web.sent_of_type("invocationresult")[1]["result"] == "hi"
        assert self.engine.auth_stats.forbidden_calls == 1

    def test_unknown_function_outside_grants_is_forbidden_not_not_found(self):
        invoke(self.web, "nope::x")
        [answer] = self.web.sent_of_type("invocationresult")
        assert answer["error"]["code"] == "FORBIDDEN"

    def test_denied_void_and_enqueue_calls_do_not_run(self):
        ran = []
        self.engine.register_function("state::set", ran.append)
        invoke(self.web, "state::set", {"a": 1}, invocation_id=None, action=VOID)
        invoke(self.web, "state::set", {"a": 1}, action={"type": "enqueue", "queue": "q"})
        assert ran == []
        [answer] = self.web.sent_of_type("invocationresult")
        assert answer["error"]["code"] == "FORBIDDEN"

    def test_a_worker_function_outside_grants(self):
        """A call forwarded to a worker is checked the same way."""
        self.backend.receive({"type": "registerfunction", "id": "orders::list"})
        invoke(self.web, "orders::list")
        assert self.backend.sent_of_type("invokefunction") == []
        assert self.web.sent_of_type("invocationresult")[0]["error"]["code"] == "FORBIDDEN"

    def test_non_worker_client_passes_its_session(self):
        """The console or any other client calls with session=: the same check."""
        s = Session(allowed_functions=["public::*"])
        f = self.failureResultOf(self.engine.call("state::get", {}, session=s),
                                 InvocationError)
        assert f.value.code == "FORBIDDEN"
        assert self.successResultOf(self.engine.call("public::hello", {}, session=s)) == "hi"

    def test_discovery_is_filtered(self):
        self.backend.receive({"type": "registerfunction", "id": "public::w"})
        self.backend.receive({"type": "registerfunction", "id": "private::w"})
        self.backend.receive({"type": "registertrigger", "id": "t1", "trigger_type": "cron",
                              "function_id": "private::w", "config": {}})
        invoke(self.web, "engine::functions::list")
        # engine::functions::list itself is not granted to web:
        assert self.web.sent_of_type("invocationresult")[0]["error"]["code"] == "FORBIDDEN"
        self.web.worker.session = Session(
            name="web", allowed_functions=["public::*", "engine::*"])
        self.web.pop_sent()
        invoke(self.web, "engine::functions::list")
        [answer] = self.web.sent_of_type("invocationresult")
        assert sorted(f["function_id"] for f in answer["result"]["functions"]) == [
            "public::hello", "public::w"]
        invoke(self.web, "engine::triggers::list", invocation_id="i2")
        assert self.web.sent_of_type("invocationresult")[1]["result"]["triggers"] == []
        invoke(self.backend, "engine::functions::list", invocation_id="i3")
        everything = self.backend.sent_of_type("invocationresult")[0]["result"]["functions"]
        assert {"private::w", "state::get"} <= {f["function_id"] for f in everything}

    def test_denied_registrations_are_refused_and_told(self):
        self.web.receive({"type": "registerfunction", "id": "public::mine"})
        assert "public::mine" not in self.engine.functions
        [told] = self.web.sent_of_type("registrationrejected")
        assert (told["code"], told["function_id"]) == ("FORBIDDEN", "public::mine")
        self.web.receive({"type": "registertriggertype", "id": "mytype"})
        assert "mytype" not in self.engine.trigger_types
        assert self.web.sent_of_type("registrationrejected")[1]["trigger_type_id"] == "mytype"
        assert self.engine.auth_stats.refused_registrations == 2

    def test_trigger_grants(self):
        """A trigger needs an allowed type and a function the session may call."""
        self.web.receive({"type": "registertrigger", "id": "t1", "trigger_type": "http",
                          "function_id": "public::hello", "config": {}})
        self.web.receive({"type": "registertrigger", "id": "t2", "trigger_type": "cron",
                          "function_id": "state::get", "config": {}})
        self.web.receive({"type": "registertrigger", "id": "t3", "trigger_type": "cron",
                          "function_id": "public::hello", "config": {}})
        assert set(self.engine.triggers) == {"t3"}
        errors = {m["id"]: m["error"] for m in
                  self.web.sent_of_type("triggerregistrationresult")}
        assert errors["t1"] == {"code": "FORBIDDEN",
                                "message": "trigger type 'http' not allowed for this session"}
        assert errors["t2"]["code"] == "FORBIDDEN"

    def test_registration_prefix(self):
        """Registered as prefix::id; the worker is invoked with its own id."""
        conn = connect(self.engine, session_from_answer(
            {"function_registration_prefix": "alice", "allowed_functions": ["alice::*"]}))
        conn.receive({"type": "registerfunction", "id": "echo"})
        assert "alice::echo" in self.engine.functions and "echo" not in self.engine.functions
        d = self.engine.call("alice::echo", {"x": 1})
        [sent] = conn.sent_of_type("invokefunction")
        assert sent["function_id"] == "echo"
        conn.receive({"type": "invocationresult", "invocation_id": sent["invocation_id"],
                      "function_id": "echo", "result": 7})
        assert self.successResultOf(d) == 7

    def test_middleware_sees_every_call_except_engine_builtins(self):
        seen = []

        def middleware(data):
            seen.append(data)
            return {"via": "middleware"}
        self.engine.register_function("mw::all", middleware)
        conn = connect(self.engine, Session(name="m", middleware_function_id="mw::all",
                                            context={"k": 1}))
        invoke(conn, "public::hello", {"a": 1})
        assert conn.sent_of_type("invocationresult")[0]["result"] == {"via": "middleware"}
        assert seen[0]["function_id"] == "public::hello"
        assert seen[0]["payload"]["a"] == 1 and seen[0]["context"] == {"k": 1}
        invoke(conn, "engine::functions::list", invocation_id="i2")
        assert "functions" in conn.sent_of_type("invocationresult")[1]["result"]
        assert len(seen) == 1


class OwnershipTests(SynchronousTestCase):
    def setUp(self):
        self.engine, _ = make_engine()

    def test_another_principal_cannot_take_a_function(self):
        a = connect(self.engine, Session(name="a"))
        b = connect(self.engine, Session(name="b"))
        a.receive({"type": "registerfunction", "id": "shared::f"})
        b.receive({"type": "registerfunction", "id": "shared::f"})
        assert self.engine.functions["shared::f"].owner is a.worker
        [told] = b.sent_of_type("registrationrejected")
        assert told["code"] == "FUNCTION_NAMESPACE_CONFLICT"
        assert told["owner_worker_id"] == a.worker_id
        b.receive({"type": "unregisterfunction", "id": "shared::f"})
        assert self.engine.functions["shared::f"].owner is a.worker

    def test_the_same_principal_may_replace_its_half_open_connection(self):
        old = connect(self.engine, Session(name="a"))
        new = connect(self.engine, Session(name="a"))
        old.receive({"type": "registerfunction", "id": "f"})
        new.receive({"type": "registerfunction", "id": "f"})
        assert self.engine.functions["f"].owner is new.worker

    def test_without_auth_the_last_writer_still_wins(self):
        old = FakeWorkerConnection.connect(self.engine)
        new = FakeWorkerConnection.connect(self.engine)
        old.receive({"type": "registerfunction", "id": "f"})
        new.receive({"type": "registerfunction", "id": "f"})
        assert self.engine.functions["f"].owner is new.worker

    def test_a_worker_never_takes_an_engine_function(self):
        self.engine.register_function("mine::f", lambda d: 1)
        w = FakeWorkerConnection.connect(self.engine)
        w.receive({"type": "registerfunction", "id": "mine::f"})
        assert self.engine.functions["mine::f"].owner is None
        assert w.sent_of_type("registrationrejected")[0]["function_id"] == "mine::f"

    def test_registertrigger_with_another_workers_id_does_not_take_it(self):
        a = connect(self.engine, Session(name="a"))
        b = connect(self.engine, Session(name="b"))
        a.receive({"type": "registerfunction", "id": "a::f"})
        b.receive({"type": "registerfunction", "id": "b::f"})
        a.receive({"type": "registertrigger", "id": "t", "trigger_type": "cron",
                   "function_id": "a::f", "config": {"expression": "a"}})
        b.receive({"type": "registertrigger", "id": "t", "trigger_type": "cron",
                   "function_id": "b::f", "config": {"expression": "b"}})
        trigger = self.engine.triggers["t"]
        assert (trigger.owner, trigger.function_id) == (a.worker, "a::f")
        assert "t" in a.worker.triggers and "t" not in b.worker.triggers
        [told] = b.sent_of_type("triggerregistrationresult")
        assert told["error"]["code"] == "FORBIDDEN"

    def test_an_engine_trigger_is_never_taken_by_a_worker(self):
        self.successResultOf(self.engine.register_trigger("sys", "cron", "x::y", {}))
        w = FakeWorkerConnection.connect(self.engine)
        w.receive({"type": "registertrigger", "id": "sys", "trigger_type": "cron",
                   "function_id": "evil", "config": {}})
        assert self.engine.triggers["sys"].function_id == "x::y"
        assert w.sent_of_type("triggerregistrationresult")[0]["error"]["code"] == "FORBIDDEN"

    def test_trigger_type_of_another_principal(self):
        a = connect(self.engine, Session(name="a"))
        b = connect(self.engine, Session(name="b"))
        a.receive({"type": "registertriggertype", "id": "webhook"})
        b.receive({"type": "registertriggertype", "id": "webhook"})
        assert self.engine.trigger_types["webhook"].owner is a.worker
        assert b.sent_of_type("registrationrejected")[0]["trigger_type_id"] == "webhook"

    def test_caller_worker_id_is_the_engines_on_every_path(self):
        """A sender cannot pick _caller_worker_id, with or without an enqueue action."""
        from iii_twisted.discovery import register_engine_functions  # noqa: F401
        victim = FakeWorkerConnection.connect(self.engine)
        self.engine.call("engine::workers::register",
                         {"_caller_worker_id": victim.worker_id, "name": "victim",
                          "runtime": "python"})
        attacker = FakeWorkerConnection.connect(self.engine)
        seen = []
        self.engine.register_function("spy", seen.append)
        for action in (None, VOID, {"type": "enqueue", "queue": "q"}):
            extra = {} if action is None else {"action": action}
            invoke(attacker, "engine::workers::register",
                   {"_caller_worker_id": victim.worker_id, "name": "evil",
                    "runtime": "evil"}, **extra)
            invoke(attacker, "spy", {"_caller_worker_id": victim.worker_id}, **extra)
        assert (victim.worker.name, victim.worker.runtime) == ("victim", "python")
        assert attacker.worker.name == "evil"
        assert all(s.get("_caller_worker_id") in (attacker.worker_id, None) for s in seen)


# -- the service: listeners, the start-up report, reload --------------------------------


def test_rbac_without_auth_function_admits_everyone_limited_to_exposed():
    """The reference's rbac: without auth_function_id: everyone in, exposed functions only."""
    from iii_twisted.auth import parse_listener_auth

    engine, clock = make_engine()
    config = parse_listener_auth(None, {"expose_functions": ['match("api::*")']}, None)
    session = Authenticator(engine, config, clock).authenticate({}, {}, "1.1.1.1")
    s = []
    session.addCallback(s.append)
    assert s[0].may_call("api::x") and not s[0].may_call("state::get")
    assert s[0].may_call("engine::workers::register")
    only_mw = parse_listener_auth(None, None, "mw::x")
    d = Authenticator(engine, only_mw, clock).authenticate({}, {}, "1.1.1.1")
    d.addCallback(s.append)
    assert s[1].may_call("state::get") and s[1].middleware_function_id == "mw::x"
    assert not config.authenticated


def test_service_with_a_trusted_and_a_public_listener():
    """Each listener its own port and auth; the report says which is authenticated."""
    from twisted.internet.testing import MemoryReactorClock

    from iii_twisted.report import startup_report
    from iii_twisted.service import EngineService

    reactor = MemoryReactorClock()
    service = EngineService({
        "listeners": [
            {"name": "trusted", "listen": "tcp:4001:interface=127.0.0.1"},
            {"name": "public", "port": 4002,
             "auth": {"tokens": [{"name": "web", "token": "p" * 32}]}},
        ]}, reactor=reactor)
    service.privilegedStartService()
    service.startService()
    try:
        assert sorted((p, i) for p, f, b, i in reactor.tcpServers) == [
            (4001, "127.0.0.1"), (4002, "0.0.0.0")]
        trusted, public = service.worker_factories
        assert trusted.authenticator is None
        assert public.authenticator.config.tokens[0].name == "web"
        report = "\n".join(startup_report(service))
        assert "worker trusted listens on tcp:4001:interface=127.0.0.1, unauthenticated" \
            in report
        assert "worker public listens on tcp:4002:interface=0.0.0.0, authenticated" in report
    finally:
        service.stopService()


def test_reload_applies_new_tokens_and_keeps_connected_sessions():
    from twisted.internet.testing import MemoryReactorClock

    from iii_twisted.service import EngineService

    def config(token):
        return {"port": 4003, "auth": {"tokens": [{"name": "web", "token": token}]}}
    reactor = MemoryReactorClock()
    service = EngineService(config("a" * 32), reactor=reactor)
    service.privilegedStartService()
    service.startService()
    try:
        conn = connect(service.engine, Session(name="web"))
        results = []
        service.reload(config("b" * 32)).addBoth(results.append)
        assert results and results[0].listener
        authenticator = service.worker_factory.authenticator
        refused = authenticator.authenticate({}, {"token": ["a" * 32]}, "x")
        refused.addErrback(lambda f: results.append(f.check(AuthRefused)))
        assert results[-1] is AuthRefused
        ok = []
        authenticator.authenticate({}, {"token": ["b" * 32]}, "x").addCallback(ok.append)
        assert ok[0].name == "web"
        assert conn.worker.id in service.engine.workers
        # The same config again changes nothing.
        again = []
        service.reload(config("b" * 32)).addBoth(again.append)
        assert not again[0].listener
    finally:
        service.stopService()


class CurrentDiscoveryTests(SynchronousTestCase):
    """The discovery functions since reference 0.13 answer per session too."""

    def setUp(self):
        self.engine, _ = make_engine()
        self.engine.register_function("public::a", lambda d: 1)
        self.engine.register_function("private::b", lambda d: 2)
        self.session = Session(name="web", allowed_functions=["public::*", "engine::*"],
                               allowed_trigger_types=["cron"])

    def call(self, function_id, data):
        return self.engine.call(function_id, data, session=self.session)

    def test_functions_info(self):
        f = self.failureResultOf(self.call("engine::functions::info",
                                           {"function_id": "private::b"}), InvocationError)
        assert f.value.code == "FORBIDDEN"
        batch = self.successResultOf(self.call(
            "engine::functions::info", {"function_ids": ["public::a", "private::b", "x"]}))
        assert [f.get("error") for f in batch["functions"]] == [None, "forbidden",
                                                                 "not_found"]

    def test_registered_triggers_and_register_trigger(self):
        self.successResultOf(self.engine.register_trigger("t1", "cron", "private::b", {}))
        self.successResultOf(self.engine.register_trigger("t2", "cron", "public::a", {}))
        listed = self.successResultOf(self.call("engine::registered-triggers::list", {}))
        assert [t["id"] for t in listed["registered_triggers"]] == ["t2"]
        for data, words in (({"trigger_type": "http", "function_id": "public::a"},
                             "Trigger type 'http' is not allowed"),
                            ({"trigger_type": "cron", "function_id": "private::b"},
                             "function 'private::b' not allowed")):
            f = self.failureResultOf(self.call("engine::register_trigger", data),
                                     InvocationError)
            assert f.value.code == "FORBIDDEN" and words in f.value.message
        assert self.successResultOf(self.call(
            "engine::register_trigger", {"trigger_type": "cron", "function_id": "public::a",
                                         "config": {}}))["id"]


def test_reattach_needs_the_same_principal():
    """With auth, another token's connection cannot retire a worker, even with its token."""
    engine, _ = make_engine()
    victim = connect(engine, Session(name="backend"))
    other = connect(engine, Session(name="web"))
    other.receive({"type": "reattach", "previous_worker_id": victim.worker_id,
                   "reattach_token": victim.worker.reattach_token})
    assert victim.worker_id in engine.workers and victim.closed is None
    same = connect(engine, Session(name="backend"))
    same.receive({"type": "reattach", "previous_worker_id": victim.worker_id,
                  "reattach_token": victim.worker.reattach_token})
    assert victim.worker_id not in engine.workers


def test_prefixed_registrations_unregister_and_trigger_by_the_workers_own_id():
    engine, _ = make_engine()
    conn = connect(engine, session_from_answer(
        {"function_registration_prefix": "p", "allowed_functions": ["p::*"],
         "allow_trigger_type_registration": True}))
    conn.receive({"type": "registerfunction", "id": "f"})
    conn.receive({"type": "registertrigger", "id": "t", "trigger_type": "cron",
                  "function_id": "f", "config": {}})
    assert engine.triggers["t"].function_id == "p::f"
    conn.receive({"type": "unregisterfunction", "id": "f"})
    assert "p::f" not in engine.functions


def test_restricted_session_and_namespaced_calls():
    """Grants cover the default namespace, as the reference's allowed_functions."""
    engine, _ = make_engine()
    engine.register_function("public::a", lambda d: 1)
    conn = connect(engine, Session(name="web", allowed_functions=["public::*"]))
    invoke(conn, "public::a", {}, namespace="default")
    invoke(conn, "public::a", {}, invocation_id="i2", namespace="team")
    first, second = conn.sent_of_type("invocationresult")
    assert first["result"] == 1
    assert second["error"] == {"code": "FORBIDDEN", "message":
                               "function 'public::a' not allowed in namespace 'team'"}


# -- the reference's registration hooks --------------------------------------------------


class RegistrationHookTests(SynchronousTestCase):
    def setUp(self):
        self.engine, self.clock = make_engine(invocation_timeout=30)
        self.engine.register_function("public::x", lambda d: 1)
        self.asked = []
        self.pending = []

        def hook(data):
            self.asked.append(data)
            d = Deferred()
            self.pending.append(d)
            return d
        self.engine.register_function("hook::reg", hook)
        hooks = {"registerfunction": "hook::reg", "registertrigger": "hook::reg",
                 "registertriggertype": "hook::reg"}
        self.conn = connect(self.engine, Session(name="w", context={"team": "a"},
                                                 hooks=hooks, hook_timeout=2.0))

    def test_function_hook_rewrites_and_later_messages_wait(self):
        self.conn.receive({"type": "registerfunction", "id": "f", "description": "d"})
        # A call right behind the registration waits for the hook, then finds it.
        invoke(self.conn, "engine::functions::list", {})
        assert self.asked == [{"function_id": "f", "description": "d", "metadata": None,
                               "namespace": "default", "context": {"team": "a"}}]
        assert "f" not in self.engine.functions
        assert self.conn.sent_of_type("invocationresult") == []
        self.pending[0].callback({"function_id": "team_a::f", "description": "hooked"})
        assert self.engine.functions["team_a::f"].description == "hooked"
        [listed] = self.conn.sent_of_type("invocationresult")
        assert "team_a::f" in {f["function_id"] for f in listed["result"]["functions"]}

    def test_a_non_object_answer_or_a_timeout_refuses_and_tells(self):
        self.conn.receive({"type": "registerfunction", "id": "f"})
        self.pending[0].callback(None)
        assert "f" not in self.engine.functions
        [told] = self.conn.sent_of_type("registrationrejected")
        assert (told["code"], told["function_id"]) == ("FORBIDDEN", "f")
        self.conn.receive({"type": "registertrigger", "id": "t", "trigger_type": "cron",
                           "function_id": "public::x", "config": {}})
        self.conn.receive({"type": "ping"})
        assert self.conn.sent_of_type("pong") == []
        self.clock.advance(2)
        assert "t" not in self.engine.triggers
        [result] = self.conn.sent_of_type("triggerregistrationresult")
        assert result["error"]["code"] == "FORBIDDEN"
        assert len(self.conn.sent_of_type("pong")) == 1

    def test_trigger_and_trigger_type_hooks(self):
        self.conn.receive({"type": "registertriggertype", "id": "hooked-type",
                           "description": "d"})
        assert self.asked[-1] == {"trigger_type_id": "hooked-type", "description": "d",
                                  "context": {"team": "a"}}
        self.pending[-1].callback({"trigger_type_id": "renamed-type"})
        assert "renamed-type" in self.engine.trigger_types
        self.conn.receive({"type": "registertrigger", "id": "t", "trigger_type": "cron",
                           "function_id": "public::x", "config": {"a": 1}})
        assert self.asked[-1]["config"] == {"a": 1}
        self.pending[-1].callback({"config": {"a": 2}})
        assert self.engine.triggers["t"].config == {"a": 2}

    def test_the_worker_leaving_while_held(self):
        self.conn.receive({"type": "registerfunction", "id": "f"})
        self.conn.disconnect()
        self.pending[0].callback({})
        assert "f" not in self.engine.functions


def test_hook_config_keys():
    from iii_twisted.auth import parse_listener_auth

    config = parse_listener_auth(None, {"auth_function_id": "a",
                                        "on_trigger_registration_function_id": "h"}, None)
    assert config.hooks == {"registertrigger": "h"}
    config = parse_auth_config({"tokens": [{"name": "x", "token": "y" * 20}],
                                "on_function_registration_function_id": "h2"})
    assert config.hooks == {"registerfunction": "h2"}
