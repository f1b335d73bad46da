"""
``twistd iii``: command-line options and the service they make. Wiring only.

    twistd -n --pidfile= iii --config iii-config.yaml
    twistd iii --check-config FILE     validate FILE, say what it holds, exit
    twistd iii --convert FILE          print FILE in the other config format, exit
    twistd iii --version               print the engine's version, exit
    twistd iii --describe-config       print every config key, exit
    twistd -n --pidfile= iii --config X --processes N
                                       N engine processes sharing the ports, forming
                                       a cluster (iii_twisted/processes.py)

A config error or a port that cannot be bound is one line on stderr and exit status 1,
without a traceback (``--debug`` shows it).
"""

import sys

from twisted.python import usage

from . import __version__
from .config import ConfigError, load_config
from .listeners import ListenerError
from .logsetup import LogSettingsService, configure_twist


class Options(usage.Options):
    """Options of ``twistd iii``."""

    synopsis = "[options]"
    longdesc = ("Run the iii engine: workers connect on the configured port (49134). "
                "SIGHUP rereads the config file.")
    optParameters = [
        ["config", "c", "iii-config.yaml", "The engine configuration file (YAML)."],
        ["check-config", None, None, "Validate this config file and exit."],
        ["convert", None, None,
         "Print this config file converted to the other format (v0.10 <-> current) "
         "and exit."],
        ["processes", None, 1,
         "Run this many engine processes on this machine, sharing the worker and HTTP "
         "ports (SO_REUSEPORT, Linux) and forming a cluster among themselves (the "
         "config needs a cluster: section with redis_url).", int],
    ]
    optFlags = [
        ["debug", None, "Show the traceback of config and start-up errors."],
        ["describe-config", None, "Print every config key (type, range, default, "
                                  "meaning) and exit."],
    ]

    def opt_version(self):
        """Print the engine's version and exit."""
        print("iii-twisted {}".format(__version__))
        sys.exit(0)

    def postOptions(self):
        """
        Load and validate the config file now, so that a bad one stops twistd with
        one line naming the file and key (and exit status 1).
        """
        if self["describe-config"]:
            from .config import describe_all
            sys.stdout.write(describe_all() + "\n")
            sys.exit(0)
        if self["check-config"]:
            self._check(self["check-config"])
        if self["convert"]:
            self._convert(self["convert"])
        try:
            self["engine_config"] = load_config(self["config"])
        except ConfigError as e:
            fail(e, self["debug"])
        from .processes import check_options
        why = check_options(self["engine_config"], self["processes"])
        if why:
            fail(usage.UsageError(why), self["debug"])

    def _check(self, path):
        try:
            config = load_config(path)
        except ConfigError as e:
            fail(e, self["debug"])
        ports = [config.listen]
        if getattr(config, "listeners", None):
            ports = ["{} ({})".format(l.listen, l.name) for l in config.listeners]
        cluster = getattr(config, "cluster", None)
        if cluster is not None:
            from .cluster.wiring import require_directory
            try:
                require_directory()
            except ConfigError as e:
                fail(e, self["debug"])
        print("{}: valid ({} format); workers listen on {}; modules: {}{}".format(
            path, config.format, ", ".join(ports),
            ", ".join(m.instance for m in config.modules) or "none",
            "" if cluster is None else "; cluster member {!r}, links on {}, "
            "membership in {}".format(cluster.name, cluster.listen, cluster.redis_url)))
        sys.exit(0)

    def _convert(self, path):
        from .convert import convert_file
        try:
            _, text = convert_file(path)
        except ConfigError as e:
            fail(e, self["debug"])
        sys.stdout.write(text)
        sys.exit(0)


def fail(error, debug=False):
    """
    Stop with C{error} as one line on stderr and exit status 1 (with C{debug}, raise
    it, so that its traceback shows).
    """
    if debug:
        raise error
    sys.stderr.write("iii: error: {}\n".format(error))
    sys.stderr.flush()
    raise SystemExit(1)


def _quiet_excepthook(previous):
    """
    A C{sys.excepthook} that prints a listener's bind failure as its one line: twistd
    raises it from its start-up, after this module has returned.
    """
    def hook(kind, value, tb):
        if isinstance(value, ListenerError):
            # twistd has pointed sys.stderr at its log by now: say it there and on
            # the real stderr.
            for stream in {id(s): s for s in (sys.stderr, sys.__stderr__) if s}.values():
                stream.write("iii: error: {}\n".format(value))
                stream.flush()
            return
        previous(kind, value, tb)
    return hook


def makeService(options, reactor=None):
    """
    @return: the L{iii_twisted.service.EngineService} for parsed C{options}; it
        rereads the config file on SIGHUP and (with ``watch: true``) when it changes.
    """
    from . import processes
    from .service import EngineService

    if reactor is None:
        from twisted.internet import reactor
    config = options["engine_config"]
    number = processes.process_number()
    if options["processes"] > 1 and number is None:
        return _supervisor(options, config, reactor)
    if number is not None:
        processes.prepare_engine_process(config, number)
    try:
        service = EngineService(config, reactor=reactor, config_path=options["config"])
    except (ConfigError, ListenerError) as e:
        fail(e, options["debug"])
    if number is not None:
        processes.become_engine_process(service, reactor)
    service.reload_on_sighup = True
    service.log_settings = LogSettingsService(config.log_level)
    service.drain_timeout = config.shutdown_timeout  # SIGTERM: let calls finish
    configure_twist(getattr(options, "parent", None), config.log_level, config.log_format)
    if not options["debug"]:
        sys.excepthook = _quiet_excepthook(sys.excepthook)
    return service


def _supervisor(options, config, reactor):
    """
    @return: the service of ``--processes N``: the log settings and an
        L{iii_twisted.processes.EngineProcesses} running N engine processes.
    """
    from twisted.application.service import MultiService

    from .processes import EngineProcesses, engine_argv

    top = MultiService()
    LogSettingsService(config.log_level).setServiceParent(top)
    EngineProcesses(options["processes"], engine_argv(options, options["config"]),
                    reactor, stop_timeout=config.shutdown_timeout or 0).setServiceParent(top)
    configure_twist(getattr(options, "parent", None), config.log_level, config.log_format)
    return top
