"""
The ``cluster:`` section of ``iii-config.yaml`` (top level, both formats): with it the
engine is a member of a cluster (docs/cluster.rst); without it nothing changes.

::

    cluster:
      redis_url: redis://redis.internal:6379   # membership (heartbeats with a TTL)
      secret: ${III_CLUSTER_SECRET}             # or secret_env: III_CLUSTER_SECRET
      listen: tcp:0:interface=127.0.0.1         # the link listener (server endpoint)
      advertise: tcp:10.0.0.5:7000              # how peers reach it (client endpoint)
      name: api-1                               # default hostname:pid
      heartbeat_ms: 1000
      member_ttl_ms: 3000
"""

import os
import socket

from ..schema import Key, ListOf, Section

# Trigger types whose event arises on one member (a request, a change made there):
# a worker's trigger of these types is offered to every member so that each serves
# or fires it (docs/cluster.rst, "Triggers across the cluster").
DEFAULT_TRIGGER_TYPES = ("http", "state", "stream", "stream:join", "stream:leave")

CLUSTER_SCHEMA = Section(
    redis_url=Key(str, None, "Redis holding the membership (required): each member "
                  "refreshes a heartbeat key with a TTL there"),
    secret=Key(str, None, "the shared secret every member's links present (required, "
               "unless secret_env names it)"),
    secret_env=Key(str, None, "the environment variable holding the secret"),
    listen=Key(str, "tcp:0:interface=127.0.0.1", "the link listener (a Twisted server "
               "endpoint string; ssl: for TLS); port 0 picks a free one"),
    advertise=Key(str, None, "how the other members reach the link listener (a Twisted "
                  "client endpoint string, tls: for TLS); default tcp:127.0.0.1:<the "
                  "bound port>"),
    name=Key(str, None, "this member's name in discovery and logs (default "
             "hostname:pid)"),
    heartbeat_ms=Key(int, 1000, "how often this member refreshes its heartbeat, ms",
                     min=10),
    member_ttl_ms=Key(int, 3000, "a member whose heartbeat is older leaves the cluster, "
                      "ms", min=20),
    trigger_types=Key(ListOf(str), list(DEFAULT_TRIGGER_TYPES), "trigger types of a "
                      "worker's triggers that every member serves (the rest fire where "
                      "they were registered)"),
)


class ClusterConfig:
    """
    A validated ``cluster:`` section.

    @ivar secret: the shared secret (non-empty str).
    @ivar listen: the link listener's server endpoint string.
    @ivar advertise: the client endpoint string peers use, or None for
        C{tcp:127.0.0.1:<bound port>}.
    @ivar heartbeat, member_ttl: seconds.
    @ivar trigger_types: frozenset of trigger type ids offered to peers.
    """

    def __init__(self, secret, redis_url=None, listen="tcp:0:interface=127.0.0.1",
                 advertise=None, name=None, heartbeat=1.0, member_ttl=3.0,
                 trigger_types=DEFAULT_TRIGGER_TYPES):
        self.secret = secret
        self.redis_url = redis_url
        self.listen = listen
        self.advertise = advertise
        self.name = name or "{}:{}".format(socket.gethostname(), os.getpid())
        self.heartbeat = heartbeat
        self.member_ttl = member_ttl
        self.trigger_types = frozenset(trigger_types)

    def settings(self):
        """@return: what the membership is built from (a reload compares it)."""
        return (self.secret, self.redis_url, self.listen, self.advertise, self.name,
                self.heartbeat, self.member_ttl, tuple(sorted(self.trigger_types)))


def parse_cluster(values, environ=None):
    """
    @param values: the validated ``cluster:`` mapping, or None.
    @return: a L{ClusterConfig}, or None without the section.
    @raise ConfigError: naming the key (``cluster.secret``...) for a missing
        ``redis_url`` or secret, an unset ``secret_env`` variable, or a TTL not
        longer than the heartbeat.
    """
    from ..config import ConfigError

    if values is None:
        return None
    environ = os.environ if environ is None else environ
    secret = values.get("secret")
    if values.get("secret_env"):
        if secret:
            raise ConfigError("give secret or secret_env, not both", "cluster.secret_env")
        secret = environ.get(values["secret_env"])
        if not secret:
            raise ConfigError("environment variable {} is not set (or empty)".format(
                values["secret_env"]), "cluster.secret_env")
    if not secret:
        raise ConfigError("a cluster needs a shared secret: set secret (or secret_env)",
                          "cluster.secret")
    if not values.get("redis_url"):
        raise ConfigError("a cluster needs redis_url (where members find each other)",
                          "cluster.redis_url")
    heartbeat = values.get("heartbeat_ms") or 1000
    ttl = values.get("member_ttl_ms") or 3000
    if ttl <= heartbeat:
        raise ConfigError("must be longer than heartbeat_ms ({})".format(heartbeat),
                          "cluster.member_ttl_ms")
    listen = values.get("listen") or "tcp:0:interface=127.0.0.1"
    if not values.get("advertise") and not listen.startswith("tcp:"):
        raise ConfigError("say how the other members reach a {} listener (the default, "
                          "tcp:127.0.0.1:<port>, fits a tcp: one only)".format(
                              listen.split(":", 1)[0]), "cluster.advertise")
    types = values.get("trigger_types")
    return ClusterConfig(
        secret, values["redis_url"],
        listen, values.get("advertise"),
        values.get("name"), heartbeat / 1000.0, ttl / 1000.0,
        DEFAULT_TRIGGER_TYPES if types is None else types)
