"""An eager-mode model definition (``modelFile``): exactly one nn.Module class."""

import torch
from torch import nn


def helper():
    """Functions and non-module classes beside the model are allowed."""
    return 2


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)
