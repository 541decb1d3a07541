#!/usr/bin/env python3
"""Build the training step that Sundara's miners run, and the dataset it trains on.

Usage: make_train_step.py DIGITS_CSV_GZ OUT_DIR OUT_CSV

- OUT_DIR/digits_train.onnx: one step of a 64 -> 64 -> 10 ReLU classifier, forward
  and backward, in plain ONNX operators that ONNX Runtime's CPU build runs. The weights are
  inputs and the gradients outputs, so an inference runtime trains:

      inputs   x f32 [rows, 64]   pixels scaled to [0, 1]
               y f32 [rows, 10]   one-hot labels
               w1 f32 [64, 64], b1 f32 [64], w2 f32 [64, 10], b2 f32 [10]
      outputs  loss    f32 [1]    cross-entropy summed over the rows
               correct i64 [1]    rows whose argmax is the label
               grad_w1, grad_b1, grad_w2, grad_b2   d(loss)/d(weight), summed over the rows

  Sums, not means: the gradient of a batch is the sum of its shards' gradients, so the
  trainer adds what the shards return and divides by the batch's rows once.
- OUT_DIR/digits.onnx: the same classifier for inference (x -> logits, probs), its weights
  initializers named as the step's weight inputs (zeros here). `sundara train` publishes
  each trained version as a copy of this file with the trained values in those
  initializers, so the network serves what it trained.
- OUT_CSV (`digits.csv`): scikit-learn's digits (1,797 8x8 images, 0-16 grey levels, the
  UCI optdigits test set), one row per image: 64 pixels then the label, no header. The
  input is `sklearn/datasets/data/digits.csv.gz` from the scikit-learn wheel, which
  `scripts/setup` extracts and checks by sha256.

The graph is checked against a numpy forward and backward pass and against finite
differences before it is written; the file is byte-for-byte the same on every run.
"""
import gzip
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from make_models import finish_model

FEATURES, HIDDEN, CLASSES = 64, 64, 10
WEIGHTS = [("w1", [FEATURES, HIDDEN]), ("b1", [HIDDEN]), ("w2", [HIDDEN, CLASSES]), ("b2", [CLASSES])]


def forward(logits: str) -> list:
    """The classifier's forward pass, x -> `logits`: the same in the step and the inference graph."""
    n = helper.make_node
    return [
        n("MatMul", ["x", "w1"], ["xw1"]),
        n("Add", ["xw1", "b1"], ["h_pre"]),
        n("Relu", ["h_pre"], ["h"]),
        n("MatMul", ["h", "w2"], ["hw2"]),
        n("Add", ["hw2", "b2"], [logits]),
    ]


def build() -> onnx.ModelProto:
    n = helper.make_node
    axis0 = helper.make_tensor("axis0", TensorProto.INT64, [1], [0])
    one = helper.make_tensor("one", TensorProto.INT64, [1], [1])
    nodes = forward("z") + [
        n("LogSoftmax", ["z"], ["logp"], axis=-1),
        n("Mul", ["y", "logp"], ["ylogp"]),
        n("ReduceSum", ["ylogp"], ["neg_loss"], keepdims=0),
        n("Neg", ["neg_loss"], ["loss_scalar"]),
        n("Reshape", ["loss_scalar", "one"], ["loss"]),
        n("ArgMax", ["z"], ["predicted"], axis=1, keepdims=0),
        n("ArgMax", ["y"], ["label"], axis=1, keepdims=0),
        n("Equal", ["predicted", "label"], ["hit"]),
        n("Cast", ["hit"], ["hit_i64"], to=TensorProto.INT64),
        n("ReduceSum", ["hit_i64"], ["correct_scalar"], keepdims=0),
        n("Reshape", ["correct_scalar", "one"], ["correct"]),
        # Backward: d(loss)/dz = softmax(z) - y, then the chain rule through both layers.
        n("Exp", ["logp"], ["p"]),
        n("Sub", ["p", "y"], ["dz"]),
        n("Transpose", ["h"], ["h_t"], perm=[1, 0]),
        n("MatMul", ["h_t", "dz"], ["grad_w2"]),
        n("ReduceSum", ["dz", "axis0"], ["grad_b2"], keepdims=0),
        n("Transpose", ["w2"], ["w2_t"], perm=[1, 0]),
        n("MatMul", ["dz", "w2_t"], ["dh"]),
        n("Greater", ["h_pre", "zero"], ["active"]),
        n("Cast", ["active"], ["active_f"], to=TensorProto.FLOAT),
        n("Mul", ["dh", "active_f"], ["dh_pre"]),
        n("Transpose", ["x"], ["x_t"], perm=[1, 0]),
        n("MatMul", ["x_t", "dh_pre"], ["grad_w1"]),
        n("ReduceSum", ["dh_pre", "axis0"], ["grad_b1"], keepdims=0),
    ]
    f32 = TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info("x", f32, ["rows", FEATURES]),
        helper.make_tensor_value_info("y", f32, ["rows", CLASSES]),
    ] + [helper.make_tensor_value_info(name, f32, shape) for name, shape in WEIGHTS]
    outputs = [
        helper.make_tensor_value_info("loss", f32, [1]),
        helper.make_tensor_value_info("correct", TensorProto.INT64, [1]),
    ] + [helper.make_tensor_value_info(f"grad_{name}", f32, shape) for name, shape in WEIGHTS]
    zero = helper.make_tensor("zero", f32, [], [0.0])
    graph = helper.make_graph(nodes, "digits_train", inputs, outputs, initializer=[axis0, one, zero])
    return finish_model(graph, "sundara-make-train-step")


def build_inference() -> onnx.ModelProto:
    nodes = forward("logits") + [helper.make_node("Softmax", ["logits"], ["probs"], axis=-1)]
    f32 = TensorProto.FLOAT
    weights = [numpy_helper.from_array(np.zeros(shape, np.float32), name) for name, shape in WEIGHTS]
    graph = helper.make_graph(
        nodes,
        "digits",
        [helper.make_tensor_value_info("x", f32, ["batch", FEATURES])],
        [
            helper.make_tensor_value_info("logits", f32, ["batch", CLASSES]),
            helper.make_tensor_value_info("probs", f32, ["batch", CLASSES]),
        ],
        initializer=weights,
    )
    return finish_model(graph, "sundara-make-train-step")


def numpy_step(x, y, w1, b1, w2, b2):
    h_pre = x @ w1 + b1
    h = np.maximum(h_pre, 0)
    z = h @ w2 + b2
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    loss = -(y * logp).sum()
    dz = np.exp(logp) - y
    dh_pre = (dz @ w2.T) * (h_pre > 0)
    grads = [x.T @ dh_pre, dh_pre.sum(axis=0), h.T @ dz, dz.sum(axis=0)]
    return loss, grads


def check(model_bytes: bytes, data: np.ndarray) -> None:
    """The graph's loss and gradients equal numpy's, and numpy's equal finite differences."""
    rng = np.random.default_rng(3)
    x = (data[:32, :FEATURES] / 16.0).astype(np.float32)
    y = np.eye(CLASSES, dtype=np.float32)[data[:32, FEATURES].astype(int)]
    weights = [(rng.standard_normal(shape) * 0.1).astype(np.float32) for _, shape in WEIGHTS]
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    feeds = {"x": x, "y": y, **{name: w for (name, _), w in zip(WEIGHTS, weights)}}
    loss, correct, *grads = session.run(None, feeds)
    want_loss, want_grads = numpy_step(x.astype(np.float64), y, *[w.astype(np.float64) for w in weights])
    assert loss.shape == (1,) and correct.shape == (1,), (loss.shape, correct.shape)
    assert np.isclose(loss[0], want_loss, rtol=1e-5), (loss, want_loss)
    for got, want in zip(grads, want_grads):
        assert np.allclose(got, want, rtol=1e-4, atol=1e-5), np.abs(got - want).max()
    w64 = [w.astype(np.float64) for w in weights]
    for which, index in [(0, (3, 5)), (1, (7,)), (2, (11, 2)), (3, (4,))]:
        eps = 1e-6
        up = [w.copy() for w in w64]
        up[which][index] += eps
        down = [w.copy() for w in w64]
        down[which][index] -= eps
        numeric = (numpy_step(x, y, *up)[0] - numpy_step(x, y, *down)[0]) / (2 * eps)
        assert np.isclose(numeric, want_grads[which][index], rtol=1e-4, atol=1e-6), (which, numeric)


def main() -> int:
    if len(sys.argv) != 4:
        print(f"usage: {sys.argv[0]} DIGITS_CSV_GZ OUT_DIR OUT_CSV", file=sys.stderr)
        return 2
    digits_gz, out_dir, out_csv = sys.argv[1:]
    with gzip.open(digits_gz, "rt") as f:
        data = np.loadtxt(f, delimiter=",")
    assert data.shape == (1797, FEATURES + 1), data.shape
    model_bytes = build().SerializeToString(deterministic=True)
    check(model_bytes, data)
    for path, content in [
        (os.path.join(out_dir, "digits_train.onnx"), model_bytes),
        (os.path.join(out_dir, "digits.onnx"), build_inference().SerializeToString(deterministic=True)),
        (out_csv, "".join(",".join(str(int(v)) for v in row) + "\n" for row in data).encode()),
    ]:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path + ".tmp", "wb") as f:
            f.write(content)
        os.replace(path + ".tmp", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
