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


def maml_init_(model: nn.Module, std: float = 0.01) -> nn.Module:
    """The initialisation of the MAML authors' sinusoid code: weights ~ truncated normal(0, std), biases 0."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            nn.init.zeros_(m.bias)
    return model
