"""Run by test_kv_events.py with vLLM's venv's python: the connector's
events (JSON on stdin) through compat.vllm_kv_events into vLLM's own
classes, published by vLLM's own ZMQ publisher, received on a SUB socket
and decoded into vllm.distributed.kv_events.KVEventBatch as a consumer
(llm-d, Dynamo) decodes them. Prints the decoded events as JSON.

    kv_events_vllm.py BLOCK_SIZE < events.json
"""

from __future__ import annotations

import json
import socket
import sys
import time
from types import SimpleNamespace

import msgspec
import zmq
from vllm.config.kv_events import KVEventsConfig
from vllm.distributed.kv_events import EventPublisherFactory, KVEventBatch

from pegaflow_connector.compat import vllm_kv_events


def main() -> None:
    block_size = int(sys.argv[1])
    ours = []
    for e in json.load(sys.stdin):
        hashes = [bytes.fromhex(x) for x in e["hashes"]]
        if e["stored"]:
            parent = bytes.fromhex(e["parent"]) if e["parent"] else None
            ours.append(SimpleNamespace(group=e["group"], hashes=hashes, parent=parent, token_ids=e["tokens"]))
        else:
            ours.append(SimpleNamespace(group=e["group"], hashes=hashes))
    events = vllm_kv_events(ours, block_size)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pub = EventPublisherFactory.create(KVEventsConfig(enable_kv_cache_events=True, publisher="zmq",
                                                      endpoint=f"tcp://*:{port}", topic="kv"))
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.connect(f"tcp://127.0.0.1:{port}")
    sub.setsockopt_string(zmq.SUBSCRIBE, "kv")
    dec = msgspec.msgpack.Decoder(type=KVEventBatch)
    deadline = time.monotonic() + 60
    # PUB drops what it sends before the subscription arrives: empty
    # batches until one comes through, then the real one.
    sent = False
    while True:
        if time.monotonic() > deadline:
            sys.exit("no batch received from vLLM's publisher")
        if not sent:
            pub.publish(KVEventBatch(ts=time.time(), events=[]))
        if sub.poll(100):
            _topic, _seq, payload = sub.recv_multipart()
            batch = dec.decode(payload)
            if batch.events:
                break
            if not sent:
                pub.publish(KVEventBatch(ts=time.time(), events=events))
                sent = True
    pub.shutdown()
    out = []
    for ev in batch.events:
        d = {f: getattr(ev, f) for f in ev.__struct_fields__}
        d["type"] = type(ev).__name__
        out.append(d)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
