#!/usr/bin/env python3
"""Split an ONNX model by layer into stages that each run as a model of their own.

Usage: split_model.py MODEL.onnx --at TENSOR[,TENSOR...] --out DIR [--name NAME]

Cuts the graph at the named tensors, in order: stage 0 runs from the model's inputs to
the first cut, stage i from cut i-1 to cut i, and the last stage from the last cut to the
model's outputs. Each stage is written as DIR/NAME-s<i>.onnx, its input the cut tensor
before it and its output the cut tensor after it (the model's own inputs and outputs at
the ends), and DIR/NAME-stages.json lists them in order with their sha256, inputs and
outputs. Register each stage as a model (`sundara models push DIR/NAME-s0.onnx --name
NAME-s0`, ...) and run them with `sundara run-staged` or `sundara::staged::run` (docs/jobs.md).

A cut must separate the graph: every stage needs exactly the tensor of the cut before it
(no skip connection may cross a cut), or the split is refused with the tensors it would
also need. Deterministic: the same model and cuts give the same bytes.
"""
import argparse
import hashlib
import json
import os
import sys

import onnx
from onnx import utils


def stage_inputs(model: onnx.ModelProto) -> set:
    """The tensors a graph reads that nothing in it produces (its real inputs)."""
    produced = {i.name for i in model.graph.initializer}
    needed = set()
    for node in model.graph.node:
        for name in node.input:
            if name and name not in produced:
                needed.add(name)
        produced.update(node.output)
    return needed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--at", required=True, help="comma-separated tensor names to cut at, in order")
    parser.add_argument("--out", required=True)
    parser.add_argument("--name", help="stage name prefix (default: the model file's stem)")
    args = parser.parse_args()

    # Shape inference names the type and shape of every intermediate tensor (a cut needs them).
    model = onnx.shape_inference.infer_shapes(onnx.load(args.model))
    name = args.name or os.path.splitext(os.path.basename(args.model))[0]
    cuts = [c for c in args.at.split(",") if c]
    known = {o for n in model.graph.node for o in n.output}
    for cut in cuts:
        if cut not in known:
            print(f"split_model: no tensor {cut!r} in {args.model}", file=sys.stderr)
            return 2
    inputs = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    outputs = [o.name for o in model.graph.output]
    bounds = [inputs] + [[c] for c in cuts] + [outputs]
    os.makedirs(args.out, exist_ok=True)
    extractor = utils.Extractor(model)
    stages = []
    for i in range(len(bounds) - 1):
        stage = extractor.extract_model(bounds[i], bounds[i + 1])
        extra = stage_inputs(stage) - set(bounds[i])
        if extra:
            print(f"split_model: stage {i} also needs {sorted(extra)}: cut where nothing crosses", file=sys.stderr)
            return 2
        stage.graph.name = f"{name}-s{i}"
        onnx.checker.check_model(stage)
        path = os.path.join(args.out, f"{name}-s{i}.onnx")
        data = stage.SerializeToString()
        with open(path, "wb") as f:
            f.write(data)
        stages.append({
            "name": f"{name}-s{i}",
            "file": os.path.basename(path),
            "sha256": hashlib.sha256(data).hexdigest(),
            "inputs": bounds[i],
            "outputs": bounds[i + 1],
        })
    manifest = {"model": name, "stages": stages}
    with open(os.path.join(args.out, f"{name}-stages.json"), "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    print(json.dumps(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
