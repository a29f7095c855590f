"""Explanations for ``POST /v1/models/NAME:explain``: why the model gave each instance its answer.

- Torch models: captum's integrated gradients on the package's differentiable module (torch.export's
  program, or TorchScript), of the logit of the class the decision rule chose (or the value, for
  regression), from the all-zeros model input: every standardized feature at its training mean, no
  one-hot category set, an image at the training mean pixel. By completeness the attributions of an
  instance sum to ``output(x) - output(baseline)`` (``convergenceDelta`` says how nearly).
- Tabular answers are per INPUT feature: the attributions of the columns a transform made (the one-hot
  columns of a category, a bucketized number's buckets) are summed back onto the feature they came from.
- Images: a saliency map of the model input's height x width, the absolute attributions summed over
  the channels.
- XGBoost packages: the booster's own exact contributions (``pred_contribs``, TreeSHAP) in log-odds of
  the chosen class (or the value), aggregated the same way.

Cost is bounded by the caller: at most ``max_instances`` instances per call (more is the client's error,
HTTP 400) and ``steps`` integration steps, evaluated ``internal_batch_size`` rows at a time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from dataclasses import dataclass
from typing import Any

import numpy as np

from conveyor.runtime.serving.model import ScoringModel

METHOD_IG = "integrated-gradients"
METHOD_TREE = "xgboost-pred-contribs"
DEFAULT_MAX_INSTANCES = 16
DEFAULT_STEPS = 32
# Rows per forward/backward pass inside integrated gradients (instances x steps rows in all).
INTERNAL_BATCH_ROWS = 256


@dataclass(frozen=True)
class ExplainLimits:
    max_instances: int = DEFAULT_MAX_INSTANCES
    steps: int = DEFAULT_STEPS

    def check(self) -> None:
        if not 1 <= self.max_instances <= 1024:
            raise ValueError(f"--explain-max-instances must be 1..1024, got {self.max_instances}")
        if not 2 <= self.steps <= 512:
            raise ValueError(f"--explain-steps must be 2..512, got {self.steps}")


class Explainer:
    """Attributions for one loaded ``ScoringModel``; ``explain`` is blocking (call it off the event loop)."""

    def __init__(self, model: ScoringModel, limits: ExplainLimits | None = None) -> None:
        self.model = model
        self.limits = limits or ExplainLimits()
        self.limits.check()
        self.method = METHOD_TREE if model.package.model_kind == "xgboost" else METHOD_IG
        # One explanation at a time, in its own thread: a burst of :explain calls queues here instead of
        # taking every core from predictions (each call is bounded by max_instances x steps).
        self.pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="conveyor-explain"
        )
        transforms = model.package.transforms
        self.kind = transforms.kind
        if self.kind != "image":
            # Each model-input column's source feature, in input order (one-hot/bucket columns -> feature).
            self.features = [f.name for f in transforms.features]
            owner = [transforms._feature_of(i) for i in range(len(transforms.output_columns))]
            self._owner = np.array([self.features.index(o) for o in owner], dtype=np.int64)

    def explain_rows(self, x: np.ndarray) -> list[dict[str, Any]]:
        """Score ``x`` and explain each row's answer (blocking)."""
        return self.explain(x, self.model.answers(self.model.forward(x)))

    def explain(self, x: np.ndarray, answers: list[Any]) -> list[dict[str, Any]]:
        """One explanation per row of ``x`` (the transformed input), for the row's answer."""
        targets = self._targets(answers)
        bias = None
        if self.method == METHOD_TREE:
            contributions, delta = self._tree_contributions(x, targets), None
            attributions, bias = contributions[:, :-1], contributions[:, -1]
        else:
            attributions, delta = self._integrated_gradients(x, targets)
        out = []
        for i, answer in enumerate(answers):
            item: dict[str, Any] = {"answer": answer}
            if self.kind == "image":
                saliency = np.abs(attributions[i]).sum(axis=0)
                item["saliency"] = saliency.round(8).tolist()
            else:
                per_feature = np.zeros(len(self.features), dtype=np.float64)
                np.add.at(per_feature, self._owner, attributions[i].astype(np.float64))
                item["attributions"] = {
                    f: round(float(v), 8) for f, v in zip(self.features, per_feature, strict=True)
                }
            if bias is not None:  # the trees' expected margin: bias + sum(attributions) = the margin
                item["bias"] = round(float(bias[i]), 8)
            if delta is not None:
                item["convergenceDelta"] = round(float(delta[i]), 8)
            out.append(item)
        return out

    def _targets(self, answers: list[Any]) -> list[int]:
        if self.model.task != "classification":
            return [0] * len(answers)
        index = {c: i for i, c in enumerate(self.model.classes or [])}
        return [index[str(a)] for a in answers]

    def _integrated_gradients(self, x: np.ndarray, targets: list[int]) -> tuple[np.ndarray, np.ndarray]:
        import torch
        from captum.attr import IntegratedGradients

        module = self.model.module
        device = self.model.device

        def logits(inputs: torch.Tensor) -> torch.Tensor:
            out = module(inputs).float()
            return out.reshape(out.shape[0], -1)

        inputs = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
        ig = IntegratedGradients(logits)
        with torch.enable_grad():
            attributions, delta = ig.attribute(
                inputs,
                baselines=torch.zeros_like(inputs),
                target=targets,
                n_steps=self.limits.steps,
                internal_batch_size=max(1, INTERNAL_BATCH_ROWS),
                return_convergence_delta=True,
            )
        return attributions.detach().cpu().numpy(), delta.detach().cpu().numpy()

    def _tree_contributions(self, x: np.ndarray, targets: list[int]) -> np.ndarray:
        import xgboost

        booster = self.model.module.booster
        contribs = np.asarray(
            booster.predict(xgboost.DMatrix(np.asarray(x, dtype=np.float32)), pred_contribs=True)
        )
        if contribs.ndim == 3:  # multi-class: [B, K, F+1], the chosen class's row
            contribs = contribs[np.arange(len(x)), targets]
        elif self.model.task == "classification":  # binary: log-odds of class 1; class 0's are the negative
            sign = np.where(np.asarray(targets) == 1, 1.0, -1.0)[:, None]
            contribs = contribs * sign
        return contribs  # [B, F+1]: the last column is the bias


async def explain_response(predictor: Any, request: Any) -> dict[str, Any]:
    """The :explain response for a decoded request (``predictor.DecodedRequest``) of ``predictor``;
    InvalidInput (400) naming the limit when it holds more instances than one call may explain."""
    from kserve.errors import InvalidInput

    explainer: Explainer = predictor.explainer
    limit = explainer.limits.max_instances
    if request.rows > limit:
        raise InvalidInput(
            f"{request.rows} instances to explain; this predictor explains at most {limit} per call "
            "(spec.predictor.explain.maxInstances, serve --explain-max-instances): send fewer"
        )
    loop = asyncio.get_running_loop()
    explanations = await loop.run_in_executor(
        explainer.pool, lambda: explainer.explain_rows(predictor.model_input([request.x]))
    )
    return {
        "explanations": explanations,
        "method": explainer.method,
        **({"steps": explainer.limits.steps} if explainer.method == METHOD_IG else {}),
        "id": request.request_id,
        "model_name": predictor.name,
        "model_version": predictor.version,
    }
