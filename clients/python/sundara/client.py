"""The client: submit tasks over NATS as a tenant, and await their results.

Connection settings are the CLI's: a NATS URL (`tls://` with a pinned CA), an NKey seed
file from `sundara auth init` (the tenant is the seed's, `tenant-<t>.nk`), and a client
certificate where the server verifies clients. Results come through one of the tenant's
RESULTS consumers, `results-<tenant>-<slot>` (the only ones its credentials may touch),
created when the client connects: every result stored after that reaches the request
waiting for it, even one that ends before its `submit` returned.
"""

from __future__ import annotations

import asyncio
import collections
import json
import pathlib
import ssl
import threading
import uuid
from typing import Any, Optional, Sequence

import nats
import nats.errors

from . import errors, wire
from .wire import Result, Tensor

RESULTS_STREAM = "RESULTS"
#: How many result followers one tenant may have at once (the Rust client's too).
RESULT_FOLLOWERS = 16
#: Results of tasks no one waits for (yet) kept at most, oldest dropped first.
UNCLAIMED = 10_000


def _seed(path: str) -> str:
    """The seed (`SU…`) in a seed file as `sundara auth` writes them."""
    for line in pathlib.Path(path).read_text().splitlines():
        if line.strip().startswith("SU"):
            return line.strip()
    raise errors.SundaraError(f"{path}: no NKey seed in it")


def _tenant_of(creds: Optional[str]) -> Optional[str]:
    name = pathlib.Path(creds).name if creds else ""
    if name.startswith("tenant-") and name.endswith(".nk"):
        return name[len("tenant-"):-len(".nk")]
    return None


class Client:
    """An asyncio client of one tenant. Use `await Client.connect(...)`, or `async with`."""

    def __init__(self, nc: Any, tenant: str):
        self._nc = nc
        self.tenant = tenant
        self._waiting: dict[str, asyncio.Future] = {}
        self._unclaimed: collections.OrderedDict[str, Result] = collections.OrderedDict()
        # Tasks submitted again (same request id), whose result may be stored already.
        self._resubmitted: set[str] = set()
        self._consumer: Optional[str] = None
        self._last_seq = 0
        self._follower: Optional[asyncio.Task] = None

    @classmethod
    async def connect(
        cls,
        url: str = "nats://127.0.0.1:4222",
        *,
        creds: Optional[str] = None,
        ca: Optional[str] = None,
        cert: Optional[str] = None,
        key: Optional[str] = None,
        tenant: Optional[str] = None,
    ) -> "Client":
        """Connects as `tenant` (default: the tenant of `creds`, else `default`). `ca` pins
        the CA the server's certificate must be signed by; `cert`/`key` for mutual TLS."""
        options: dict[str, Any] = {"servers": [url], "allow_reconnect": True, "max_reconnect_attempts": -1}
        if ca or url.startswith("tls://"):
            context = ssl.create_default_context(cafile=ca)
            if cert:
                context.load_cert_chain(cert, key)
            options["tls"] = context
        if creds:
            import nkeys

            seed = _seed(creds)
            public = nkeys.from_seed(seed.encode()).public_key.decode()
            # Only this user's inbox is open to it: replies come there.
            options.update(nkeys_seed_str=seed, inbox_prefix=f"_INBOX_{public}")
        own = _tenant_of(creds)
        if own and tenant and tenant != own:
            raise errors.SundaraError(f"your credentials are tenant {own}'s; tenant {tenant} is not permitted")
        client = cls(await nats.connect(**options), tenant or own or "default")
        await client._follow(deliver={"deliver_policy": "new"})
        client._follower = asyncio.create_task(client._hand_out())
        return client

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        if self._follower:
            self._follower.cancel()
        if self._consumer:
            try:
                await self._nc.request(f"$JS.API.CONSUMER.DELETE.{RESULTS_STREAM}.{self._consumer}", b"", timeout=2)
            except Exception:
                pass  # it lapses 30 s after its last pull anyway
        await self._nc.close()

    async def submit(
        self,
        model: str,
        inputs: Sequence[Tensor],
        *,
        request_id: Optional[str] = None,
        timeout_ms: Optional[int] = None,
        priority: str = "normal",
        seed: int = 0,
    ) -> str:
        """Submits one task; its task id. Raises the `Rejected` subclass of its code."""
        request = wire.SubmitRequest(model, list(inputs), request_id, seed, timeout_ms, priority)
        reply = await self._nc.request(f"sundara.submit.{self.tenant}", request.encode(), timeout=30)
        outcome = wire.decode_submit_reply(reply.data)
        if isinstance(outcome, wire.Rejected):
            raise errors.Rejected.of(outcome.code, outcome.reason)
        if outcome.duplicate:
            self._resubmitted.add(outcome.task_id)
        return outcome.task_id

    async def result(self, task_id: str, timeout: float = 120.0) -> Result:
        """The task's result (verified or failed); `ResultTimeout` after `timeout` seconds."""
        if task_id in self._unclaimed:
            return self._unclaimed.pop(task_id)
        if task_id in self._resubmitted:
            self._resubmitted.discard(task_id)
            stored = await self._stored(task_id)
            if stored is not None:
                return stored
        future = self._waiting.setdefault(task_id, asyncio.get_running_loop().create_future())
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except asyncio.TimeoutError:
            raise errors.ResultTimeout(f"no result for task {task_id} within {timeout} s") from None
        finally:
            if future.done():
                self._waiting.pop(task_id, None)

    async def infer(self, model: str, inputs: Sequence[Tensor], **submit: Any) -> list[Tensor]:
        """Submits and awaits: the verified outputs, or `TaskFailed`."""
        result = await self.result(await self.submit(model, inputs, **submit))
        if not result.verified:
            raise errors.TaskFailed(result.task_id, result.code or "failed", result.reason or "")
        return result.outputs

    async def run_job(
        self,
        model: str,
        inputs: Sequence[Tensor],
        *,
        shard_rows: int = 100,
        in_flight: int = 8,
        attempts: int = 3,
        timeout_ms: Optional[int] = None,
        progress: Optional[Any] = None,
    ) -> list[Tensor]:
        """A batch job (docs/jobs.md): `inputs`' rows (every tensor's first dimension)
        cut into shard tasks of `shard_rows` rows, `in_flight` at once, each verified; a
        shard that ends unverified is submitted again, up to `attempts` times in all, and a
        refusal to retry later waits for a shard to end. Returns the outputs of every row,
        in order; raises `TaskFailed` once a shard has used its attempts. `progress`, if
        given, is called with (verified, shards) after each shard ends."""
        shards = _split_rows(list(inputs), shard_rows)
        outputs: list[Optional[list[Tensor]]] = [None] * len(shards)
        tried = [0] * len(shards)
        pending = collections.deque(range(len(shards)))
        running: dict[asyncio.Future, int] = {}
        wait = (timeout_ms or 120_000) / 1000 + 10
        verified = 0
        while verified < len(shards):
            while pending and len(running) < max(in_flight, 1):
                i = pending.popleft()
                try:
                    task_id = await self.submit(model, shards[i], timeout_ms=timeout_ms)
                except errors.RetryLater:
                    pending.appendleft(i)
                    if not running:
                        await asyncio.sleep(0.2)
                    break
                tried[i] += 1
                running[asyncio.ensure_future(self.result(task_id, timeout=wait))] = i
            if not running:
                continue
            done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for ended in done:
                i = running.pop(ended)
                result = ended.result()
                if result.verified:
                    outputs[i] = result.outputs
                    verified += 1
                elif tried[i] >= max(attempts, 1):
                    for other in running:
                        other.cancel()
                    raise errors.TaskFailed(result.task_id, result.code or "failed", result.reason or "")
                else:
                    pending.appendleft(i)
                if progress is not None:
                    progress(verified, len(shards))
        return _stack_rows([o for o in outputs if o is not None])

    # ------------------------------------------------------------------ server-side jobs

    async def _job(self, op: str, fields: dict) -> Any:
        subject = f"sundara.jobs.{self.tenant}.{op.lower()}"
        try:
            reply = await self._nc.request(subject, wire.encode_job_request(op, fields), timeout=30)
        except nats.errors.NoRespondersError:
            raise errors.JobRefused("unavailable", "no jobs service answers (is it running?)") from None
        answer = wire.decode_job_reply(reply.data)
        if isinstance(answer, wire.JobRefusal):
            raise errors.JobRefused(answer.code, answer.reason)
        return answer

    async def submit_job(
        self,
        model: str,
        inputs: Sequence[Tensor],
        *,
        shard_rows: int = 100,
        in_flight: int = 8,
        attempts: int = 3,
        shard_timeout_ms: int = 60_000,
        deadline_s: int = 3600,
        part_bytes: int = 4 << 20,
    ) -> dict:
        """A server-side job (docs/jobs.md §3): `inputs`' rows put in parts of whole shards
        of at most `part_bytes` each, then started; the jobs service runs its shards,
        retries them, keeps its progress and outputs, and ends it at its deadline. Returns
        the job's status (`job_id`, `state`, `shards`, ...); follow it with `job_results`."""
        rows = inputs[0].shape[0] if inputs and inputs[0].shape else 0
        row_bytes = max(sum(len(t.data) // max(rows, 1) for t in inputs), 1)
        per_part = max(part_bytes // (row_bytes * max(shard_rows, 1)), 1) * max(shard_rows, 1)
        parts = _split_rows(list(inputs), per_part)
        spec = dict(model=model, parts=len(parts), shard_rows=shard_rows, in_flight=in_flight, attempts=attempts,
                    shard_timeout_ms=shard_timeout_ms, deadline_ms=deadline_s * 1000)
        job_id = (await self._job("Create", spec))["job_id"]
        for i, part in enumerate(parts):
            await self._job("Put", dict(job_id=job_id, part=i, inputs=part))
        return await self._job("Start", dict(job_id=job_id))

    async def job(self, job_id: str) -> dict:
        """The job's status: `state`, `shards`, `verified`, `running`, `retried`, `eta_ms`, ..."""
        return await self._job("Show", dict(job_id=job_id))

    async def jobs(self) -> list[dict]:
        """This tenant's jobs, newest first (at most 100)."""
        return await self._job("List", {})

    async def cancel_job(self, job_id: str) -> dict:
        """Stops the job: no shard is submitted after this; verified ones stay readable."""
        return await self._job("Cancel", dict(job_id=job_id))

    async def job_shard(self, job_id: str, shard: int) -> wire.ShardOutput:
        """One verified shard's outputs."""
        return await self._job("Fetch", dict(job_id=job_id, shard=shard))

    async def job_shards(self, job_id: str, *, idle: float = 300.0) -> Any:
        """Yields the job's verified shards in order, each as soon as it and those before it
        are verified; raises `JobEnded` if the job fails, is cancelled or expires, and
        `ResultTimeout` if nothing changes for `idle` seconds."""
        events = await self._nc.subscribe(f"sundara.jobevent.{self.tenant}.{job_id}")
        try:
            following, last, changed = 0, None, asyncio.get_running_loop().time()
            while True:
                status = await self.job(job_id)
                while following < status["verified_prefix"]:
                    yield await self.job_shard(job_id, following)
                    following += 1
                if status != last:
                    last, changed = status, asyncio.get_running_loop().time()
                if status["state"] == "done":
                    return
                if status["state"] in ("failed", "cancelled", "expired"):
                    raise errors.JobEnded(job_id, status["state"], status.get("reason") or "")
                if asyncio.get_running_loop().time() - changed > idle:
                    raise errors.ResultTimeout(f"job {job_id}: nothing changed within {idle} s")
                try:
                    await events.next_msg(timeout=1)
                except nats.errors.TimeoutError:
                    pass
        finally:
            await events.unsubscribe()

    async def job_results(self, job_id: str, *, progress: Optional[Any] = None, idle: float = 300.0) -> list[Tensor]:
        """Follows the job to its end: every row's outputs, in order. `progress`, if given,
        is called with (shards read, shard) as each arrives."""
        parts = []
        async for shard in self.job_shards(job_id, idle=idle):
            parts.append(shard.outputs)
            if progress is not None:
                progress(len(parts), shard)
        return _stack_rows(parts)

    # ------------------------------------------------------------------ results

    async def _create_consumer(self, filter_subject: str, deliver: dict) -> str:
        """Creates a RESULTS consumer in the first free one of the tenant's slots (a strict
        create: a slot another follower holds is skipped); its name."""
        mark = f"python follower {uuid.uuid4().hex}"
        start = uuid.uuid4().int % RESULT_FOLLOWERS
        for i in range(RESULT_FOLLOWERS):
            name = f"results-{self.tenant}-{(start + i) % RESULT_FOLLOWERS}"
            config = {
                "name": name,
                "description": mark,
                "filter_subject": filter_subject,
                "ack_policy": "none",
                "max_deliver": 1,
                "inactive_threshold": 30_000_000_000,
                "num_replicas": 1,
                "mem_storage": True,
                **deliver,
            }
            request = {"stream_name": RESULTS_STREAM, "config": config, "action": "create"}
            subject = f"$JS.API.CONSUMER.CREATE.{RESULTS_STREAM}.{name}.{filter_subject}"
            reply = json.loads((await self._nc.request(subject, json.dumps(request).encode(), timeout=10)).data)
            error = reply.get("error")
            if error and error.get("err_code") == 10148:  # consumer already exists: another follower's
                continue
            if error:
                raise errors.SundaraError(f"cannot follow results: {error.get('description')}")
            return name
        raise errors.SundaraError(f"tenant {self.tenant} already follows its results {RESULT_FOLLOWERS} times")

    async def _follow(self, deliver: dict) -> None:
        """This client's results consumer, and a pull subscription bound to it."""
        self._consumer = await self._create_consumer(f"sundara.result.{self.tenant}.>", deliver)
        self._pull = await self._nc.jetstream().pull_subscribe_bind(consumer=self._consumer, stream=RESULTS_STREAM)

    async def _stored(self, task_id: str) -> Optional[Result]:
        """The task's result if RESULTS already holds it (for a resubmitted request, whose
        result may have been stored before this client followed)."""
        name = await self._create_consumer(f"sundara.result.{self.tenant}.{task_id}", {"deliver_policy": "last"})
        try:
            pull = await self._nc.jetstream().pull_subscribe_bind(consumer=name, stream=RESULTS_STREAM)
            try:
                messages = await pull.fetch(batch=1, timeout=2.0)
            except nats.errors.TimeoutError:
                return None
            finally:
                await pull.unsubscribe()
            return wire.decode_client_result(messages[0].data) if messages else None
        finally:
            await self._nc.request(f"$JS.API.CONSUMER.DELETE.{RESULTS_STREAM}.{name}", b"", timeout=5)

    async def _hand_out(self) -> None:
        """Pulls results and hands each to the request waiting for it (or keeps it, bounded,
        for one that will ask). A consumer that went away is made again after the last
        result seen."""
        while True:
            try:
                messages = await self._pull.fetch(batch=256, timeout=1.0)
            except nats.errors.TimeoutError:
                continue
            except asyncio.CancelledError:
                raise
            except Exception:
                await asyncio.sleep(0.5)
                try:
                    await self._follow(deliver={"deliver_policy": "by_start_sequence", "opt_start_seq": self._last_seq + 1})
                except Exception:
                    pass
                continue
            for msg in messages:
                self._last_seq = max(self._last_seq, msg.metadata.sequence.stream)
                result = wire.decode_client_result(msg.data)
                future = self._waiting.pop(result.task_id, None)
                if future is not None and not future.done():
                    future.set_result(result)
                else:
                    self._unclaimed[result.task_id] = result
                    while len(self._unclaimed) > UNCLAIMED:
                        self._unclaimed.popitem(last=False)


def _split_rows(inputs: list[Tensor], rows_per_shard: int) -> list[list[Tensor]]:
    """`inputs` cut along their common first dimension into shards of `rows_per_shard` rows."""
    if not inputs or any(not t.shape or t.shape[0] != inputs[0].shape[0] for t in inputs):
        raise ValueError("a job's inputs need a common first dimension (rows) to split along")
    rows, step = inputs[0].shape[0], max(rows_per_shard, 1)
    shards = []
    for start in range(0, rows, step):
        n = min(step, rows - start)
        shard = []
        for t in inputs:
            row = len(t.data) // rows
            shard.append(Tensor(t.name, t.dtype, [n] + t.shape[1:], t.data[start * row:(start + n) * row]))
        shards.append(shard)
    return shards


def _stack_rows(parts: list[list[Tensor]]) -> list[Tensor]:
    """The shards' outputs put back together along the first dimension, in order."""
    stacked = []
    for i, first in enumerate(parts[0]):
        rows = sum(p[i].shape[0] for p in parts)
        stacked.append(Tensor(first.name, first.dtype, [rows] + first.shape[1:], b"".join(p[i].data for p in parts)))
    return stacked


class SyncClient:
    """The same client for code without asyncio: its own event loop in a thread."""

    def __init__(self, client: Client, loop: asyncio.AbstractEventLoop, thread: threading.Thread):
        self._client, self._loop, self._thread = client, loop, thread
        self.tenant = client.tenant

    @classmethod
    def connect(cls, url: str = "nats://127.0.0.1:4222", **options: Any) -> "SyncClient":
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="sundara-client", daemon=True)
        thread.start()
        client = asyncio.run_coroutine_threadsafe(Client.connect(url, **options), loop).result()
        return cls(client, loop, thread)

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def submit(self, model: str, inputs: Sequence[Tensor], **options: Any) -> str:
        return self._run(self._client.submit(model, inputs, **options))

    def result(self, task_id: str, timeout: float = 120.0) -> Result:
        return self._run(self._client.result(task_id, timeout))

    def infer(self, model: str, inputs: Sequence[Tensor], **options: Any) -> list[Tensor]:
        return self._run(self._client.infer(model, inputs, **options))

    def run_job(self, model: str, inputs: Sequence[Tensor], **options: Any) -> list[Tensor]:
        return self._run(self._client.run_job(model, inputs, **options))

    def submit_job(self, model: str, inputs: Sequence[Tensor], **options: Any) -> dict:
        return self._run(self._client.submit_job(model, inputs, **options))

    def job(self, job_id: str) -> dict:
        return self._run(self._client.job(job_id))

    def jobs(self) -> list[dict]:
        return self._run(self._client.jobs())

    def cancel_job(self, job_id: str) -> dict:
        return self._run(self._client.cancel_job(job_id))

    def job_results(self, job_id: str, **options: Any) -> list[Tensor]:
        return self._run(self._client.job_results(job_id, **options))

    def close(self) -> None:
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def __enter__(self) -> "SyncClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
