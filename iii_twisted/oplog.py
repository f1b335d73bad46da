"""
How workers and connections read in the operator's log: one name for a worker, the
meaning of a WebSocket close code.
"""

CLOSE_CODES = {
    1000: "normal closure",
    1001: "going away",
    1002: "protocol error",
    1003: "unsupported data",
    1006: "connection lost without a close frame",
    1007: "invalid payload data",
    1008: "policy violation",
    1009: "message too big",
    1010: "mandatory extension",
    1011: "internal error",
    1012: "service restart",
    1013: "try again later",
}


def describe_worker(worker):
    """
    A worker as the log names it: ``worker "math" (python 0.10.0, pid 42, 10.0.0.5,
    id 0b7c...)``. Before the worker has said who it is (``engine::workers::register``),
    the name is ``unnamed`` and the runtime unknown.
    """
    name = worker.name or "unnamed"
    parts = []
    if worker.runtime:
        parts.append(worker.runtime + (" " + worker.version if worker.version else ""))
    if worker.pid is not None:
        parts.append("pid {}".format(worker.pid))
    if worker.ip_address:
        parts.append(worker.ip_address)
    parts.append("id " + worker.id)
    return 'worker "{}" ({})'.format(name, ", ".join(parts))


def describe_agent(connection):
    """`` (User-Agent)`` of a connection's upgrade request, or ``""``."""
    agent = getattr(connection, "user_agent", None)
    if not agent:
        return ""
    return " ({})".format(agent[:100])


def describe_close(close_info):
    """
    @param close_info: ``(code, reason, was_clean)`` from the connection, or None.
    @return: ``"code 1009 (message too big): frame exceeds limit"``, or ``"closed by
        the engine"`` when there is nothing (an in-process connection).
    """
    if close_info is None:
        return "connection closed"
    code, reason, _ = close_info
    text = "code {}".format(code)
    meaning = CLOSE_CODES.get(code)
    if meaning is None and code is not None and 4000 <= code <= 4999:
        meaning = "application code"
    if meaning:
        text += " ({})".format(meaning)
    if reason:
        text += ": {}".format(reason)
    return text
