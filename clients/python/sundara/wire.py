"""Sundara's wire format: MessagePack maps with named fields, exactly as the Rust types in
`schemas/` write them (`rmp_serde::to_vec_named`). `tests/test_wire.py` checks these
functions against `schemas/golden/*.hex`, the bytes the Rust side writes.

- A struct is a map of its fields, in declaration order; `None` is nil.
- A tensor's data is raw little-endian bytes (MessagePack bin), row-major.
- An enum without data is its snake_case name (`"high"`); one with data is a one-key map
  from its variant's name to its fields (`{"Accepted": {"task_id": ..., "duplicate": ...}}`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import msgpack

#: The wire version every message carries in `v`.
WIRE_VERSION = 1

#: dtype name → (struct format character, bytes per element).
DTYPES = {
    "f32": ("f", 4),
    "f64": ("d", 8),
    "i8": ("b", 1),
    "u8": ("B", 1),
    "i16": ("h", 2),
    "i32": ("i", 4),
    "i64": ("q", 8),
    "bool": ("?", 1),
}

#: numpy dtype names → Sundara's.
_NUMPY = {"float32": "f32", "float64": "f64", "int8": "i8", "uint8": "u8", "int16": "i16", "int32": "i32",
          "int64": "i64", "bool": "bool"}


@dataclass
class Tensor:
    """A named tensor: dtype (`f32`, `i64`, ...), shape, and row-major little-endian bytes."""

    name: str
    dtype: str
    shape: list[int]
    data: bytes

    @staticmethod
    def from_values(name: str, dtype: str, shape: Sequence[int], values: Sequence[Any]) -> "Tensor":
        """A tensor of flat `values` (row-major)."""
        fmt, _ = DTYPES[dtype]
        count = 1
        for d in shape:
            count *= d
        if len(values) != count:
            raise ValueError(f"{name}: shape {list(shape)} has {count} elements, got {len(values)} values")
        return Tensor(name, dtype, list(shape), struct.pack(f"<{count}{fmt}", *values))

    @staticmethod
    def from_numpy(name: str, array: Any) -> "Tensor":
        """A tensor of a numpy array (copied, little-endian, row-major)."""
        import numpy as np

        dtype = _NUMPY.get(str(array.dtype))
        if dtype is None:
            raise ValueError(f"{name}: numpy dtype {array.dtype} has no Sundara dtype")
        little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        return Tensor(name, dtype, list(array.shape), little.tobytes())

    def values(self) -> list[Any]:
        """The elements, flat (row-major)."""
        fmt, size = DTYPES[self.dtype]
        return list(struct.unpack(f"<{len(self.data) // size}{fmt}", self.data))

    def to_numpy(self) -> Any:
        import numpy as np

        numpy_name = {v: k for k, v in _NUMPY.items()}[self.dtype]
        return np.frombuffer(self.data, dtype=np.dtype(numpy_name).newbyteorder("<")).reshape(self.shape)

    def to_wire(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "data": bytes(self.data)}

    @staticmethod
    def from_wire(m: dict) -> "Tensor":
        return Tensor(m["name"], m["dtype"], list(m["shape"]), bytes(m["data"]))


@dataclass
class SubmitRequest:
    model: str
    inputs: list[Tensor]
    request_id: Optional[str] = None
    seed: int = 0
    timeout_ms: Optional[int] = None
    priority: str = "normal"

    def encode(self) -> bytes:
        return msgpack.packb(
            {
                "v": WIRE_VERSION,
                "model": self.model,
                "inputs": [t.to_wire() for t in self.inputs],
                "request_id": self.request_id,
                "seed": self.seed,
                "timeout_ms": self.timeout_ms,
                "priority": self.priority,
            },
            use_bin_type=True,
        )


@dataclass
class Accepted:
    task_id: str
    duplicate: bool


@dataclass
class Rejected:
    code: str
    reason: str


def _variant(m: Any) -> tuple[str, Any]:
    """An enum with data: its one key and value."""
    if not isinstance(m, dict) or len(m) != 1:
        raise ValueError(f"not an enum variant: {m!r}")
    return next(iter(m.items()))


def _unpack(payload: bytes) -> dict:
    m = msgpack.unpackb(payload, raw=False)
    if not isinstance(m, dict) or m.get("v") != WIRE_VERSION:
        raise ValueError("not a Sundara message of wire version 1")
    return m


def decode_submit_reply(payload: bytes) -> Accepted | Rejected:
    variant, fields = _variant(_unpack(payload)["outcome"])
    if variant == "Accepted":
        return Accepted(fields["task_id"], fields["duplicate"])
    if variant == "Rejected":
        return Rejected(fields["code"], fields["reason"])
    raise ValueError(f"unknown submit outcome {variant}")


@dataclass
class Result:
    """A task's end: `verified` with its outputs and how many of its k miners agreed, or a
    failure `code` (`no_consensus`, `expired`) with its reason."""

    task_id: str
    model: str
    version: str
    verified: bool
    outputs: list[Tensor] = field(default_factory=list)
    agreeing: int = 0
    k: int = 0
    code: Optional[str] = None
    reason: Optional[str] = None
    completed_at_ms: int = 0


def decode_client_result(payload: bytes) -> Result:
    m = _unpack(payload)
    variant, fields = _variant(m["status"])
    base = dict(task_id=m["task_id"], model=m["model"]["name"], version=m["model"]["version"],
                completed_at_ms=m["completed_at_ms"])
    if variant == "Verified":
        outputs = [Tensor.from_wire(t) for t in fields["outputs"]]
        return Result(verified=True, outputs=outputs, agreeing=fields["agreeing"], k=fields["k"], **base)
    if variant == "Failed":
        return Result(verified=False, code=fields["code"], reason=fields["reason"], **base)
    raise ValueError(f"unknown result status {variant}")


# ---------------------------------------------------------------------- server-side jobs


def encode_job_request(op: str, fields: dict) -> bytes:
    """A `JobRequest`: `op` (`Create`, `Put`, `Start`, `Show`, `List`, `Cancel`, `Fetch`)
    with its fields."""
    if op == "Put":
        fields = dict(fields, inputs=[t.to_wire() for t in fields["inputs"]])
    return msgpack.packb({"v": WIRE_VERSION, "op": {op: fields}}, use_bin_type=True)


@dataclass
class JobRefusal:
    code: str
    reason: str


@dataclass
class ShardOutput:
    """One verified shard of a job: the job's rows `first_row .. first_row + rows`."""

    shard: int
    first_row: int
    task_id: str
    outputs: list[Tensor]


def decode_job_reply(payload: bytes) -> Any:
    """A job's status (a dict), a list of them, a `ShardOutput` or a `JobRefusal`."""
    variant, fields = _variant(_unpack(payload)["answer"])
    if variant in ("Status", "List"):
        return fields
    if variant == "Outputs":
        outputs = [Tensor.from_wire(t) for t in fields["outputs"]]
        return ShardOutput(fields["shard"], fields["first_row"], fields["task_id"], outputs)
    if variant == "Refused":
        return JobRefusal(fields["code"], fields["reason"])
    raise ValueError(f"unknown job answer {variant}")
