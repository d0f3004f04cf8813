"""Multilayer perceptrons: the sinusoid regressor of Finn et al. 2017 (1-40-40-1, ReLU)."""

from torch import nn


def mlp(in_features: int = 1, hidden: tuple[int, ...] = (40, 40), out_features: int = 1) -> nn.Sequential:
    """Linear layers of the given widths with ReLU between them."""
    widths = (in_features, *hidden, out_features)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)
