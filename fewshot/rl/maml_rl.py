"""MAML for reinforcement learning (Finn, Abbeel & Levine 2017, Algorithm 3), TRPO in the outer loop.

For a meta-batch of tasks T_i (MDPs):

    sample K trajectories D_i with f_theta,
    inner update (eq. 1, REINFORCE loss eq. 4):  theta'_i = theta - alpha * grad_theta L_{T_i}(f_theta; D_i)
    sample K trajectories D'_i with f_{theta'_i},
    outer update: TRPO on sum_i L_{T_i}(f_{theta'_i}; D'_i) as a function of theta,

where the surrogate of the outer loss is the importance-weighted advantage of
D'_i under theta'_i(theta), and the trust region bounds the mean KL divergence
between the sampling policies f_{theta'_i} and the new adapted ones. The
meta-gradient and the KL Hessian-vector products differentiate through the
inner update (second order) unless ``first_order``. With ``inner_steps = 0``
this is plain TRPO on the whole task distribution (the "pretrained" baseline).

The inner update is fewshot's ``adapt`` of the supervised MAML, vmapped over
the tasks: the REINFORCE loss takes the role of the support loss, with the
trajectories packed as x = (observation, action) and y = (advantage, mask).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import vmap

from fewshot.algorithms.maml import Params, adapt, per_task_copies
from fewshot.rl import rollouts, trpo
from fewshot.rl.baseline import normalised_advantages
from fewshot.rl.config import RLConfig
from fewshot.rl.policy import distribution, gaussian_kl, gaussian_log_prob
from fewshot.rl.rollouts import Episodes


# --------------------------------------------------------------------------- the inner loop


def support(episodes: Episodes, advantages: Tensor) -> tuple[Tensor, Tensor]:
    """Trajectories packed for ``adapt``: x = (obs, action) (B, T, K, obs+act), y = (advantage, mask) (B, T, K, 2)."""
    return torch.cat([episodes.obs, episodes.actions], -1), torch.stack([advantages, episodes.mask], -1)


def reinforce_loss(policy: nn.Module, obs_dim: int):
    """L(theta; D) = -sum_t log pi_theta(a_t | s_t) A_t / (valid steps): the policy-gradient (REINFORCE) loss of one task.

    Its gradient is the likelihood-ratio estimate of minus the gradient of the
    expected return (eq. 4 of the MAML paper; Williams 1992), with the baseline
    already subtracted in A_t.
    """

    def task_loss(params: Params, x: Tensor, y: Tensor) -> Tensor:
        mean, log_std = distribution(policy, params, x[..., :obs_dim])
        log_prob = gaussian_log_prob(mean, log_std, x[..., obs_dim:])  # (T, K)
        advantages, mask = y[..., 0], y[..., 1]
        return -(log_prob * advantages * mask).sum() / mask.sum()

    return task_loss


def inner_update(policy: nn.Module, params: Params, episodes: Episodes, config: RLConfig, first_order: bool) -> Params:
    """One policy-gradient step per task (eq. 1), every task's parameters (B, ...) at once."""
    obs_dim = episodes.obs.shape[-1]
    task_loss = vmap(reinforce_loss(policy, obs_dim))
    advantages = normalised_advantages(episodes, config.gamma)
    lrs = dict.fromkeys(params, config.inner_lr)
    return adapt(task_loss, params, support(episodes, advantages), lrs, 1, first_order)


def adapted_parameters(policy: nn.Module, theta: Params, inner: list[Episodes], config: RLConfig, first_order: bool) -> Params:
    """theta'_i(theta) for every task, one inner step per list entry of trajectories."""
    params = per_task_copies(theta, inner[0].obs.shape[0]) if inner else None
    for episodes in inner:
        params = inner_update(policy, params, episodes, config, first_order)
    return params


# --------------------------------------------------------------------------- sampling a meta-batch


@dataclass
class MetaBatch:
    """Everything TRPO needs about one meta-batch, sampled before the update."""

    inner: list[Episodes]  # trajectories of the inner steps, sampled with theta, theta'_1, ...
    outer: Episodes  # D'_i, sampled with the adapted policies
    outer_advantages: Tensor  # (B, T, K)
    old_mean: Tensor  # the sampling policies at D'_i's observations (B, T, K, act_dim)
    old_log_std: Tensor
    old_log_prob: Tensor  # (B, T, K)

    def first_tasks(self, n: int) -> "MetaBatch":
        """The same meta-batch restricted to its first ``n`` tasks (they are i.i.d.: a random subset)."""
        cut = lambda x: x[:n]  # noqa: E731
        return MetaBatch([Episodes(*map(cut, e)) for e in self.inner], Episodes(*map(cut, self.outer)),
                         *map(cut, (self.outer_advantages, self.old_mean, self.old_log_std, self.old_log_prob)))  # fmt: skip

    @property
    def returns_before(self) -> float:
        """Mean return of the meta-batch before adaptation."""
        return float((self.inner[0] if self.inner else self.outer).returns().mean())

    @property
    def returns_after(self) -> float:
        return float(self.outer.returns().mean())


def sample_meta_batch(policy: nn.Module, theta: Params, tasks: list[dict], config: RLConfig, seed: int, generator: torch.Generator) -> MetaBatch:
    """Sample D_i with theta, adapt, sample D'_i with theta'_i (Algorithm 3, lines 4-8)."""
    oracle = config.method == "oracle"
    params = per_task_copies({n: p.detach() for n, p in theta.items()}, len(tasks))
    inner = []
    for step in range(config.trained_inner_steps):
        inner.append(rollouts.sample(policy, params, config.env, tasks, config.trajectories, seed + step, generator, oracle, config.reward))
        params = {n: p.detach() for n, p in inner_update(policy, params, inner[-1], config, first_order=True).items()}
    outer = rollouts.sample(policy, params, config.env, tasks, config.trajectories, seed + 1000, generator, oracle, config.reward)
    with torch.no_grad():
        mean, log_std = vmap(lambda p, o: distribution(policy, p, o))(params, outer.obs)
        old_log_prob = gaussian_log_prob(mean, log_std, outer.actions)
    return MetaBatch(inner, outer, normalised_advantages(outer, config.gamma), mean, log_std, old_log_prob)


# --------------------------------------------------------------------------- the outer loop


def masked_task_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean over each task's valid steps, then over tasks: (B, T, K) -> ()."""
    return ((values * mask).sum((1, 2)) / mask.sum((1, 2))).mean()


def surrogate_and_kl(policy: nn.Module, theta: Params, batch: MetaBatch, config: RLConfig, first_order: bool) -> tuple[Tensor, Tensor]:
    """TRPO's surrogate loss -E[pi_theta'(a|s) / pi_old(a|s) A] and mean KL(pi_old || pi_theta'), theta' = theta'(theta)."""
    params = adapted_parameters(policy, theta, batch.inner, config, first_order)
    if params is None:  # no inner loop: every task uses theta itself
        params = per_task_copies(theta, batch.outer.obs.shape[0])
    mean, log_std = vmap(lambda p, o: distribution(policy, p, o))(params, batch.outer.obs)
    ratio = torch.exp(gaussian_log_prob(mean, log_std, batch.outer.actions) - batch.old_log_prob)
    mask = batch.outer.mask
    loss = -masked_task_mean(ratio * batch.outer_advantages, mask)
    kl = masked_task_mean(gaussian_kl(batch.old_mean, batch.old_log_std, mean, log_std), mask)
    return loss, kl


def flatten(params: Params) -> Tensor:
    return torch.cat([p.reshape(-1) for p in params.values()])


def unflatten(vector: Tensor, like: Params) -> Params:
    sizes = [p.numel() for p in like.values()]
    return {n: v.view_as(p) for (n, p), v in zip(like.items(), torch.split(vector, sizes))}


@dataclass
class StepInfo:
    loss_before: float
    loss_after: float
    kl: float
    backtracks: int  # -1: no step accepted


def gauss_newton_kl_hvp(policy: nn.Module, theta: Tensor, like: Params, batch: MetaBatch, config: RLConfig):
    """v -> (d^2 KL / d theta^2) v for one second-order inner step, as sum_i J_i F_i J_i v / B.

    At the sampling point the KL of every adapted policy is at its minimum (zero
    gradient), so the chain rule's term with the curvature of the inner update
    vanishes and the Hessian is exactly J_i' F_i J_i: F_i the KL Hessian of task
    i's adapted policy (its Fisher matrix) and J_i = I - alpha H_i the Jacobian
    of the inner update (H_i the Hessian of the inner REINFORCE loss, symmetric,
    so J_i' = J_i). Each product costs two inner-loss and one policy
    Hessian-vector product, instead of differentiating the KL three times.
    """
    episodes, n_tasks, alpha = batch.inner[0], batch.outer.obs.shape[0], config.inner_lr
    task_loss = vmap(reinforce_loss(policy, episodes.obs.shape[-1]))
    x, y = support(episodes, normalised_advantages(episodes, config.gamma))
    per_task = {n: p.detach().expand(n_tasks, *p.shape).clone().requires_grad_() for n, p in unflatten(theta, like).items()}
    inner_grads = torch.autograd.grad(task_loss(per_task, x, y).sum(), list(per_task.values()), create_graph=True)
    adapted = {n: (p - alpha * g).detach().requires_grad_() for (n, p), g in zip(per_task.items(), inner_grads)}
    mean, log_std = vmap(lambda p, o: distribution(policy, p, o))(adapted, batch.outer.obs)
    kl = masked_task_mean(gaussian_kl(batch.old_mean, batch.old_log_std, mean, log_std), batch.outer.mask)
    kl_grads = torch.autograd.grad(kl, list(adapted.values()), create_graph=True)

    def vector_product(grads, inputs, vectors):  # per task: (d grads / d inputs) vectors
        dot = sum((g * v).sum() for g, v in zip(grads, vectors))
        return torch.autograd.grad(dot, inputs, retain_graph=True)

    def jacobian_product(vectors):  # J_i v_i = v_i - alpha H_i v_i
        return [v - alpha * h for v, h in zip(vectors, vector_product(inner_grads, list(per_task.values()), vectors))]

    def product(vector: Tensor) -> Tensor:
        vectors = [v.expand(n_tasks, *v.shape) for v in unflatten(vector, like).values()]
        fisher = vector_product(kl_grads, list(adapted.values()), jacobian_product(vectors))
        summed = [t.sum(0) for t in jacobian_product(list(fisher))]  # sum over tasks (KL is the task mean)
        return torch.cat([t.reshape(-1) for t in summed]) + config.cg_damping * vector

    return product


def trpo_meta_step(policy: nn.Module, batch: MetaBatch, config: RLConfig) -> StepInfo:
    """One TRPO step of the meta-parameters (the policy's parameters are updated in place)."""
    like = {n: p.detach() for n, p in policy.named_parameters()}
    theta = flatten(like).requires_grad_()
    second_order = not config.first_order
    loss, _ = surrogate_and_kl(policy, unflatten(theta, like), batch, config, first_order=not second_order)
    (loss_gradient,) = torch.autograd.grad(loss, theta)
    # The KL's curvature from a subset of the tasks (rllab's subsample_factor): its products are the dominant cost.
    hvp_batch = batch.first_tasks(config.hvp_tasks) if config.hvp_tasks else batch
    if second_order and len(batch.inner) == 1:
        kl_hvp = gauss_newton_kl_hvp(policy, theta.detach(), like, hvp_batch, config)
    else:  # no inner step, first order (J = I) or several inner steps: differentiate the KL twice
        _, kl = surrogate_and_kl(policy, unflatten(theta, like), hvp_batch, config, first_order=not second_order)
        (kl_gradient,) = torch.autograd.grad(kl, theta, create_graph=True)
        kl_hvp = trpo.hessian_vector_product(kl_gradient, theta, config.cg_damping)
    step = trpo.natural_step(loss_gradient, kl_hvp, config.max_kl, config.cg_iterations)

    def evaluate(candidate: Tensor) -> tuple[float, float]:
        with torch.no_grad():
            new_loss, new_kl = surrogate_and_kl(policy, unflatten(candidate, like), batch, config, first_order=True)
        return new_loss.item(), new_kl.item()

    new_theta, backtracks, (loss_after, kl_after) = trpo.line_search(
        evaluate, theta.detach(), step.detach(), loss.item(), config.max_kl, config.line_search_steps
    )
    with torch.no_grad():
        for p, value in zip(policy.parameters(), unflatten(new_theta, like).values()):
            p.copy_(value)
    return StepInfo(loss.item(), loss_after, kl_after, backtracks)


# --------------------------------------------------------------------------- adaptation at test time


def evaluation_step_sizes(config: RLConfig, steps: int, inner_lr: float | None = None) -> list[float]:
    """Step size of each evaluation step: ``inner_lr`` (default alpha), then ``eval_later_lr_scale`` times it.

    The authors' test script (cbfinn/maml_rl, maml_examples/test_maml_point.py)
    takes its first step at the training step size and halves it after.
    """
    first = config.inner_lr if inner_lr is None else inner_lr
    return [first * (1.0 if step == 0 else config.eval_later_lr_scale) for step in range(steps)]


def adaptation_episodes(policy: nn.Module, tasks: list[dict], config: RLConfig, steps: int, seed: int, inner_lr: float | None = None) -> list[Episodes]:
    """Trajectories of every task after 0, 1, ..., ``steps`` policy-gradient steps (``steps + 1`` entries).

    ``config.eval_trajectories`` fresh trajectories per task are sampled before
    every step (the authors' test script: 40), steps sized by ``evaluation_step_sizes``.
    """
    generator = torch.Generator().manual_seed(seed)
    step_configs = [dataclasses.replace(config, inner_lr=lr) for lr in evaluation_step_sizes(config, steps, inner_lr)]
    params = per_task_copies({n: p.detach() for n, p in policy.named_parameters()}, len(tasks))
    sampled = []
    for step in range(steps + 1):
        sampled.append(rollouts.sample(policy, params, config.env, tasks, config.eval_trajectories, seed + step, generator, config.method == "oracle", config.reward))
        if step < steps:
            params = {n: p.detach() for n, p in inner_update(policy, params, sampled[-1], step_configs[step], first_order=True).items()}
    return sampled


def adaptation_returns(policy: nn.Module, tasks: list[dict], config: RLConfig, steps: int, seed: int, inner_lr: float | None = None) -> Tensor:
    """Mean return per task after 0, 1, ..., ``steps`` policy-gradient steps: (steps + 1, n_tasks)."""
    return torch.stack([e.returns().mean(1) for e in adaptation_episodes(policy, tasks, config, steps, seed, inner_lr)])
