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
takes that route for plain 4-D CPU tensors; anything else runs untouched, as do
calls under ``torch.func`` transforms and ``torch.compile``.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

_aten = torch.ops.aten


def _pair(value) -> list[int]:
    return [value, value] if isinstance(value, int) else list(value)


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
        and x.device.type == "cpu"
        and x.dim() == 4
        and x.is_floating_point()
        and x.is_contiguous()
        and not x.is_contiguous(memory_format=torch.channels_last)  # ATen already uses the fast kernel then
    )


def max_pool2d(x: Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """``F.max_pool2d`` with the same results, through the channels-last kernel where that is faster."""
    if return_indices or not _takes_channels_last_route(x):
        return F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices)
    stride = kernel_size if stride is None or (not isinstance(stride, int) and len(stride) == 0) else stride
    return ChannelsLastMaxPool2d.apply(x, _pair(kernel_size), _pair(stride), _pair(padding), _pair(dilation), bool(ceil_mode))


_ROUTES = {F.max_pool2d: max_pool2d, torch.max_pool2d: max_pool2d}


class _FastCPUKernels(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return _ROUTES.get(func, func)(*args, **(kwargs or {}))


def fast_cpu_kernels():
    """Context that routes slow CPU kernels to the faster identical ones above (no-op while compiling)."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return _FastCPUKernels()
