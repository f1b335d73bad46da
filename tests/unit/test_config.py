"""iii-config.yaml loading, expansion and validation (iii_twisted.config, iii_twisted.tap)."""

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from iii_twisted import tap
from iii_twisted.config import ConfigError, load_config, parse_config

ENV = {"PORT": "4000", "EMPTY": ""}


def parse(text, environ=ENV):
    return parse_config(text, source="test.yaml", environ=environ)


def test_defaults():
    """An empty file means port 49134 on all interfaces and no modules."""
    config = parse("")
    assert config.port == 49134
    assert config.listen == "tcp:49134:interface=0.0.0.0"
    assert config.modules == []


def test_port_zero_means_default():
    """As in the reference, port 0 is the default port."""
    assert parse("port: 0").port == 49134


def test_env_expansion_types_plain_scalars():
    """A plain scalar that is one ${...} takes the type of its value."""
    config = parse("port: ${PORT}\ninvocation_timeout_ms: ${TIMEOUT:1500}")
    assert config.port == 4000
    assert config.invocation_timeout == 1.5


def test_env_expansion_in_strings():
    """${VAR:default} works inside longer strings; defaults may hold colons; empty is kept."""
    config = parse(
        "modules:\n"
        "  - class: modules::observability::OtelModule\n"
        "    config:\n"
        "      headers:\n"
        "        url: redis://${HOST:localhost}:${PORT}/0\n"
        "        quoted: '${PORT}'\n"
        "        fallback: ${NOPE:redis://h:6379/0}\n"
        "        empty: ${EMPTY:x}\n"
        "        blank_default: ${NOPE2:}\n")
    [(name, module_config, key)] = config.modules
    assert module_config["headers"] == {"url": "redis://localhost:4000/0", "quoted": "4000",
                             "fallback": "redis://h:6379/0", "empty": "", "blank_default": ""}
    assert key == "modules[0]"


def test_comments_are_not_expanded():
    """An unset variable in a comment is harmless (deviation: the reference aborts)."""
    assert parse("port: 1234  # ${UNSET_IN_COMMENT}").port == 1234


def test_unset_variable_names_file_and_key():
    """An unset ${VAR} without default is an error naming the file, key and variable."""
    with pytest.raises(ConfigError) as e:
        parse("modules:\n  - class: modules::worker::WorkerModule\n    config:\n      x: ${MISSING}\n")
    assert str(e.value).startswith("test.yaml, key modules[0].config.x: environment variable MISSING")


@pytest.mark.parametrize("text, key, words", [
    ("port: [1]", "port", "must be an integer"),
    ("port: true", "port", "must be an integer"),
    ("port: 70000", "port", "between 0 and 65535"),
    ("modules: {}", "modules", "must be a list"),
    ("modules: [3]", "modules[0]", "mapping with a class"),
    ("modules: [{config: {}}]", "modules[0].class", "missing"),
    ("modules: [{class: modules::nope::Nope}]", "modules[0].class", "unknown module class"),
    ("modules: [{class: modules::worker::WorkerModule, config: 3}]", "modules[0].config",
     "must be a mapping"),
    ("workers: [{class: x}]", "workers[0].class", "unknown module class"),
])
def test_bad_values_name_the_key(text, key, words):
    """Each unusable value is reported with the key it sits under."""
    with pytest.raises(ConfigError) as e:
        parse(text)
    assert e.value.key == key
    assert words in str(e.value)


def test_bad_yaml_names_the_file():
    """Invalid YAML is reported with the file name."""
    with pytest.raises(ConfigError, match="test.yaml: invalid YAML"):
        parse("port: [1\n")


def test_not_a_mapping():
    """A file holding a list is refused."""
    with pytest.raises(ConfigError, match="must hold a mapping"):
        parse("- 1\n")


def test_missing_file(tmp_path):
    """A missing file is an error naming it."""
    path = str(tmp_path / "none.yaml")
    with pytest.raises(ConfigError, match="none.yaml: cannot read config file"):
        load_config(path)


def test_options_load_the_config(tmp_path):
    """twistd's Options load and validate the file given with --config."""
    path = tmp_path / "c.yaml"
    path.write_text("port: 5555\n")
    options = tap.Options()
    options.parseOptions(["--config", str(path)])
    assert options["config"] == str(path)
    assert options["engine_config"].port == 5555


def test_options_refuse_a_bad_config(tmp_path, capsys):
    """A bad config is one line on stderr and exit status 1, no usage text."""
    path = tmp_path / "c.yaml"
    path.write_text("modules: [{class: modules::nope::Nope}]\n")
    with pytest.raises(SystemExit) as e:
        tap.Options().parseOptions(["-c", str(path)])
    assert e.value.code == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("iii: error: {}, key modules[0].class: unknown".format(path))
    assert err.count("\n") == 1


def test_options_debug_raises_the_error(tmp_path):
    """--debug lets the ConfigError (and its traceback) through."""
    path = tmp_path / "c.yaml"
    path.write_text("modules: [{class: modules::nope::Nope}]\n")
    with pytest.raises(ConfigError):
        tap.Options().parseOptions(["--debug", "-c", str(path)])


def test_version(capsys):
    """twistd iii --version prints the engine's version."""
    from iii_twisted import __version__
    with pytest.raises(SystemExit) as e:
        tap.Options().parseOptions(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == "iii-twisted {}\n".format(__version__)


def test_check_config(tmp_path, capsys):
    """--check-config validates a file, says what it holds, and exits 0 (1 if bad)."""
    good = tmp_path / "good.yaml"
    good.write_text("workers:\n  - name: iii-worker-manager\n    config: {port: 5000}\n"
                    "  - name: http\n")
    with pytest.raises(SystemExit) as e:
        tap.Options().parseOptions(["--check-config", str(good)])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "valid (current format)" in out and "tcp:5000" in out and "iii-http" in out
    two = tmp_path / "two.yaml"
    two.write_text("listeners:\n  - name: trusted\n    listen: 'unix:/tmp/t.sock'\n"
                   "  - name: public\n    listen: 'tcp:0'\n")
    with pytest.raises(SystemExit) as e:
        tap.Options().parseOptions(["--check-config", str(two)])
    assert "unix:/tmp/t.sock (trusted), tcp:0 (public)" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("workers:\n  - name: htp\n")
    with pytest.raises(SystemExit) as e:
        tap.Options().parseOptions(["--check-config", str(bad)])
    assert e.value.code == 1
    assert "did you mean http?" in capsys.readouterr().err


def test_make_service_binds_the_worker_port(tmp_path):
    """makeService wires the worker listener on the configured endpoint."""
    path = tmp_path / "c.yaml"
    path.write_text("port: 5555\nhost: 127.0.0.1\n")
    options = tap.Options()
    options.parseOptions(["-c", str(path)])
    reactor = MemoryReactorClock()
    service = tap.makeService(options, reactor=reactor)
    service.privilegedStartService()
    service.startService()
    [(port, factory, backlog, interface)] = reactor.tcpServers
    assert (port, interface) == (5555, "127.0.0.1")
    assert factory is service.worker_factory
    service.stopService()


def test_convert_option(tmp_path, capsys):
    """--convert prints the file in the other format and exits 0."""
    path = tmp_path / "c.yaml"
    path.write_text("port: 5000\nmodules:\n  - class: modules::cron::CronModule\n")
    with pytest.raises(SystemExit) as e:
        tap.Options().parseOptions(["--convert", str(path)])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "workers:\n- name: iii-worker-manager\n  config:\n    port: 5000\n" \
        "- name: iii-cron\n" in out
    converted = tmp_path / "d.yaml"
    converted.write_text(out)
    assert load_config(str(converted)).port == 5000


def test_describe_config(capsys):
    """--describe-config lists every key with its type, range and default."""
    with pytest.raises(SystemExit) as e:
        tap.Options().parseOptions(["--describe-config"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "  port (an integer, 0..65535, default 49134): TCP port workers" in out
    assert "iii-http / http (modules::api::RestApiModule, " \
        "modules::rest_api::RestApiModule):\n  port (an integer, 0..65535, default 3111)" in out
    assert "name: kv (v0.10 class: modules::state::adapters::KvStore), config:" in out
    # Keys checked outside the schema are listed too.
    assert "listeners, a list of listeners" in out and "  name (a string)" in out
    assert "  auth keys: tokens, auth_function_id," in out
    assert "  auth.tokens[] keys: name, token, allowed_functions," in out
