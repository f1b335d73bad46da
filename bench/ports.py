"""Loopback ports for the benchmark scripts: a free one, and waiting for a listener."""

import socket
import time


def free_port():
    """@return: a TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, process, timeout=30.0, what="engine"):
    """
    Wait until something listens on 127.0.0.1:C{port}.

    @param process: the C{subprocess.Popen} that should listen there.
    @raise RuntimeError: when C{process} exits first, or nothing listens within
        C{timeout} seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("{} exited with code {}".format(what, process.returncode))
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)  # polling the port for readiness, bounded by the deadline
    raise RuntimeError("{} did not listen on {} within {:.0f}s".format(what, port, timeout))
