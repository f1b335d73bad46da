"""
Drive an official SDK worker that runs in another process (npm ``iii-sdk`` under
Node, or a newer PyPI ``iii-sdk`` in its own virtualenv) from a test.

The worker scripts (``node/worker.mjs``, ``workers/newer_py_worker.py``) speak one
line protocol: the test writes ``{"id": n, "op": ...}`` commands to the worker's
stdin; the worker answers each with one ``{"reply": n, "ok": ...}`` line and prints
``{"event": ...}`` lines for what happens to it (its function invoked, a trigger
registered with it). Other output (the SDK's own logging) is kept as
``{"line": text}``. Every wait is bounded.
"""

import json
import os
import subprocess
import threading

from engine_process import Waiter, wait_or_kill


class WorkerFailed(AssertionError):
    """A command the worker answered with ``ok: false``."""

    def __init__(self, op, error):
        AssertionError.__init__(self, "{} failed: {!r}".format(op, error))
        self.error = error


class SdkProcess:
    """
    One worker process.

    @ivar output: a L{Waiter} over every line the process printed (dicts).
    """

    def __init__(self, argv, cwd=None, env=None):
        self.argv = argv
        self.output = Waiter()
        self._next_id = 0
        self.process = subprocess.Popen(
            argv, cwd=cwd, env=dict(os.environ, **(env or {})),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for raw in self.process.stdout:
            text = raw.decode("utf-8", "replace").rstrip("\n")
            try:
                line = json.loads(text)
            except ValueError:
                line = None
            self.output.add(line if isinstance(line, dict) else {"line": text})
        self.output.add({"exited": self.process.wait()})

    def request(self, op, timeout=15.0, **fields):
        """
        Send one command and wait for its reply.

        @return: the reply dict.
        @raise WorkerFailed: if the worker answered ``ok: false``.
        @raise AssertionError: if no reply came within C{timeout} seconds or the
            process exited first.
        """
        self._next_id += 1
        command_id = self._next_id
        self.process.stdin.write((json.dumps(dict(fields, id=command_id, op=op)) + "\n").encode())
        self.process.stdin.flush()

        def answered(lines):
            return any(line.get("reply") == command_id or "exited" in line for line in lines)

        lines = self.output.wait_for(answered, timeout)
        for line in lines:
            if line.get("reply") == command_id:
                if not line["ok"]:
                    raise WorkerFailed(op, line.get("error"))
                return line
        raise AssertionError("{} exited before answering {}: {}".format(
            self.argv, op, self.text()))

    def wait_event(self, predicate, timeout=15.0):
        """
        @return: the first printed line (dict) for which C{predicate(line)} is true.
        @raise AssertionError: if none is within C{timeout} seconds.
        """
        lines = self.output.wait_for(lambda lines: any(predicate(l) for l in lines), timeout)
        return next(l for l in lines if predicate(l))

    def wait_line(self, text, timeout=15.0):
        """@return: the first plain output line containing C{text}."""
        return self.wait_event(lambda l: text in l.get("line", ""), timeout)["line"]

    def events(self, kind):
        """@return: the C{{"event": kind}} lines printed so far."""
        return [l for l in self.output.values if l.get("event") == kind]

    def text(self):
        """@return: everything printed so far, one line per entry (for messages)."""
        return "\n".join(l["line"] if "line" in l else json.dumps(l) for l in self.output.values)

    def stop(self, timeout=10.0):
        """Ask the worker to shut down (closing stdin); kill its group if it lingers."""
        if self.process.poll() is None:
            try:
                self.process.stdin.close()
            except OSError:
                pass
            wait_or_kill(self.process, timeout)
        self._reader.join(timeout)
