"""The benchmark's baseline: a plain ``kserve.Model`` of a package, one forward pass per request.

What one would write without a batcher: load the package (``ScoringModel``: the same backend as the
conveyor predictor picks, e.g. onnxruntime) and the fitted transforms, and in ``predict`` transform the
request's input and run it. Same request format as the conveyor predictor's
raw-pixel / per-feature V2 input, same outputs, so the load generator is the same.

    python tests/bench/_plain_kserve_model.py --model-dir URI --name NAME --http-port P [--device D] [--torch-threads N]
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model-dir", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--torch-threads", type=int, default=0)
    args = p.parse_args()

    import kserve
    import numpy as np
    import torch
    from kserve import InferOutput, InferRequest, InferResponse

    from conveyor.runtime.serving.model import ScoringModel

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    class PlainModel(kserve.Model):
        def load(self) -> bool:
            self.scoring = ScoringModel.open(args.model_dir, args.device)
            self.pkg = self.scoring.package
            self.ready = True
            return True

        def predict(self, payload: InferRequest | dict, headers: dict[str, str] | None = None) -> Any:
            t = self.pkg.transforms
            if isinstance(payload, dict):  # V1: rows, or images as KServe's image example sends them
                from _ray_serve_model import decode  # the same decoding as the Ray Serve peer

                probs = self.scoring.forward(decode(self.pkg, payload["instances"]))
                classes = self.pkg.classes
                return {
                    "predictions": [
                        {"label": classes[int(r.argmax())], "probabilities": r.tolist()} for r in probs
                    ]
                }
            if t.kind == "image":
                x = t.apply(payload.inputs[0].as_numpy())
            else:
                x = t.apply({i.name: i.as_numpy().tolist() for i in payload.inputs})
            probs = self.scoring.forward(x)
            classes = self.pkg.classes
            label = InferOutput("label", [len(probs)], "BYTES")
            label.set_data_from_numpy(
                np.array([classes[i] for i in probs.argmax(1)], dtype=object), binary_data=False
            )
            out = InferOutput("probabilities", list(probs.shape), "FP32")
            out.set_data_from_numpy(probs.astype(np.float32), binary_data=False)
            return InferResponse(payload.id or "", self.name, [label, out], model_version=self.pkg.version)

    model = PlainModel(args.name)
    model.load()
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    logging.getLogger("kserve.trace").setLevel(logging.WARNING)
    from conveyor.runtime.serving.server import model_server_class

    # KServe's own ModelServer; the subclass only binds it to 127.0.0.1 instead of every interface.
    server = model_server_class()(
        bind_host="127.0.0.1", http_port=args.http_port, enable_grpc=False, enable_latency_logging=False
    )
    server.start([model])
    return 0


if __name__ == "__main__":
    sys.exit(main())
