"""
An official-SDK worker in its own process, for tests that kill a worker mid-call.

Registers ``hang::forever``, whose handler prints ``STARTED <data>`` and never returns;
prints ``READY`` once registered. Usage: python hanging_worker.py ws://127.0.0.1:PORT
"""

import sys
import threading

from iii import InitOptions, register_worker

iii = register_worker(sys.argv[1], InitOptions(worker_name="hanging"))


def hang(data):
    print("STARTED", data.get("n"), flush=True)
    threading.Event().wait()


iii.register_function({"id": "hang::forever"}, hang)
print("READY", flush=True)
threading.Event().wait()
