"""
A bare WebSocket client on a blocking socket, for tests that must behave the way no
SDK does: never read, send a handshake a byte at a time, send huge frames.
"""

import base64
import json
import os
import socket
import struct


def handshake_bytes(port, path="/"):
    key = base64.b64encode(os.urandom(16)).decode("ascii")
    return ("GET {} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: {}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n").format(path, port, key).encode("ascii")


def frame(payload, opcode=1):
    """A client frame (masked, with a zero mask so the payload needs no XOR)."""
    length = len(payload)
    if length < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
    elif length < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
    return head + b"\0\0\0\0" + payload


def message(obj):
    return frame(json.dumps(obj).encode("utf-8"))


class RawClient:
    """One connection on the worker port, opened and upgraded; reads only on request."""

    def __init__(self, port, source="127.0.0.1", rcvbuf=None, timeout=10.0):
        self.sock = socket.socket()
        if rcvbuf is not None:
            # A small receive buffer: a peer that does not read is full sooner.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.bind((source, 0))
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        self.sock.sendall(handshake_bytes(port))
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            if not chunk:
                raise ConnectionError("closed during the handshake")
            head += chunk
        assert head.startswith(b"HTTP/1.1 101"), head

    def send(self, obj):
        self.sock.sendall(message(obj))

    def read_message(self):
        """@return: the next text message, decoded (skips pings and other control frames)."""
        while True:
            b0, b1 = self._exactly(2)
            length = b1 & 0x7F
            if length == 126:
                length = struct.unpack("!H", self._exactly(2))[0]
            elif length == 127:
                length = struct.unpack("!Q", self._exactly(8))[0]
            payload = self._exactly(length)
            if b0 & 0x0F == 1:
                return json.loads(payload)
            if b0 & 0x0F == 8:
                raise ConnectionError("closed by the engine")

    def closed_by_peer(self):
        """@return: True if the engine has closed the connection (reads what is left)."""
        try:
            while True:
                chunk = self.sock.recv(1 << 20)
                if not chunk:
                    return True
        except socket.timeout:
            return False
        except OSError:
            return True

    def _exactly(self, n):
        data = bytearray()
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed by the engine")
            data += chunk
        return bytes(data)

    def close(self):
        self.sock.close()


def rss_bytes(pid, field="VmRSS"):
    """@return: a process's resident memory (or another /proc status field), in bytes."""
    with open("/proc/{}/status".format(pid)) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise LookupError(field)
