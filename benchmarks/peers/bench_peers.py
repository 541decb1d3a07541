#!/usr/bin/env python3
"""Peers benchmark: the same ONNX model served by what a user would pick instead of Sundara.

Systems (onnxruntime on CPU, intra_op_num_threads=1, inter_op_num_threads=1 everywhere):
  ray        Ray Serve over HTTP, one replica, no batching           -> "ray-serve"
  ray-batch  Ray Serve over HTTP, one replica, @serve.batch          -> "ray-serve-batch"
  celery     Celery, Redis broker + Redis result backend, 2 workers  -> "celery"
  ray-embed  Ray Serve over HTTP, --replicas replicas, serving the text-embedding model
             (--model minilm.onnx, --tokenizer tokenizer.json with the `tokenizers`
             package) as OpenAI's POST /v1/embeddings; requests from --corpus, the file
             `bench corpus` writes                                    -> "ray-serve"

Closed-loop load: C clients, each sends one request (--rows random f32 rows), waits for the
reply, repeats. For every concurrency: a warm-up, then --runs consecutive measurement windows
of --duration seconds. One JSON object per window is appended to --out.

The system under test is started once per invocation (one system, one model) and every
concurrency and run goes against that one instance. The load generator is a separate child
process (this file with --_loadgen) so its CPU use can be measured on its own.

Usage:
  python bench_peers.py --system ray|ray-batch|celery --model PATH --model-name mlp \
      --concurrency 1,16,64 --duration 8 --warmup 2 --runs 3 --rows 1 --out FILE.jsonl
  python bench_peers.py --system ray-embed --model minilm.onnx --tokenizer minilm_tokenizer.json \
      --corpus corpus.json --replicas 2 --concurrency 16 --runs 3 --out FILE.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
SYSTEM_NAMES = {"ray": "ray-serve", "ray-batch": "ray-serve-batch", "celery": "celery", "ray-embed": "ray-serve"}
ERROR_BACKOFF_S = 0.005  # a client that got an error waits this long before its next request


def log(msg: str) -> None:
    print(f"[peers] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- model info


def model_info(path: str) -> dict:
    """Input name and width, and the width of the probs output, read with onnxruntime."""
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    outs = sess.get_outputs()
    out = next((o for o in outs if o.name == "probs"), outs[-1])
    width, n_out = inp.shape[1], out.shape[1]
    if not isinstance(width, int) or not isinstance(n_out, int):
        raise SystemExit(f"{path}: need static feature dims, got input {inp.shape}, output {out.shape}")
    return {"input": inp.name, "width": width, "output": out.name, "n_out": n_out}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- timeouts


class PhaseTimeout(Exception):
    pass


class alarm:
    """Raise PhaseTimeout in the main thread if the block runs longer than `seconds`."""

    def __init__(self, seconds: float, what: str):
        self.seconds, self.what = max(1, int(seconds + 0.999)), what

    def _fire(self, *_):
        raise PhaseTimeout(f"{self.what} took more than {self.seconds}s")

    def __enter__(self):
        self.prev = signal.signal(signal.SIGALRM, self._fire)
        signal.alarm(self.seconds)

    def __exit__(self, *exc):
        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.prev)
        return False


def descendants() -> list:
    import psutil

    try:
        return psutil.Process().children(recursive=True)
    except Exception:
        return []


def kill_procs(procs: list, grace: float = 3.0) -> None:
    """SIGTERM then SIGKILL the given psutil processes (ours, by pid)."""
    import psutil

    alive = []
    for p in procs:
        try:
            p.terminate()
            alive.append(p)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(alive, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=grace)


def hard_watchdog(seconds: float) -> threading.Timer:
    """Last resort: kill everything this process started and exit if the whole run overruns."""

    def fire():
        log(f"hard deadline of {seconds:.0f}s reached: killing child processes and exiting")
        kill_procs(descendants(), grace=2.0)
        os._exit(3)

    t = threading.Timer(seconds, fire)
    t.daemon = True
    t.start()
    return t


# --------------------------------------------------------------------------- systems


class RedisServer:
    def __init__(self):
        self.proc: Optional[subprocess.Popen] = None
        self.dir = tempfile.mkdtemp(prefix="peers-redis-")
        self.port = 0

    def start(self, timeout: float = 15.0) -> None:
        exe = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.port = free_port()
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
             "--save", "", "--appendonly", "no", "--daemonize", "no",
             "--logfile", os.path.join(self.dir, "redis.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise PhaseTimeout(f"redis-server not answering PING after {timeout}s")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


class CelerySystem:
    """Redis (broker + result backend) and a Celery worker subprocess with concurrency 2."""

    def __init__(self, args, info):
        self.args, self.info = args, info
        self.redis = RedisServer()
        self.worker: Optional[subprocess.Popen] = None
        self.logf = None

    def start(self) -> dict:
        self.redis.start()
        env = dict(os.environ, PEERS_REDIS_URL=self.redis.url, PEERS_MODEL=os.path.abspath(self.args.model),
                   PEERS_PREFETCH=str(self.args.celery_prefetch))
        env["PYTHONPATH"] = HERE + os.pathsep + env.get("PYTHONPATH", "")
        self.logpath = os.path.join(self.redis.dir, "worker.log")
        self.logf = open(self.logpath, "wb")
        # Pool: threads by default. Measured on this 2-core box (C=16, 4 paired A/B runs, mlp and
        # mlp_heavy) the threads pool used 1.7-2.0 ms of server CPU per task on mlp against
        # 2.2-2.4 ms for prefork (3.9-4.2 vs 4.5-4.8 ms on mlp_heavy) and won every pair on
        # tasks/s (+10-20%). prefork's parent reads Redis and hands each task to a child over
        # a pipe and back: one more process hop per task, and on 2 cores there is no spare
        # core for it. With threads, ORT's Run releases the GIL, so the two inferences still
        # run in parallel; only Celery's own Python overhead shares one GIL.
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "celery_app", "worker",
             "-P", self.args.celery_pool, "-c", "2", "-Q", "peers", "-n", f"peers{self.redis.port}@%h",
             "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "WARNING"],
            cwd=HERE, env=env, stdin=subprocess.DEVNULL, stdout=self.logf, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        sys.path.insert(0, HERE)
        from celery_app import make_app

        app = make_app(self.redis.url)
        deadline = time.monotonic() + self.args.start_timeout
        try:
            ok = 0
            while ok < 4:  # a few round trips so both children have answered at least once, likely
                if self.worker.poll() is not None:
                    raise RuntimeError(f"celery worker exited with {self.worker.returncode}: {self._tail()}")
                if time.monotonic() > deadline:
                    raise PhaseTimeout(f"celery worker not answering after {self.args.start_timeout}s: {self._tail()}")
                try:
                    if app.send_task("peers.ping", queue="peers").get(timeout=2) == "pong":
                        ok += 1
                except Exception:
                    pass
        finally:
            app.close()
        return {"redis_url": self.redis.url}

    def alive(self) -> bool:
        return bool(self.worker and self.worker.poll() is None
                    and self.redis.proc and self.redis.proc.poll() is None)

    def _tail(self) -> str:
        try:
            with open(self.logpath, "rb") as f:
                return f.read()[-2000:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        w = self.worker
        if w and w.poll() is None:
            try:
                os.killpg(w.pid, signal.SIGTERM)  # the worker's own group: parent + pool children
                w.wait(10)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                pass
            if w.poll() is None:
                try:
                    os.killpg(w.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                w.wait(5)
            # a leftover pool child in that group (parent gone) is killed the same way
            try:
                os.killpg(w.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self.logf:
            self.logf.close()
        self.redis.stop()


def make_ray_app(model_path: str, info: dict, batch: bool, max_batch: int, batch_wait_s: float,
                 max_ongoing: int):
    """The Serve application: one replica, raw f32 bytes in, raw f32 probs bytes out."""
    import numpy as np
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import Response

    def new_session():
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        return ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])

    name, width, out = info["input"], info["width"], info["output"]
    opts = dict(num_replicas=1, max_ongoing_requests=max_ongoing, ray_actor_options={"num_cpus": 1})

    if not batch:
        @serve.deployment(**opts)
        class OnnxModel:
            def __init__(self):
                self.sess = new_session()

            async def __call__(self, request: Request) -> Response:
                x = np.frombuffer(await request.body(), dtype=np.float32).reshape(-1, width)
                y = self.sess.run([out], {name: x})[0]
                return Response(y.astype(np.float32, copy=False).tobytes(),
                                media_type="application/octet-stream")

        return OnnxModel.bind()

    @serve.deployment(**opts)
    class OnnxModelBatched:
        def __init__(self):
            self.sess = new_session()

        @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=batch_wait_s)
        async def infer(self, xs: list) -> list:
            y = self.sess.run([out], {name: np.concatenate(xs)})[0].astype(np.float32, copy=False)
            res, i = [], 0
            for x in xs:
                n = x.shape[0]
                res.append(y[i:i + n].tobytes())
                i += n
            return res

        async def __call__(self, request: Request) -> Response:
            x = np.frombuffer(await request.body(), dtype=np.float32).reshape(-1, width)
            return Response(await self.infer(x), media_type="application/octet-stream")

    return OnnxModelBatched.bind()


def make_ray_embeddings_app(model_path: str, tokenizer_path: str, replicas: int, max_ongoing: int):
    """OpenAI's POST /v1/embeddings: texts tokenized with the `tokenizers` package (one text
    at a time, special tokens added, no truncation: as the Sundara gateway does), padded to
    the request's longest, run as one batch; base64 or float embeddings and usage in tokens."""
    import base64

    import numpy as np
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    @serve.deployment(num_replicas=replicas, max_ongoing_requests=max_ongoing, ray_actor_options={"num_cpus": 1})
    class Embeddings:
        def __init__(self):
            import onnxruntime as ort
            from tokenizers import Tokenizer

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            opts.inter_op_num_threads = 1
            self.sess = ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])
            self.tok = Tokenizer.from_file(tokenizer_path)
            self.tok.no_padding()
            self.tok.no_truncation()

        async def __call__(self, request: Request) -> JSONResponse:
            body = await request.json()
            texts = body["input"]
            if isinstance(texts, str):
                texts = [texts]
            rows = [self.tok.encode(t).ids for t in texts]
            n, longest = len(rows), max(len(r) for r in rows)
            ids = np.zeros((n, longest), np.int64)
            mask = np.zeros((n, longest), np.int64)
            for i, r in enumerate(rows):
                ids[i, :len(r)] = r
                mask[i, :len(r)] = 1
            out = self.sess.run(None, {"input_ids": ids, "attention_mask": mask,
                                       "token_type_ids": np.zeros_like(ids)})[0].astype("<f4", copy=False)
            if body.get("encoding_format") == "base64":
                vectors = [base64.b64encode(v.tobytes()).decode() for v in out]
            else:
                vectors = out.tolist()
            tokens = sum(len(r) for r in rows)
            return JSONResponse({
                "object": "list",
                "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
                "model": body.get("model"),
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            })

    return Embeddings.bind()


class RaySystem:
    def __init__(self, args, info, batch: bool):
        self.args, self.info, self.batch = args, info, batch
        self.tmp = tempfile.mkdtemp(prefix="rp", dir="/tmp")  # short: Ray puts sockets in it
        self.started = False
        self.procs: list = []

    def start(self) -> dict:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # Keep every Ray service on loopback. _node_ip_address alone is not enough: Ray turns
        # 127.0.0.1 back into the primary NIC's address unless "cluster mode" is off, which is
        # what this variable (meant for single-node Windows/macOS) does.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        import logging

        import ray
        from ray import serve

        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        port = free_port()
        ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, _temp_dir=self.tmp, log_to_driver=False,
                 _node_ip_address="127.0.0.1",
                 object_store_memory=256 * 1024 * 1024, logging_level="WARNING",
                 configure_logging=True)
        self.started = True
        # Access logs off: one log line per request would cost the proxy and replica CPU.
        logging_config = {"enable_access_log": False, "log_level": "WARNING"}
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=logging_config)
        max_ongoing = self.args.ray_max_ongoing
        if self.info.get("embeddings"):
            app = make_ray_embeddings_app(os.path.abspath(self.args.model), os.path.abspath(self.args.tokenizer),
                                          self.args.replicas, max_ongoing)
            prefix = "/v1/embeddings"
        else:
            app = make_ray_app(os.path.abspath(self.args.model), self.info, self.batch, self.args.max_batch,
                               self.args.batch_wait_s, max_ongoing)
            prefix = "/"
        serve.run(app, name="peers", route_prefix=prefix, blocking=False, logging_config=logging_config)
        url = f"http://127.0.0.1:{port}{prefix}"
        self._wait_http(url)
        self.procs = descendants()
        return {"url": url}

    def alive(self) -> bool:
        """gcs_server, raylet, the HTTP proxy and the replica are all still up."""
        import psutil

        keys = ("gcs_server", "raylet", "ProxyActor", "ServeReplica")
        seen = set()
        for p in self.procs:
            try:
                name = " ".join(p.cmdline()[:1]) + " " + p.name()
                for k in keys:
                    if k in name and p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                        seen.add(k)
            except psutil.Error:
                pass
        return len(seen) == len(keys)

    def _wait_http(self, url: str) -> None:
        import urllib.request

        import numpy as np

        if self.info.get("embeddings"):
            body = json.dumps({"model": "probe", "input": ["A man is eating food."]}).encode()
            headers = {"Content-Type": "application/json"}

            def ok(data: bytes) -> bool:
                return len(json.loads(data)["data"]) == 1
        else:
            body = np.zeros((1, self.info["width"]), np.float32).tobytes()
            headers = {"Content-Type": "application/octet-stream"}

            def ok(data: bytes) -> bool:
                return len(data) == 4 * self.info["n_out"]
        deadline = time.monotonic() + self.args.start_timeout
        last = None
        while time.monotonic() < deadline:
            try:
                req = urllib.request.Request(url, data=body, headers=headers)
                with urllib.request.urlopen(req, timeout=5) as r:
                    if r.status == 200 and ok(r.read()):
                        return
            except Exception as e:  # not up yet
                last = e
            time.sleep(0.2)
        raise PhaseTimeout(f"Ray Serve HTTP not answering at {url}: {last}")

    def stop(self) -> None:
        procs = self.procs or descendants()
        if self.started:
            import ray
            from ray import serve

            try:
                with alarm(30, "serve.shutdown"):
                    serve.shutdown()
            except BaseException as e:
                log(f"serve.shutdown: {e!r}")
            try:
                with alarm(30, "ray.shutdown"):
                    ray.shutdown()
            except BaseException as e:
                log(f"ray.shutdown: {e!r}")
        procs = list({p.pid: p for p in procs + descendants()}.values())
        kill_procs(procs)  # whatever of ours survived the shutdown
        shutil.rmtree(self.tmp, ignore_errors=True)


# --------------------------------------------------------------------------- load generator


class Window:
    """Completions recorded between begin() and end(): (latency_s, ok) pairs."""

    def __init__(self):
        self.cur: Optional[list] = None

    def begin(self) -> None:
        self.cur = []

    def end(self) -> list:
        cur, self.cur = self.cur, None
        return cur or []

    def add(self, latency: float, ok: bool) -> None:
        cur = self.cur
        if cur is not None:
            cur.append((latency, ok))


def proc_stat() -> tuple:
    """(busy, total) jiffies over all CPUs, and the number of CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        lines = f.read().splitlines()
    v = [int(x) for x in lines[0].split()[1:9]]  # user nice system idle iowait irq softirq steal
    ncpu = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    total = sum(v)
    return total - v[3] - v[4], total, ncpu


def make_payloads(width: int, rows: int, n: int = 256) -> list:
    import numpy as np

    rng = np.random.default_rng(12345)
    return [rng.standard_normal((rows, width), dtype=np.float32).tobytes() for _ in range(n)]


def summarize(cfg: dict, conc: int, run: int, recs: list, wall: float, cpu: float, busy: float,
              total: float, ncpu: int) -> dict:
    import numpy as np

    lat = np.array([l for l, ok in recs if ok], dtype=np.float64) * 1e3
    completed = int(lat.size)
    errors = len(recs) - completed

    def pct(q):
        return round(float(np.percentile(lat, q)), 3) if completed else None

    rec = {
        "system": SYSTEM_NAMES[cfg["system"]],
        "model": cfg["model_name"],
        "concurrency": conc,
        "rows": cfg["rows"],
        "run": run,
        "duration_s": round(wall, 3),
        "completed": completed,
        "errors": errors,
        "tasks_per_s": round(completed / wall, 2) if wall > 0 else 0.0,
        "p50_ms": pct(50),
        "p90_ms": pct(90),
        "p99_ms": pct(99),
        "loadgen_cpu_cores": round(cpu / wall, 3) if wall > 0 else 0.0,
        "machine_cpu_cores": round(busy / total * ncpu, 3) if total > 0 else 0.0,
    }
    corpus = cfg.get("corpus")
    if corpus:
        # Requests go out in turn, so each counts alike: tokens per request is the corpus' mean
        # (as the Rust load generator counts them).
        per_request = sum(r["tokens"] for r in corpus["requests"]) / len(corpus["requests"])
        rps = rec["tasks_per_s"]
        rec.update({"workload": "embeddings", "replicas": cfg.get("replicas"),
                    "texts_per_request": corpus["texts_per_request"], "tokens_per_request": per_request,
                    "texts_per_s": rps * corpus["texts_per_request"], "tokens_per_s": rps * per_request})
    return rec


async def http_loadgen(cfg: dict, emit: Callable[[dict], None]) -> None:
    import asyncio

    import aiohttp
    import psutil

    me = psutil.Process()
    url, rows, n_out = cfg["url"], cfg["rows"], cfg["n_out"]
    timeout = aiohttp.ClientTimeout(total=cfg["request_timeout"])
    corpus = cfg.get("corpus")
    if corpus:
        # OpenAI embeddings requests in turn (base64, as the openai package asks): an answer
        # counts when it has one embedding per text and the right token usage.
        headers = {"Content-Type": "application/json"}
        payloads = [json.dumps({"model": cfg["model_name"], "input": r["input"], "encoding_format": "base64"}).encode()
                    for r in corpus["requests"]]
        expect = [(len(r["input"]), r["tokens"]) for r in corpus["requests"]]

        def answer_ok(k: int, data: bytes) -> bool:
            try:
                doc = json.loads(data)
                return (len(doc["data"]), doc["usage"]["prompt_tokens"]) == expect[k]
            except Exception:
                return False
    else:
        want = rows * n_out * 4
        payloads = make_payloads(cfg["width"], rows)
        headers = {"Content-Type": "application/octet-stream"}

        def answer_ok(k: int, data: bytes) -> bool:
            return len(data) == want
    sent = [0]  # embeddings: requests go out in turn from every client

    for conc in cfg["concurrency"]:
        window = Window()
        stop = False
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

            async def client(i: int):
                k = i * 7
                while not stop:
                    if corpus:
                        k = sent[0]
                        sent[0] += 1
                    idx = k % len(payloads)
                    body = payloads[idx]
                    k += 1
                    t0 = time.perf_counter()
                    ok = False
                    try:
                        async with session.post(url, data=body, headers=headers) as resp:
                            data = await resp.read()
                            ok = resp.status == 200 and answer_ok(idx, data)
                    except asyncio.CancelledError:
                        raise
                    except Exception:
                        ok = False
                    window.add(time.perf_counter() - t0, ok)
                    if not ok:
                        await asyncio.sleep(ERROR_BACKOFF_S)

            tasks = [asyncio.create_task(client(i)) for i in range(conc)]
            try:
                await asyncio.sleep(cfg["warmup"])
                for run in range(cfg["runs"]):
                    c0, (b0, t0, ncpu), w0 = sum(me.cpu_times()[:2]), proc_stat(), time.perf_counter()
                    window.begin()
                    await asyncio.sleep(cfg["duration"])
                    recs = window.end()
                    c1, (b1, t1, _), w1 = sum(me.cpu_times()[:2]), proc_stat(), time.perf_counter()
                    emit(summarize(cfg, conc, run, recs, w1 - w0, c1 - c0, b1 - b0, t1 - t0, ncpu))
            finally:
                stop = True
                done, pending = await asyncio.wait(tasks, timeout=cfg["request_timeout"] + 2)
                for t in pending:
                    t.cancel()
                if pending:
                    await asyncio.wait(pending, timeout=2)


def celery_loadgen(cfg: dict, emit: Callable[[dict], None]) -> None:
    import psutil

    sys.path.insert(0, HERE)
    from celery_app import QUEUE, make_app

    me = psutil.Process()
    rows, want = cfg["rows"], cfg["rows"] * cfg["n_out"] * 4
    payloads = make_payloads(cfg["width"], rows)
    tmo = cfg["request_timeout"]

    for conc in cfg["concurrency"]:
        window = Window()
        stop = threading.Event()
        ready = threading.Barrier(conc + 1, timeout=60)

        def client(i: int):
            # Celery's Redis result consumer is not thread-safe (celery/celery#4480, #6335):
            # each client thread gets its own app, hence its own connections and pub/sub.
            app = make_app(cfg["redis_url"])
            k = i * 7
            try:
                app.connection_for_write().ensure_connection(max_retries=3)
                ready.wait()
                while not stop.is_set():
                    body = payloads[k % len(payloads)]
                    k += 1
                    t0 = time.perf_counter()
                    ok = False
                    try:
                        r = app.send_task("peers.infer", args=(body, rows), queue=QUEUE)
                        data = r.get(timeout=tmo)
                        ok = isinstance(data, (bytes, bytearray)) and len(data) == want
                    except Exception:
                        ok = False
                    window.add(time.perf_counter() - t0, ok)
                    if not ok:
                        time.sleep(ERROR_BACKOFF_S)
            except threading.BrokenBarrierError:
                pass
            finally:
                try:
                    app.close()
                except Exception:
                    pass

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(conc)]
        for t in threads:
            t.start()
        try:
            ready.wait()
            time.sleep(cfg["warmup"])
            for run in range(cfg["runs"]):
                c0, (b0, t0, ncpu), w0 = sum(me.cpu_times()[:2]), proc_stat(), time.perf_counter()
                window.begin()
                time.sleep(cfg["duration"])
                recs = window.end()
                c1, (b1, t1, _), w1 = sum(me.cpu_times()[:2]), proc_stat(), time.perf_counter()
                emit(summarize(cfg, conc, run, recs, w1 - w0, c1 - c0, b1 - b0, t1 - t0, ncpu))
        finally:
            stop.set()
            ready.abort()
            deadline = time.monotonic() + tmo + 5
            for t in threads:
                t.join(max(0.0, deadline - time.monotonic()))
            stuck = sum(t.is_alive() for t in threads)
            if stuck:
                log(f"{stuck} celery client threads still waiting after {tmo + 5:.0f}s")


def loadgen_main(cfg: dict) -> None:
    def emit(rec: dict) -> None:
        sys.stdout.write(json.dumps(rec) + "\n")
        sys.stdout.flush()

    if cfg.get("corpus_path"):
        with open(cfg["corpus_path"]) as f:
            cfg["corpus"] = json.load(f)
    if cfg["system"] == "celery":
        celery_loadgen(cfg, emit)
    else:
        import asyncio

        try:
            import uvloop

            uvloop.install()
        except Exception:
            pass
        asyncio.run(http_loadgen(cfg, emit))


# --------------------------------------------------------------------------- orchestrator


def human(rec: dict) -> str:
    def f(v):
        return "   -  " if v is None else f"{v:7.2f}"

    return (f"{rec['system']:<16} {rec['model']:<10} C={rec['concurrency']:<3} rows={rec['rows']} "
            f"run={rec['run']}  {rec['tasks_per_s']:9.1f} tasks/s  p50={f(rec['p50_ms'])} "
            f"p90={f(rec['p90_ms'])} p99={f(rec['p99_ms'])} ms  err={rec['errors']}  "
            f"client={rec['loadgen_cpu_cores']:.2f} machine={rec['machine_cpu_cores']:.2f} cores")


def run_loadgen(cfg: dict, out_path: str, expect: int, per_conc_s: float) -> int:
    """Start the load generator child, collect its records, append them to out_path."""
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--_loadgen", json.dumps(cfg)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    lines: "queue.Queue[Optional[str]]" = queue.Queue()

    def reader():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=reader, daemon=True).start()
    got = 0
    try:
        per_record = max(cfg["duration"] + 30, 30)
        first = per_conc_s  # the first record of a concurrency also waits for client set-up + warm-up
        while got < expect:
            wait = first if got % cfg["runs"] == 0 else per_record
            try:
                line = lines.get(timeout=wait)
            except queue.Empty:
                raise PhaseTimeout(f"load generator silent for {wait:.0f}s after {got}/{expect} records")
            if line is None:
                break
            rec = json.loads(line)
            with open(out_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(human(rec), flush=True)
            got += 1
        try:
            proc.wait(cfg["request_timeout"] + 20)
        except subprocess.TimeoutExpired:
            log("load generator did not exit; killing it")
        if got < expect:
            log(f"load generator exited with {proc.returncode} after {got}/{expect} records")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    return got


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--_loadgen", help=argparse.SUPPRESS)
    ap.add_argument("--system", choices=sorted(SYSTEM_NAMES))
    ap.add_argument("--model", help="path of the ONNX model")
    ap.add_argument("--model-name", help="name written in the records (default: file stem)")
    ap.add_argument("--concurrency", default="1,16,64", help="comma-separated list of C (default 1,16,64)")
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per measurement window (default 8)")
    ap.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per concurrency (default 2)")
    ap.add_argument("--runs", type=int, default=3, help="windows per concurrency (default 3)")
    ap.add_argument("--rows", type=int, default=1, help="rows per request (default 1)")
    ap.add_argument("--out", help="JSONL file the records are appended to")
    ap.add_argument("--request-timeout", type=float, default=10.0, help="per-request timeout, s (default 10)")
    ap.add_argument("--start-timeout", type=float, default=120.0, help="system start-up timeout, s (default 120)")
    ap.add_argument("--max-batch", type=int, default=64, help="ray-batch: max_batch_size (default 64)")
    ap.add_argument("--batch-wait-s", type=float, default=0.002, help="ray-batch: batch_wait_timeout_s (default 0.002)")
    ap.add_argument("--ray-max-ongoing", type=int, default=256,
                    help="replica max_ongoing_requests (default 256; Ray's own default of 5 makes the "
                         "router back off and collapses throughput at C=64, see README)")
    ap.add_argument("--celery-pool", choices=["prefork", "threads"], default="threads",
                    help="celery worker pool (default threads, the faster one here; see README)")
    ap.add_argument("--celery-prefetch", type=int, default=4, help="worker_prefetch_multiplier (default 4)")
    ap.add_argument("--tokenizer", help="ray-embed: the model's tokenizer.json")
    ap.add_argument("--corpus", help="ray-embed: the requests, as `bench corpus --out` writes them")
    ap.add_argument("--replicas", type=int, default=1,
                    help="ray-embed: Serve replicas, one inference thread each (default 1)")
    args = ap.parse_args()

    if args._loadgen:
        loadgen_main(json.loads(args._loadgen))
        return 0
    for req in ("system", "model", "out"):
        if not getattr(args, req):
            ap.error(f"--{req} is required")
    concs = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if not concs or min(concs) < 1 or args.runs < 1 or args.rows < 1 or args.duration <= 0:
        ap.error("bad --concurrency/--runs/--rows/--duration")
    model_name = args.model_name or os.path.splitext(os.path.basename(args.model))[0]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    per_conc = 60 + args.warmup + args.request_timeout  # client set-up + warm-up + slack
    total = (args.start_timeout + 60 + len(concs) * (per_conc + args.runs * (args.duration + 5)
                                                    + args.request_timeout + 10))
    hard_watchdog(total + 60)

    def on_term(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)

    corpus = None
    if args.system == "ray-embed":
        if not (args.tokenizer and args.corpus):
            ap.error("ray-embed needs --tokenizer and --corpus")
        with open(args.corpus) as f:
            corpus = json.load(f)
        info = {"embeddings": True, "width": 0, "n_out": 0}
        log(f"{SYSTEM_NAMES[args.system]} / {model_name}: /v1/embeddings, {len(corpus['requests'])} requests of "
            f"{corpus['texts_per_request']} texts, {args.replicas} replicas")
    else:
        info = model_info(args.model)
        log(f"{SYSTEM_NAMES[args.system]} / {model_name}: input {info['input']}[*,{info['width']}] -> "
            f"{info['output']}[*,{info['n_out']}]")
    if args.system == "celery":
        system = CelerySystem(args, info)
    else:
        system = RaySystem(args, info, batch=args.system == "ray-batch")

    rc = 0
    t_start = time.monotonic()
    try:
        with alarm(args.start_timeout + 30, f"starting {args.system}"):
            endpoint = system.start()
        startup = time.monotonic() - t_start
        print(f"{SYSTEM_NAMES[args.system]} / {model_name}: started in {startup:.1f}s", flush=True)
        cfg = dict(endpoint, system=args.system, model_name=model_name, width=info["width"],
                   n_out=info["n_out"], rows=args.rows, concurrency=concs, duration=args.duration,
                   warmup=args.warmup, runs=args.runs, request_timeout=args.request_timeout,
                   corpus_path=os.path.abspath(args.corpus) if corpus else None,
                   replicas=args.replicas if corpus else None)
        expect = len(concs) * args.runs
        got = run_loadgen(cfg, args.out, expect, per_conc)
        if got < expect:
            rc = 1
        if not system.alive():
            log(f"{SYSTEM_NAMES[args.system]} lost a process during the run: its records are suspect")
            rc = 1
    except BaseException as e:
        log(f"failed: {e!r}")
        rc = 1 if not isinstance(e, SystemExit) else (e.code or 1)
    finally:
        t_stop = time.monotonic()
        try:
            system.stop()
        except BaseException as e:
            log(f"cleanup: {e!r}")
            kill_procs(descendants())
        log(f"stopped in {time.monotonic() - t_stop:.1f}s; total {time.monotonic() - t_start:.1f}s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
