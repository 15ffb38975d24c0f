"""Tinker's protobuf wire format, as Bios reads and writes it: a small codec of its own.

Tinker's SDK (0.25 and later) sends `forward_backward` (and forward-only passes, as
`forward_only=true` on the same route) as a protobuf `ForwardBackwardRequest`, and asks for two
results, `ForwardBackwardOutput` and `SampleResponse`, as protobuf (`Accept:
application/x-protobuf`). Bios does not vendor a schema: this module decodes exactly the
fields it uses (varint and length-delimited fields, by number) into Bios's JSON wire shapes
(`bios.types`), and encodes the two results from their JSON shapes. Unknown fields are skipped,
as protobuf requires, except where a field would change the request's meaning (image or audio
chunks, provenance spans): those are a `ProtoDecodeError` that names the feature.

Field numbers (tinker_public.proto, read from the published wheels):
  ForwardBackwardRequest: model_id=1 (string), seq_id=2 (int32), data=3 (Datum), loss_fn=4,
    loss_fn_config=5 (map<string,double>), forward_only=6 (bool),
    loss_fn_config_v2=7 (map<string, LossConfigValue{number=1 double | text=2 string}>)
  Datum: model_input=1 (Chunk), loss_fn_inputs=2 (map<string,Tensor>), model_input_spans=3,
    loss_fn_input_spans=4
  Chunk: encoded_text=1 {tokens=1: int32 bytes}, image=2, dmel=3
  Tensor: dense=1 (bytes), sparse_csr=2 {values=1, crow_indices=2, col_indices=3 (int64)},
    dtype=3 (enum: FLOAT32=1 INT64=2 INT32=3 BFLOAT16=4), shape=4 (packed int64)
  ForwardBackwardOutput: loss_fn_output_type=1, loss_fn_outputs=2 (ArrayRecord),
    metrics=3 (map<string,double>)
  ArrayRecord: type_tag=1, fields=2 (map<string,BatchedTensor>), num_datums=3
  BatchedTensor: data=1, offsets=2 (int64 byte offsets, n+1), dtype=3, trailing_shape=4
  SampleResponse: sequences=1, prompt_logprobs=2 (float32 bytes, NaN = none),
    topk_prompt_logprobs=3, prompt_cache_hit_tokens=4
  SampledSequence: stop_reason=1 (STOP=0, LENGTH=1), tokens=2 (int32 bytes),
    logprobs=3 (float32 bytes)
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import numpy as np

PROTOBUF = "application/x-protobuf"

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
DTYPE_FLOAT32, DTYPE_INT64, DTYPE_INT32, DTYPE_BFLOAT16 = 1, 2, 3, 4
_NUMPY = {DTYPE_FLOAT32: np.float32, DTYPE_INT64: np.int64, DTYPE_INT32: np.int32}
_STOP_REASON = {"stop": 0, "length": 1}


class ProtoDecodeError(ValueError):
    """The body is not a ForwardBackwardRequest Bios can read; `field` names where."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


# ----------------------------------------------------------------------------- reading


def _varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ProtoDecodeError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ProtoDecodeError("varint longer than 10 bytes")


def fields(buf: bytes | memoryview) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) for each field of one message: an int for varint and
    fixed-width fields, a memoryview for length-delimited ones."""
    view = memoryview(buf)
    pos, end = 0, len(view)
    while pos < end:
        key, pos = _varint(view, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ProtoDecodeError("field number 0")
        if wire == _VARINT:
            value, pos = _varint(view, pos)
        elif wire == _LEN:
            size, pos = _varint(view, pos)
            if pos + size > end:
                raise ProtoDecodeError("length-delimited field runs past the message end")
            value, pos = view[pos:pos + size], pos + size
        elif wire == _I64:
            if pos + 8 > end:
                raise ProtoDecodeError("truncated 64-bit field")
            value, pos = int.from_bytes(view[pos:pos + 8], "little"), pos + 8
        elif wire == _I32:
            if pos + 4 > end:
                raise ProtoDecodeError("truncated 32-bit field")
            value, pos = int.from_bytes(view[pos:pos + 4], "little"), pos + 4
        else:
            raise ProtoDecodeError(f"unsupported wire type {wire}")
        yield number, wire, value


def _want(wire: int, expected: int, field: str) -> None:
    if wire != expected:
        raise ProtoDecodeError(f"{field} has the wrong wire type ({wire})", field)


def _text(value: Any, field: str) -> str:
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProtoDecodeError(f"{field} is not valid UTF-8", field) from e


def _double(bits: int) -> float:
    return struct.unpack("<d", bits.to_bytes(8, "little"))[0]


def _int32(v: int) -> int:
    """A varint read as a signed 32-bit value (negatives are sent sign-extended to 64 bits)."""
    v &= 0xFFFFFFFFFFFFFFFF
    return v - (1 << 64) if v >= 1 << 63 else v


def _map_entry(buf: memoryview, field: str) -> tuple[str, Any]:
    key, value = "", None
    for number, wire, v in fields(buf):
        if number == 1:
            _want(wire, _LEN, field)
            key = _text(v, field)
        elif number == 2:
            value = (wire, v)
    return key, value


def _array(data: memoryview, dtype: int, field: str) -> np.ndarray:
    np_dtype = _NUMPY.get(dtype)
    if np_dtype is None:
        raise ProtoDecodeError(f"{field}: tensor dtype {dtype} is not supported (float32, int64 "
                               "or int32)", field)
    if len(data) % np.dtype(np_dtype).itemsize:
        raise ProtoDecodeError(f"{field}: {len(data)} bytes is not a whole number of "
                               f"{np.dtype(np_dtype).name} values", field)
    return np.frombuffer(data, dtype=np_dtype)


def _tensor(buf: memoryview, field: str) -> dict[str, Any]:
    """A Tensor message -> Bios's TensorData JSON ({data, dtype, shape}); CSR made dense."""
    dense: memoryview | None = None
    csr: dict[int, memoryview] = {}
    dtype = 0
    shape: list[int] = []
    for number, wire, v in fields(buf):
        if number == 1:
            _want(wire, _LEN, field)
            dense = v
        elif number == 2:
            _want(wire, _LEN, field)
            csr = {n: sv for n, w, sv in fields(v) if w == _LEN}
        elif number == 3:
            dtype = v
        elif number == 4:
            if wire == _LEN:  # packed
                pos = 0
                while pos < len(v):
                    dim, pos = _varint(v, pos)
                    shape.append(_int32(dim))
            else:
                shape.append(_int32(v))
    if dtype == 0:
        raise ProtoDecodeError(f"{field}: tensor has no dtype", field)
    if csr:
        values = _array(csr.get(1, memoryview(b"")), dtype, field)
        crow = _array(csr.get(2, memoryview(b"")), DTYPE_INT64, field)
        col = _array(csr.get(3, memoryview(b"")), DTYPE_INT64, field)
        if len(shape) != 2 or len(crow) != shape[0] + 1 or len(col) != len(values):
            raise ProtoDecodeError(f"{field}: sparse CSR tensor does not match its shape "
                                   f"{shape}", field)
        arr = np.zeros(shape, dtype=values.dtype)
        rows = np.repeat(np.arange(shape[0]), np.diff(crow))
        if len(col) and (col.min() < 0 or col.max() >= shape[1]):
            raise ProtoDecodeError(f"{field}: sparse column index outside the shape", field)
        arr[rows, col] = values
        flat = arr.ravel()
    else:
        flat = _array(dense if dense is not None else memoryview(b""), dtype, field)
    kind = "float32" if flat.dtype.kind == "f" else "int64"
    return {"data": flat.tolist(), "dtype": kind, "shape": shape or None}


def _chunk(buf: memoryview, field: str) -> list[int]:
    for number, wire, v in fields(buf):
        if number == 1:
            _want(wire, _LEN, field)
            for n, w, tv in fields(v):
                if n == 1 and w == _LEN:
                    return _array(tv, DTYPE_INT32, field).tolist()
            return []
        if number in (2, 3):
            what = "image" if number == 2 else "audio (dmel)"
            raise ProtoDecodeError(f"{field}: {what} chunks are not supported; Bios trains on "
                                   "text (encoded_text chunks) only", field)
    return []


def _datum(buf: memoryview, field: str) -> dict[str, Any]:
    tokens: list[int] = []
    inputs: dict[str, Any] = {}
    for number, wire, v in fields(buf):
        if number == 1:
            _want(wire, _LEN, field)
            tokens += _chunk(v, f"{field}.model_input")
        elif number == 2:
            key, tensor = _map_entry(v, f"{field}.loss_fn_inputs")
            where = f"{field}.loss_fn_inputs.{key}"
            if tensor is None or tensor[0] != _LEN:
                raise ProtoDecodeError(f"{where} has no tensor", where)
            inputs[key] = _tensor(tensor[1], where)
        elif number in (3, 4):
            raise ProtoDecodeError(f"{field}: provenance spans (Datum.with_provenance, for "
                                   "stable_reinforce) are not supported by Bios; train with "
                                   "importance_sampling instead", field)
    return {"model_input": {"chunks": [{"tokens": tokens, "type": "encoded_text"}]},
            "loss_fn_inputs": inputs}


def peek_ids(body: bytes) -> tuple[str | None, int | None]:
    """model_id and seq_id of a ForwardBackwardRequest, for filling a rejected request's slot
    even when the rest of the body cannot be read; (None, None) where they cannot be either."""
    run_id: str | None = None
    seq_id: int | None = None
    try:
        for number, wire, v in fields(body):
            if number == 1 and wire == _LEN:
                run_id = bytes(v).decode("utf-8")
            elif number == 2 and wire == _VARINT:
                seq_id = _int32(v)
    except (ProtoDecodeError, UnicodeDecodeError):
        pass
    return run_id, seq_id


def decode_forward_backward(body: bytes) -> tuple[dict[str, Any], bool]:
    """A protobuf ForwardBackwardRequest -> (the Bios JSON request body, forward_only).

    The JSON body is what `/api/v1/forward_backward` (or `/api/v1/forward` when forward_only)
    takes, so it then passes the same validation as a JSON request.
    """
    run_id, seq_id, loss_fn, forward_only = "", 0, "", False
    data: list[dict[str, Any]] = []
    config_v1: dict[str, float] = {}
    config_v2: dict[str, Any] = {}
    for number, wire, v in fields(body):
        if number == 1:
            _want(wire, _LEN, "model_id")
            run_id = _text(v, "model_id")
        elif number == 2:
            _want(wire, _VARINT, "seq_id")
            seq_id = _int32(v)
        elif number == 3:
            _want(wire, _LEN, "data")
            data.append(_datum(v, f"data[{len(data)}]"))
        elif number == 4:
            _want(wire, _LEN, "loss_fn")
            loss_fn = _text(v, "loss_fn")
        elif number == 5:
            key, value = _map_entry(v, "loss_fn_config")
            if value is not None and value[0] == _I64:
                config_v1[key] = _double(value[1])
        elif number == 6:
            forward_only = bool(v)
        elif number == 7:
            key, value = _map_entry(v, "loss_fn_config_v2")
            if value is None or value[0] != _LEN:
                continue
            for n, w, cv in fields(value[1]):
                if n == 1 and w == _I64:
                    config_v2[key] = _double(cv)
                elif n == 2 and w == _LEN:
                    config_v2[key] = _text(cv, f"loss_fn_config.{key}")
    # The SDK writes float values to both maps and text values to v2 only; v2 wins when set.
    config = config_v2 or config_v1
    inp = {"data": data, "loss_fn": loss_fn, "loss_fn_config": config or None}
    req = {"model_id": run_id, "seq_id": seq_id,
           ("forward_input" if forward_only else "forward_backward_input"): inp}
    return req, forward_only


# ----------------------------------------------------------------------------- writing


def _key(number: int, wire: int) -> bytes:
    return _uvarint(number << 3 | wire)


def _uvarint(v: int) -> bytes:
    v &= 0xFFFFFFFFFFFFFFFF
    out = bytearray()
    while v > 0x7F:
        out.append(v & 0x7F | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
    return _key(number, _LEN) + _uvarint(len(payload)) + payload


def _str_field(number: int, text: str) -> bytes:
    return _len_field(number, text.encode("utf-8"))


def _varint_field(number: int, v: int) -> bytes:
    return _key(number, _VARINT) + _uvarint(v) if v else b""


def _double_map(number: int, values: dict[str, float]) -> bytes:
    return b"".join(_len_field(number, _str_field(1, k) + _key(2, _I64)
                               + struct.pack("<d", float(v))) for k, v in values.items())


def _batched(arrays: list[np.ndarray], dtype: int, trailing: list[int]) -> bytes:
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([a.nbytes for a in arrays])
    data = b"".join(a.tobytes() for a in arrays)
    packed = b"".join(_uvarint(d) for d in trailing)
    return (_len_field(1, data) + _len_field(2, offsets.tobytes()) + _varint_field(3, dtype)
            + (_len_field(4, packed) if trailing else b""))


def encode_forward_backward_output(out: dict[str, Any]) -> bytes:
    """A ForwardBackwardOutput in Bios's JSON shape -> protobuf (one batched ArrayRecord)."""
    outputs: list[dict[str, Any]] = out.get("loss_fn_outputs") or []
    record = b""
    if outputs:
        record += _str_field(1, "ArrayRecord")
        for name in outputs[0]:
            first = outputs[0][name]
            is_float = first.get("dtype", "float32") == "float32"
            np_dtype = np.float32 if is_float else np.int64
            shape = first.get("shape") or []
            trailing = [int(d) for d in shape[1:]]
            arrays = [np.asarray(o[name]["data"], dtype=np_dtype) for o in outputs]
            bt = _batched(arrays, DTYPE_FLOAT32 if is_float else DTYPE_INT64, trailing)
            record += _len_field(2, _str_field(1, name) + _len_field(2, bt))
        record += _varint_field(3, len(outputs))
    msg = _str_field(1, out.get("loss_fn_output_type") or "ArrayRecord")
    if outputs:
        msg += _len_field(2, record)
    return msg + _double_map(3, out.get("metrics") or {})


def encode_sample_response(out: dict[str, Any]) -> bytes:
    """A SampleResponse in Bios's JSON shape -> protobuf."""
    msg = b""
    for seq in out.get("sequences") or []:
        body = _varint_field(1, _STOP_REASON.get(seq.get("stop_reason"), 0))
        body += _len_field(2, np.asarray(seq.get("tokens") or [], dtype=np.int32).tobytes())
        if seq.get("logprobs") is not None:
            body += _len_field(3, np.asarray(seq["logprobs"], dtype=np.float32).tobytes())
        msg += _len_field(1, body)
    prompt_lp = out.get("prompt_logprobs")
    if prompt_lp is not None:
        values = [float("nan") if v is None else float(v) for v in prompt_lp]
        msg += _len_field(2, np.asarray(values, dtype=np.float32).tobytes())
    topk = out.get("topk_prompt_logprobs")
    if topk:
        k = max((len(row) for row in topk if row), default=0)
        if k:
            ids = np.zeros((len(topk), k), dtype=np.int32)
            lps = np.full((len(topk), k), -99999.0, dtype=np.float32)
            for i, row in enumerate(topk):
                for j, (tok, lp) in enumerate(row or []):
                    ids[i, j], lps[i, j] = tok, lp
            msg += _len_field(3, _len_field(1, ids.tobytes()) + _len_field(2, lps.tobytes())
                              + _varint_field(3, k) + _varint_field(4, len(topk)))
    return msg + _varint_field(4, int(out.get("prompt_cache_hit_tokens") or 0))


def encode_result(body: str | bytes, json_loads: Any) -> bytes | None:
    """A finished request's JSON body as protobuf when it is one of the two result types the
    SDK reads as protobuf (ForwardBackwardOutput, SampleResponse); None for anything else
    (other results, errors), which stay JSON."""
    obj = json_loads(body)
    if not isinstance(obj, dict):
        return None
    if obj.get("type") == "sample" and "sequences" in obj:
        return encode_sample_response(obj)
    if "loss_fn_outputs" in obj and "metrics" in obj and "error" not in obj:
        return encode_forward_backward_output(obj)
    return None
