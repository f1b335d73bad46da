"""
``twistd iii``: command-line options and the service they make. Wiring only.

    twistd -n --pidfile= iii --config iii-config.yaml
"""

from twisted.python import usage

from .config import ConfigError, load_config


class Options(usage.Options):
    """Options of ``twistd iii``."""

    synopsis = "[options]"
    longdesc = "Run the iii engine: workers connect on the configured port (49134)."
    optParameters = [
        ["config", "c", "iii-config.yaml", "The engine configuration file (YAML)."],
    ]

    def postOptions(self):
        """
        Load and validate the config file now, so that a bad one stops twistd with
        a message naming the file and key, and exit status 1.

        @raise SystemExit: for a config that cannot be used. Not a UsageError: twistd
            prints those with its whole usage text, and Twisted before 26 (the newest
            on Python 3.9 / PyPy is 25.5) then exits with status 0.
        """
        try:
            self["engine_config"] = load_config(self["config"])
        except ConfigError as e:
            raise SystemExit("iii: {}".format(e))


def makeService(options, reactor=None):
    """
    @return: the L{iii_twisted.service.EngineService} for parsed C{options}.
    @raise usage.UsageError: when a module refuses its config.
    """
    from .service import EngineService

    if reactor is None:
        from twisted.internet import reactor
    try:
        return EngineService(options["engine_config"], reactor=reactor)
    except ConfigError as e:
        raise usage.UsageError(str(e))
