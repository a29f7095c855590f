"""The benchmark's peer: the same package served by Ray Serve with ``@serve.batch``, as a user choosing Ray
Serve instead would write it (with the package's forward pass as the conveyor predictor runs it,
``ScoringModel``: same backend): decode the V1 body (rows, or KServe-style base64 images), apply the
package's fitted transforms, batch the forward pass, answer ``{"predictions": [...]}``.

    python tests/bench/_ray_serve_model.py --model-dir URI --http-port P [--torch-threads N] [--replicas N]

Prints ``READY`` once the application answers; runs until killed.
"""

from __future__ import annotations

import argparse
import base64
import io
import sys
import time
from typing import Any


def decode(pkg: Any, instances: list[Any]) -> Any:
    import numpy as np

    t = pkg.transforms
    if t.kind == "image":
        from PIL import Image

        raw = np.stack([
            np.asarray(Image.open(io.BytesIO(base64.b64decode(i["image"]["b64"]))).convert("L"), np.float32)[None]
            for i in instances
        ])  # fmt: skip
        return t.apply(raw * np.float32(t.scale / 255.0))
    import pandas as pd

    return t.apply(pd.DataFrame([{f.name: i.get(f.name) for f in t.features} for i in instances]))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model-dir", required=True)
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-wait-ms", type=float, default=2.0)
    args = p.parse_args()

    import ray
    from ray import serve
    from starlette.requests import Request

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.http_port})

    @serve.deployment(num_replicas=args.replicas, max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
    class PackageModel:
        def __init__(self) -> None:
            import torch

            from conveyor.runtime.serving.model import ScoringModel

            torch.set_num_threads(args.torch_threads)  # onnxruntime takes the same thread count
            self.scoring = ScoringModel.open(args.model_dir, "cpu")  # the conveyor predictor's backend
            self.pkg = self.scoring.package

        @serve.batch(max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_ms / 1000)
        async def forward(self, xs: list[Any]) -> list[Any]:
            import numpy as np

            sizes = [len(x) for x in xs]
            probs = self.scoring.forward(np.concatenate(xs))
            out, start = [], 0
            for n in sizes:
                out.append(probs[start : start + n])
                start += n
            return out

        async def __call__(self, request: Request) -> dict[str, Any]:
            body = await request.json()
            probs = await self.forward(decode(self.pkg, body["instances"]))
            classes = self.pkg.classes
            return {
                "predictions": [
                    {"label": classes[int(r.argmax())], "probabilities": r.tolist()} for r in probs
                ]
            }

    serve.run(PackageModel.bind(), name="model", route_prefix="/predict")
    print("READY", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
