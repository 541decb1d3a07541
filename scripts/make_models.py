#!/usr/bin/env python3
"""Generate the deterministic generated models used by Sundara's tests and benchmarks.

Usage: make_models.py OUT_DIR

- `mlp.onnx`, a small MLP classifier (overhead-dominated: about 25 us per row on one core):
    x f32 [batch, 784] -> Gemm(784->256) -> Relu -> Gemm(256->10) = logits f32 [batch, 10]
                                                   Softmax(logits, axis=-1) = probs f32 [batch, 10]
- `mlp_heavy.onnx`, a compute-heavy MLP for the benchmarks (about 8.4 M multiply-adds per row):
    x f32 [batch, 1024] -> Gemm(1024->2048) -> Relu -> Gemm(2048->2048) -> Relu -> Gemm(2048->1000)
                        = logits f32 [batch, 1000], probs = Softmax(logits)
Weights come from numpy's default_rng(42), so the files are byte-for-byte identical
on every run (opset 17, IR version 8).
"""
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SEED = 42
OPSET = 17
IR_VERSION = 8
MODELS = {
    "mlp": [784, 256, 10],
    "mlp_heavy": [1024, 2048, 2048, 1000],
}


def build_mlp(name: str, dims: list) -> onnx.ModelProto:
    rng = np.random.default_rng(SEED)
    initializers, nodes = [], []
    current = "x"
    layers = len(dims) - 1
    for i in range(layers):
        fan_in, fan_out = dims[i], dims[i + 1]
        # mlp keeps its original 0.05 scale (and so its outputs); wider layers are scaled by
        # fan-in so that activations stay in a sane range.
        scale = 0.05 if name == "mlp" else 1.6 / np.sqrt(fan_in)
        w = (rng.standard_normal((fan_in, fan_out)) * scale).astype(np.float32)
        b = (rng.standard_normal((fan_out,)) * 0.01).astype(np.float32)
        initializers += [numpy_helper.from_array(w, name=f"w{i + 1}"), numpy_helper.from_array(b, name=f"b{i + 1}")]
        out = "logits" if i == layers - 1 else f"h{i + 1}"
        nodes.append(helper.make_node("Gemm", [current, f"w{i + 1}", f"b{i + 1}"], [out], name=f"fc{i + 1}"))
        if i < layers - 1:
            nodes.append(helper.make_node("Relu", [out], [f"{out}_relu"], name=f"relu{i + 1}"))
            current = f"{out}_relu"
    nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1))
    graph = helper.make_graph(
        nodes,
        name,
        inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", dims[0]])],
        outputs=[
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", dims[-1]]),
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", dims[-1]]),
        ],
        initializer=initializers,
    )
    return finish_model(graph, "sundara-make-models")


def finish_model(graph: onnx.GraphProto, producer: str) -> onnx.ModelProto:
    """`graph` as a checked model of opset OPSET and IR version IR_VERSION."""
    model = helper.make_model(
        graph, producer_name=producer, producer_version="1", opset_imports=[helper.make_opsetid("", OPSET)]
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def main() -> int:
    if len(sys.argv) != 2:
        print(f"usage: {sys.argv[0]} OUT_DIR", file=sys.stderr)
        return 2
    out_dir = sys.argv[1]
    os.makedirs(out_dir, exist_ok=True)
    for name, dims in MODELS.items():
        path = os.path.join(out_dir, f"{name}.onnx")
        data = build_mlp(name, dims).SerializeToString(deterministic=True)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        onnx.checker.check_model(path, full_check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
