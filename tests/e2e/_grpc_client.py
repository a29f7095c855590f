"""``tritonclient.grpc`` in a process of its own: it and KServe register the same protobuf names
(``inference.*``) in protobuf's default pool, so the two cannot be imported in one process.

    python tests/e2e/_grpc_client.py HOST:PORT MODEL < request.json   (prints the answer as JSON)

``request.json``: ``{"inputs": [{"name", "datatype", "data": [...]}]}`` (BYTES data as text). The answer:
``{"ready": bool, "label": [...], "model_version": str}``, or ``{"error": {"status", "message"}}``.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import tritonclient.grpc as tgrpc

_NUMPY = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "BOOL": np.bool_, "BYTES": np.object_}


def main() -> None:
    url, model = sys.argv[1], sys.argv[2]
    request = json.load(sys.stdin)
    client = tgrpc.InferenceServerClient(url)
    answer: dict = {"ready": client.is_model_ready(model)}
    inputs = []
    for spec in request["inputs"]:
        data = spec["data"]
        if spec["datatype"] == "BYTES":
            arr = np.array([v.encode() for v in data], dtype=np.object_)
        else:
            arr = np.array([np.nan if v is None else v for v in data], dtype=_NUMPY[spec["datatype"]])
        t = tgrpc.InferInput(spec["name"], list(arr.shape), spec["datatype"])
        t.set_data_from_numpy(arr)
        inputs.append(t)
    try:
        result = client.infer(model, inputs)
        answer["label"] = [v.decode() for v in result.as_numpy("label").tolist()]
        answer["model_version"] = result.get_response().model_version
    except tgrpc.InferenceServerException as e:
        answer["error"] = {"status": e.status(), "message": e.message()}
    finally:
        client.close()
    print(json.dumps(answer))


if __name__ == "__main__":
    main()
