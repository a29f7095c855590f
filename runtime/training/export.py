"""The trained torch model as the package holds it: a ``torch.export`` program and, where the model
allows, ONNX, both with a dynamic batch dimension.

- ``model.pt2``: ``torch.export.save`` of an ExportedProgram (the format torch keeps; TorchScript is
  deprecated). Loadable with no training code; differentiable, so explanations use it.
- ``model.onnx``: the same graph for onnxruntime (the fastest CPU backend for these models, measured by
  tests/bench/bench_model_format.py). Optional: a model the exporter cannot take still packages.

A model ``torch.export`` cannot take (a custom model with data-dependent Python control flow) falls back
to a traced TorchScript ``model.pt`` (package modelKind ``torchscript``), which every predictor still loads.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

log = logging.getLogger("conveyor.training.export")


@dataclass
class ExportedModel:
    """What the package stores: its ``modelKind``, the weights' files by name, and a forward pass over
    the exported artifact (not the training-time module) for the run's evaluation."""

    model_kind: str
    files: dict[str, bytes]
    module: nn.Module | torch.fx.GraphModule
    notes: dict[str, str] = field(default_factory=dict)


def export_model(model: nn.Module, input_shape: Sequence[int], *, onnx: bool = True) -> ExportedModel:
    """Export ``model`` (traced on CPU, eval mode) for a batch of any size of ``input_shape`` inputs."""
    from conveyor.runtime.training.models import export_torchscript

    model = model.to("cpu").eval()
    example = torch.zeros(2, *input_shape, dtype=torch.float32)
    try:
        program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
    except Exception as e:  # data-dependent control flow, unsupported ops: TorchScript still works
        log.warning("torch.export cannot take this model (%s: %s); packaging TorchScript", type(e).__name__, e)
        data = export_torchscript(model, input_shape)
        module = torch.jit.load(io.BytesIO(data), map_location="cpu").eval()
        return ExportedModel("torchscript", {"model.pt": data}, module, {"torchExport": str(e)[:500]})
    buf = io.BytesIO()
    torch.export.save(program, buf)
    files = {"model.pt2": buf.getvalue()}
    notes: dict[str, str] = {}
    if onnx:
        try:
            files["model.onnx"] = export_onnx(model, example)
        except Exception as e:  # ONNX lacks an op the model uses: the package serves with torch
            log.warning("no ONNX for this model (%s: %s)", type(e).__name__, e)
            notes["onnx"] = f"{type(e).__name__}: {e}"[:500]
    loaded = torch.export.load(io.BytesIO(files["model.pt2"])).module()
    return ExportedModel("torch-export", files, loaded, notes)


def export_onnx(model: nn.Module, example: torch.Tensor) -> bytes:
    """ONNX bytes with input ``x`` and output ``y``, batch dimension dynamic.

    The TorchScript-based exporter first: on this machine it takes ~1.5 s for the fraud MLP against
    ~20 s for the dynamo exporter (which would add that to every training run); the dynamo exporter when
    the installed torch no longer has the other one.
    """
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                model,
                (example,),
                buf,
                dynamo=False,
                input_names=["x"],
                output_names=["y"],
                dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
            )
            return buf.getvalue()
        except (TypeError, RuntimeError, NotImplementedError) as legacy_error:
            log.info("legacy ONNX exporter failed (%s); trying dynamo", legacy_error)
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=["x"],
            output_names=["y"],
            dynamic_shapes=({0: torch.export.Dim.DYNAMIC},),
            verbose=False,
        )
        return program.model_proto.SerializeToString()
