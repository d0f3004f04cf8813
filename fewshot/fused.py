"""Batch-norm CPU kernels: with ReLU and 2x2 max-pooling in one, and its second derivative (issue 6).

On the CPU, the block [BatchNorm2d with the batch's statistics, ReLU, MaxPool2d(2)] of
the paper's conv learner is bound by memory traffic, not arithmetic: ATen reads and
writes its first-block activations (75x64x28x28, 15 MB, on the Omniglot query batch)
about six times forward and nine times backward. ``csrc/batch_norm.cpp`` does the
block in two reads and a quarter-size write forward (statistics, then
normalise-max-ReLU per window, keeping which of the four won), and one read and one
write backward (batch norm's gradient needs dy only at the winners). One thread,
that block: 6.0 -> 1.5 ms forward, 15 -> 6.4 ms forward + backward (measured).

It is the same function: float64 results agree with ATen's ops to 1e-14; the first
maximum of each window in ATen's scan order wins; NaN or infinite inputs or
parameters fall back to ATen's ops, which propagate them as they do. Where a graph of
the backward itself is asked for (``create_graph``, MAML's second order through the
support pass), the backward is a Function of its own whose backward is batch norm's
second derivative (below) at the block's gradient carried to each window's winner:
ReLU and pooling are fixed linear maps at a given x. Before, that case recomputed the
block with ATen's ops: one thread, a 20-way 1-shot task (5 steps, second order)
took 653 ms, 548 ms with this, and 432 ms once the small support batches took the
kernels too (``fewshot.kernels.MIN_ELEMENTS``).

Batch norm's second derivative (second-order MAML differentiates the support pass's
backward) takes ATen about 25 elementwise ops over the activations; the kernel does it
in two passes (``double_backward`` in the C++ file has the formulas). Inside
``fewshot.kernels.fast_cpu_kernels()``, ``F.batch_norm`` with batch statistics of a 4-D
float32/64 CPU batch runs ATen's forward and backward through ``batch_norm`` below, whose
backward's backward is that kernel: one 5x64x28x28 support batch, forward, backward and
double backward on one thread, 4.3 -> 1.6 ms. It takes NCHW and channels-last batches.
Float64 agrees with ATen to 1e-15. Where a
graph of that double backward is asked for, the same formulas run as differentiable ops
with the statistics recomputed from x (third derivatives checked against central
differences: ATen's own treats its saved statistics as constants).

``fused_copy(module)`` gives a copy of a module in which every such block of an
``nn.Sequential`` (BatchNorm2d(affine, track_running_stats=False), ReLU and
MaxPool2d(2), the pool before or after the ReLU) runs as one
``BatchNormReLUMaxPool2d`` with the batch norm's parameter names, so
``functional_call`` with the original parameter names drives it. The block takes the
kernel only for channels-last CPU batches (what ``fewshot.kernels``'s convolution
route produces), float32 or float64; anything else runs ATen's ops.

The kernels are compiled on first use with PyTorch's C++ extension builder (a C++
compiler is needed; about 30 s, once per machine, cached under
``~/.cache/fewshot/extensions``). Without a compiler (warned once), or with
``FEWSHOT_FUSED=0``, nothing is fused and ATen's ops run as before.
"""

from __future__ import annotations

import copy
import hashlib
import os
import platform
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot import kernels

_SOURCE = Path(__file__).with_name("csrc") / "batch_norm.cpp"
_FLAGS = ["-O3", "-march=native"]
_lock = threading.Lock()
_extension = None  # the compiled module; False once it failed


def _machine_tag() -> str:
    """The kernel is compiled for this CPU (-march=native): one build per CPU model, compiler and source."""
    try:
        cpu = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    key = "|".join([cpu, platform.machine(), torch.__version__, sys.version, sys.prefix, str(_SOURCE), *_FLAGS, _SOURCE.read_text()])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def extension():
    """The compiled kernel, compiled on first call; None where that is off or impossible (warned once)."""
    global _extension
    if _extension is None:
        with _lock:
            if _extension is None:
                _extension = _build() or False
    return _extension or None


def _build():
    if os.environ.get("FEWSHOT_FUSED", "1") == "0":
        return None
    name = f"fewshot_batch_norm_{_machine_tag()}"
    directory = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fewshot" / "extensions" / name
    try:
        from torch.utils.cpp_extension import load

        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError:  # a read-only home: build in a temporary directory, for this process
            directory = Path(tempfile.mkdtemp(prefix=name))
        if not any(directory.glob("*.so")):
            print("fewshot: compiling the batch-norm CPU kernels (once per machine, about 30 s)",
                  file=sys.stderr, flush=True)  # fmt: skip
        return load(name=name, sources=[str(_SOURCE)], extra_cflags=_FLAGS,
                    build_directory=str(directory), verbose=False)  # fmt: skip
    except Exception as error:  # no compiler, no ninja, a read-only home: run ATen's ops instead
        warnings.warn(f"fewshot: the batch-norm CPU kernels are not available "
                      f"({type(error).__name__}: {str(error)[:300]}); using PyTorch's ops", RuntimeWarning, stacklevel=3)  # fmt: skip
        return None


def reference(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """The block with ATen's ops: max_pool2d(relu(batch_norm(x)), 2), batch statistics."""
    return F.max_pool2d(F.relu(F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)), 2)


class _Computed:
    """The kernel's results, handed to the autograd Function as a non-tensor argument (so its output is not an input)."""

    def __init__(self, tensors):
        self.tensors = tensors


class _BatchNormReLUMaxPool2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, computed):
        out, argmax, mean, invstd = computed.tensors
        computed.tensors = None
        ctx.eps = eps
        ctx.save_for_backward(x, weight, bias, out, argmax, mean, invstd)  # out: where the ReLU passed
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, out, argmax, mean, invstd = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph: the same kernel, as a Function with a backward of its own
            grads = _BatchNormReLUMaxPool2dBackward.apply(grad_out, x, weight, bias, out.detach(), argmax, mean, invstd, ctx.eps)
        else:
            grads = extension().backward(grad_out, x, out, argmax, mean, invstd, weight)
        return (*(g if need else None for g, need in zip(grads, needs)), None, None)


class _BatchNormReLUMaxPool2dBackward(torch.autograd.Function):
    """The block's (grad_x, grad_weight, grad_bias) by the kernel; its own backward is batch norm's second
    derivative at dy = the block's gradient carried to each window's winner where the ReLU passed (ReLU and
    pooling are piecewise linear: at a given x they are fixed linear maps, with no second derivative). The
    bias is an input so that its (zero) second derivative is there, as with ATen's ops."""

    @staticmethod
    def forward(ctx, grad_out, x, weight, bias, out, argmax, mean, invstd, eps):
        ctx.eps = eps
        ctx.save_for_backward(grad_out, x, weight, out, argmax, mean, invstd)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: the kernel skips its terms
        return tuple(extension().backward(grad_out, x, out, argmax, mean, invstd, weight))

    @staticmethod
    def backward(ctx, gg_x, gg_weight, gg_bias):
        if gg_x is None and gg_weight is None and gg_bias is None:
            return (None,) * 9
        grad_out, x, weight, out, argmax, mean, invstd = ctx.saved_tensors
        grad_y = _ToWinners.apply(grad_out, out, argmax, *x.shape[2:])
        grad_x, grad_weight, grad_grad_y = _second_derivative(x, weight, mean, invstd, grad_y, gg_x, gg_weight, gg_bias, ctx.eps)
        grad_grad_out = _FromWinners.apply(grad_grad_y, out, argmax)
        grad_bias = torch.zeros_like(weight) if ctx.needs_input_grad[3] else None
        return grad_grad_out, grad_x, grad_weight, grad_bias, None, None, None, None, None


class _ToWinners(torch.autograd.Function):
    """A block-output-sized gradient at each window's winner where the ReLU passed, zero elsewhere (linear)."""

    @staticmethod
    def forward(ctx, grad_out, out, argmax, height, width):
        ctx.save_for_backward(out, argmax)
        return extension().to_winners(grad_out, out, argmax, height, width)

    @staticmethod
    def backward(ctx, grad):
        out, argmax = ctx.saved_tensors
        return _FromWinners.apply(grad, out, argmax), None, None, None, None


class _FromWinners(torch.autograd.Function):
    """The adjoint of ``_ToWinners``: each window's winner where the ReLU passed."""

    @staticmethod
    def forward(ctx, grad, out, argmax):
        ctx.save_for_backward(out, argmax)
        ctx.size = grad.shape[2:]
        return extension().from_winners(grad, out, argmax)

    @staticmethod
    def backward(ctx, grad_out):
        out, argmax = ctx.saved_tensors
        return _ToWinners.apply(grad_out, out, argmax, *ctx.size), None, None


def _plain_parameter(t, x: Tensor) -> bool:
    return kernels._plain_cpu(t) and t.shape == (x.shape[1],) and t.dtype == x.dtype


def _takes_kernel(x: Tensor, weight: Tensor, bias: Tensor) -> bool:
    return (
        kernels._plain_cpu_batch(x)
        and x.dtype in (torch.float32, torch.float64)
        and kernels._is_channels_last_only(x)
        and x.shape[2] >= 2
        and x.shape[3] >= 2
        and all(_plain_parameter(t, x) for t in (weight, bias))
        and extension() is not None
    )


def batch_norm_relu_max_pool2d(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """``max_pool2d(relu(batch_norm(x, batch statistics)), 2)``, in one kernel where it applies."""
    if _takes_kernel(x, weight, bias):
        result = extension().forward(x.detach(), weight.detach(), bias.detach(), eps)
        if result:  # empty where something is not finite
            return _BatchNormReLUMaxPool2dFunction.apply(x, weight, bias, eps, _Computed(result))
    return reference(x, weight, bias, eps)


class BatchNormReLUMaxPool2d(nn.Module):
    """[BatchNorm2d (batch statistics), ReLU, MaxPool2d(2)] as one module, holding the batch norm's parameters."""

    def __init__(self, batch_norm: nn.BatchNorm2d):
        super().__init__()
        self.weight, self.bias, self.eps = batch_norm.weight, batch_norm.bias, batch_norm.eps

    def forward(self, x: Tensor) -> Tensor:
        return batch_norm_relu_max_pool2d(x, self.weight, self.bias, self.eps)


def _is_batch_statistics_norm(m: nn.Module) -> bool:
    return type(m) is nn.BatchNorm2d and m.affine and not m.track_running_stats


def _is_halving_pool(m: nn.Module) -> bool:
    def pair(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v, v)

    return (
        type(m) is nn.MaxPool2d
        and pair(m.kernel_size) == (2, 2)
        and pair(m.stride if m.stride is not None else m.kernel_size) == (2, 2)
        and pair(m.padding) == (0, 0)
        and pair(m.dilation) == (1, 1)
        and not m.ceil_mode
        and not m.return_indices
    )


def _fuse_(module: nn.Module) -> int:
    """Replace every block in the ``nn.Sequential`` submodules of ``module`` in place; how many."""
    count = 0
    for sequential in [m for m in module.modules() if type(m) is nn.Sequential]:
        children = list(sequential.named_children())
        i = 0
        while i + 2 < len(children):
            (name, bn), (_, a), (_, b) = children[i : i + 3]
            pair_ok = (type(a) is nn.ReLU and _is_halving_pool(b)) or (_is_halving_pool(a) and type(b) is nn.ReLU)
            if _is_batch_statistics_norm(bn) and pair_ok:
                setattr(sequential, name, BatchNormReLUMaxPool2d(bn))
                setattr(sequential, children[i + 1][0], nn.Identity())
                setattr(sequential, children[i + 2][0], nn.Identity())
                count += 1
                i += 3
            else:
                i += 1
    return count


def fused_copy(module: nn.Module) -> nn.Module | None:
    """A deep copy of ``module`` with its blocks fused (same parameter names), or None where there is none
    or the kernel is not available."""
    if not any(_is_batch_statistics_norm(m) for m in module.modules()) or extension() is None:
        return None
    twin = copy.deepcopy(module)
    return twin if _fuse_(twin) else None


class _BatchNorm(torch.autograd.Function):
    """Batch norm with the batch's statistics: ATen's forward and backward, the backward as ``_BatchNormBackward``."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, mean, invstd = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)
        ctx.eps = eps
        ctx.save_for_backward(x, weight, mean, invstd)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, mean, invstd = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = _BatchNormBackward.apply(x, weight, mean, invstd, grad_y, ctx.eps)
        return grad_x, grad_weight, grad_bias, None


class _BatchNormBackward(torch.autograd.Function):
    """(grad_x, grad_weight, grad_bias) of batch norm; its own backward is the C++ double backward."""

    @staticmethod
    def forward(ctx, x, weight, mean, invstd, grad_y, eps):
        ctx.eps = eps
        ctx.save_for_backward(x, weight, mean, invstd, grad_y)
        return torch.ops.aten.native_batch_norm_backward(grad_y, x, weight, None, None, mean, invstd, True, eps, [True, True, True])

    @staticmethod
    def backward(ctx, gg_x, gg_weight, gg_bias):
        x, weight, mean, invstd, grad_y = ctx.saved_tensors
        grad_x, grad_weight, grad_grad_y = _second_derivative(x, weight, mean, invstd, grad_y, gg_x, gg_weight, gg_bias, ctx.eps)
        return grad_x, grad_weight, None, None, grad_grad_y, None


def _second_derivative(x, weight, mean, invstd, grad_y, gg_x, gg_weight, gg_bias, eps):
    """(d/dx, d/dweight, d/dgrad_y) of <gg, batch norm's backward at grad_y>: the C++ kernel, or where a
    graph of it is asked for, the same formulas in differentiable ops."""
    if torch.is_grad_enabled():
        return _double_backward_ops(x, weight, grad_y, gg_x, gg_weight, gg_bias, eps)
    grad_x, grad_grad_y, grad_weight = extension().double_backward(x, grad_y, gg_x, gg_weight, gg_bias, weight, mean.double(), invstd.double())
    return grad_x, grad_weight, grad_grad_y


def _double_backward_ops(x, weight, grad_y, gg_x, gg_weight, gg_bias, eps):
    """(d/dx, d/dweight, d/dgrad_y) of <gg, batch norm's backward>: the C++ kernel's formulas written
    with differentiable ops, the statistics recomputed from x, so derivatives of every order follow."""
    dims, shape = (0, *range(2, x.dim())), (1, -1) + (1,) * (x.dim() - 2)
    m = x.numel() // x.shape[1]
    mean = x.mean(dims, keepdim=True)
    invstd = torch.rsqrt(x.var(dims, unbiased=False, keepdim=True) + eps)
    xh = (x - mean) * invstd
    gamma = weight.view(shape)

    def backward_operator(v):  # P(v) = invstd * (v - mean(v) - xh * mean(v * xh))
        return invstd * (v - v.mean(dims, keepdim=True) - xh * (v * xh).mean(dims, keepdim=True))

    gg_x = torch.zeros_like(x) if gg_x is None else gg_x
    gg_weight = 0.0 if gg_weight is None else gg_weight.view(shape)
    gg_bias = 0.0 if gg_bias is None else gg_bias.view(shape)
    a, b = grad_y.mean(dims, keepdim=True), (grad_y * xh).mean(dims, keepdim=True)
    s1 = (gg_x * (grad_y - a - xh * b)).sum(dims, keepdim=True)
    s2 = (gg_x * xh).sum(dims, keepdim=True)
    p_dy, p_gg = backward_operator(grad_y), backward_operator(gg_x)
    grad_x = gamma * (-invstd**2 * s1 / m * xh - invstd * b * p_gg - invstd * s2 / m * p_dy) + gg_weight * p_dy
    grad_grad_y = gamma * p_gg + gg_weight * xh + gg_bias
    return grad_x, (invstd * s1).view(-1), grad_grad_y


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    """``F.batch_norm``; with batch statistics of a 4-D float32/64 CPU batch, through ``_BatchNorm``."""
    if (
        training  # F.batch_norm itself refuses evaluation without running statistics
        and running_mean is None
        and running_var is None
        and kernels._plain_cpu_batch(input, min_elements=0)
        and input.dtype in (torch.float32, torch.float64)
        and input.numel() > input.shape[1]  # one value per channel: F.batch_norm's own error
        and all(_plain_parameter(t, input) for t in (weight, bias))
        and extension() is not None
    ):
        return _BatchNorm.apply(input, weight, bias, eps)
    return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
