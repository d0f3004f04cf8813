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


def test_authors_variant_is_the_authors_codes_learner():
    torch.manual_seed(0)
    omniglot, mini = Conv4(n_way=5, strided=True, authors=True), Conv4(n_way=5, in_channels=3, hidden=32, image_size=84, authors=True)
    assert omniglot.head.in_features == 64 and mini.head.in_features == 32 * 5 * 5  # averaged 2x2 map / flattened 5x5
    x = torch.rand(4, 1, 28, 28)
    assert torch.allclose(omniglot(x), omniglot.head(omniglot.features(x).mean((2, 3))))
    for model in (omniglot, mini):
        norms = [m for m in model.features if isinstance(m, nn.BatchNorm2d)]
        assert all(m.eps == 1e-3 and not m.weight.requires_grad and torch.equal(m.weight, torch.ones(m.num_features)) for m in norms)
        assert all(m.bias.requires_grad for m in norms)
        adapted = model.inner_loop_parameters()
        assert len(adapted) == 10 and not any(n.startswith(("features.1.", "features.5.")) for n in adapted)
        convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
        assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in convs)
        fan = convs[1].weight[0].numel() + convs[1].weight[:, 0].numel()  # Xavier-uniform: U(+-sqrt(6 / (fan_in + fan_out)))
        assert convs[1].weight.abs().max() <= (6 / fan) ** 0.5 and convs[1].weight.std() > 0.8 * (2 / fan) ** 0.5
    assert 0.8 < omniglot.head.weight.std() < 1.2  # N(0, 1)
    paper = Conv4(n_way=5, strided=True)
    assert paper.inner_loop_parameters() == [n for n, _ in paper.named_parameters()]
    assert all(p.requires_grad for p in paper.parameters())
