"""The Conv4 learner: pooling before the ReLU is the paper's [BN, ReLU, pool] block bit for bit."""

import pytest
import torch
from torch import nn

from fewshot.models import Conv4


def paper_order(model: Conv4) -> nn.Module:
    """The same modules (same parameters) as [conv, BN, ReLU, pool] x 4, then the head."""
    blocks = [model.features[i : i + 4] for i in range(0, len(model.features), 4)]
    layers = [m for conv, bn, _, _ in blocks for m in (conv, bn, nn.ReLU(), nn.MaxPool2d(2))]
    return nn.Sequential(*layers, nn.Flatten(), model.head)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pool_before_relu_is_the_papers_block_to_second_derivatives(dtype):
    torch.manual_seed(0)
    model = Conv4(n_way=3, hidden=4, image_size=16).to(dtype)
    assert [type(m).__name__ for m in model.features[:4]] == ["Conv2d", "BatchNorm2d", "MaxPool2d", "ReLU"]
    x = torch.rand(6, 1, 16, 16, dtype=dtype)
    x[:, :, :8] = 0.0  # blank background, as Omniglot's: windows whose values tie
    params = list(model.parameters())
    direction = [torch.randn_like(p) for p in params]

    def value_gradient_and_second(forward):
        out = forward(x)
        loss = (out * torch.linspace(-1, 1, 3, dtype=dtype)).sum() + out.pow(2).sum()
        grads = torch.autograd.grad(loss, params, create_graph=True)
        second = torch.autograd.grad(sum((g * d).sum() for g, d in zip(grads, direction)), params)
        return [out, *grads, *second]

    ours, paper = value_gradient_and_second(model), value_gradient_and_second(paper_order(model))
    assert len(ours) == 1 + 2 * len(params)
    for a, b in zip(ours, paper):
        assert torch.equal(a, b)


def test_parameter_names_are_those_of_the_papers_order():  # checkpoints of either order load into the other
    names = list(Conv4(n_way=5).state_dict())
    assert names[:6] == ["features.0.weight", "features.0.bias", "features.1.weight", "features.1.bias",
                         "features.4.weight", "features.4.bias"]  # fmt: skip
