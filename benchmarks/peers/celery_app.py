"""Celery app for the peers benchmark (imported by the worker and by bench_peers.py).

Configured through the environment so the worker subprocess and the client agree:
  PEERS_REDIS_URL  redis://127.0.0.1:PORT/0 (broker and result backend)
  PEERS_MODEL      path of the ONNX model the worker serves
  PEERS_PREFETCH   worker_prefetch_multiplier (default 4, Celery's own default)

Payloads are raw little-endian f32 bytes carried by the msgpack serializer (no JSON float
formatting, no base64), i.e. the cheapest encoding Celery offers out of the box.
"""

from __future__ import annotations

import os
import threading

from celery import Celery
from celery.signals import worker_process_init

REDIS_URL = os.environ.get("PEERS_REDIS_URL", "redis://127.0.0.1:6399/0")
QUEUE = "peers"


def make_app(url: str) -> Celery:
    """A Celery app on broker = result backend = `url`, configured like the worker's."""
    a = Celery("peers", broker=url, backend=url)
    a.conf.update(CONF)
    return a


CONF = dict(
    task_serializer="msgpack",
    result_serializer="msgpack",
    accept_content=["msgpack"],
    task_default_queue=QUEUE,
    task_ignore_result=False,
    task_acks_late=False,
    task_send_sent_event=False,
    worker_send_task_events=False,
    worker_prefetch_multiplier=int(os.environ.get("PEERS_PREFETCH", "4")),
    worker_hijack_root_logger=False,
    result_expires=120,  # results are read once; Redis drops them on its own after 2 min
    broker_connection_retry_on_startup=True,
    broker_connection_timeout=5,
    redis_socket_connect_timeout=5,
)

app = make_app(REDIS_URL)

_lock = threading.Lock()
_state: dict = {}


def _session():
    """The process's ONNX Runtime session (intra_op 1, inter_op 1), made on first use.

    ORT's Run() is thread-safe, so with the threads pool the two threads share one session.
    """
    s = _state.get("s")
    if s is not None:
        return s
    with _lock:
        if "s" not in _state:
            import numpy as np  # noqa: F401  (imported here so the client stays light)
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            opts.inter_op_num_threads = 1
            sess = ort.InferenceSession(
                os.environ["PEERS_MODEL"], opts, providers=["CPUExecutionProvider"]
            )
            inp = sess.get_inputs()[0]
            outs = [o.name for o in sess.get_outputs()]
            out = "probs" if "probs" in outs else outs[-1]
            _state["s"] = (sess, inp.name, int(inp.shape[1]), out)
        return _state["s"]


@worker_process_init.connect
def _load_in_child(**_kwargs):
    # prefork: each child loads its own session before taking work
    if os.environ.get("PEERS_MODEL"):
        _session()


@app.task(name="peers.infer")
def infer(x: bytes, rows: int) -> bytes:
    import numpy as np

    sess, name, width, out = _session()
    a = np.frombuffer(x, dtype=np.float32).reshape(rows, width)
    return sess.run([out], {name: a})[0].astype(np.float32, copy=False).tobytes()


@app.task(name="peers.ping")
def ping() -> str:
    _session()
    return "pong"
