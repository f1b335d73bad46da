"""
The log as an operator reads it (iii_twisted.logsetup and the REST access log):
log_level, no "Starting factory <... at 0x...>" lines, text by default under twist,
an access log that is off unless switched on, Prometheus scrapes never logged.
"""

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import (
    LogLevel, LogPublisher, Logger, globalLogPublisher, jsonFileLogObserver,
    textFileLogObserver,
)
from twisted.web.resource import Resource
from twisted.web.test.requesthelper import DummyRequest

from iii_twisted.config import ConfigError, from_dict
from iii_twisted.logsetup import LogSettingsService, QuietSite, configure_twist

from test_http_api import Api


def _setup(level):
    publisher = LogPublisher()
    seen = []
    publisher.addObserver(seen.append)
    settings = LogSettingsService(level, publisher)
    settings.apply()
    return publisher, settings, seen


def test_log_level_and_factory_noise():
    publisher, settings, seen = _setup("warn")
    log = Logger(observer=publisher)
    log.info("routine")
    log.warn("attention")
    log.error("broken")
    log.info("Starting factory {factory!r}", factory=object())
    assert [e["log_format"] for e in seen] == ["attention", "broken"]
    settings.set_level("debug")
    log.debug("details")
    log.info("Stopping factory {factory!r}", factory=object())
    assert seen[-1]["log_format"] == "details"
    settings.restore()
    log.debug("unfiltered")
    assert seen[-1]["log_format"] == "unfiltered"


def test_log_level_and_format_are_checked_config_keys():
    config = from_dict({"log_level": "debug", "log_format": "json"})
    assert (config.log_level, config.log_format) == ("debug", "json")
    assert (from_dict({}).log_level, from_dict({}).log_format) == ("info", "text")
    with pytest.raises(ConfigError) as e:
        from_dict({"log_level": "verbose"})
    assert "log_level" in str(e.value) and "debug, info, warn" in str(e.value)
    with pytest.raises(ConfigError) as e:
        from_dict({"log_format": 1})
    assert "log_format" in str(e.value)


class _TwistOptions(dict):
    """What configure_twist reads of twist's options (they are a dict)."""


def _twist(fmt="json"):
    options = _TwistOptions(logLevel=LogLevel.info, logFormat=fmt,
                            fileLogObserverFactory=jsonFileLogObserver)
    return options


def test_twist_writes_text_when_not_on_a_terminal():
    """Reported: twist iii under Docker/systemd wrote raw JSON events."""
    import io

    options = _twist()
    configure_twist(options, "warn", "text", argv=["iii", "--config", "x.yaml"])
    assert options["logLevel"] == LogLevel.warn
    assert options["logFormat"] == "text"
    out = io.StringIO()
    observer = options["fileLogObserverFactory"](out)
    observer({"log_format": "hello {x}", "x": 1, "log_level": LogLevel.info,
              "log_time": 0, "log_namespace": "t"})
    observer({"log_format": "Starting factory {f!r}", "f": 1, "log_level": LogLevel.info,
              "log_time": 0, "log_namespace": "t"})
    assert "hello 1" in out.getvalue() and "{" not in out.getvalue()
    assert "Starting factory" not in out.getvalue()


def test_twist_command_line_wins_and_twistd_is_left_alone():
    options = _twist()
    configure_twist(options, "debug", "text",
                    argv=["--log-format=json", "--log-level", "error", "iii"])
    assert options["fileLogObserverFactory"] is jsonFileLogObserver
    assert options["logLevel"] == LogLevel.info
    twistd_options = {"nodaemon": True}
    configure_twist(twistd_options, "debug", "json", argv=[])
    assert twistd_options == {"nodaemon": True}
    configure_twist(None, "debug", "json", argv=[])


def _access_lines(**config):
    api = Api(**config)
    api.route("f", {"api_path": "x", "http_method": "GET"})
    lines = []

    def observe(event):
        if event.get("log_namespace") == "iii.access":
            from twisted.logger import formatEvent
            lines.append(formatEvent(event))
    globalLogPublisher.addObserver(observe)
    try:
        protocol = api.module.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.9.8.7", 5555))
        protocol.makeConnection(transport)
        protocol.dataReceived(b"GET /x?q=1 HTTP/1.1\r\nHost: x\r\nUser-Agent: curl/8\r\n\r\n")
        [call] = api.invocations()
        api.clock.advance(0.25)
        api.answer(call, {"status_code": 201, "body": {"ok": True}})
        assert transport.value().startswith(b"HTTP/1.1 201 ")
    finally:
        globalLogPublisher.removeObserver(observe)
    return lines


def test_access_log_is_off_by_default():
    assert _access_lines() == []


def test_access_log_one_line_per_request():
    [line] = _access_lines(access_log=True)
    assert line == '10.9.8.7 "GET /x?q=1 HTTP/1.1" 201 11B 250.0ms "curl/8"'


def test_access_log_must_be_a_boolean():
    with pytest.raises(ConfigError) as e:
        Api(access_log="yes")
    assert "access_log" in str(e.value)


def test_prometheus_site_logs_no_scrape():
    site = QuietSite(Resource())
    assert site.noisy is False
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        site.log(DummyRequest([b"metrics"]))
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert events == []


def test_autobahn_per_connection_lines_are_bounded_per_minute():
    """
    A thousand failed upgrades (wrong tokens) write at most 10 of Autobahn's own
    failure lines a minute; other events pass; a new minute lets lines through again.
    """
    from twisted.logger import PredicateResult

    from iii_twisted.logsetup import PerConnectionLines

    limit = PerConnectionLines(limit=10, window=60.0)

    def failed(t):
        return limit({"log_format": "failing WebSocket opening handshake ('{reason}')",
                      "reason": "Unauthorized", "log_time": t})

    def dropped(t):
        return limit({"log_format": "dropping connection to peer {peer} with "
                                    "abort={abort}: {reason}", "log_time": t})

    kept = [r for i in range(500) for r in (failed(1000 + i * 0.01),
                                            dropped(1000 + i * 0.01))
            if r is PredicateResult.maybe]
    assert len(kept) == 10
    other = limit({"log_format": "worker {worker} registered", "log_time": 1001.0})
    assert other is PredicateResult.maybe
    assert failed(1061.0) is PredicateResult.maybe
