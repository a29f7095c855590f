"""An example of ``architecture: custom`` (and what the sample manifests/samples/mlpipeline-custom.yaml
names): a function that builds a torch.nn.Module from the package's input schema.

A user's own module looks the same, lives in their training image (``FROM`` conveyor's runtime image,
``pip install`` their package) and is named in ``training.model.module`` as ``package.module:function``.
"""

from __future__ import annotations

from typing import Any

from torch import nn


class ResidualBlock(nn.Module):
    def __init__(self, width: int, dropout: float) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Dropout(dropout)
        )

    def forward(self, x: Any) -> Any:
        return x + self.body(x)


def residual_mlp(*, input_shape: list[int], outputs: int, schema: dict[str, Any]) -> nn.Module:
    """A residual MLP whose width follows the number of input features; ``schema`` (feature names and
    types, the task, the classes) is there for models that treat some features differently."""
    features = 1
    for d in input_shape:
        features *= d
    width = max(32, min(256, 4 * features))
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(features, width),
        ResidualBlock(width, 0.1),
        ResidualBlock(width, 0.1),
        nn.LayerNorm(width),
        nn.Linear(width, outputs),
    )
