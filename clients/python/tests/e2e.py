"""Run by tests/python_client.rs against a running pipeline (env: SUNDARA_NATS_URL,
SUNDARA_NATS_CA, SUNDARA_NATS_CREDS): a verified `mlp` inference with the async client and
with the sync one, a batch job run by the client and one run by the jobs service, and typed
rejections. Prints what it got as one JSON line."""

import asyncio
import json
import os
import sys

import numpy as np

from sundara import Client, SyncClient, Tensor
from sundara import errors


def inputs(rows: int) -> list[Tensor]:
    values = np.array([(i % 100) / 100 for i in range(rows * 784)], dtype=np.float32).reshape(rows, 784)
    return [Tensor.from_numpy("x", values)]


async def main() -> dict:
    settings = dict(ca=os.environ["SUNDARA_NATS_CA"], creds=os.environ.get("SUNDARA_NATS_CREDS"))
    url = os.environ["SUNDARA_NATS_URL"]
    out: dict = {}
    async with await Client.connect(url, **settings) as client:
        out["tenant"] = client.tenant
        outputs = await client.infer("mlp", inputs(2), request_id="py-1")
        out["outputs"] = {t.name: {"shape": t.shape, "values": t.values()} for t in outputs}
        task_id = await client.submit("mlp", inputs(2), request_id="py-1")
        out["same_task_again"] = (await client.result(task_id)).verified
        # A batch job of 250 rows in shards of 100: the same rows as one task, in order.
        seen: list = []
        job = await client.run_job("mlp", inputs(250), shard_rows=100, progress=lambda v, n: seen.append((v, n)))
        whole = await client.infer("mlp", inputs(250))
        out["job"] = {
            "shapes": [t.shape for t in job],
            "max_diff": max(float(np.abs(a.to_numpy() - b.to_numpy()).max()) for a, b in zip(job, whole)),
            "progress": seen[-1],
        }
        # The same rows as a server-side job, put in parts of one 100-row shard each.
        status = await client.submit_job("mlp", inputs(250), shard_rows=100, part_bytes=100 * 784 * 4)
        server = await client.job_results(status["job_id"])
        out["server_job"] = {
            "parts": status["parts"],
            "shapes": [t.shape for t in server],
            "max_diff": max(float(np.abs(a.to_numpy() - b.to_numpy()).max()) for a, b in zip(server, whole)),
            "listed": (await client.jobs())[0]["job_id"] == status["job_id"],
        }
        for attempt in [lambda: client.job("no-such-job"), lambda: client.cancel_job(status["job_id"])]:
            try:
                await attempt()
            except errors.JobRefused as e:
                out.setdefault("job_refusals", []).append(e.code)
        for model, batch, expected in [("nope", inputs(1), errors.UnknownModel), ("mlp", [Tensor.from_values("x", "f32", [1, 3], [1, 2, 3])], errors.WrongShape)]:
            try:
                await client.submit(model, batch)
                out.setdefault("not_rejected", []).append(model)
            except expected as e:
                out.setdefault("rejected", []).append(e.code)
    sync = await asyncio.to_thread(SyncClient.connect, url, **settings)
    try:
        out["sync_outputs"] = len(await asyncio.to_thread(sync.infer, "mlp", inputs(1)))
    finally:
        await asyncio.to_thread(sync.close)
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main())))
    sys.stdout.flush()
