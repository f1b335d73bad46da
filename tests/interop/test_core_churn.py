"""200 workers on real sockets connecting, registering, calling and dropping at random."""

import asyncio
import json
import random

from websockets.asyncio.client import connect


async def _worker(url, n, rng, peers):
    """One raw-protocol worker: register, call a peer, then leave (cleanly or not)."""
    ws = await connect(url, max_size=None)
    hello = json.loads(await ws.recv())
    assert hello["type"] == "workerregistered"
    await ws.send(json.dumps({"type": "registerfunction", "id": "churn{}::fn".format(n)}))
    await ws.send(json.dumps({"type": "registertriggertype", "id": "type{}".format(n),
                              "description": "d"}))
    await ws.send(json.dumps({"type": "registertrigger", "id": "trig{}".format(n),
                              "trigger_type": "type{}".format(rng.randrange(200)),
                              "function_id": "churn{}::fn".format(n), "config": {}}))
    peers.append(n)
    target = rng.choice(peers)
    await ws.send(json.dumps({"type": "invokefunction", "invocation_id": "c{}".format(n),
                              "function_id": "churn{}::fn".format(target), "data": {}}))
    await asyncio.sleep(rng.random() * 0.2)  # stay connected a random while (churn)
    if rng.random() < 0.5:
        await ws.close()
    else:
        ws.transport.abort()  # drop TCP without a close handshake


async def _churn(url):
    rng = random.Random(42)
    peers = []
    await asyncio.gather(*(_worker(url, n, rng, peers) for n in range(200)))


def test_churn_leaves_registries_empty(engine, sdk_worker):
    """After 200 workers come and go, no worker, function, trigger or type of theirs is left."""
    asyncio.run(_churn(engine.url))
    checker = sdk_worker(engine.url, "checker")
    deadline_checks = 200
    for _ in range(deadline_checks):
        workers = [w for w in checker.list_workers() if w.name != "checker"]
        # Only the checker's own (possibly telemetry) connections may remain.
        if all(w.function_count == 0 for w in workers) and len(workers) <= 1:
            break
    assert not [f for f in checker.list_functions() if f.function_id.startswith("churn")]
    assert checker.list_triggers(include_internal=True) == []
    types = checker.trigger({"function_id": "engine::trigger-types::list", "payload": {}})
    assert [t for t in types["trigger_types"] if t["id"].startswith("type")] == []
    remaining = [w for w in checker.list_workers() if w.name != "checker"]
    assert all(w.name is None for w in remaining) and len(remaining) <= 1  # SDK telemetry socket
