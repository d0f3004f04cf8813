"""Policy gradient, baseline, conjugate gradient, Hessian-vector products and the TRPO step of fewshot.rl."""

import math

import pytest
import torch
from torch import nn

pytest.importorskip("gymnasium")

from fewshot.rl import envs, maml_rl, trpo  # noqa: E402
from fewshot.rl.baseline import discounted_returns, features, linear_baseline  # noqa: E402
from fewshot.rl.config import RLConfig  # noqa: E402
from fewshot.rl.policy import GaussianPolicy, gaussian_kl, gaussian_log_prob  # noqa: E402
from fewshot.rl.rollouts import Episodes  # noqa: E402


class Bandit(nn.Module):
    """A one-step bandit's policy: N(mu, exp(log_std)^2), whatever the observation."""

    def __init__(self, mu: float, log_std: float):
        super().__init__()
        self.mu = nn.Parameter(torch.tensor([mu], dtype=torch.float64))
        self.log_std = nn.Parameter(torch.tensor([log_std], dtype=torch.float64))

    def forward(self, obs):
        shape = (*obs.shape[:-1], 1)
        return self.mu.expand(shape), self.log_std.expand(shape)


def test_policy_gradient_equals_the_analytic_gradient_on_a_one_step_bandit():
    # reward r(a) = -(a - c)^2, a ~ N(mu, sigma^2): J = -((mu - c)^2 + sigma^2),
    # dJ/dmu = -2 (mu - c), dJ/dlog_sigma = -2 sigma^2.
    mu, log_std, c, n = 0.3, math.log(0.5), 1.0, 400_000
    policy = Bandit(mu, log_std)
    generator = torch.Generator().manual_seed(0)
    actions = mu + math.exp(log_std) * torch.randn(1, n, 1, generator=generator, dtype=torch.float64)  # (T=1, K, 1)
    rewards = -((actions[..., 0] - c) ** 2)
    obs = torch.zeros(1, n, 1, dtype=torch.float64)
    x, y = torch.cat([obs, actions], -1), torch.stack([rewards - rewards.mean(), torch.ones_like(rewards)], -1)
    params = dict(policy.named_parameters())
    loss = maml_rl.reinforce_loss(policy, obs_dim=1)(params, x, y)
    grad_mu, grad_log_std = torch.autograd.grad(-loss, (params["mu"], params["log_std"]))
    sigma2 = math.exp(2 * log_std)
    assert grad_mu.item() == pytest.approx(-2 * (mu - c), rel=0.02)
    assert grad_log_std.item() == pytest.approx(-2 * sigma2, rel=0.03)


def test_gaussian_log_prob_and_kl_match_torch_distributions():
    mean, log_std, actions = torch.randn(5, 3), torch.randn(5, 3) * 0.3, torch.randn(5, 3)
    reference = torch.distributions.Normal(mean, log_std.exp())
    assert torch.allclose(gaussian_log_prob(mean, log_std, actions), reference.log_prob(actions).sum(-1), atol=1e-5)
    mean_q, log_std_q = torch.randn(5, 3), torch.randn(5, 3) * 0.3
    other = torch.distributions.Normal(mean_q, log_std_q.exp())
    expected = torch.distributions.kl_divergence(reference, other).sum(-1)
    assert torch.allclose(gaussian_kl(mean, log_std, mean_q, log_std_q), expected, atol=1e-5)


def test_discounted_returns_and_a_linear_baseline_that_fits_exactly():
    rewards, mask = torch.tensor([[[1.0], [2.0], [3.0]]]), torch.tensor([[[1.0], [1.0], [0.0]]])  # (B=1, T=3, K=1)
    assert discounted_returns(rewards, mask, 0.5).flatten().tolist() == [2.0, 2.0, 0.0]
    generator = torch.Generator().manual_seed(0)
    obs = torch.randn(2, 30, 8, 3, generator=generator)
    episodes = Episodes(obs, torch.zeros(2, 30, 8, 1), torch.zeros(2, 30, 8), torch.ones(2, 30, 8))
    weights = torch.randn(2, 1, 1, features(episodes).shape[-1], generator=generator)
    returns = (features(episodes) * weights).sum(-1)  # a return that is linear in the features, per task
    assert torch.allclose(linear_baseline(episodes, returns), returns, atol=1e-3)


def test_conjugate_gradient_solves_a_known_linear_system():
    generator = torch.Generator().manual_seed(0)
    m = torch.randn(12, 12, generator=generator, dtype=torch.float64)
    a, b = m @ m.T + 0.5 * torch.eye(12, dtype=torch.float64), torch.randn(12, generator=generator, dtype=torch.float64)
    x = trpo.conjugate_gradient(lambda v: a @ v, b, iterations=12)
    assert torch.allclose(x, torch.linalg.solve(a, b), atol=1e-8)


def test_natural_step_puts_the_quadratic_kl_model_on_the_bound():
    h = torch.diag(torch.tensor([4.0, 1.0, 0.25], dtype=torch.float64))
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    step = trpo.natural_step(g, lambda v: h @ v, max_kl=0.01, cg_iterations=3)
    assert (0.5 * step @ h @ step).item() == pytest.approx(0.01)
    assert torch.allclose(step / step.norm(), -torch.linalg.solve(h, g) / torch.linalg.solve(h, g).norm())


def _small_meta_batch(seed=0, **overrides):
    config = RLConfig(hidden=(16, 16), meta_batch=3, trajectories=6, hvp_tasks=0, **overrides)
    torch.manual_seed(seed)
    policy = GaussianPolicy(2, 2, config.hidden)
    tasks = envs.sample_tasks("nav2d", config.meta_batch, seed)
    batch = maml_rl.sample_meta_batch(policy, dict(policy.named_parameters()), tasks, config, seed, torch.Generator().manual_seed(seed))
    return config, policy, batch


def test_kl_hessian_vector_product_through_the_inner_update_equals_finite_differences():
    config, policy, batch = _small_meta_batch()
    policy.double()
    batch = maml_rl.MetaBatch([Episodes(*(t.double() for t in e)) for e in batch.inner], Episodes(*(t.double() for t in batch.outer)),
                              *(t.double() for t in (batch.outer_advantages, batch.old_mean, batch.old_log_std, batch.old_log_prob)))  # fmt: skip
    like = {n: p.detach() for n, p in policy.named_parameters()}
    theta = maml_rl.flatten(like).requires_grad_()

    def kl_gradient(point, create_graph=False):
        _, kl = maml_rl.surrogate_and_kl(policy, maml_rl.unflatten(point, like), batch, config, first_order=False)
        return torch.autograd.grad(kl, point, create_graph=create_graph)[0]

    vector = torch.randn(theta.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    hvp = trpo.hessian_vector_product(kl_gradient(theta, create_graph=True), theta)(vector)
    eps = 1e-6
    plus = kl_gradient((theta.detach() + eps * vector).requires_grad_())
    minus = kl_gradient((theta.detach() - eps * vector).requires_grad_())
    finite = (plus - minus) / (2 * eps)
    assert (hvp - finite).norm() < 1e-4 * finite.norm()  # ReLU kinks crossed by +-eps keep it from exact
    # the Gauss-Newton form used by the TRPO step is exact at the sampling point
    gauss_newton = maml_rl.gauss_newton_kl_hvp(policy, theta.detach(), like, batch, config)(vector)
    assert (gauss_newton - finite).norm() < 1e-4 * finite.norm()
    # the second-order terms matter: the first-order product is a different matrix
    _, kl_fo = maml_rl.surrogate_and_kl(policy, maml_rl.unflatten(theta, like), batch, config, first_order=True)
    hvp_fo = trpo.hessian_vector_product(torch.autograd.grad(kl_fo, theta, create_graph=True)[0], theta)(vector)
    assert (hvp - hvp_fo).norm() > 1e-2 * finite.norm()


def test_trpo_meta_step_improves_the_surrogate_within_the_kl_bound():
    config, policy, batch = _small_meta_batch(seed=3, max_kl=0.005)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    info = maml_rl.trpo_meta_step(policy, batch, config)
    after = {n: p.detach() for n, p in policy.named_parameters()}
    assert info.backtracks >= 0 and any(not torch.equal(before[n], after[n]) for n in before)
    with torch.no_grad():
        loss_before, kl_before = maml_rl.surrogate_and_kl(policy, before, batch, config, first_order=True)
        loss_after, kl_after = maml_rl.surrogate_and_kl(policy, after, batch, config, first_order=True)
    assert kl_before.item() == pytest.approx(0.0, abs=1e-9)  # the sampling policies are the adapted ones
    assert 0 < kl_after.item() <= config.max_kl
    assert loss_after.item() < loss_before.item()
