"""Faster routes for CPU kernels that measured slow (issue 6, BENCHMARKS.md "Omniglot speed").

Routes inside ``fast_cpu_kernels()``:

**Convolutions in channels-last.** ATen's batch norm, ReLU and pooling kernels for
NCHW CPU tensors run well below memory speed; their channels-last kernels do not
(one thread, 75x64x28x28: batch norm 8.5 -> 2.3 ms, pooling 6.2 -> 1.3 ms, measured).
oneDNN convolves in channels-last, and writes a channels-last output, whenever the
input or the weight is channels-last; everything downstream of a convolution then
follows that layout. So ``conv2d`` of an NCHW CPU batch is called with a
channels-last view or copy of its weight (a few thousand numbers): the same
convolution, summed in another order. The network's activations from there on are
channels-last, with the same values up to rounding: float64 meta-gradients agree to
1e-14, and in float32 the channels-last batch-norm statistics were the closer to
float64 (relative error 8e-6 against 2e-3 for NCHW on the Omniglot query batch).
``Tensor.view`` (and ``view_as``) of such an activation, which needs NCHW strides, falls
back to a contiguous copy (what ``reshape`` does), and ``call`` gives the outputs back NCHW.
The routed convolution is ``_Conv2d``, whose backward is an autograd Function of its own,
so that second-order MAML differentiates a convolution's backward with one
``convolution_backward`` and one convolution instead of ATen's four convolutions, two copies and an add.

**Max-pooling of NCHW tensors** (where the route above did not apply) through
ATen's channels-last kernel: a 2x2 pool of a 75x64x28x28 batch took 21 ms on one
thread, the channels-last kernel 1.6 ms and a copy of the input 1.4 ms. Pooling a
channels-last copy and copying the result back gives the same maxima and the same
argmax indices (the first maximum of each window, in the same scan order), so the
backward is ATen's own, from the NCHW input, and every order of derivative is
unchanged bit for bit (``tests/test_kernels.py``).

Both take plain 4-D float16/32/64 CPU tensors (the pooling route from
``POOL_MIN_ELEMENTS`` elements on, the convolution route of any size, as the fused
block of ``fewshot.fused``); anything else runs untouched, as do calls under
``torch.func`` transforms, forward-mode AD and ``torch.compile``.

A third route sends ``F.batch_norm`` with batch statistics (any size) to
``fewshot.fused.batch_norm``, whose second derivative is a C++ kernel.
"""

from __future__ import annotations

import contextlib
import operator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import forward_ad
from torch.overrides import TorchFunctionMode

_aten = torch.ops.aten


_EXACT_DTYPES = (torch.float16, torch.float32, torch.float64)  # bfloat16: a NaN window's payload differs
# The pooling route: below about this many input elements its two copies cost more than the NCHW
# kernel loses (one thread, 2x2 pools of 64 channels: 0.14 vs 0.06 ms at 2,880 elements, even at
# 43,200, 2.2x faster at 235,200).
POOL_MIN_ELEMENTS = 32_768
# The convolution route and the fused block: from any size. With the block's second derivative in
# C++ the small support batches gain too (one thread, a 20-way 1-shot task, 5 steps, second order:
# 548 -> 432 ms per task; BENCHMARKS.md "Omniglot speed"). Tests set it high to turn both off.
MIN_ELEMENTS = 0


def _pair(value) -> list[int]:
    """An int or a sequence of ints as a list of two ints; TypeError for anything else."""
    values = [operator.index(value)] * 2 if not isinstance(value, (list, tuple)) else [operator.index(v) for v in value]
    if len(values) not in (1, 2):
        raise TypeError(f"expected one or two ints, got {value!r}")
    return values * (3 - len(values))


class ChannelsLastMaxPool2d(torch.autograd.Function):
    """``F.max_pool2d`` of an NCHW tensor, computed by the channels-last kernel."""

    @staticmethod
    def forward(ctx, x: Tensor, kernel_size: list[int], stride: list[int], padding: list[int], dilation: list[int], ceil_mode: bool):
        out, indices = _aten.max_pool2d_with_indices(
            x.contiguous(memory_format=torch.channels_last), kernel_size, stride, padding, dilation, ceil_mode
        )
        ctx.save_for_backward(x, indices)
        ctx.pooling = (kernel_size, stride, padding, dilation, ceil_mode)
        return out.contiguous()

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # differentiable ATen op: double backward works as for F.max_pool2d
        x, indices = ctx.saved_tensors
        grad_x = _aten.max_pool2d_with_indices_backward(grad_out, x, *ctx.pooling, indices)
        return grad_x, None, None, None, None, None


def _plain_cpu(t) -> bool:
    """A CPU tensor outside torch.func transforms and forward-mode AD (the routes' Functions have no jvp)."""
    return (
        isinstance(t, Tensor)
        and not torch._C._functorch.is_functorch_wrapped_tensor(t)  # vmap / grad transforms: leave to ATen
        and forward_ad.unpack_dual(t).tangent is None
        and t.device.type == "cpu"
    )


def _plain_cpu_batch(x, min_elements: int | None = None) -> bool:
    """A plain 4-D float CPU tensor of at least ``min_elements`` (default ``MIN_ELEMENTS``) elements, outside
    torch.func transforms and forward-mode AD."""
    return (
        _plain_cpu(x)
        and x.dim() == 4
        and x.numel() >= (MIN_ELEMENTS if min_elements is None else min_elements)
        and x.dtype in _EXACT_DTYPES
    )


def _takes_channels_last_route(x) -> bool:
    return (
        _plain_cpu_batch(x, POOL_MIN_ELEMENTS)
        and x.is_contiguous()
        and not x.is_contiguous(memory_format=torch.channels_last)  # ATen already uses the fast kernel then
    )


def max_pool2d(input: Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """``F.max_pool2d`` with the same results, through the channels-last kernel where that is faster."""
    if not return_indices and _takes_channels_last_route(input):
        no_stride = stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0)
        try:
            pooling = [_pair(v) for v in (kernel_size, kernel_size if no_stride else stride, padding, dilation)]
        except TypeError:  # an argument F.max_pool2d may accept or reject in its own words
            pooling = None
        if pooling is not None:
            return ChannelsLastMaxPool2d.apply(input, *pooling, bool(ceil_mode))
    return F.max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices)


def channels_last_weight(weight: Tensor) -> Tensor:
    """``weight`` with channels-last strides (differentiable), so that oneDNN convolves in channels-last.

    A weight with one input channel is contiguous in both layouts and ``contiguous(channels_last)``
    leaves it as it is, so it gets the channels-last strides explicitly (the same numbers in memory).
    """
    if weight.shape[1] != 1:
        return weight.contiguous(memory_format=torch.channels_last)
    weight = weight.contiguous()
    _, _, height, width = weight.shape
    return weight.as_strided(weight.shape, (height * width, 1, width, 1), weight.storage_offset())


def _is_channels_last_only(x: Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def conv2d(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0, dilation=1, groups=1) -> Tensor:
    """``F.conv2d``, in channels-last for an NCHW CPU batch, with the double backward of ``_Conv2d`` (module docstring)."""
    if not (
        _plain_cpu_batch(input)
        and _plain_cpu(weight)
        and weight.dim() == 4
        and weight.dtype == input.dtype
        and (bias is None or _plain_cpu(bias))
    ):
        return F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    if not _is_channels_last_only(weight):
        weight = channels_last_weight(weight)
    try:
        pairs = [_pair(v) for v in (stride, padding, dilation)]
    except TypeError:  # padding="same" and the like: ATen's own convolution and derivatives
        return F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    return _Conv2d.apply(input, weight, bias, *pairs, groups)


class _Conv2d(torch.autograd.Function):
    """``F.conv2d`` whose backward is ``_Conv2dGradients``, an autograd Function of its own.

    ATen's second derivative of a convolution (``_convolution_double_backward``) computes the
    weight's term as a convolution of the transposed batch with the gradient as its kernel, plus
    two copies, and the gradient's term as two convolutions and an add. ``_Conv2dGradients``
    gets both terms from one ``convolution_backward`` and one convolution of concatenated
    channels: one 20-way support step of layer 2 (20x64x14x14), 28 -> 26 ms for its outer
    backward, one thread (BENCHMARKS.md "Omniglot speed"). Derivatives of every order are
    these two Functions again, so a third derivative is exact as well.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(input, weight)
        ctx.convolution = (stride, padding, dilation, groups)
        return F.conv2d(input, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out):
        input, weight = ctx.saved_tensors
        wanted = ctx.needs_input_grad[:3]  # False for a bias of None
        grad_input, grad_weight, grad_bias = _Conv2dGradients.apply(grad_out, input, weight, wanted, *ctx.convolution)
        return grad_input, grad_weight, grad_bias, None, None, None, None


def _conv2d_sum(terms: list[tuple[Tensor, Tensor]], bias: Tensor | None, convolution, channels_last: bool) -> Tensor:
    """The sum of ``conv2d(x, w)`` over ``terms``, plus ``bias``: one convolution of the concatenated
    channels where there are no groups (one thread, 20x64x14x14: 7.5 ms against 8.4 for two
    convolutions and the add), channels-last if ``channels_last`` (a one-channel input decides by the weight)."""
    stride, padding, dilation, groups = convolution
    if groups == 1 and len(terms) > 1:
        terms = [(torch.cat([x for x, _ in terms], 1), torch.cat([w for _, w in terms], 1))]
    total = None
    for x, w in terms:
        if channels_last and not _is_channels_last_only(w):
            w = channels_last_weight(w)
        y = _Conv2d.apply(x, w, bias if total is None else None, stride, padding, dilation, groups)
        total = y if total is None else total + y
    return total


class _Conv2dGradients(torch.autograd.Function):
    """A convolution's gradients (for input, weight, bias) from ``grad_out``: one ``convolution_backward``.

    The gradients are linear in ``grad_out``, the input's is linear in the weight and the weight's
    in the input. So for upstream gradients (``gg_input``, ``gg_weight``, ``gg_bias``):
    with respect to ``grad_out``, ``conv(gg_input, weight) + conv(input, gg_weight) + gg_bias``;
    with respect to the input, the input gradient of a convolution with weight ``gg_weight``; with
    respect to the weight, the weight gradient of a convolution of ``gg_input``; those two are one
    ``_Conv2dGradients`` of ``grad_out`` with input ``gg_input`` and weight ``gg_weight``.
    """

    @staticmethod
    def forward(ctx, grad_out, input, weight, wanted, stride, padding, dilation, groups):
        ctx.save_for_backward(grad_out, input, weight)
        ctx.convolution = (stride, padding, dilation, groups)
        ctx.set_materialize_grads(False)
        bias_sizes = [weight.shape[0]] if wanted[2] else None
        return _aten.convolution_backward(
            grad_out, input, weight, bias_sizes, stride, padding, dilation, False, [0, 0], groups, list(wanted)
        )

    @staticmethod
    def backward(ctx, gg_input, gg_weight, gg_bias):
        grad_out, input, weight = ctx.saved_tensors
        wants_grad_out, wants_input, wants_weight = ctx.needs_input_grad[:3]
        gg_grad_out = grad_input = grad_weight = None
        if wants_grad_out:
            terms = [(x, w) for x, w in ((gg_input, weight), (input, gg_weight)) if x is not None and w is not None]
            if terms:
                gg_grad_out = _conv2d_sum(terms, gg_bias, ctx.convolution, _is_channels_last_only(grad_out))
            elif gg_bias is not None:
                gg_grad_out = torch.zeros_like(grad_out) + gg_bias.view(1, -1, 1, 1)
        wanted = (wants_input and gg_weight is not None, wants_weight and gg_input is not None, False)
        if wanted[0] or wanted[1]:  # an argument not wanted only lends its shape
            grad_input, grad_weight, _ = _Conv2dGradients.apply(
                grad_out, input if gg_input is None else gg_input, weight if gg_weight is None else gg_weight,
                wanted, *ctx.convolution,
            )  # fmt: skip
        return gg_grad_out, grad_input, grad_weight, None, None, None, None, None


def _copy_if_channels_last(method):
    """A view method of Tensor that, where a channels-last activation cannot be viewed so, views a
    contiguous copy instead (as ``reshape`` gives: writing into it in place does not reach the activation)."""

    def routed(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except RuntimeError:
            if not (isinstance(self, Tensor) and _is_channels_last_only(self)):
                raise
            return method(self.contiguous(), *args, **kwargs)

    routed.__name__, routed.__doc__ = method.__name__, f"``Tensor.{method.__name__}``, with a copy where a channels-last activation needs one."
    return routed


view = _copy_if_channels_last(Tensor.view)
view_as = _copy_if_channels_last(Tensor.view_as)


def batch_norm(*args, **kwargs) -> Tensor:
    """``F.batch_norm``, whose second derivative, with batch statistics, is a C++ kernel (``fewshot.fused``)."""
    from fewshot import fused  # fused imports this module

    return fused.batch_norm(*args, **kwargs)


_ROUTES = {F.max_pool2d: max_pool2d, torch.max_pool2d: max_pool2d, torch.conv2d: conv2d, Tensor.view: view, Tensor.view_as: view_as, F.batch_norm: batch_norm}


class _FastCPUKernels(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return _ROUTES.get(func, func)(*args, **(kwargs or {}))


def fast_cpu_kernels():
    """Context that routes slow CPU kernels to the faster ones above (no-op while compiling).

    Tensors made inside may be channels-last; ``call`` gives a function's outputs back NCHW.
    """
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return _FastCPUKernels()


def _nchw(output):
    if isinstance(output, Tensor):
        return output.contiguous() if _is_channels_last_only(output) else output
    if type(output) in (tuple, list):
        return type(output)(_nchw(o) for o in output)
    if isinstance(output, tuple) and hasattr(output, "_fields"):  # a namedtuple
        return type(output)(*(_nchw(o) for o in output))
    if type(output) is dict:
        return {k: _nchw(v) for k, v in output.items()}
    return output


def call(function, *args, **kwargs):
    """``function(*args, **kwargs)`` inside ``fast_cpu_kernels()``, its tensor outputs in the usual NCHW layout."""
    with fast_cpu_kernels():
        output = function(*args, **kwargs)
    return _nchw(output)
