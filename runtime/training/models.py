"""Model architectures: an MLP for tabular data; torchvision classification models (adapted to the
input's channels and size and the number of outputs), a small CNN, or an MLP over pixels for images; or
the user's own (``custom``): an importable ``package.module:function`` that builds a torch.nn.Module."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

# Below this size a stock ImageNet stem (stride-2 conv + max-pool) would shrink the image to nothing.
SMALL_IMAGE = 64
# Architectures that are not adapted for small inputs get them upsampled to this size.
MIN_GENERIC_SIZE = 32


class MLP(nn.Module):
    def __init__(
        self, in_features: int, hidden: Sequence[int], out_features: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class SmallCNN(nn.Module):
    """Two conv blocks and a linear head: quick to train on small images (tests, samples)."""

    def __init__(self, channels: int, classes: int, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class Upsampled(nn.Module):
    """Resize inputs up to the smallest size an unadapted torchvision model accepts."""

    def __init__(self, model: nn.Module, size: int) -> None:
        super().__init__()
        self.model = model
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.model(x)


class TargetScale(nn.Module):
    """Maps a regression model trained on standardized targets back to the label's units."""

    def __init__(self, model: nn.Module, mean: float, std: float) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) * self.std + self.mean


def _first_conv(module: nn.Module) -> tuple[nn.Module, str, nn.Conv2d] | None:
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d):
            return module, name, child
        found = _first_conv(child)
        if found is not None:
            return found
    return None


def _torchvision_model(
    name: str, channels: int, height: int, width: int, outputs: int, pretrained: bool
) -> nn.Module:
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise ValueError(
            f"training.model.architecture {name!r} is not 'mlp', 'cnn' or a torchvision classification model "
            f"(e.g. resnet18, mobilenet_v3_small, efficientnet_b0)"
        )
    if pretrained:
        # Pretrained weights come from torchvision's cache (TORCH_HOME); nothing is downloaded at run time
        # in an air-gapped cluster, so a missing cache is an error naming the fix.
        try:
            model = torchvision.models.get_model(name, weights="DEFAULT")
        except Exception as e:
            raise ValueError(
                f"training.model.pretrained: could not load {name}'s pretrained weights ({e}); put them in "
                "the image's TORCH_HOME cache or set pretrained: false"
            ) from e
        _replace_head(model, outputs)
    else:
        model = torchvision.models.get_model(name, weights=None, num_classes=outputs)

    found = _first_conv(model)
    if found is not None and found[2].in_channels != channels:
        parent, attr, conv = found
        new = nn.Conv2d(
            channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            bias=conv.bias is not None,
        )
        if pretrained:
            with torch.no_grad():
                new.weight.copy_(conv.weight.mean(dim=1, keepdim=True).repeat(1, channels, 1, 1))
        setattr(parent, attr, new)

    small = min(height, width) < SMALL_IMAGE
    if small and hasattr(model, "conv1") and hasattr(model, "maxpool"):
        # ResNet-style stem for small images (as for CIFAR): 3x3 stride-1 conv, no max-pool.
        conv = model.conv1
        model.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
        return model
    if min(height, width) < MIN_GENERIC_SIZE:
        return Upsampled(model, MIN_GENERIC_SIZE)
    return model


def _replace_head(model: nn.Module, outputs: int) -> None:
    for attr in ("fc", "classifier", "head", "heads"):
        head = getattr(model, attr, None)
        if isinstance(head, nn.Linear):
            setattr(model, attr, nn.Linear(head.in_features, outputs))
            return
        if isinstance(head, nn.Sequential) and isinstance(head[-1], nn.Linear):
            head[-1] = nn.Linear(head[-1].in_features, outputs)
            return
    raise ValueError(f"cannot adapt the pretrained model's classifier head to {outputs} outputs")


def build_model(
    architecture: str,
    *,
    input_shape: Sequence[int],
    outputs: int,
    hidden_layers: Sequence[int] = (128, 64),
    dropout: float = 0.0,
    pretrained: bool = False,
    module: str | None = None,
    schema: dict[str, Any] | None = None,
) -> nn.Module:
    """``input_shape`` without the batch dimension: [F] (tabular) or [C, H, W] (images)."""
    shape = list(input_shape)
    if architecture == "custom":
        return build_custom(module, input_shape=shape, outputs=outputs, schema=schema or {})
    if architecture == "mlp":
        features = 1
        for d in shape:
            features *= d
        return MLP(features, hidden_layers, outputs, dropout)
    if len(shape) != 3:
        raise ValueError(
            f"training.model.architecture {architecture!r} needs image data ([C, H, W]); tabular data uses 'mlp'"
        )
    channels, height, width = shape
    if architecture == "cnn":
        return SmallCNN(channels, outputs)
    return _torchvision_model(architecture, channels, height, width, outputs, pretrained)


def build_custom(
    module: str | None, *, input_shape: list[int], outputs: int, schema: dict[str, Any]
) -> nn.Module:
    """The user's model: ``function(input_shape=..., outputs=..., schema=...)`` from ``module`` (the
    package's input schema: feature names and types, or the image's size; ``outputs`` is the number of
    classes, 1 for regression). It must be traceable by TorchScript, as every packaged model is."""
    import importlib

    if not module or ":" not in module:
        raise ValueError("training.model.module must name package.module:function for architecture custom")
    module_name, function_name = module.split(":", 1)
    try:
        factory = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(
            f"training.model.module {module!r} cannot be imported ({e}); install it in the training image"
        ) from e
    model = factory(input_shape=list(input_shape), outputs=outputs, schema=schema)
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"training.model.module {module!r} returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def export_torchscript(model: nn.Module, input_shape: Sequence[int]) -> bytes:
    """The trained model as TorchScript bytes (traced on CPU): loadable with no training code."""
    import io

    model = model.to("cpu").eval()
    example = torch.zeros(2, *input_shape, dtype=torch.float32)
    with torch.no_grad():
        traced = torch.jit.trace(model, example)
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    return buf.getvalue()
