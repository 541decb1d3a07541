"""The Python client writes and reads the same bytes as the Rust types: checked against
`schemas/golden/*.hex`, which `schemas/tests/golden.rs` pins on the Rust side."""

import pathlib
import unittest

from sundara import wire
from sundara.wire import Tensor

GOLDEN = pathlib.Path(__file__).resolve().parents[3] / "schemas" / "golden"


def golden(name: str) -> bytes:
    return bytes.fromhex((GOLDEN / f"{name}.hex").read_text().strip())


def x() -> Tensor:
    return Tensor.from_values("x", "f32", [1, 2], [1.5, -2.0])


class GoldenBytes(unittest.TestCase):
    def test_a_submit_request_is_the_rust_bytes(self):
        request = wire.SubmitRequest(
            model="mlp",
            inputs=[x(), Tensor.from_values("sr", "i64", [], [16000])],
            request_id="r-1",
            seed=7,
            timeout_ms=5000,
            priority="high",
        )
        self.assertEqual(request.encode().hex(), golden("submit_request").hex())

    def test_replies_decode(self):
        self.assertEqual(wire.decode_submit_reply(golden("submit_reply_accepted")),
                         wire.Accepted(task_id="0192f0c4a1b2", duplicate=False))
        rejected = wire.decode_submit_reply(golden("submit_reply_rejected"))
        self.assertEqual(rejected, wire.Rejected(code="wrong_shape", reason="input `x` must have shape [?, 784]"))

    def test_a_verified_result_decodes(self):
        result = wire.decode_client_result(golden("client_result"))
        self.assertTrue(result.verified)
        self.assertEqual((result.task_id, result.model, result.version), ("0192f0c4a1b2", "mlp", "1"))
        self.assertEqual((result.agreeing, result.k, result.completed_at_ms), (2, 3, 1_700_000_000_000))
        self.assertEqual(result.outputs, [x()])
        self.assertEqual(result.outputs[0].values(), [1.5, -2.0])

    def test_job_requests_are_the_rust_bytes_and_answers_decode(self):
        spec = dict(model="mlp", parts=2, shard_rows=100, in_flight=8, attempts=3, shard_timeout_ms=60_000,
                    deadline_ms=3_600_000)
        self.assertEqual(wire.encode_job_request("Create", spec).hex(), golden("job_request_create").hex())
        put = wire.encode_job_request("Put", dict(job_id="j1", part=1, inputs=[x()]))
        self.assertEqual(put.hex(), golden("job_request_put").hex())
        self.assertEqual(wire.encode_job_request("List", {}).hex(), golden("job_request_list").hex())
        self.assertEqual(wire.decode_job_reply(golden("job_reply_outputs")), wire.ShardOutput(2, 200, "t1", [x()]))
        self.assertEqual(wire.decode_job_reply(golden("job_reply_refused")), wire.JobRefusal("not_found", "no job j9"))

    def test_numpy_arrays_become_tensors_and_back(self):
        import numpy as np

        array = np.array([[1.5, -2.0]], dtype=np.float32)
        tensor = Tensor.from_numpy("x", array)
        self.assertEqual(tensor, x())
        np.testing.assert_array_equal(tensor.to_numpy(), array)

    def test_a_miscounted_tensor_is_refused(self):
        with self.assertRaises(ValueError):
            Tensor.from_values("x", "f32", [2, 2], [1.0])

    def test_another_wire_version_is_refused(self):
        with self.assertRaises(ValueError):
            wire.decode_submit_reply(bytes.fromhex("82a17602a76f7574636f6d65c0"))


if __name__ == "__main__":
    unittest.main()
