"""Meta-LSTM: "Optimization as a Model for Few-Shot Learning" (Ravi & Larochelle, ICLR 2017).

The learner's update is an LSTM cell whose cell state is the learner's
parameters (section 3.1, eq. 2):

    c_t = f_t * c_{t-1} + i_t * c~_t,        c~_t = -grad_t,  theta_t = c_t
    i_t = sigmoid(W_I . [grad_t, L_t, theta_{t-1}, i_{t-1}] + b_I)   (a learned step size)
    f_t = sigmoid(W_F . [grad_t, L_t, theta_{t-1}, f_{t-1}] + b_F)   (a learned decay)

and c_0, the learner's initialisation, is a meta-parameter too. One small
meta-learner is shared by every coordinate of the learner (section 3.2): all
coordinates are one flat vector theta (P,) and every step is a few batched
tensor operations over it. Two layers (section 3.2 and the authors' code): an
ordinary LSTM (hidden 20) reads the preprocessed (grad_t, L_t) of each
coordinate (Andrychowicz et al. 2016, appendix A, p = 10); its hidden state
summarises grad and L for the update cell above.

Training (Algorithm 1): per episode, T updates of the learner on batches of the
support set, then the query loss of theta_T trains the meta-learner; the
learner's gradients and losses are inputs, not functions of the meta-learner
(the paper's dropped second derivatives, section 3.2). Batch norm (section
3.4): batch statistics at meta-training for both sets; at meta-test the
support batches' statistics during the updates and their running averages for
the query set, reset at the start of every episode.

The update rule is an ``(init, update)`` pair, like SGD's (``sgd_rule``): the
loop ``unroll`` is the same for both, the state of the Meta-LSTM rule is the
two layers' recurrent state.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Iterator, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

from fewshot import kernels
from fewshot.algorithms.maml import _PrecomputedGradient
from fewshot.tasks.base import TaskBatch

LossFn = Callable[[Tensor, Tensor], Tensor]
Gradient = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]  # (theta, x, y) -> (loss (), grad (P,))


# --------------------------------------------------------------------------- the update rules


def preprocess(x: Tensor, p: float = 10.0) -> Tensor:
    """Andrychowicz et al. 2016, appendix A: (log|x| / p, sign x) if |x| >= e^-p, else (-1, e^p x).

    (...) -> (..., 2): gradients and losses of any magnitude mapped to a scale the LSTM can read.
    """
    large = x.abs() >= math.exp(-p)
    magnitude = torch.where(large, x.abs().clamp_min(math.exp(-p)).log() / p, -torch.ones_like(x))
    direction = torch.where(large, x.sign(), math.exp(p) * x)
    return torch.stack([magnitude, direction], dim=-1)


class UpdateRule(NamedTuple):
    """An optimizer as a pair of pure functions: ``init(theta) -> state``,
    ``update(state, theta, grad, loss) -> (theta', state')``."""

    init: Callable
    update: Callable


def sgd_rule(lr: float) -> UpdateRule:
    """Plain gradient descent, theta' = theta - lr * grad (the MAML inner loop's rule), stateless."""
    return UpdateRule(init=lambda theta: (), update=lambda state, theta, grad, loss: (theta - lr * grad, state))


class LSTMState(NamedTuple):
    """The Meta-LSTM rule's state, one row per learner coordinate."""

    h: Tensor  # (P, H) first layer's hidden state
    c: Tensor  # (P, H) first layer's cell state
    forget: Tensor  # (P,) f_{t-1}
    input: Tensor  # (P,) i_{t-1}


class MetaLearner(nn.Module):
    """The coordinate-wise two-layer meta-learner; ``rule()`` is its ``(init, update)`` pair.

    Args:
        hidden: hidden units of the first LSTM (20 in the paper).
        p: the preprocessing constant (10 in the paper).
    """

    def __init__(self, hidden: int = 20, p: float = 10.0):
        super().__init__()
        self.hidden, self.p = hidden, p
        self.lstm = nn.LSTMCell(4, hidden)  # input: preprocessed (grad, loss)
        # the update cell: columns (forget, input); rows [h_t (H), theta_{t-1}]; previous gate weights
        self.gate_weight = nn.Parameter(torch.empty(hidden + 1, 2).uniform_(-0.01, 0.01))
        self.gate_previous = nn.Parameter(torch.empty(2).uniform_(-0.01, 0.01))
        # the authors' code: f near 1 (keep theta), i small (a small step): training starts near plain SGD
        self.gate_bias = nn.Parameter(torch.stack([torch.empty(()).uniform_(4, 5), torch.empty(()).uniform_(-5, -4)]))

    def init(self, theta: Tensor) -> LSTMState:
        zeros = theta.new_zeros(theta.shape[0], self.hidden)
        return LSTMState(zeros, zeros, theta.new_zeros(theta.shape), theta.new_zeros(theta.shape))

    def update(self, state: LSTMState, theta: Tensor, grad: Tensor, loss: Tensor) -> tuple[Tensor, LSTMState]:
        """One step of eq. 2 for all P coordinates at once: theta (P,), grad (P,), loss () -> theta' (P,)."""
        n = theta.shape[0]
        inputs = torch.cat([preprocess(grad, self.p), preprocess(loss, self.p).expand(n, 2)], dim=1)  # (P, 4)
        h, c = self.lstm(inputs, (state.h, state.c))  # (P, H) each
        previous = torch.stack([state.forget, state.input], dim=1)  # (P, 2)
        gates = torch.sigmoid(torch.cat([h, theta[:, None]], dim=1) @ self.gate_weight + previous * self.gate_previous + self.gate_bias)
        forget, input = gates.unbind(1)  # (P,) each
        return forget * theta - input * grad, LSTMState(h, c, forget, input)

    def rule(self) -> UpdateRule:
        return UpdateRule(self.init, self.update)


# --------------------------------------------------------------------------- the learner as a flat vector


class FlatLearner:
    """A learner ``nn.Module`` run from one flat parameter vector theta (P,): views, no copies."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.names = [n for n, _ in module.named_parameters()]
        self.shapes = [p.shape for _, p in module.named_parameters()]
        self.sizes = [p.numel() for _, p in module.named_parameters()]

    def flatten(self) -> Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.module.parameters()])  # (P,)

    def params(self, theta: Tensor) -> dict[str, Tensor]:
        return {n: t.view(s) for n, t, s in zip(self.names, torch.split(theta, self.sizes), self.shapes)}

    def __call__(self, theta: Tensor, x: Tensor, running_statistics: bool = False) -> Tensor:
        """f_theta(x); batch norm with the batch's statistics (updating the running averages), or with the running averages."""
        self.module.train(not running_statistics)
        return kernels.call(functional_call, self.module, self.params(theta), (x,))  # faster CPU kernels

    def layer_of_coordinate(self) -> tuple[list[str], Tensor]:
        """The learner's layers (modules owning parameters) and each coordinate's layer index (P,)."""
        layers = list(dict.fromkeys(n.rpartition(".")[0] or n for n in self.names))
        index = [layers.index(n.rpartition(".")[0] or n) for n in self.names]
        return layers, torch.repeat_interleave(torch.tensor(index), torch.tensor(self.sizes))


def with_episode_statistics(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose batch norms keep running averages (a cumulative mean), to reset per episode."""
    module = copy.deepcopy(module)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats, m.momentum = True, None
            m.register_buffer("running_mean", torch.zeros(m.num_features))
            m.register_buffer("running_var", torch.ones(m.num_features))
            m.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
    return module


def reset_statistics(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            m.reset_running_stats()


# --------------------------------------------------------------------------- the algorithm


def learner_gradient(learner: FlatLearner, loss_fn: LossFn) -> Gradient:
    """(theta, x, y) -> (L_t, grad_t) at a detached theta: no second derivatives (section 3.2)."""

    def gradient(theta: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            leaf = theta.detach().requires_grad_()
            loss = loss_fn(learner(leaf, x), y)
            (grad,) = torch.autograd.grad(loss, leaf)
        return loss.detach(), grad  # (), (P,)

    return gradient


def support_batches(x: Tensor, y: Tensor, batch_size: int, steps: int) -> Iterator[tuple[Tensor, Tensor]]:
    """``steps`` batches of the support set: the whole set if ``batch_size`` is 0 or >= its size, else
    consecutive slices of fixed (seeded) permutations, epoch after epoch: the same batches every call."""
    n = x.shape[0]
    if batch_size <= 0 or batch_size >= n:
        for _ in range(steps):
            yield x, y
        return
    per_epoch = -(-n // batch_size)
    for t in range(steps):
        epoch, start = divmod(t, per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
        chosen = order[start * batch_size : (start + 1) * batch_size]
        yield x[chosen], y[chosen]


def unroll(rule: UpdateRule, theta: Tensor, gradient: Gradient, batches) -> tuple[Tensor, list]:
    """theta_t = update(theta_{t-1}, grad_t, L_t) over the support batches (Algorithm 1, lines 5-10).

    Returns theta_T (P,) and the states after each step.
    """
    state, states = rule.init(theta), []
    for x, y in batches:
        loss, grad = gradient(theta, x, y)
        theta, state = rule.update(state, theta, grad, loss)
        states.append(state)
    return theta, states


# --------------------------------------------------------------------------- the user-facing class


def _clip_scale(grads: list[Tensor], max_norm: float) -> Tensor:
    """The factor that brings the gradients' joint norm down to ``max_norm`` (torch.nn.utils.clip_grad_norm_'s rule)."""
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    return (max_norm / (norm + 1e-6)).clamp(max=1.0)


class MetaLSTM(nn.Module):
    """The Meta-LSTM meta-learner around an ordinary learner ``nn.Module``.

    Args:
        learner: the learner; its architecture is used, its current weights become
            the initial c_0 (a meta-parameter, ``initial_params``).
        loss_fn: ``loss_fn(predictions, targets) -> scalar``, e.g. ``F.cross_entropy``.
        steps: T, learner updates per episode (the authors' code: 12 for 1-shot).
        batch_size: support examples per update; 0 for the whole support set.
        hidden: the first LSTM's hidden units (20).
        grad_clip: clip the meta-gradient's norm to this (0: no clipping); the
            authors' code clips at 0.25.

    Example::

        meta = MetaLSTM(Conv4(5, hidden=32), F.cross_entropy, steps=12, batch_size=5)
        opt = torch.optim.Adam(meta.parameters(), lr=1e-3)
        for tasks in episodes:               # TaskBatch, tensors (B, N, ...)
            opt.zero_grad()
            meta.training_loss(tasks).backward()   # the gradient is clipped already
            opt.step()
        logits = meta.adaptation_curve(test_tasks, 12)[-1]   # (B, M, n_way)
    """

    def __init__(self, learner: nn.Module, loss_fn: LossFn, steps: int = 12, batch_size: int = 0,
                 hidden: int = 20, grad_clip: float = 0.25):  # fmt: skip
        super().__init__()
        if not (isinstance(steps, int) and steps >= 0):
            raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
        if not (isinstance(batch_size, int) and batch_size >= 0):
            raise ValueError(f"batch_size must be an integer >= 0 (0: the whole support set), got {batch_size!r}")
        if not grad_clip >= 0:
            raise ValueError(f"grad_clip must be >= 0 (0: no clipping), got {grad_clip}")
        self.loss_fn, self.steps, self.batch_size, self.grad_clip = loss_fn, steps, batch_size, float(grad_clip)
        self.learner = with_episode_statistics(learner).requires_grad_(False)  # the architecture; c_0 holds the weights
        self.meta_learner = MetaLearner(hidden)
        self.initial_params = nn.Parameter(FlatLearner(self.learner).flatten().clone())  # c_0 (P,)

    @property
    def flat(self) -> FlatLearner:
        return FlatLearner(self.learner)

    # ---- meta-training

    def query_loss(self, task: TaskBatch, gradient: Gradient | None = None) -> Tensor:
        """L^query(theta_T) of one task (no batch dimension), batch statistics throughout (meta-training)."""
        flat = self.flat
        gradient = gradient or learner_gradient(flat, self.loss_fn)
        batches = support_batches(task.support_x, task.support_y, self.batch_size, self.steps)
        theta, _ = unroll(self.meta_learner.rule(), self.initial_params, gradient, batches)
        return self.loss_fn(flat(theta, task.query_x), task.query_y)

    def training_loss(self, tasks: TaskBatch, clip: bool = True) -> Tensor:
        """Mean query loss over the meta-batch; on backward, its gradient clipped to ``grad_clip``.

        Each task's gradient is taken while the loss is formed (one task's graph
        alive at a time), summed, clipped, and handed over by the returned loss.
        ``clip=False`` hands it over unclipped, for a share of a meta-batch whose
        gradients are summed elsewhere first (``clip_gradients_`` then clips the sum).
        """
        tasks = TaskBatch(*tasks)
        n_tasks = tasks.support_x.shape[0]
        inputs = [p for p in self.parameters() if p.requires_grad]
        if not torch.is_grad_enabled():
            return torch.stack([self.query_loss(tasks.task(i)) for i in range(n_tasks)]).mean()
        total, grads = self.initial_params.new_zeros(()), [torch.zeros_like(p) for p in inputs]
        for i in range(n_tasks):
            loss = self.query_loss(tasks.task(i)) / n_tasks
            for grad, task_grad in zip(grads, torch.autograd.grad(loss, inputs, materialize_grads=True)):
                grad.add_(task_grad)
            total = total + loss.detach()
        if clip and self.grad_clip > 0:
            scale = _clip_scale(grads, self.grad_clip)
            grads = [g * scale for g in grads]
        return _PrecomputedGradient.apply(total, tuple(grads), *inputs)

    def clip_gradients_(self) -> None:
        """Clip the parameters' ``.grad`` (a meta-gradient summed over processes by ``fewshot.train``) to
        ``grad_clip``, as ``training_loss`` clips a whole meta-batch's."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if self.grad_clip > 0 and grads:
            scale = _clip_scale(grads, self.grad_clip)
            for g in grads:
                g.mul_(scale)

    meta_loss = training_loss

    # ---- meta-test

    @torch.no_grad()
    def episode(self, task: TaskBatch, steps: int) -> tuple[list[Tensor], Tensor, Tensor]:
        """One meta-test episode (no batch dimension): query logits after 0..steps updates, and the gates.

        The running batch-norm averages are reset first; each step's support batch
        is normalised with its own statistics and added to the running averages,
        which then normalise the query set. Returns ``steps + 1`` predictions
        (M, ...) and the input and forget gates (steps, P).
        """
        flat = self.flat
        reset_statistics(self.learner)
        gradient = learner_gradient(flat, self.loss_fn)
        rule = self.meta_learner.rule()
        theta = self.initial_params
        state, predictions, inputs, forgets = rule.init(theta), [], [], []
        batches = support_batches(task.support_x, task.support_y, self.batch_size, steps + 1)
        for t, (x, y) in enumerate(batches):
            loss, grad = gradient(theta, x, y)  # the support forward at theta_t adds its statistics
            predictions.append(flat(theta, task.query_x, running_statistics=True))
            if t < steps:
                theta, state = rule.update(state, theta, grad, loss)
                inputs.append(state.input)
                forgets.append(state.forget)
        empty = theta.new_zeros(0, theta.shape[0])
        return predictions, torch.stack(inputs) if inputs else empty, torch.stack(forgets) if forgets else empty

    def adaptation_curve(self, tasks: TaskBatch, max_steps: int) -> list[Tensor]:
        """Query predictions after 0..``max_steps`` updates, meta-test batch norm: ``max_steps + 1`` tensors (B, M, ...)."""
        per_task = [self.episode(tasks.task(i), max_steps)[0] for i in range(len(tasks.support_x))]
        return [torch.stack(step) for step in zip(*per_task)]

    def gate_means(self, tasks: TaskBatch, steps: int | None = None) -> dict:
        """Figure 3's analysis: per episode, update step and learner layer, the mean input and forget gate.

        Returns ``{"layers": [names], "input": (B, steps, L), "forget": (B, steps, L)}``.
        """
        steps = self.steps if steps is None else steps
        layers, index = self.flat.layer_of_coordinate()
        counts = torch.bincount(index, minlength=len(layers)).to(self.initial_params.dtype)  # (L,)
        result = {"layers": layers, "input": [], "forget": []}
        for i in range(len(tasks.support_x)):
            _, inputs, forgets = self.episode(tasks.task(i), steps)
            for key, gates in (("input", inputs), ("forget", forgets)):  # (steps, P) -> (steps, L)
                sums = gates.new_zeros(steps, len(layers)).index_add_(1, index, gates)
                result[key].append(sums / counts)
        return {**result, "input": torch.stack(result["input"]), "forget": torch.stack(result["forget"])}
