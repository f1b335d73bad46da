"""
The cluster: several engines acting as one router (issue 12, docs/cluster.rst).

Two seams, built by separate pieces of work:

- L{iii_twisted.cluster.directory}: *membership*. Who is in the cluster and the address
  at which each member's link listener can be reached. L{IClusterDirectory} is the
  contract; L{MemoryDirectory} (engines in one process, tests) and the Redis directory
  (heartbeat keys with a TTL, the issue's point 5) implement it, and
  C{tests/contract/test_cluster_directory.py} runs each through the same cases.
- the links: a WebSocket each way between two members, speaking the worker protocol
  and authenticated with the cluster secret, over which each member offers its local
  functions and triggers to the others and calls flow in one round trip. A link is
  opened when the directory reports a member joining and closed when it reports it
  leaving. L{iii_twisted.cluster.settings} (the ``cluster:`` config section),
  L{iii_twisted.cluster.client} (a worker-protocol client), L{iii_twisted.cluster.links}
  (both ends of a link, what is offered), L{iii_twisted.cluster.triggers} (which
  offered trigger is in force) and L{iii_twisted.cluster.wiring} (the
  L{ClusterService} an engine with ``cluster:`` runs).
"""
