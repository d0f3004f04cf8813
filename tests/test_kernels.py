"""The routes of fewshot.kernels: max-pooling gives F.max_pool2d's results bit for bit, to second
derivatives; convolutions in channels-last give F.conv2d's to rounding, and what follows them runs
channels-last with the same values."""

from collections import namedtuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad
from torch.func import vmap

from fewshot import kernels
from fewshot.kernels import ChannelsLastMaxPool2d, fast_cpu_kernels, max_pool2d

ROUTED = "ChannelsLastMaxPool2dBackward"

POOLINGS = [  # kernel_size, stride, padding, dilation, ceil_mode
    (2, None, 0, 1, False),
    (2, 2, 0, 1, True),
    (3, 2, 1, 1, False),
    (3, 1, 1, 1, True),
    ((2, 3), (1, 2), (1, 0), (2, 1), False),
]


def images_with_ties(dtype, seed=0):
    """ReLU'd noise with flat patches, as blank Omniglot background gives: windows whose maxima tie."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 16, 23, 25, generator=g, dtype=dtype)  # above kernels.POOL_MIN_ELEMENTS
    x[:, :, :4, :6] = 0.5
    x[:, 1:, 5:, 3:] = 0.0
    return x.relu()


def pool_and_derivatives(pool, x, grad_out, grad_grad):
    """Output, input gradient, and the derivative of <input gradient, grad_grad> w.r.t. the output gradient."""
    x = x.clone().requires_grad_()
    grad_out = grad_out.clone().requires_grad_()
    y = pool(x)
    (grad_x,) = torch.autograd.grad(y, x, grad_out, create_graph=True)
    (second,) = torch.autograd.grad(grad_x, grad_out, grad_grad)
    return y, grad_x, second


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pooling", POOLINGS)
def test_channels_last_route_is_bit_identical(pooling, dtype):
    x = images_with_ties(dtype)
    y = F.max_pool2d(x, *pooling)
    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(y.shape, generator=g, dtype=dtype)
    grad_grad = torch.randn(x.shape, generator=g, dtype=dtype)
    reference = pool_and_derivatives(lambda t: F.max_pool2d(t, *pooling), x, grad_out, grad_grad)
    routed = pool_and_derivatives(lambda t: max_pool2d(t, *pooling), x, grad_out, grad_grad)
    assert type(routed[0].grad_fn).__name__ == ROUTED  # it did take the route
    for ours, theirs in zip(routed, reference):
        assert torch.equal(ours, theirs)
    assert routed[0].is_contiguous()  # NCHW out, as F.max_pool2d gives for NCHW in


def test_second_derivatives_match_finite_differences():
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    args = ([2, 2], [2, 2], [0, 0], [1, 1], False)
    assert torch.autograd.gradgradcheck(lambda t: ChannelsLastMaxPool2d.apply(t, *args), (x,))


def test_modules_take_the_route_inside_the_context_and_other_inputs_do_not():
    pool = nn.MaxPool2d(2)
    x = torch.rand(2, 16, 32, 32, requires_grad=True)
    assert type(pool(x).grad_fn).__name__ != ROUTED  # outside: untouched
    with fast_cpu_kernels():
        routed = [
            pool(x),
            torch.max_pool2d(x, 2),
            torch.max_pool2d(input=x, kernel_size=2),  # the keyword names of both functions
            F.max_pool2d(input=x, kernel_size=(2, 2), stride=(2,)),
            F.max_pool2d(x, np.int64(2)),  # any integer type F.max_pool2d takes
        ]
        for y in routed:
            assert type(y.grad_fn).__name__ == ROUTED
            assert torch.equal(y, F.max_pool2d(x.detach(), 2))
        untouched = [
            pool(x[0]),  # 3-D input
            pool(x[:1, :8].contiguous()),  # too small to gain (kernels.POOL_MIN_ELEMENTS)
            pool(x.contiguous(memory_format=torch.channels_last)),  # ATen's fast kernel already
            F.max_pool2d(x, 2, return_indices=True)[0],
            pool(x.detach().bfloat16().requires_grad_()),  # a NaN's payload would differ
        ]
        for y in untouched:
            assert type(y.grad_fn).__name__ != ROUTED
        batched = vmap(lambda t: pool(t))(x.unsqueeze(1))  # under a torch.func transform: ATen's kernel
        with forward_ad.dual_level():  # forward-mode AD: ATen's kernel, which has a jvp
            tangent = torch.rand_like(x)
            dual_out = forward_ad.unpack_dual(pool(forward_ad.make_dual(x.detach(), tangent)))
    assert torch.equal(batched.squeeze(1), F.max_pool2d(x, 2))
    assert torch.equal(dual_out.primal, F.max_pool2d(x.detach(), 2))
    assert dual_out.tangent is not None


def channels_last_only(x) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


CONVOLUTIONS = [  # in_channels, out_channels, F.conv2d keyword arguments
    (1, 8, dict(padding=1)),  # Omniglot's first layer: a weight contiguous in both layouts
    (3, 8, dict(stride=2, padding=1)),
    (6, 8, dict(padding=(1, 2), dilation=(2, 1), groups=2)),
]


def convolution_arguments(c_in, c_out, options, batch, size):
    """A seeded generator and float64 input, weight and bias (requiring gradients) for ``F.conv2d(..., **options)``."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c_in, size, size, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(c_out, c_in // options.get("groups", 1), 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(c_out, generator=g, dtype=torch.float64, requires_grad=True)
    return g, x, w, b


@pytest.mark.parametrize("c_in, c_out, options", CONVOLUTIONS)
def test_convolution_route_gives_conv2d_results_to_rounding_and_channels_last_activations(c_in, c_out, options):
    g, x, w, b = convolution_arguments(c_in, c_out, options, batch=40, size=30)
    gamma = torch.rand(c_out, generator=g, dtype=torch.float64, requires_grad=True)

    def block(conv):  # convolution, batch norm, ReLU and a pool, as in the Conv4 learner
        y = F.batch_norm(conv(x, w, b, **options), None, None, gamma, None, training=True)
        return F.max_pool2d(F.relu(y), 2)

    reference = block(F.conv2d)
    with fast_cpu_kernels():
        routed = block(F.conv2d)
    assert channels_last_only(routed)  # the layout followed the convolution through the block
    assert torch.allclose(routed, reference, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn(reference.shape, generator=g, dtype=torch.float64)
    ours = torch.autograd.grad(routed, (x, w, b, gamma), grad_out, create_graph=True)
    theirs = torch.autograd.grad(reference, (x, w, b, gamma), grad_out, create_graph=True)
    for a, c in zip(ours, theirs):
        assert torch.allclose(a, c, rtol=1e-11, atol=1e-11)
    direction = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in ours]
    second = [torch.autograd.grad(grads, (w, gamma), direction) for grads in (ours, theirs)]
    for a, c in zip(*second):  # a second derivative through the routed block, as MAML's second order takes
        assert torch.allclose(a, c, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("c_in, c_out, options", CONVOLUTIONS)
def test_convolution_route_derivatives_match_finite_differences_and_aten_to_third_order(c_in, c_out, options):
    _, x, w, b = convolution_arguments(c_in, c_out, options, batch=2, size=6)
    assert torch.autograd.gradgradcheck(lambda *a: kernels.conv2d(*a, **options), (x, w, b), fast_mode=True)

    def derivatives(conv, wrt_input: bool):  # first, second, third derivatives, as MAML's orders take them
        y = conv(x, w, b, **options)
        first = torch.autograd.grad((y.tanh() * y).sum(), (x, w, b) if wrt_input else (w, b), create_graph=True)
        second = torch.autograd.grad(sum(t.sin().sum() for t in first), (x, w, b), create_graph=True)
        third = torch.autograd.grad(sum((t**2).sum() for t in second), (x, w, b))
        return [*first, *second, *third]

    for wrt_input in (True, False):  # without the input's gradient, as the first layer of a network
        for ours, aten in zip(derivatives(kernels.conv2d, wrt_input), derivatives(F.conv2d, wrt_input)):
            assert torch.allclose(ours, aten, rtol=1e-12, atol=1e-12 * aten.abs().max().item())


def test_convolution_route_leaves_other_inputs_alone():
    conv = nn.Conv2d(4, 8, 3, padding=1)
    x = torch.rand(20, 4, 24, 24)
    assert not channels_last_only(conv(x))  # outside the context
    with fast_cpu_kernels():
        assert channels_last_only(conv(x))
        assert channels_last_only(torch.conv2d(input=x, weight=conv.weight))  # keyword arguments
        assert channels_last_only(conv(x[:1]))  # any size (kernels.MIN_ELEMENTS)
        untouched = [
            conv(x[0]),  # 3-D input
            conv.bfloat16()(x.bfloat16()),  # not among the float16/32/64 the routes take
        ]
        conv.float()
        batched = vmap(conv)(x.unsqueeze(1))  # under a torch.func transform: untouched
    for y in untouched:
        assert y.is_contiguous()
    assert batched.squeeze(1).is_contiguous()
    assert torch.allclose(batched.squeeze(1), conv(x), atol=1e-6)


def test_views_of_channels_last_activations_and_outputs_come_back_nchw():
    x = torch.rand(20, 4, 24, 24)
    conv = nn.Conv2d(4, 8, 3, padding=1)
    features = nn.Sequential(conv, nn.ReLU())

    def model(t):  # the common idiom x.view(batch, -1), which needs NCHW strides
        h = features(t)
        return h.view(h.shape[0], -1), {"maps": h, "pair": (h, 1)}

    tiny = x[:1, :, :4, :4]  # any batch size takes the route
    flat_as = kernels.call(lambda t: features(t).view_as(torch.empty(1, 8 * 16)), tiny)
    assert torch.allclose(flat_as, features(tiny).view(1, -1), atol=1e-6)
    flat, extras = kernels.call(model, x)
    Pair = namedtuple("Pair", "maps extra")
    assert kernels.call(lambda t: Pair(features(t), 1), x).maps.is_contiguous()
    reference = features(x)
    assert torch.allclose(flat, reference.view(20, -1), atol=1e-6)
    for h in (extras["maps"], extras["pair"][0]):
        assert h.is_contiguous() and torch.allclose(h, reference, atol=1e-6)
    with fast_cpu_kernels(), pytest.raises(RuntimeError):
        features(x).view(7, -1)  # a view that is wrong in any layout still fails
