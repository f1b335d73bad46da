"""
A failover TCP load balancer for tests, in threads: each connection goes to the first
backend (in the order given) that accepts it, and bytes are copied both ways until
either side closes. What a load balancer in front of cluster members does when one
dies: the SDK's reconnection lands on a survivor.
"""

import socket
import threading

from engine_process import free_port


class Balancer:
    """
    @ivar port: where it listens (127.0.0.1).
    @ivar url: ``ws://127.0.0.1:<port>``.
    @ivar routed: the backend port of each connection, in order.
    """

    def __init__(self, backends):
        """@param backends: ports on 127.0.0.1, most preferred first."""
        self.backends = list(backends)
        self.port = free_port()
        self.url = "ws://127.0.0.1:{}".format(self.port)
        self.routed = []
        self._sockets = []
        self._closed = False
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", self.port))
        self._listener.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._route, args=(client,), daemon=True).start()

    def _route(self, client):
        for port in self.backends:
            try:
                backend = socket.create_connection(("127.0.0.1", port), timeout=2)
            except OSError:
                continue
            backend.settimeout(None)
            self.routed.append(port)
            self._sockets.extend([client, backend])
            threading.Thread(target=_copy, args=(backend, client), daemon=True).start()
            _copy(client, backend)
            return
        client.close()

    def close(self):
        self._closed = True
        self._listener.close()
        for sock in self._sockets:
            try:
                sock.close()
            except OSError:
                pass


def _copy(source, target):
    try:
        while True:
            data = source.recv(65536)
            if not data:
                break
            target.sendall(data)
    except OSError:
        pass
    for sock in (source, target):
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
