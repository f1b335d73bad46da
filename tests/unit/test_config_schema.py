"""
Strict validation of every module's config, in both file formats (table-driven: the
file's text, the error it must give), and the two formats loading into one model.
"""

import pytest

from iii_twisted.config import ConfigError, parse_config
from iii_twisted.convert import convert_text
from iii_twisted.schema import Key, Section


def parse(text):
    return parse_config(text, source="f.yaml", environ={})


def v010(iii_class, config):
    return "modules:\n  - class: {}\n    config:\n{}".format(
        iii_class, "".join("      " + line + "\n" for line in config.splitlines()))


def current(name, config):
    return "workers:\n  - name: {}\n    config:\n{}".format(
        name, "".join("      " + line + "\n" for line in config.splitlines()))


# (module class, current name, config text, expected error: key path below config and
# words of the message). Each row is checked in both formats.
MODULE_ERRORS = [
    # HTTP API
    ("modules::api::RestApiModule", "iii-http", "prot: 3111",
     "prot", "unknown key 'prot'; did you mean 'port'?"),
    ("modules::api::RestApiModule", "http", "port: 70000",
     "port", "must be between 0 and 65535, not 70000"),
    ("modules::api::RestApiModule", "iii-http", "port: '3111'",
     "port", "must be an integer, not a string ('3111')"),
    ("modules::api::RestApiModule", "iii-http", "default_timeout: 0",
     "default_timeout", "must be at least 1"),
    ("modules::api::RestApiModule", "iii-http", "cors: {allowed_origin: ['*']}",
     "cors.allowed_origin", "did you mean 'allowed_origins'?"),
    ("modules::api::RestApiModule", "iii-http", "cors: {allowed_methods: [1]}",
     "cors.allowed_methods[0]", "must be a string"),
    ("modules::api::RestApiModule", "iii-http", "cors:\n  allowed_origins: []\n  port: 1",
     "cors.port", "it belongs in"),
    # state
    ("modules::state::StateModule", "iii-state", "adaptor: {}",
     "adaptor", "did you mean 'adapter'?"),
    ("modules::state::StateModule", "state", "adapter: {config: {store_methd: x}}",
     "adapter.config.store_methd", "did you mean 'store_method'?"),
    ("modules::state::StateModule", "state",
     "adapter: {config: {store_method: on_disk}}",
     "adapter.config.store_method", "must be one of in_memory, file_based"),
    ("modules::state::StateModule", "state", "adapter: {config: {save_interval_ms: -1}}",
     "adapter.config.save_interval_ms", "must be at least 0"),
    # stream
    ("modules::stream::StreamModule", "iii-stream", "host: [1]",
     "host", "must be a string, not a list"),
    ("modules::stream::StreamModule", "iii-stream",
     "adapter: {config: {channel_size: 0}}",
     "adapter.config.channel_size", "must be at least 1"),
    ("modules::stream::StreamModule", "iii-stream", "host: localhost",
     "host", "must be an IP address"),
    ("modules::stream::StreamModule", "iii-stream", "auth_fn: x",
     "auth_fn", "unknown key 'auth_fn'"),
    # pub/sub
    ("modules::pubsub::PubSubModule", "pubsub", "adapter: {config: {x: 1}}",
     "adapter.config.x", "unknown key 'x'; known keys: none"),
    ("modules::pubsub::PubSubModule", "iii-pubsub", "topics: []",
     "topics", "unknown key 'topics'"),
    # queue
    ("modules::queue::QueueModule", "queue", "adapter: {config: {max_attempt: 3}}",
     "adapter.config.max_attempt", "did you mean 'max_attempts'?"),
    ("modules::queue::QueueModule", "iii-queue", "adapter: {config: {mode: lifo}}",
     "adapter.config.mode", "must be one of standard, fifo"),
    ("modules::queue::QueueModule", "iii-queue",
     "queue_configs: {orders: {max_retry: 2}}",
     "queue_configs.orders.max_retry", "did you mean 'max_retries'?"),
    ("modules::queue::QueueModule", "iii-queue",
     "queue_configs: {orders: {concurrency: 0}}",
     "queue_configs.orders.concurrency", "must be at least 1"),
    ("modules::queue::QueueModule", "iii-queue",
     "queue_configs: {orders: {type: fifo}}",
     "queue_configs.orders.message_group_field", "a fifo queue needs message_group_field"),
    # cron
    ("modules::cron::CronModule", "cron", "adapter: {config: {lock_ttl: 1}}",
     "adapter.config.lock_ttl", "did you mean 'lock_ttl_ms'?"),
    ("modules::cron::CronModule", "iii-cron", "adapter: {config: {lock_ttl_ms: x}}",
     "adapter.config.lock_ttl_ms", "must be an integer"),
    # observability
    ("modules::observability::OtelModule", "iii-observability",
     "prometheus: {prot: 9464}", "prometheus.prot", "did you mean 'port'?"),
    ("modules::observability::OtelModule", "iii-observability", "exporter: jaeger",
     "exporter", "must be one of memory, otlp, both, not 'jaeger'"),
    ("modules::observability::OtelModule", "iii-observability", "sampling_ratio: 2",
     "sampling_ratio", "must be between 0.0 and 1.0, not 2"),
    ("modules::observability::OtelModule", "iii-observability",
     "sampling: {rules: [{operation: x}]}", "sampling.rules[0].rate", "is required"),
    ("modules::observability::OtelModule", "iii-observability",
     "alerts: [{name: a, metric: m, threshold: 1, action: {type: mail}}]",
     "alerts[0].action.type", "must be one of log, webhook, function"),
    ("modules::observability::OtelModule", "iii-observability",
     "alerts: [{name: a, metric: m, threshold: 1, action: {type: webhook}}]",
     "alerts[0].action.url", "is required for a webhook action"),
    ("modules::observability::OtelModule", "iii-observability", "prometheus: true",
     "prometheus", "must be a mapping {port, host}, an endpoint string or false"),
    ("modules::observability::OtelModule", "iii-observability", "logs_max_cnt: 5",
     "logs_max_cnt", "did you mean 'logs_max_count'?"),
    # HTTP functions
    ("modules::http_functions::HttpFunctionsModule", "iii-http-functions",
     "security: {url_allow_list: []}", "security.url_allow_list",
     "did you mean 'url_allowlist'?"),
    ("modules::http_functions::HttpFunctionsModule", "iii-http-functions",
     "security: {require_https: maybe}", "security.require_https",
     "must be true or false"),
    # mandatory modules
    ("modules::telemetry::TelemetryModule", "iii-telemetry", "enabeld: false",
     "enabeld", "did you mean 'enabled'?"),
    ("modules::worker::WorkerModule", "iii-engine-functions", "x: 1",
     "x", "unknown key 'x'; known keys: none"),
]


@pytest.mark.parametrize("iii_class, name, config, key, words", MODULE_ERRORS)
@pytest.mark.parametrize("fmt", ["v0.10", "current"])
def test_module_config_errors(fmt, iii_class, name, config, key, words):
    """Every module's keys are checked at every depth, in both formats."""
    if fmt == "v0.10":
        text, prefix = v010(iii_class, config), "modules[0].config."
    else:
        text, prefix = current(name, config), "workers[0].config."
    with pytest.raises(ConfigError) as e:
        parse(text)
    assert e.value.key == prefix + key
    message = str(e.value)
    assert message.startswith("f.yaml, key {}: ".format(prefix + key))
    assert words in message
    assert "\n" not in message


# (file text, key, words): the file as a whole.
FILE_ERRORS = [
    ("prt: 49134\n", "prt", "unknown key 'prt'; did you mean 'port'?"),
    ("port: 49134\nmodules:\n  - class: modules::api::RestApiModule\n    port: 3111\n",
     "modules[0].port", "it belongs under config: (check the indentation)"),
    ("workers:\n  - name: http\n    port: 3111\n",
     "workers[0].port", "it belongs under config:"),
    ("modules:\n  - class: modules::api::RestApiModule\n"
     "    config: {invocation_timeout_ms: 5}\n", "modules[0].config.invocation_timeout_ms",
     "it belongs at the top level (check the indentation)"),
    ("modules:\n  - class: modules::api::RestApiModule\n    confg: {}\n",
     "modules[0].confg", "did you mean 'config'?"),
    # mixing the formats
    ("modules:\n  - class: modules::api::RestApiModule\nworkers:\n  - name: iii-state\n",
     "workers[0]", "mixes the two config formats: modules[0] uses class: (v0.10 format)"),
    ("port: 49134\nworkers:\n  - name: iii-http\n",
     "port", "mixes the two config formats: top-level port: is the v0.10 format"),
    ("workers:\n  - name: iii-state\n    config:\n      adapter:\n"
     "        class: modules::state::adapters::KvStore\n",
     "workers[0].config.adapter.class", "adapter class: is the v0.10 format"),
    ("modules:\n  - class: modules::state::StateModule\n    config:\n      adapter:\n"
     "        name: kv\n",
     "modules[0].config.adapter.name", "adapter name: is the current format"),
    ("workers:\n  - {name: iii-http, class: modules::api::RestApiModule}\n",
     "workers[0]", "not both"),
    ("workers:\n  - name: iii-state\n  - name: http\n  - name: state\n",
     "workers[2].name", "'iii-state' is the older name of 'state', and both are present"),
    # names this engine refuses or does not know
    ("workers:\n  - name: iii-worker-ops\n", "workers[0].name", "not part of this engine"),
    ("workers:\n  - name: iii-sandbox\n", "workers[0].name", "not part of this engine"),
    ("workers:\n  - name: compose\n", "workers[0].name", "not part of this engine"),
    ("workers:\n  - name: iii-exec\n", "workers[0].name", "not implemented"),
    ("workers:\n  - {name: my-worker, image: ghcr.io/x/y}\n", "workers[0].image",
     "not part of this engine"),
    ("workers:\n  - name: iii-stram\n", "workers[0].name",
     "unknown worker name iii-stram; did you mean iii-stream?"),
    ("modules:\n  - class: modules::state::StateModul\n", "modules[0].class",
     "did you mean modules::state::StateModule?"),
    # adapters
    ("workers:\n  - name: state\n    config: {adapter: {name: kvv}}\n",
     "workers[0].config.adapter.name", "unknown adapter 'kvv'; did you mean 'kv'?"),
    ("workers:\n  - name: state\n    config: {adapter: {name: bridge, config: "
     "{bridge_ulr: x}}}\n", "workers[0].config.adapter.config.bridge_ulr",
     "did you mean 'bridge_url'"),
    ("modules:\n  - class: modules::stream::StreamModule\n    config: {adapter: "
     "{class: modules::stream::adapters::Bridge, config: {bridge_url: http://x}}}\n",
     "modules[0].config.adapter.config.bridge_url", "must be a ws:// or wss:// URL"),
    # the bridge module
    ("workers:\n  - name: iii-bridge\n    config: {url: 'http://hub:49134'}\n",
     "workers[0].config.url", "must be a ws:// or wss:// URL"),
    ("workers:\n  - name: iii-bridge\n    config: {forward: [{local_function: a}]}\n",
     "workers[0].config.forward[0].remote_function", "is required"),
    ("modules:\n  - class: modules::bridge_client::BridgeClientModule\n    config: "
     "{expose: [{remote_function: x}]}\n", "modules[0].config.expose[0].local_function",
     "is required"),
    ("workers:\n  - name: iii-bridge\n    config: {forward: [{local_function: a, "
     "remote_function: b, timeout_ms: -1}]}\n",
     "workers[0].config.forward[0].timeout_ms", "must be at least 0"),
    ("workers:\n  - name: iii-bridge\n    config: {exposes: []}\n",
     "workers[0].config.exposes", "did you mean 'expose'"),
    ("workers:\n  - name: state\n    config: {adapter: {name: redis, config: "
     "{redis_ulr: x}}}\n", "workers[0].config.adapter.config.redis_ulr",
     "did you mean 'redis_url'"),
    ("workers:\n  - name: queue\n    config: {adapter: {name: rabbitmq, config: "
     "{amqp_ulr: x}}}\n", "workers[0].config.adapter.config.amqp_ulr",
     "did you mean 'amqp_url'"),
    # the worker listener and engine keys
    ("workers:\n  - name: iii-worker-manager\n    config: {port: -1}\n",
     "workers[0].config.port", "must be between 0 and 65535"),
    ("workers:\n  - name: iii-worker-manager\n    config: {rbac: "
     "{on_function_registration_function_id: 3}}\n",
     "workers[0].config.rbac.on_function_registration_function_id",
     "must be a string"),
    ("workers:\n  - name: iii-worker-manager\n    config: {rbac: {}, auth: "
     "{auth_function_id: f}}\n", "workers[0].config.rbac", "not both"),
    ("watch: yes please\n", "watch", "must be true or false"),
    ("invocation_timeout_ms: -5\n", "invocation_timeout_ms", "must be at least 0"),
    ("max_message_size: 0\n", "max_message_size", "must be at least 1"),
]


@pytest.mark.parametrize("text, key, words", FILE_ERRORS)
def test_file_errors(text, key, words):
    """Errors about the file's shape name the key path and say what is meant."""
    with pytest.raises(ConfigError) as e:
        parse(text)
    assert e.value.key == key
    assert words in str(e.value)


SEED_V010 = """\
port: 49134
modules:
  - class: modules::rest_api::RestApiModule
    config: {port: 3111}
  - class: modules::state::StateModule
    config:
      adapter:
        class: modules::state::adapters::KvStore
        config: {store_method: file_based, file_path: ./data/state}
  - class: modules::queue::QueueModule
    config:
      adapter: {class: modules::queue::BuiltinQueueAdapter}
  - class: modules::pubsub::PubSubModule
  - class: modules::cron::CronModule
    config: {adapter: {class: modules::cron::KvCronAdapter}}
  - class: modules::observability::OtelModule
    config: {exporter: memory}
"""

SEED_CURRENT = """\
workers:
  - name: iii-worker-manager
    config: {port: 49134}
  - name: http
    config: {port: 3111}
  - name: state
    config:
      adapter:
        name: kv
        config: {store_method: file_based, file_path: ./data/state}
  - name: queue
    config:
      adapter: {name: builtin}
  - name: pubsub
  - name: cron
    config: {adapter: {name: kv}}
  - name: iii-observability
    config: {exporter: memory}
"""


def model(config):
    from iii_twisted.modules import MODULE_CLASSES
    return (config.listen, [(m.instance, MODULE_CLASSES[m.name], m.config)
                            for m in config.modules])


def test_both_formats_load_into_the_same_model():
    """A v0.10 file and its current-format twin give the same engine config."""
    old, new = parse(SEED_V010), parse(SEED_CURRENT)
    assert (old.format, new.format) == ("v0.10", "current")
    assert model(old) == model(new)
    assert [m.instance for m in new.modules] == [
        "iii-http", "iii-state", "iii-queue", "iii-pubsub", "iii-cron",
        "iii-observability"]


def test_worker_port_in_iii_worker_manager():
    """The current format's worker port and settings live in iii-worker-manager."""
    config = parse("workers:\n  - name: iii-worker-manager\n"
                   "    config: {port: 5000, host: 127.0.0.1, max_message_size: 1024}\n")
    assert config.listen == "tcp:5000:interface=127.0.0.1"
    assert config.max_message_size == 1024
    assert config.modules == []
    assert parse("workers: []\n").listen == "tcp:49134:interface=0.0.0.0"


def test_repeated_modules_get_instance_ids():
    """A second module of a class is name#2, as the reference's instance ids."""
    config = parse("workers:\n  - name: http\n    config: {port: 1}\n"
                   "  - name: http\n    config: {port: 2}\n")
    assert [m.instance for m in config.modules] == ["iii-http", "iii-http#2"]


@pytest.mark.parametrize("text", [SEED_V010, SEED_CURRENT])
def test_convert_round_trip(text):
    """--convert writes the other format with the same meaning, and back."""
    target, converted = convert_text(text, "f.yaml")
    assert target == ("current" if "class:" in text else "v0.10")
    assert model(parse(converted)) == model(parse(text))
    _, back = convert_text(converted, "g.yaml")
    assert model(parse(back)) == model(parse(text))


def test_convert_keeps_variables():
    """${VAR} references are kept as written (plain, so they keep their type)."""
    _, converted = convert_text("port: ${P:49134}\n", "f.yaml")
    assert "port: ${P:49134}\n" in converted


def test_a_key_is_one_line():
    """The declaration mechanism: one Key per key, validated at once."""
    section = Section(redis_url=Key(str, "redis://localhost:6379", "where"))
    assert section.validate({"redis_url": "redis://h"}) == {"redis_url": "redis://h"}
    with pytest.raises(ConfigError, match="did you mean 'redis_url'"):
        section.validate({"redis_ulr": "x"})
    assert "redis_url (a string, default 'redis://localhost:6379'): where" in \
        section.describe()


def test_repo_configs_validate():
    """The root config, the examples and the SDK-suite config are valid."""
    import glob
    import os
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    files = [os.path.join(root, "iii-config.yaml"),
             os.path.join(root, "conformance", "sdk-suite-config.yaml")]
    files += glob.glob(os.path.join(root, "examples", "*.yaml"))
    for path in files:
        with open(path) as f:
            parse_config(f.read(), source=path, environ={})


def test_example_current_format_is_the_root_config():
    """examples/iii-config.current.yaml means what the root iii-config.yaml means."""
    import os
    from iii_twisted.config import load_config
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    old = load_config(os.path.join(root, "iii-config.yaml"))
    new = load_config(os.path.join(root, "examples", "iii-config.current.yaml"))
    assert new.format == "current"
    assert model(old) == model(new)


def test_engine_version_variable():
    """${VAR:__III_ENGINE_VERSION__} gives the engine's version, as in the reference."""
    from iii_twisted import __version__
    config = parse("modules:\n  - class: modules::observability::OtelModule\n"
                   "    config: {service_version: '${V:__III_ENGINE_VERSION__}'}\n")
    assert config.modules[0].config["service_version"] == __version__


def test_every_module_declares_its_schema():
    """Each module class has a config_schema, and each current name maps to a class."""
    from iii_twisted.modules import MODULE_CLASSES, WORKER_NAMES, load_module_factory
    from iii_twisted.schema import Section
    for iii_class in MODULE_CLASSES:
        schema = getattr(load_module_factory(iii_class), "config_schema", None)
        assert isinstance(schema, Section) and not schema.open, iii_class
    assert set(WORKER_NAMES.values()) <= set(MODULE_CLASSES)


def test_convert_says_it_drops_listener_names():
    """The current format cannot name a worker port: the output says so."""
    from iii_twisted.convert import convert_text

    target, text = convert_text(
        "listeners:\n  - name: trusted\n    listen: 'unix:/tmp/t.sock'\n"
        "  - name: public\n    listen: 'tcp:0'\nmodules: []\n")
    assert target == "current"
    assert "# note: listener names not kept (trusted, public)" in text


BRIDGE_V010 = """\
modules:
  - class: modules::bridge_client::BridgeClientModule
    config:
      url: ws://hub:49134
      expose: [{local_function: a::f}]
      forward: [{local_function: r::echo, remote_function: echo, timeout_ms: 5000}]
  - class: modules::state::StateModule
    config:
      adapter: {class: modules::state::adapters::Bridge, config: {bridge_url: "ws://hub:49134"}}
  - class: modules::stream::StreamModule
    config:
      adapter: {class: modules::stream::adapters::Bridge}
"""

BRIDGE_CURRENT = """\
workers:
  - name: iii-bridge
    config:
      url: ws://hub:49134
      expose: [{local_function: a::f}]
      forward: [{local_function: r::echo, remote_function: echo, timeout_ms: 5000}]
  - name: state
    config:
      adapter: {name: bridge, config: {bridge_url: "ws://hub:49134"}}
  - name: iii-stream
    config:
      adapter: {name: bridge}
"""


@pytest.mark.parametrize("text", [BRIDGE_V010, BRIDGE_CURRENT])
def test_bridge_config_in_both_formats(text):
    """The bridge module and the Bridge adapters load the same from either format."""
    config = parse(text)
    assert model(config) == model(parse(BRIDGE_V010))
    assert [m.instance for m in config.modules] == ["iii-bridge", "iii-state",
                                                     "iii-stream"]
    _, converted = convert_text(text, "f.yaml")
    assert model(parse(converted)) == model(config)
