#!/usr/bin/env python3
"""Generate the deterministic demo model `mlp.onnx` used by Sundara's tests.

Usage: make_models.py OUT_DIR

The model is a small MLP classifier:
    x f32 [batch, 784] -> Gemm(784->256) -> Relu -> Gemm(256->10) = logits f32 [batch, 10]
                                                   Softmax(logits, axis=-1) = probs f32 [batch, 10]
Weights come from numpy's default_rng(42), so the output file is byte-for-byte
identical on every run (opset 17, IR version 8).
"""
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SEED = 42
OPSET = 17
IR_VERSION = 8
IN_DIM, HIDDEN, OUT_DIM = 784, 256, 10


def build_mlp() -> onnx.ModelProto:
    rng = np.random.default_rng(SEED)
    w1 = (rng.standard_normal((IN_DIM, HIDDEN)) * 0.05).astype(np.float32)
    b1 = (rng.standard_normal((HIDDEN,)) * 0.01).astype(np.float32)
    w2 = (rng.standard_normal((HIDDEN, OUT_DIM)) * 0.05).astype(np.float32)
    b2 = (rng.standard_normal((OUT_DIM,)) * 0.01).astype(np.float32)

    initializers = [
        numpy_helper.from_array(w1, name="w1"),
        numpy_helper.from_array(b1, name="b1"),
        numpy_helper.from_array(w2, name="w2"),
        numpy_helper.from_array(b2, name="b2"),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["h_relu"], name="relu1"),
        helper.make_node("Gemm", ["h_relu", "w2", "b2"], ["logits"], name="fc2"),
        helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", IN_DIM])],
        outputs=[
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", OUT_DIM]),
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", OUT_DIM]),
        ],
        initializer=initializers,
    )
    model = helper.make_model(
        graph,
        producer_name="sundara-make-models",
        producer_version="1",
        opset_imports=[helper.make_opsetid("", OPSET)],
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
    path = os.path.join(out_dir, "mlp.onnx")
    data = build_mlp().SerializeToString(deterministic=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    onnx.checker.check_model(path, full_check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
