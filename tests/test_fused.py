"""The fused batch-norm/ReLU/pool CPU kernel gives ATen's results (float64 to rounding), to second derivatives."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fewshot import fused, kernels
from fewshot.fused import batch_norm_relu_max_pool2d, fused_copy, reference

CL = torch.channels_last


def block_input(shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=dtype)
    x[:, :, :3] = 0.25  # flat patches: windows whose maxima tie
    w = torch.randn(shape[1], generator=g, dtype=dtype)
    w[0] = 0.0  # a channel scaled to zero: every window ties
    b = torch.randn(shape[1], generator=g, dtype=dtype)
    return x.contiguous(memory_format=CL).requires_grad_(), w.requires_grad_(), b.requires_grad_()


def took_kernel(out) -> bool:
    return type(out.grad_fn).__name__ == "_BatchNormReLUMaxPool2dFunctionBackward"


@pytest.mark.parametrize("shape", [(40, 6, 28, 28), (30, 5, 17, 23)])  # odd sizes: a row and column no window pools
def test_kernel_matches_aten_to_second_derivatives(shape):
    assert fused.extension() is not None, "the kernel did not compile (a C++ compiler and ninja are needed)"
    x, w, b = block_input(shape)
    ours, theirs = batch_norm_relu_max_pool2d(x, w, b), reference(x, w, b, 1e-5)
    assert took_kernel(ours) and kernels._is_channels_last_only(ours)
    assert torch.allclose(ours, theirs, rtol=1e-12, atol=1e-12)
    g = torch.Generator().manual_seed(1)
    cubic = torch.randn(theirs.shape, generator=g, dtype=theirs.dtype)  # a gradient at the block's output that depends on x
    first = [torch.autograd.grad((cubic * out**3).sum(), (x, w, b), create_graph=True) for out in (ours, theirs)]
    assert type(first[0][0].grad_fn).__name__ == "_BatchNormReLUMaxPool2dBackwardBackward"
    for a, c in zip(*first):
        assert torch.allclose(a, c, rtol=1e-11, atol=1e-11)
    direction = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in first[1]]
    second = [torch.autograd.grad(grads, (x, w, b), direction, retain_graph=True) for grads in first]  # ours: C++
    second_ops = torch.autograd.grad(first[0], (x, w, b), direction, create_graph=True)  # ours: differentiable ops
    for a, c, d in zip(*second, second_ops):
        assert torch.allclose(a, c, rtol=1e-10, atol=1e-10) and torch.allclose(d, c, rtol=1e-10, atol=1e-10)
    (plain,) = torch.autograd.grad((cubic * batch_norm_relu_max_pool2d(x, w, b) ** 3).sum(), x)  # the kernel's own backward
    assert torch.allclose(plain, first[1][0], rtol=1e-11, atol=1e-11)


def test_block_third_derivative_matches_central_differences():
    x, w, b = block_input((6, 4, 10, 12))
    g = torch.Generator().manual_seed(3)
    cubic = torch.randn(6, 4, 5, 6, generator=g, dtype=torch.float64)
    direction = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (x, w, b)]

    def second(point, create_graph):
        first = torch.autograd.grad((cubic * batch_norm_relu_max_pool2d(point, w, b) ** 3).sum(), (point, w, b), create_graph=True)
        scalar = sum((f * d).sum() for f, d in zip(first, direction))
        grads = torch.autograd.grad(scalar, (point, w), create_graph=create_graph)
        return sum((s * s).sum() for s in grads)

    (third,) = torch.autograd.grad(second(x, create_graph=True), x)
    v = torch.randn(x.shape, generator=g, dtype=torch.float64)
    eps = 1e-6
    at = [(x + sign * eps * v).detach().contiguous(memory_format=CL).requires_grad_() for sign in (1, -1)]
    estimate = (second(at[0], False) - second(at[1], False)) / (2 * eps)  # the C++ second derivative
    assert abs((third * v).sum() - estimate) < 1e-6 * abs(estimate)


def test_float32_kernel_is_as_close_to_float64_as_aten():
    x, w, b = block_input((75, 64, 28, 28), dtype=torch.float64)  # Omniglot's first block, query batch
    truth = reference(x, w, b, 1e-5)
    truth_grad = torch.autograd.grad(truth.sum(), (x, w, b))
    x32, w32, b32 = (t.detach().float().requires_grad_() for t in (x, w, b))
    errors = []
    for out in (batch_norm_relu_max_pool2d(x32, w32, b32), reference(x32, w32, b32, 1e-5)):
        grads = torch.autograd.grad(out.sum(), (x32, w32, b32))
        errors.append([((out.double() - truth).norm() / truth.norm()).item()]
                      + [((g.double() - t).norm() / t.norm()).item() for g, t in zip(grads, truth_grad)])  # fmt: skip
    ours, aten = errors
    assert all(e < 1e-5 for e in ours)
    assert all(o <= 2 * a for o, a in zip(ours, aten))  # statistics summed in double: no worse than ATen


def test_non_finite_values_and_other_inputs_take_atens_ops():
    x, w, b = block_input((40, 6, 28, 28))
    x_nan = x.detach().clone()
    x_nan[3, 2, 5, 7] = float("nan")
    out = batch_norm_relu_max_pool2d(x_nan, w, b)
    assert not took_kernel(out) and torch.equal(out.isnan(), reference(x_nan, w, b, 1e-5).isnan())
    for other in (x.detach().contiguous(), x.detach().half()):  # NCHW, float16
        assert not took_kernel(batch_norm_relu_max_pool2d(other, w.to(other.dtype), b.to(other.dtype)))
    assert took_kernel(batch_norm_relu_max_pool2d(x[:1], w, b))  # one image: any batch size


def conv_net(pool_first=False, blocks=2, **bn_options):
    torch.manual_seed(0)
    layers, c = [], 1
    for _ in range(blocks):
        pair = [nn.MaxPool2d(2), nn.ReLU()] if pool_first else [nn.ReLU(), nn.MaxPool2d(kernel_size=(2, 2), stride=2)]
        layers += [nn.Conv2d(c, 8, 3, padding=1), nn.BatchNorm2d(8, **bn_options), *pair]
        c = 8
    return nn.Sequential(nn.Sequential(*layers), nn.Flatten(), nn.LazyLinear(3)).double()


@pytest.mark.parametrize("pool_first", [False, True])
def test_fused_copy_keeps_names_and_results(pool_first):
    model = conv_net(pool_first, track_running_stats=False)
    x = torch.rand(40, 1, 28, 28, dtype=torch.float64)
    model(x)  # materialise the lazy head
    twin = fused_copy(model)
    assert sum(isinstance(m, fused.BatchNormReLUMaxPool2d) for m in twin.modules()) == 2
    assert list(dict(twin.named_parameters())) == list(dict(model.named_parameters()))
    params = dict(model.named_parameters())
    ours = kernels.call(torch.func.functional_call, twin, params, (x,))
    theirs = model(x)
    assert torch.allclose(ours, theirs, rtol=1e-12, atol=1e-12)
    for a, c in zip(torch.autograd.grad(ours.sum(), list(params.values())), torch.autograd.grad(theirs.sum(), list(params.values()))):
        assert torch.allclose(a, c, rtol=1e-10, atol=1e-10)


def test_blocks_that_are_not_the_pattern_are_left_alone():
    assert fused_copy(conv_net(track_running_stats=True)) is None  # running statistics: not batch statistics
    odd_pool = conv_net(track_running_stats=False)
    odd_pool[0][3] = nn.MaxPool2d(3, 2)
    twin = fused_copy(odd_pool)
    assert isinstance(twin[0][3], nn.MaxPool2d) and isinstance(twin[0][5], fused.BatchNormReLUMaxPool2d)
    assert fused_copy(nn.Sequential(nn.Linear(2, 2), nn.ReLU())) is None


def test_without_the_kernel_nothing_is_fused_and_maml_runs_atens_ops():
    code = (
        "import torch, torch.nn.functional as F\n"
        "from fewshot import MAML, TaskBatch, fused\n"
        "from fewshot.models import Conv4\n"
        "model = Conv4(n_way=2, hidden=4, image_size=16)\n"
        "assert fused.extension() is None and fused.fused_copy(model) is None\n"
        "x = torch.rand(1, 30, 1, 16, 16); y = torch.arange(2).repeat(15).unsqueeze(0)\n"
        "maml = MAML(model, F.cross_entropy, 0.4, 1, task_threads=1)\n"
        "maml.meta_loss(TaskBatch(x, y, x, y)).backward()\n"
        "assert maml._fused_twin == [None] and all(p.grad is not None for p in model.parameters())\n"
    )
    env = {**os.environ, "FEWSHOT_FUSED": "0"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


class CountingExtension:
    """The compiled extension, counting calls of its functions."""

    def __init__(self, extension):
        self.extension, self.calls = extension, {}

    def __getattr__(self, name):
        function = getattr(self.extension, name)

        def counted(*args):
            self.calls[name] = self.calls.get(name, 0) + 1
            return function(*args)

        return counted


@pytest.mark.parametrize("layout", [torch.contiguous_format, CL])
@pytest.mark.parametrize("which", ["all", "input only", "parameters only"])
def test_batch_norm_second_and_third_derivatives_match_aten(which, layout, monkeypatch):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 6, 7, 9, generator=g, dtype=torch.float64).contiguous(memory_format=layout).requires_grad_()
    w = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    cubic = torch.randn(5, 6, 7, 9, generator=g, dtype=torch.float64)
    weights = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (x, w, b)]
    counting = CountingExtension(fused.extension())
    monkeypatch.setattr(fused, "_extension", counting)

    def derivatives(routed: bool, at=None, create_graph=True):
        point = x if at is None else at
        with kernels.fast_cpu_kernels() if routed else torch.enable_grad():
            y = F.batch_norm(point, None, None, w, b, training=True)
        assert (type(y.grad_fn).__name__ == "_BatchNormBackward") == routed
        # the gradient reaching batch norm depends on x itself, as it does after any non-linearity
        first = torch.autograd.grad((cubic * y**3).sum(), (point, w, b), create_graph=True)
        used = {"all": [0, 1, 2], "input only": [0], "parameters only": [1, 2]}[which]  # the others stay undefined
        scalar = sum((first[i] * weights[i]).sum() for i in used)
        kernel_second = torch.autograd.grad(scalar, (point, w), retain_graph=True, materialize_grads=True)  # C++
        if not create_graph:
            return sum((s * s).sum() for s in kernel_second)
        second = torch.autograd.grad(scalar, (point, w), create_graph=True, materialize_grads=True)  # differentiable ops
        third = torch.autograd.grad(sum((s * s).sum() for s in second), point, materialize_grads=True)[0]
        return [*first, *kernel_second, *second], third

    (ours, third), (theirs, _) = derivatives(True), derivatives(False)
    assert counting.calls.get("double_backward", 0) >= 1
    for a, c in zip(ours, theirs):
        assert torch.allclose(a, c, rtol=1e-10, atol=1e-10)
    # third derivative along a direction, against central differences of the kernel's second derivative
    # (ATen's own third derivative of batch norm treats the saved statistics as constants: in one case
    # measured it gave 78.2 where central differences and this gave 105.95)
    v = torch.randn(x.shape, generator=g, dtype=torch.float64)
    eps = 1e-5
    plus = derivatives(True, (x + eps * v).detach().requires_grad_(), create_graph=False)
    minus = derivatives(True, (x - eps * v).detach().requires_grad_(), create_graph=False)
    assert abs((third * v).sum() - (plus - minus) / (2 * eps)) < 1e-6 * abs((third * v).sum())


def test_fused_block_output_is_its_own_tensor_and_views_take_keywords():
    x, w, b = block_input((40, 6, 28, 28))
    out = batch_norm_relu_max_pool2d(x, w, b)
    assert took_kernel(out) and out._base is None  # not a view of anything the kernel was handed
    (grad,) = torch.autograd.grad((2.0 * out).sum(), x)
    (expected,) = torch.autograd.grad(2.0 * reference(x, w, b, 1e-5).sum(), x)
    assert torch.allclose(grad, expected, rtol=1e-11, atol=1e-11)
    with kernels.fast_cpu_kernels():
        assert out.view(dtype=torch.int64).dtype == torch.int64  # keyword arguments of Tensor.view
        assert out.view(size=(40, -1)).shape == (40, 6 * 14 * 14)




def test_kernels_refuse_tensors_of_the_wrong_shape():
    x, w, b = (t.detach() for t in block_input((4, 3, 6, 6)))
    ext = fused.extension()
    out, argmax, mean, invstd = ext.forward(x, w, b, 1e-5)
    grad = torch.ones_like(out)
    with pytest.raises(RuntimeError, match="argmax"):
        ext.backward(grad, x, out, argmax[:, :2], mean, invstd, w)
    with pytest.raises(RuntimeError, match="grad_out"):
        ext.backward(grad[:, :, :2], x, out, argmax, mean, invstd, w)
    with pytest.raises(RuntimeError, match="per-channel"):
        ext.double_backward(x, x, None, None, None, w[:2], mean, invstd)
    with pytest.raises(RuntimeError, match="dy"):
        ext.double_backward(x, x[:2], None, None, None, w, mean, invstd)
    with pytest.raises(RuntimeError, match="out"):
        ext.to_winners(grad, out, argmax, 8, 6)
    with pytest.raises(RuntimeError, match="out"):
        ext.from_winners(x[:, :, :4], out, argmax)
