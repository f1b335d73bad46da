"""The ``cluster:`` section: parsing, errors naming the key, the tools, reload."""

import pytest
from twisted.internet.testing import MemoryReactorClock

from iii_twisted import tap
from iii_twisted.cluster.directory import MemoryDirectory, MemoryRegistry
from iii_twisted.cluster.settings import DEFAULT_TRIGGER_TYPES
from iii_twisted.config import ConfigError, from_dict, parse_config
from iii_twisted.convert import convert_text
from iii_twisted.service import EngineService

CLUSTER = {"redis_url": "redis://127.0.0.1:6379", "secret": "s"}


def test_without_the_section_nothing_changes():
    """No cluster: section, no membership, no link listener."""
    assert from_dict({}).cluster is None
    service = EngineService({}, reactor=MemoryReactorClock())
    assert service.cluster is None and service.engine.cluster is None
    assert service.engine.registry_watchers == []


def test_defaults():
    """Defaults suit engines on one machine."""
    cluster = from_dict({"cluster": CLUSTER}).cluster
    assert cluster.secret == "s" and cluster.redis_url == "redis://127.0.0.1:6379"
    assert cluster.listen == "tcp:0:interface=127.0.0.1"
    assert cluster.advertise is None
    assert (cluster.heartbeat, cluster.member_ttl) == (1.0, 3.0)
    assert ":" in cluster.name  # hostname:pid
    assert cluster.trigger_types == frozenset(DEFAULT_TRIGGER_TYPES)


def test_both_formats_and_every_key():
    """The current format reads the section too, with every key."""
    text = ("workers:\n  - name: iii-worker-manager\ncluster:\n"
            "  redis_url: redis://r:1\n  secret_env: MY_SECRET\n"
            "  listen: 'ssl:7000:privateKey=k.pem'\n  advertise: 'tls:a.example:7000'\n"
            "  name: api-1\n  heartbeat_ms: 500\n  member_ttl_ms: 2000\n"
            "  trigger_types: [http]\n")
    import os
    os.environ["MY_SECRET"] = "from-env"
    try:
        cluster = parse_config(text).cluster
    finally:
        del os.environ["MY_SECRET"]
    assert (cluster.secret, cluster.name, cluster.heartbeat, cluster.member_ttl) == \
        ("from-env", "api-1", 0.5, 2.0)
    assert (cluster.listen, cluster.advertise) == ("ssl:7000:privateKey=k.pem",
                                                   "tls:a.example:7000")
    assert cluster.trigger_types == frozenset(["http"])


def test_env_expansion_of_the_secret():
    config = parse_config("cluster:\n  redis_url: redis://r\n  secret: ${S}\n",
                          environ={"S": "xyz"})
    assert config.cluster.secret == "xyz"


@pytest.mark.parametrize("section, key, text", [
    ({"redis_url": "r"}, "cluster.secret", "shared secret"),
    ({"redis_url": "r", "secret": ""}, "cluster.secret", "shared secret"),
    ({"secret": "s"}, "cluster.redis_url", "redis_url"),
    ({"redis_url": "r", "secret_env": "III_SURELY_UNSET_VAR"}, "cluster.secret_env",
     "III_SURELY_UNSET_VAR"),
    ({"redis_url": "r", "secret": "s", "secret_env": "X"}, "cluster.secret_env", "not both"),
    (dict(CLUSTER, listen="unix:/tmp/x"), "cluster.advertise", "unix"),
    (dict(CLUSTER, heartbeat_ms=3000), "cluster.member_ttl_ms", "heartbeat_ms"),
    (dict(CLUSTER, sekret="x"), "cluster.sekret", "did you mean 'secret'"),
    (dict(CLUSTER, heartbeat_ms="fast"), "cluster.heartbeat_ms", "integer"),
])
def test_errors_name_the_key(section, key, text):
    with pytest.raises(ConfigError) as e:
        from_dict({"cluster": section})
    assert e.value.key == key
    assert text in str(e.value)


def test_check_config_says_it_is_a_member(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("cluster:\n  redis_url: redis://r:6379\n  secret: s\n  name: m1\n")
    with pytest.raises(SystemExit) as e:
        tap.Options().parseOptions(["--check-config", str(path)])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "cluster member 'm1', links on tcp:0:interface=127.0.0.1, membership in " \
        "redis://r:6379" in out


def test_describe_config_lists_the_section(capsys):
    with pytest.raises(SystemExit):
        tap.Options().parseOptions(["--describe-config"])
    out = capsys.readouterr().out
    assert "cluster" in out and "member_ttl_ms" in out and "secret_env" in out


@pytest.mark.parametrize("text", [
    "port: 5000\ncluster:\n  redis_url: redis://r\n  secret: ${S:x}\n  name: m\n",
    "workers:\n  - name: iii-worker-manager\ncluster:\n  redis_url: redis://r\n"
    "  secret: s\n  heartbeat_ms: 200\n",
])
def test_convert_keeps_the_section(text):
    _, converted = convert_text(text, "f.yaml")
    assert parse_config(converted).cluster.settings() == \
        parse_config(text).cluster.settings()
    assert "cluster:" in converted


def test_a_member_gets_a_link_listener_and_joins():
    """makeService-style wiring on a memory reactor: the listener, then the join."""
    reactor = MemoryReactorClock()
    registry = MemoryRegistry()
    service = EngineService({"listen": "tcp:0:interface=127.0.0.1",
                             "cluster": dict(CLUSTER, name="m1")},
                            reactor=reactor, cluster_directory=MemoryDirectory(registry))
    service.startService()
    ports = [port for port, factory, _, _ in reactor.tcpServers
             if factory is service.cluster.factory]
    assert ports == [0]
    [member] = registry.members.values()
    assert member.name == "m1" and member.engine_id == service.cluster.engine_id
    assert member.address.startswith("tcp:127.0.0.1:")
    service.stopService()
    assert registry.members == {}


def test_reload_keeps_the_membership_and_says_a_restart_is_needed():
    from iii_twisted.testing import log_lines

    reactor = MemoryReactorClock()
    service = EngineService({"listen": "tcp:0:interface=127.0.0.1",
                             "cluster": dict(CLUSTER, name="m1")},
                            reactor=reactor,
                            cluster_directory=MemoryDirectory(MemoryRegistry()))
    running = service.config.cluster
    with log_lines() as lines:
        d = service.reload({"listen": "tcp:0:interface=127.0.0.1",
                            "cluster": dict(CLUSTER, name="m2")})
    changes = []
    d.addCallback(changes.append)
    assert "cluster (not applied: a cluster: change needs a restart)" in \
        changes[0].describe()
    assert service.config.cluster is running
    assert any("needs a restart" in line for line in lines)


def test_without_the_redis_extra_start_and_check_config_name_it(monkeypatch, tmp_path,
                                                                capsys):
    """
    A cluster keeps its membership in Redis: without txredisapi (the ``redis``
    extra) the engine refuses to start, and --check-config refuses the file, naming
    the extra to install.
    """
    import sys

    from iii_twisted.cluster.wiring import redis_directory

    monkeypatch.setitem(sys.modules, "txredisapi", None)
    monkeypatch.delitem(sys.modules, "iii_twisted.redis_client", raising=False)
    monkeypatch.delitem(sys.modules, "iii_twisted.cluster.redis_directory",
                        raising=False)
    settings = from_dict({"cluster": CLUSTER}).cluster
    with pytest.raises(ConfigError) as info:
        redis_directory(settings, MemoryReactorClock())
    assert info.value.key == "cluster.redis_url"
    assert 'pip install "iii-twisted[redis]"' in str(info.value)
    path = tmp_path / "c.yaml"
    path.write_text("cluster:\n  redis_url: redis://127.0.0.1:6379\n  secret: s\n")
    with pytest.raises(SystemExit) as exit_:
        tap.Options().parseOptions(["--check-config", str(path)])
    assert exit_.value.code == 1
    assert 'pip install "iii-twisted[redis]"' in capsys.readouterr().err
