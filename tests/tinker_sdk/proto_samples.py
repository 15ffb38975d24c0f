"""Protobuf bodies as Tinker's SDK writes them, and results as it reads them (run in an SDK venv).

`python proto_samples.py requests MODEL_ID` prints {name: hex} of ForwardBackwardRequest bodies
built with the SDK's own converter; `python proto_samples.py decode KIND` reads {name: hex} of
result bodies on stdin and prints what the SDK's own decoder makes of them. The tests in
test_wire_proto.py compare these with Bios's codec, so Bios is checked against the SDK's real
encoder and decoder, not against itself.
"""

from __future__ import annotations

import json
import sys

import numpy as np
from tinker import types
from tinker.proto import request_conv, response_conv


def requests(model_id: str) -> dict[str, str]:
    seq = list(range(10, 20))
    plain = types.Datum(model_input=types.ModelInput.from_ints(seq[:-1]), loss_fn_inputs={
        "target_tokens": np.array(seq[1:], dtype=np.int64),
        "weights": np.linspace(0, 1, len(seq) - 1, dtype=np.float32),
        "logprobs": np.full(len(seq) - 1, -2.0, dtype=np.float32),
        "advantages": np.ones(len(seq) - 1, dtype=np.float32)})
    csr = types.TensorData(data=[11, 12, 13], dtype="int64", shape=[3, 2],
                           sparse_crow_indices=[0, 1, 1, 3], sparse_col_indices=[1, 0, 1])
    sparse = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]),
                         loss_fn_inputs={"target_tokens": csr})
    image = types.Datum(model_input=types.ModelInput(chunks=[
        types.ImageChunk(data=b"\x89PNG....", format="png")]), loss_fn_inputs={})

    def body(data: list, loss_fn: str = "cross_entropy", config: dict | None = None,
             seq_id: int = 1) -> str:
        req = types.ForwardBackwardRequest(
            forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn=loss_fn,
                                                              loss_fn_config=config),
            model_id=model_id, seq_id=seq_id)
        return request_conv.forward_backward_request_to_proto(req).SerializeToString().hex()

    return {"plain": body([plain, plain], "ppo", {"clip_low_threshold": 0.75}),
            "text_config": body([plain], "cross_entropy", {"mode": "sum"}, seq_id=2),
            "sparse": body([sparse], seq_id=3),
            "image": body([image], seq_id=4)}


def decode(kind: str, bodies: dict[str, str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for name, hexed in bodies.items():
        raw = bytes.fromhex(hexed)
        if kind == "forward_backward":
            r = response_conv.deserialize_forward_backward_output(raw)
            out[name] = {"metrics": r.metrics, "loss_fn_output_type": r.loss_fn_output_type,
                         "outputs": [{k: {"data": v.tolist(), "shape": v.shape}
                                      for k, v in o.items()} for o in r.loss_fn_outputs]}
        else:
            s = response_conv.deserialize_sample_response(raw)
            plp = s.prompt_logprobs
            out[name] = {"sequences": [{"stop_reason": q.stop_reason, "tokens": list(q.tokens),
                                        "logprobs": None if q.logprobs is None
                                        else list(q.logprobs)} for q in s.sequences],
                         "prompt_logprobs": None if plp is None else list(plp),
                         "topk": s.topk_prompt_logprobs}
    return out


if __name__ == "__main__":
    if sys.argv[1] == "requests":
        print(json.dumps(requests(sys.argv[2])))
    else:
        print(json.dumps(decode(sys.argv[2], json.load(sys.stdin)), default=str))
