"""MAML: Model-Agnostic Meta-Learning (Finn, Abbeel & Levine, ICML 2017).

Algorithm 2 of the paper, for a meta-batch of tasks T_i ~ p(T):

    inner update (eq. 1):  theta'_i = theta - alpha * grad_theta L_{T_i}^{support}(f_theta)
    meta-objective (eq. 2/3):  min_theta  sum_i L_{T_i}^{query}(f_{theta'_i})

Second order differentiates the meta-objective through the inner updates (the
gradient of eq. 1 is itself differentiated); first order (FOMAML, section 5.2)
treats the inner gradients as constants. With a learned inner learning rate
alpha (Meta-SGD, Li et al. 2017) alpha is a meta-parameter too, one per
parameter tensor or one per coordinate.

The functions before the ``MAML`` class are pure functions of a parameter dict:
``adapt`` maps (meta-parameters, support set) to adapted parameters and never
mutates the model. The whole meta-batch is adapted either in one batched call
(``torch.func.vmap`` of the forward pass over per-task parameter copies, with
ordinary autograd for every gradient) or by a loop over tasks; both give the
same numbers (tests/algorithms/test_maml.py). ``meta_gradient_functorch`` is the
same objective written with function transforms only, for ``torch.compile``.
"""

from __future__ import annotations

import copy
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from fewshot import fused, kernels
from fewshot.batched import batched_loss
from fewshot.tasks.base import TaskBatch

Params = dict[str, Tensor]
TaskLoss = Callable[[Params, Tensor, Tensor], Tensor]


# --------------------------------------------------------------------------- the algorithm


def sgd_update(params: Params, grads: Params, inner_lrs: dict[str, Tensor | float]) -> Params:
    """theta' = theta - alpha * grad (eq. 1), alpha per parameter tensor or per coordinate."""
    return {name: p - inner_lrs[name] * grads[name] for name, p in params.items()}


def autograd_gradient(task_loss: TaskLoss, params: Params, x: Tensor, y: Tensor, first_order: bool) -> Params:
    """grad_theta L(f_theta) by ordinary autograd; second order keeps its graph (``create_graph``).

    With per-task parameter copies (a leading task dimension) ``task_loss`` returns
    one loss per task; the gradient of their sum with respect to the copies is
    every task's own gradient, in one backward pass.
    """
    keep_graph = torch.is_grad_enabled()  # under no_grad: values only; the inner loop still differentiates
    with torch.enable_grad():
        # A fresh leaf must own its memory: an expanded (stride-0) tensor, or a view made
        # under no_grad, would receive one gradient shared by every task.
        params = {
            n: p if keep_graph and p.requires_grad else p.detach().contiguous().requires_grad_()
            for n, p in params.items()
        }
        loss = task_loss(params, x, y).sum()
        grads = torch.autograd.grad(loss, tuple(params.values()), create_graph=not first_order, materialize_grads=True)
    return dict(zip(params, grads))


def functorch_gradient(task_loss: TaskLoss, params: Params, x: Tensor, y: Tensor, first_order: bool) -> Params:
    """The same gradient with ``torch.func.grad``: composes with ``vmap`` and ``torch.compile``."""
    grads = torch.func.grad(task_loss)(params, x, y)
    return {n: g.detach() for n, g in grads.items()} if first_order else grads


def adapt(
    task_loss: TaskLoss,
    params: Params,
    support: tuple[Tensor, Tensor],
    inner_lrs: dict[str, Tensor | float],
    steps: int,
    first_order: bool,
    gradient=autograd_gradient,
) -> Params:
    """Inner loop (eq. 1): ``steps`` gradient steps on the support loss, as a pure function.

    Second order differentiates through every step; first order treats the inner
    gradients as constants. Parameters without a step size in ``inner_lrs`` are not
    adapted: every task uses them as they are (they stay meta-parameters).
    """
    x, y = support
    fixed = {n: p for n, p in params.items() if n not in inner_lrs}
    adapted = {n: p for n, p in params.items() if n in inner_lrs}
    loss = task_loss if not fixed else (lambda adapted, x, y: task_loss({**fixed, **adapted}, x, y))
    for _ in range(steps):
        adapted = sgd_update(adapted, gradient(loss, adapted, x, y, first_order), inner_lrs)
    return {n: adapted.get(n, p) for n, p in params.items()}


def query_loss_after_adaptation(
    task_loss: TaskLoss,
    params: Params,
    tasks: TaskBatch,
    inner_lrs: dict[str, Tensor | float],
    steps: int,
    first_order: bool,
    gradient=autograd_gradient,
) -> Tensor:
    """L_{T_i}^{query}(f_{theta'_i}): the query loss of the adapted parameters."""
    adapted = adapt(task_loss, params, tasks.support, inner_lrs, steps, first_order, gradient)
    return task_loss(adapted, tasks.query_x, tasks.query_y)


def per_task_copies(params: Params, n_tasks: int) -> Params:
    """theta expanded to (B, *shape) for every task: views, no copy; each task's gradient lands in its slice."""
    return {n: p.expand(n_tasks, *p.shape) for n, p in params.items()}


def meta_objective_batched(
    task_loss: TaskLoss, params: Params, tasks: TaskBatch, inner_lrs, steps: int, first_order: bool,
    tasks_loss: TaskLoss | None = None,
) -> Tensor:
    """Mean query loss over the meta-batch, every task adapted in one call: ``tasks_loss``, the
    (B,) losses of all tasks at once, is ``vmap(task_loss)`` unless given."""
    per_task = per_task_copies(params, tasks.support_x.shape[0])
    losses = query_loss_after_adaptation(tasks_loss or vmap(task_loss), per_task, tasks, inner_lrs, steps, first_order)
    return losses.mean()  # (B,) -> ()


def meta_objective_looped(
    task_loss: TaskLoss, params: Params, tasks: TaskBatch, inner_lrs, steps: int, first_order: bool
) -> Tensor:
    """Mean query loss over the meta-batch, one task at a time (the reference)."""
    n_tasks = tasks.support_x.shape[0]
    losses = [
        query_loss_after_adaptation(task_loss, params, tasks.task(i), inner_lrs, steps, first_order)
        for i in range(n_tasks)
    ]
    return torch.stack(losses).mean()


def meta_gradient_task_by_task(
    task_loss: TaskLoss, params: Params, tasks: TaskBatch, inner_lrs, steps: int, first_order: bool,
    inputs: list[Tensor], meta_batch_size: int | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """The looped meta-objective and its gradient w.r.t. ``inputs``, one task's graph alive at a time.

    Each task's query loss (divided by B) is differentiated and its graph freed
    before the next task is adapted, so peak memory is that of one task, not of
    the whole meta-batch; the sum of the per-task gradients is the meta-gradient.
    ``meta_batch_size`` is B when ``tasks`` is only a share of the meta-batch.
    """
    n_tasks = meta_batch_size or tasks.support_x.shape[0]
    total, grads = inputs[0].new_zeros(()), [torch.zeros_like(x) for x in inputs]
    for i in range(tasks.support_x.shape[0]):
        loss = query_loss_after_adaptation(task_loss, params, tasks.task(i), inner_lrs, steps, first_order) / n_tasks
        for grad, task_grad in zip(grads, torch.autograd.grad(loss, inputs, materialize_grads=True)):
            grad.add_(task_grad)
        total = total + loss.detach()
    return total, grads


def meta_gradient_functorch(
    task_loss: TaskLoss, theta: Params, alphas: Params, tasks: TaskBatch, fixed_lrs: dict[str, float], steps: int,
    first_order: bool,
) -> tuple[Tensor, tuple[Params, Params]]:
    """(meta-loss, its gradient w.r.t. theta and learned alphas) with ``torch.func`` only.

    The batched meta-objective written with function transforms alone (``grad``
    inside ``vmap`` inside ``grad_and_value``), so ``torch.compile`` can trace all
    of it into one graph. ``alphas`` is empty when the step sizes are the fixed
    ``fixed_lrs`` (one per adapted parameter).
    """

    def objective(theta: Params, alphas: Params) -> Tensor:
        lrs = alphas or fixed_lrs

        def one_task(xs, ys, xq, yq):
            task = TaskBatch(xs, ys, xq, yq)
            return query_loss_after_adaptation(task_loss, theta, task, lrs, steps, first_order, functorch_gradient)

        return vmap(one_task)(tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y).mean()

    grads, loss = torch.func.grad_and_value(objective, argnums=(0, 1))(theta, alphas)
    return loss, grads


def map_on_threads(pool: ThreadPoolExecutor, share: Callable[[int], object], n_threads: int) -> list:
    """``[share(0), ..., share(n_threads - 1)]``, each on a thread of ``pool`` with one intra-op thread.

    Each call sees the caller's grad mode (grad mode is per thread); the caller's
    intra-op thread count is restored afterwards.
    """
    grad_mode, threads_before = torch.is_grad_enabled(), torch.get_num_threads()

    def run(k: int):
        torch.set_num_threads(1)  # this thread's own OpenMP pool
        with torch.set_grad_enabled(grad_mode):
            return share(k)

    try:
        return list(pool.map(run, range(n_threads)))
    finally:
        torch.set_num_threads(threads_before)


def meta_gradient_in_threads(
    task_losses: list[TaskLoss], params: Params, tasks: TaskBatch, inner_lrs, steps: int, first_order: bool,
    inputs: list[Tensor], pool: ThreadPoolExecutor,
) -> tuple[Tensor, list[Tensor]]:
    """``meta_gradient_task_by_task`` with the meta-batch dealt out to threads, one task per thread at a time.

    Thread k takes tasks k, k + n, k + 2n, ... with its own ``task_losses[k]`` (a
    replica of the module: ``functional_call`` swaps a module's parameters while it
    runs, so threads cannot share one) and one intra-op thread: on a few CPU cores
    whole tasks side by side keep the cores busier than one task's small kernels
    split across them. Shares are summed in a fixed order, so the result does not
    depend on thread timing.
    """
    n_tasks, n_threads = tasks.support_x.shape[0], len(task_losses)

    def share(k: int) -> tuple[Tensor, list[Tensor]]:
        share_of_tasks = TaskBatch(*(t[k::n_threads] for t in tasks[:4]))
        return meta_gradient_task_by_task(
            task_losses[k], params, share_of_tasks, inner_lrs, steps, first_order, inputs, meta_batch_size=n_tasks
        )

    # Every input's gradient accumulator is held for the whole section by a view of it: made anew
    # inside a thread, an accumulator takes its mutex and then the GIL, while a thread in
    # Function.apply holds the GIL and waits for that mutex (a deadlock seen in CI, torch 2.13).
    with torch.enable_grad():
        holders = [x.view_as(x) for x in inputs if x.requires_grad]
    shares = map_on_threads(pool, share, n_threads)
    del holders
    total = sum(loss for loss, _ in shares)
    return total, [sum(gs) for gs in zip(*(g for _, g in shares))]


class _PrecomputedGradient(torch.autograd.Function):
    """Returns ``loss``; its backward gives every input its precomputed gradient (times grad_output)."""

    @staticmethod
    def forward(ctx, loss: Tensor, grads: tuple[Tensor, ...], *inputs: Tensor) -> Tensor:
        ctx.grads = grads
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        return (None, None, *(grad_output * g for g in ctx.grads))


def _has_hooks(module: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def functional_loss(module: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor]) -> TaskLoss:
    """``(params, x, y) -> loss_fn(module(x) with params, y)``; buffers are the module's own."""
    buffers = dict(module.named_buffers())

    def task_loss(params: Params, x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(functional_call(module, {**buffers, **params}, (x,)), y)

    return task_loss


# --------------------------------------------------------------------------- the user-facing class

LEARN_INNER_LR = (False, True, "per_tensor", "per_element")
BATCHED = ("auto", True, False)

# Layers the batched (vmap) path is measured to lose on, or to get wrong (BENCHMARKS.md):
# batched is 12x faster than a per-task loop on the sinusoid MLP, while vmap was 4x
# slower on the Omniglot conv net on 2 CPU cores and its batch-norm meta-gradients were off.
_LOOP_LAYERS = (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.RNNBase)


def prefers_batched(module: nn.Module) -> bool:
    """The measured choice: vmap over tasks unless the model has conv, norm or RNN layers."""
    return not any(isinstance(m, _LOOP_LAYERS) for m in module.modules())


def has_batch_norm(module: nn.Module) -> bool:
    """Whether the module has batch- or instance-norm layers (both run native batch norm)."""
    return any(isinstance(m, nn.modules.batchnorm._NormBase) for m in module.modules())


def updates_buffers(module: nn.Module) -> bool:
    """Whether a forward pass writes the module's buffers (batch-norm running statistics)."""
    return any(isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats for m in module.modules())


class MAML(nn.Module):
    """MAML around an ordinary ``nn.Module``.

    Args:
        model: the learner f_theta; its parameters are the meta-parameters theta.
        loss_fn: ``loss_fn(predictions, targets) -> scalar``, e.g. ``F.mse_loss``.
        inner_lr: alpha, the inner-loop step size (initial value if learned).
        inner_steps: gradient steps of the inner loop at meta-training.
        first_order: FOMAML (drop second derivatives) when True.
        learn_inner_lr: False for a fixed alpha; True or ``"per_tensor"`` learns one
            alpha per parameter tensor, ``"per_element"`` one per coordinate
            (Meta-SGD, Li et al. 2017).
        batched: ``True`` adapts the meta-batch in one vmapped call, ``False`` loops
            over tasks, ``"auto"`` picks what measured faster for the model's layers.
        inner_params: names of the parameters the inner loop adapts (``None``: all of
            them). The others are meta-learned like every parameter but not adapted:
            every task uses them as they are (the authors' batch-norm shift, say, or
            ANIL's feature extractor, Raghu et al. 2020).
        task_threads: on the looped path, how many tasks run side by side, each on
            its own thread with one intra-op thread. ``"auto"`` uses as many as
            ``torch.get_num_threads()`` on CPU (1 on other devices, or when a forward
            pass updates buffers such as batch-norm running statistics, which
            threads would race on); the result is the same for any number up to
            float rounding (each thread sums its own tasks' gradients first).
        compile: compute the meta-gradient with ``torch.func`` transforms compiled
            by ``torch.compile`` (batched path only; the first call compiles, which
            takes tens of seconds). ``meta_loss(...).backward()`` works the same. If
            compilation fails, a warning says why and the eager path is used. Refused
            for models with batch- or instance-norm layers: the transforms' second
            derivative through native batch norm is wrong there (torch 2.13,
            pytorch/functorch#534: the batching rule of its backward for grad_input).

    Example::

        model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 1))
        maml = MAML(model, F.mse_loss, inner_lr=0.01, inner_steps=1)
        opt = torch.optim.Adam(maml.parameters(), lr=1e-3)
        for tasks in task_batches:           # TaskBatch, tensors (B, N, ...)
            opt.zero_grad()
            maml.meta_loss(tasks).backward()
            opt.step()
        adapted = maml.adapt((x_support, y_support), steps=10)
        y_pred = maml(x_query, adapted)
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        first_order: bool = False,
        learn_inner_lr: bool | str = False,
        batched: bool | str = "auto",
        compile: bool = False,
        task_threads: int | str = "auto",
        inner_params: Iterable[str] | None = None,
    ):
        super().__init__()
        if not inner_lr >= 0:
            raise ValueError(f"inner_lr must be >= 0, got {inner_lr}")
        if not (isinstance(inner_steps, int) and inner_steps >= 0):
            raise ValueError(f"inner_steps must be an integer >= 0, got {inner_steps!r}")
        if learn_inner_lr not in LEARN_INNER_LR:
            raise ValueError(f"learn_inner_lr must be one of {LEARN_INNER_LR}, got {learn_inner_lr!r}")
        if batched not in BATCHED:
            raise ValueError(f"batched must be one of {BATCHED}, got {batched!r}")
        if not (task_threads == "auto" or (isinstance(task_threads, int) and not isinstance(task_threads, bool) and task_threads >= 1)):
            raise ValueError(f"task_threads must be 'auto' or an integer >= 1, got {task_threads!r}")
        names = [n for n, _ in model.named_parameters()]
        if isinstance(inner_params, str):
            raise ValueError(f"inner_params must be a collection of parameter names, got the string {inner_params!r}")
        unknown = sorted(set(inner_params or ()) - set(names))
        if unknown:
            raise ValueError(f"inner_params: {unknown} are not parameters of the model; allowed: {names}")
        self.adapted_names = names if inner_params is None else [n for n in names if n in set(inner_params)]
        self.module = model
        self.loss_fn = loss_fn
        self.inner_lr = float(inner_lr)
        self.inner_steps = inner_steps
        self.first_order = first_order
        self.batched = prefers_batched(model) if batched == "auto" else batched
        if compile and not self.batched:
            raise ValueError("compile=True needs the batched path (batched=True or 'auto' on a model without conv/norm layers)")
        if compile and has_batch_norm(model):
            raise ValueError(
                "compile=True is not offered for models with batch- or instance-norm layers: torch.func's "
                "grad(vmap(grad)) through native batch norm gives second-order meta-gradients off by 2-30% "
                "(torch 2.13, measured against the per-task loop); use compile=False (the eager paths are exact)"
            )
        self._compiled = torch.compile(meta_gradient_functorch) if compile else None
        self.inner_lrs = nn.ParameterList()  # learned alphas of the adapted parameters, in the order of named_parameters
        if learn_inner_lr:
            params = dict(model.named_parameters())
            for p in (params[n] for n in self.adapted_names):
                shape = p.shape if learn_inner_lr == "per_element" else ()
                self.inner_lrs.append(nn.Parameter(torch.full(shape, self.inner_lr, dtype=p.dtype)))
        self.task_threads = task_threads
        self._replica_modules: list[nn.Module] = []  # one per thread, made on first use (not submodules)
        self._fused_twin: list[nn.Module | None] = []  # [the module's fused copy, or None], made on first use
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0

    def _threads_for(self, n_tasks: int, device: torch.device) -> int:
        """How many tasks run side by side on the looped path (see ``task_threads``)."""
        if self.task_threads != "auto":
            return min(self.task_threads, n_tasks)
        if device.type != "cpu" or updates_buffers(self.module):
            return 1
        return max(1, min(torch.get_num_threads(), n_tasks))

    def _replicas(self, n: int) -> tuple[list[nn.Module], ThreadPoolExecutor]:
        """``n`` replicas of the module (their own parameters are never used) and a pool of ``n`` threads."""
        while len(self._replica_modules) < n:
            self._replica_modules.append(self._fused_copy() or copy.deepcopy(self.module).requires_grad_(False))
        if self._pool is None or self._pool_size < n:
            if self._pool is not None:
                self._pool.shutdown()
            self._pool, self._pool_size = ThreadPoolExecutor(n, thread_name_prefix="fewshot-task"), n
        return self._replica_modules[:n], self._pool

    def _call(self, module: nn.Module, params: Params, x: Tensor) -> Tensor:
        """f_params(x) on ``module`` (this module or a replica of it), with this module's buffers."""
        tensors = {**dict(self.module.named_buffers()), **params}
        if self.batched:  # under vmap the routes of fewshot.kernels never apply
            return functional_call(module, tensors, (x,))
        if module is self.module and self._twin_can_stand_in(params):  # its twin with fused blocks (fewshot.fused)
            if not self._fused_twin:
                self._fused_twin.append(self._fused_copy())
            module = self._fused_twin[0] or module
        if module is not self.module:
            module.train(self.module.training)
        return kernels.call(functional_call, module, tensors, (x,))  # faster CPU kernels

    def _fused_copy(self) -> nn.Module | None:
        """A copy of the module with fused blocks (``fewshot.fused``), its own parameters never used;
        None where nothing fuses, or where the module has hooks (fusing would drop them)."""
        twin = None if _has_hooks(self.module) else fused.fused_copy(self.module)
        return twin.requires_grad_(False) if twin is not None else None

    def _twin_can_stand_in(self, params: Params) -> bool:
        """A copy made once runs only with every parameter given and no hooks on the module (they would not fire)."""
        names = [n for n, _ in self.module.named_parameters()]
        return len(params) >= len(names) and all(n in params for n in names) and not _has_hooks(self.module)

    def _task_loss(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        """The loss of f_params(x) on the module itself (a method, so that a copy of MAML uses its own module)."""
        return self.loss_fn(self._call(self.module, params, x), y)

    def _replica_loss(self, replica: nn.Module) -> TaskLoss:
        return lambda params, x, y: self.loss_fn(self._call(replica, params, x), y)

    def __getstate__(self):  # thread pools and compiled functions cannot be pickled or copied: rebuilt on use
        state = self.__dict__.copy()
        state["_pool"], state["_pool_size"], state["_replica_modules"], state["_fused_twin"] = None, 0, [], []
        state["_compiled"] = self._compiled is not None
        return state

    def __setstate__(self, state):
        compiled = state.pop("_compiled")
        super().__setstate__(state)
        self._compiled = torch.compile(meta_gradient_functorch) if compiled else None

    def meta_parameters(self) -> Params:
        """theta, as a dict of the model's own parameter tensors (gradients flow to them)."""
        return dict(self.module.named_parameters())

    def step_sizes(self) -> dict[str, Tensor | float]:
        """alpha for every adapted parameter tensor: learned tensors, or the fixed float."""
        if len(self.inner_lrs):
            return dict(zip(self.adapted_names, self.inner_lrs))
        return dict.fromkeys(self.adapted_names, self.inner_lr)

    def adapt(
        self, support: tuple[Tensor, Tensor], steps: int | None = None, first_order: bool | None = None
    ) -> Params:
        """Adapted parameters theta' for one task's support set ``(x, y)``."""
        steps = self.inner_steps if steps is None else steps
        first_order = self.first_order if first_order is None else first_order
        return adapt(self._task_loss, self.meta_parameters(), support, self.step_sizes(), steps, first_order)

    def forward(self, x: Tensor, params: Params | None = None) -> Tensor:
        """f_theta(x), or f_{theta'}(x) with adapted ``params`` from ``adapt``."""
        if params is None:
            return self.module(x)
        return self._call(self.module, params, x)

    def meta_loss(self, tasks: TaskBatch, steps: int | None = None, first_order: bool | None = None) -> Tensor:
        """The meta-objective: mean query loss after adapting to each task's support set.

        ``meta_loss(tasks).backward()`` leaves the meta-gradient in ``.grad``. On the
        looped path the gradient is computed task by task while the loss is formed
        (peak memory of one task), and the returned loss hands it over on backward;
        it cannot be differentiated twice (``create_graph``).
        """
        steps = self.inner_steps if steps is None else steps
        first_order = self.first_order if first_order is None else first_order
        tasks = TaskBatch(*tasks)
        if self._compiled is not None:
            try:
                return self._compiled_meta_loss(tasks, steps, first_order)
            except Exception as error:  # no C++ compiler, an unsupported op, ...: run eagerly instead
                warnings.warn(f"torch.compile of the meta-gradient failed ({type(error).__name__}: {error}); "
                              "continuing without compile", RuntimeWarning, stacklevel=2)  # fmt: skip
                self._compiled = None
        if self.batched:
            # an MLP's layers as baddbmm calls (fewshot.batched; 7 us to plan, from the module as it is now); else vmap
            mlp_loss = batched_loss(self.module, self.loss_fn)
            return meta_objective_batched(self._task_loss, self.meta_parameters(), tasks, self.step_sizes(), steps, first_order, mlp_loss)
        inputs = [x for x in (*self.module.parameters(), *self.inner_lrs) if x.requires_grad]
        if not (torch.is_grad_enabled() and inputs):
            return meta_objective_looped(self._task_loss, self.meta_parameters(), tasks, self.step_sizes(), steps, first_order)
        n_threads = self._threads_for(tasks.support_x.shape[0], tasks.support_x.device)
        if n_threads > 1:
            replicas, pool = self._replicas(n_threads)
            loss, grads = meta_gradient_in_threads(
                [self._replica_loss(r) for r in replicas], self.meta_parameters(), tasks, self.step_sizes(), steps, first_order, inputs, pool
            )
        else:
            loss, grads = meta_gradient_task_by_task(
                self._task_loss, self.meta_parameters(), tasks, self.step_sizes(), steps, first_order, inputs
            )
        return _PrecomputedGradient.apply(loss, tuple(grads), *inputs)

    def _compiled_meta_loss(self, tasks: TaskBatch, steps: int, first_order: bool) -> Tensor:
        theta = {n: p.detach() for n, p in self.meta_parameters().items()}
        alphas = {n: a.detach() for n, a in zip(self.adapted_names, self.inner_lrs)}
        fixed_lrs = dict.fromkeys(self.adapted_names, self.inner_lr)
        loss, (theta_grads, alpha_grads) = self._compiled(self._task_loss, theta, alphas, tasks, fixed_lrs, steps, first_order)
        inputs = [*self.module.parameters(), *self.inner_lrs]
        grads = (*theta_grads.values(), *alpha_grads.values())
        return _PrecomputedGradient.apply(loss, grads, *inputs)

    def training_loss(self, tasks: TaskBatch) -> Tensor:
        """What the outer optimizer minimises at meta-training: the meta-objective."""
        return self.meta_loss(tasks)

    @torch.no_grad()
    def adaptation_curve(
        self, tasks: TaskBatch, max_steps: int, inner_lr: float | None = None, query_batch: int | None = None
    ) -> list[Tensor]:
        """Query predictions after 0, 1, ..., ``max_steps`` inner steps, for evaluation.

        No meta-gradient is kept. Returns ``max_steps + 1`` tensors (B, M, *y_shape).
        ``query_batch``: score a task's queries in consecutive forward passes of this
        many (batch norm with batch statistics normalises each pass with its own);
        None: all at once.
        """
        lrs = self.step_sizes() if inner_lr is None else dict.fromkeys(self.adapted_names, float(inner_lr))
        lrs = {n: lr.detach() if isinstance(lr, Tensor) else lr for n, lr in lrs.items()}
        theta = {n: p.detach() for n, p in self.meta_parameters().items()}
        if self.batched:
            forward = _in_query_batches(vmap(self.forward), query_batch, query_dim=1)
            return _curve(vmap(self._task_loss), forward, per_task_copies(theta, len(tasks.support_x)), tasks, lrs, max_steps)
        n_tasks = len(tasks.support_x)
        n_threads = self._threads_for(n_tasks, tasks.support_x.device)
        if n_threads == 1:
            forward = _in_query_batches(self.forward, query_batch)
            per_task = [_curve(self._task_loss, forward, theta, tasks.task(i), lrs, max_steps) for i in range(n_tasks)]
            return [torch.stack(step) for step in zip(*per_task)]
        replicas, pool = self._replicas(n_threads)

        def curves_of_share(k: int) -> list[list[Tensor]]:
            forward = _in_query_batches(lambda x, params: self._call(replicas[k], params, x), query_batch)
            loss = self._replica_loss(replicas[k])
            return [_curve(loss, forward, theta, tasks.task(i), lrs, max_steps) for i in range(k, n_tasks, n_threads)]

        shares = map_on_threads(pool, curves_of_share, n_threads)
        per_task = [shares[i % n_threads][i // n_threads] for i in range(n_tasks)]
        return [torch.stack(step) for step in zip(*per_task)]


def _in_query_batches(forward, query_batch: int | None, query_dim: int = 0):
    """``forward(x, params)`` run on consecutive slices of ``query_batch`` examples of x, concatenated."""
    if query_batch is None:
        return forward
    return lambda x, params: torch.cat([forward(part, params) for part in x.split(query_batch, query_dim)], query_dim)


def _curve(task_loss: TaskLoss, forward, params: Params, tasks: TaskBatch, lrs, max_steps: int) -> list[Tensor]:
    predictions = [forward(tasks.query_x, params)]
    for _ in range(max_steps):
        params = {n: p.detach() for n, p in adapt(task_loss, params, tasks.support, lrs, 1, True).items()}
        predictions.append(forward(tasks.query_x, params))
    return predictions
