"""Faster, bit-identical routes for CPU kernels that measured slow (issue 6, BENCHMARKS.md).

ATen's max-pooling kernel for contiguous (NCHW) CPU tensors runs far below memory
speed: a 2x2 pool of a 75x64x28x28 batch took 21 ms on one thread here, where the
channels-last kernel took 1.6 ms and a copy of the input 1.4 ms. Pooling a
channels-last copy and copying the result back gives the same maxima and the same
argmax indices (the first maximum of each window, in the same scan order), so the
backward is ATen's own, from the NCHW input, and every order of derivative is
unchanged. ``tests/test_kernels.py`` checks the outputs, gradients and second
derivatives bit for bit against ``F.max_pool2d``.

``fast_cpu_kernels()`` is a context in which ``F.max_pool2d`` (hence ``nn.MaxPool2d``)
takes that route for plain contiguous 4-D float16/32/64 CPU tensors of at least
``MIN_ELEMENTS`` elements; anything else runs
untouched, as do calls under ``torch.func`` transforms, forward-mode AD and ``torch.compile``.
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
# Below about this many input elements the two copies cost more than the NCHW kernel loses
# (one thread, 2x2 pools of 64 channels: 0.14 vs 0.06 ms at 2,880 elements, even at 43,200,
# 2.2x faster at 235,200).
MIN_ELEMENTS = 32_768


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


def _takes_channels_last_route(x) -> bool:
    return (
        isinstance(x, Tensor)
        and not torch._C._functorch.is_functorch_wrapped_tensor(x)  # vmap / grad transforms: leave to ATen
        and forward_ad.unpack_dual(x).tangent is None  # forward-mode AD: ChannelsLastMaxPool2d has no jvp
        and x.device.type == "cpu"
        and x.dim() == 4
        and x.numel() >= MIN_ELEMENTS
        and x.dtype in _EXACT_DTYPES
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


_ROUTES = {F.max_pool2d: max_pool2d, torch.max_pool2d: max_pool2d}


class _FastCPUKernels(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return _ROUTES.get(func, func)(*args, **(kwargs or {}))


def fast_cpu_kernels():
    """Context that routes slow CPU kernels to the faster identical ones above (no-op while compiling)."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return _FastCPUKernels()
