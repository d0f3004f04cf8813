"""MAML's gradients against independent references.

- second order: a central finite difference of the meta-objective itself (float64);
- first order: the query-loss gradient at the adapted parameters, computed by hand;
- batched (vmap) path: the per-task loop.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fewshot import MAML, TaskBatch
from fewshot.algorithms.maml import prefers_batched


def tiny_net(seed=0, dtype=torch.float64):
    # tanh: smooth, so the finite difference never straddles a ReLU kink
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 1)).to(dtype)


def tasks(n_tasks=3, shots=4, queries=6, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    amp = torch.rand(n_tasks, 1, 1, generator=g, dtype=dtype) * 2 + 0.5
    xs = torch.rand(n_tasks, shots, 1, generator=g, dtype=dtype) * 4 - 2
    xq = torch.rand(n_tasks, queries, 1, generator=g, dtype=dtype) * 4 - 2
    return TaskBatch(xs, amp * torch.sin(xs), xq, amp * torch.sin(xq))


def flat_meta_grad(maml, batch):
    params = list(maml.parameters())
    grads = torch.autograd.grad(maml.meta_loss(batch), params)
    return torch.cat([g.flatten() for g in grads])


def finite_difference(maml, batch, eps=1e-6):
    """Central difference of the meta-loss, coordinate by coordinate, over every meta-parameter."""
    out = []
    with torch.no_grad():
        for p in maml.parameters():
            flat = p.view(-1)
            for i in range(flat.numel()):
                orig = flat[i].item()
                flat[i] = orig + eps
                up = maml.meta_loss(batch).item()
                flat[i] = orig - eps
                down = maml.meta_loss(batch).item()
                flat[i] = orig
                out.append((up - down) / (2 * eps))
    return torch.tensor(out, dtype=torch.float64)


def rel_error(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("batched", [True, False])
def test_second_order_meta_gradient_matches_finite_difference(steps, batched):
    maml = MAML(tiny_net(), F.mse_loss, inner_lr=0.1, inner_steps=steps, batched=batched)
    batch = tasks()
    assert rel_error(flat_meta_grad(maml, batch), finite_difference(maml, batch)) < 1e-5


@pytest.mark.parametrize("mode", ["per_tensor", "per_element"])
def test_learned_inner_lr_gradient_matches_finite_difference(mode):
    maml = MAML(tiny_net(), F.mse_loss, inner_lr=0.1, inner_steps=2, learn_inner_lr=mode)
    assert len(list(maml.parameters())) == 2 * len(list(maml.module.parameters()))
    batch = tasks()
    assert rel_error(flat_meta_grad(maml, batch), finite_difference(maml, batch)) < 1e-5


def test_first_order_is_query_gradient_at_adapted_parameters():
    maml = MAML(tiny_net(), F.mse_loss, inner_lr=0.1, inner_steps=2, first_order=True)
    batch = tasks()
    expected = []
    for i in range(3):
        net = tiny_net()  # same weights: same seed
        for _ in range(2):  # plain SGD on the support set, gradients as constants
            loss = F.mse_loss(net(batch.support_x[i]), batch.support_y[i])
            grads = torch.autograd.grad(loss, list(net.parameters()))
            with torch.no_grad():
                for p, g in zip(net.parameters(), grads):
                    p -= 0.1 * g
        query = F.mse_loss(net(batch.query_x[i]), batch.query_y[i])
        expected.append(torch.cat([g.flatten() for g in torch.autograd.grad(query, list(net.parameters()))]))
    expected = torch.stack(expected).mean(0)
    assert torch.allclose(flat_meta_grad(maml, batch), expected, rtol=1e-10, atol=1e-12)


def test_second_order_differs_from_first_order():
    batch = tasks()
    second = flat_meta_grad(MAML(tiny_net(), F.mse_loss, inner_lr=0.1), batch)
    first = flat_meta_grad(MAML(tiny_net(), F.mse_loss, inner_lr=0.1, first_order=True), batch)
    assert rel_error(first, second) > 1e-3


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("learn_inner_lr", [False, "per_element"])
def test_batched_path_equals_per_task_loop(first_order, learn_inner_lr):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    batch = tasks(n_tasks=25, shots=10, queries=10, dtype=torch.float32)
    grads = {}
    for batched in (True, False):
        maml = MAML(model, F.mse_loss, 0.01, 3, first_order=first_order, learn_inner_lr=learn_inner_lr, batched=batched)
        loss = maml.meta_loss(batch)
        grads[batched] = (loss.detach(), flat_meta_grad(maml, batch))
    assert torch.allclose(grads[True][0], grads[False][0], rtol=1e-6)
    assert rel_error(grads[True][1], grads[False][1]) < 1e-6


def test_adapt_is_pure_and_lowers_support_loss():
    maml = MAML(tiny_net(), F.mse_loss, inner_lr=0.1)
    before = {n: p.clone() for n, p in maml.module.named_parameters()}
    task = tasks().task(0)
    adapted = maml.adapt(task.support, steps=5)
    for n, p in maml.module.named_parameters():
        assert torch.equal(p, before[n])  # the model is not mutated
    assert set(adapted) == set(before)
    assert F.mse_loss(maml(task.support_x, adapted), task.support_y) < F.mse_loss(maml(task.support_x), task.support_y)


def test_adapt_with_zero_steps_returns_meta_parameters():
    maml = MAML(tiny_net(), F.mse_loss)
    adapted = maml.adapt(tasks().task(0).support, steps=0)
    assert all(adapted[n] is p for n, p in maml.module.named_parameters())


def test_unused_parameter_gets_zero_inner_gradient():
    class WithSpare(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.spare = nn.Linear(1, 1), nn.Linear(1, 1)

        def forward(self, x):
            return self.used(x)

    maml = MAML(WithSpare().double(), F.mse_loss, inner_lr=0.1)
    adapted = maml.adapt(tasks().task(0).support)
    assert torch.equal(adapted["spare.weight"], maml.module.spare.weight)


HEAD_ONLY = ["4.weight", "4.bias"]  # tiny_net's last layer: the inner loop adapts only it (as ANIL does)


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("learn_inner_lr", [False, "per_tensor"])
def test_parameters_left_out_of_the_inner_loop_are_meta_learned_exactly(batched, learn_inner_lr):
    maml = MAML(tiny_net(), F.mse_loss, 0.1, 2, batched=batched, learn_inner_lr=learn_inner_lr, inner_params=HEAD_ONLY)
    assert len(maml.inner_lrs) == (2 if learn_inner_lr else 0)
    batch = tasks()
    grad = flat_meta_grad(maml, batch)
    assert rel_error(grad, finite_difference(maml, batch)) < 1e-5
    # the whole body gets a meta-gradient, and it is not that of adapting every parameter
    n_body = sum(p.numel() for n, p in maml.module.named_parameters() if n not in HEAD_ONLY)
    assert grad[:n_body].abs().min() > 0
    everything = MAML(tiny_net(), F.mse_loss, 0.1, 2, batched=batched, learn_inner_lr=learn_inner_lr)
    n_theta = sum(p.numel() for p in maml.module.parameters())
    assert rel_error(grad[:n_theta], flat_meta_grad(everything, batch)[:n_theta]) > 1e-3


def test_parameters_left_out_of_the_inner_loop_stay_as_they_are():
    maml = MAML(tiny_net(), F.mse_loss, 0.1, inner_params=HEAD_ONLY)
    adapted = maml.adapt(tasks().task(0).support, steps=3)
    assert list(adapted) == [n for n, _ in maml.module.named_parameters()]
    for n, p in maml.module.named_parameters():
        assert (adapted[n] is p) == (n not in HEAD_ONLY)
    # an evaluation step size (adaptation_curve's inner_lr) adapts the same parameters
    batch = tasks()
    curve = maml.adaptation_curve(batch, 2, inner_lr=0.3)
    at_03 = MAML(tiny_net(), F.mse_loss, 0.3, inner_params=HEAD_ONLY)
    expected = at_03(batch.query_x[1], at_03.adapt(batch.task(1).support, steps=2))
    assert torch.allclose(curve[2][1], expected.detach(), atol=1e-12)


@pytest.mark.parametrize("batched", [True, False])
def test_adaptation_curve_matches_adapt_task_by_task(batched):
    maml = MAML(tiny_net(), F.mse_loss, inner_lr=0.1, batched=batched)
    batch = tasks()
    curve = maml.adaptation_curve(batch, 3)
    assert len(curve) == 4 and curve[0].shape == batch.query_y.shape
    for i in range(3):
        for steps in (0, 1, 3):
            adapted = maml.adapt(batch.task(i).support, steps=steps, first_order=True)
            assert torch.allclose(curve[steps][i], maml(batch.query_x[i], adapted), atol=1e-12)


def test_meta_loss_is_the_same_without_autograd():
    # no_grad must not change the value: the inner loop differentiates regardless
    batch = tasks()
    maml = MAML(tiny_net(), F.mse_loss, inner_lr=0.1, batched=True)
    with torch.no_grad():
        quiet = maml.meta_loss(batch)
    assert torch.equal(quiet, maml.meta_loss(batch))


def test_measured_path_choice():
    assert prefers_batched(tiny_net())
    assert not prefers_batched(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"inner_lr": -0.1}, "inner_lr must be >= 0"),
        ({"inner_steps": -1}, "inner_steps must be an integer >= 0"),
        ({"learn_inner_lr": "yes"}, "learn_inner_lr must be one of"),
        ({"batched": "maybe"}, "batched must be one of"),
        ({"inner_params": ["4.weight", "head.bias"]}, r"inner_params: \['head.bias'\] are not parameters of the model; allowed: \['0.weight'"),
        ({"inner_params": "4.weight"}, "inner_params must be a collection of parameter names"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MAML(tiny_net(), F.mse_loss, **kwargs)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("learn_inner_lr", [False, "per_tensor"])
def test_torch_func_meta_gradient_equals_autograd_path(first_order, learn_inner_lr):
    # the transform-only formulation that torch.compile traces must be the same function
    from fewshot.algorithms.maml import meta_gradient_functorch

    maml = MAML(tiny_net(), F.mse_loss, 0.1, 2, first_order=first_order, learn_inner_lr=learn_inner_lr)
    batch = tasks()
    theta = {n: p.detach() for n, p in maml.meta_parameters().items()}
    alphas = {n: a.detach() for n, a in zip(theta, maml.inner_lrs)}
    loss, (g_theta, g_alpha) = meta_gradient_functorch(maml._task_loss, theta, alphas, batch, dict.fromkeys(theta, 0.1), 2, first_order)
    expected = flat_meta_grad(maml, batch)
    got = torch.cat([g.flatten() for g in (*g_theta.values(), *g_alpha.values())])
    assert torch.allclose(loss, maml.meta_loss(batch), rtol=1e-12)
    assert rel_error(got, expected) < 1e-10


def test_compiled_meta_loss_backward_gives_the_reference_gradient():
    torch.manual_seed(0)
    batch = tasks(dtype=torch.float32)
    reference = flat_meta_grad(MAML(tiny_net(dtype=torch.float32), F.mse_loss, 0.1, 1, batched=False), batch)
    maml = MAML(tiny_net(dtype=torch.float32), F.mse_loss, 0.1, 1, compile=True)
    loss = maml.meta_loss(batch)
    loss.backward()
    got = torch.cat([p.grad.flatten() for p in maml.parameters()])
    assert rel_error(got, reference) < 1e-5
    with pytest.raises(ValueError, match="compile=True needs the batched path"):
        MAML(tiny_net(), F.mse_loss, compile=True, batched=False)


def test_failed_compilation_warns_and_falls_back_to_eager(monkeypatch):
    def broken_compile(fn):
        def raises(*args, **kwargs):
            raise RuntimeError("no C++ compiler")

        return raises

    monkeypatch.setattr(torch, "compile", broken_compile)
    batch = tasks()
    maml = MAML(tiny_net(), F.mse_loss, 0.1, 1, compile=True)
    with pytest.warns(RuntimeWarning, match="torch.compile of the meta-gradient failed .*no C\\+\\+ compiler"):
        got = flat_meta_grad(maml, batch)
    assert rel_error(got, flat_meta_grad(MAML(tiny_net(), F.mse_loss, 0.1, 1), batch)) < 1e-12


def test_a_copy_of_maml_adapts_its_own_module_and_a_pickled_one_gives_the_same_meta_loss():
    import copy
    import pickle

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1)).double()
    maml = MAML(net, F.mse_loss, inner_lr=0.1, batched=False)  # running statistics: the looped path
    batch = tasks()
    twin = copy.deepcopy(maml)
    original_stats = maml.module[1].running_mean.clone()
    twin.meta_loss(batch)  # training mode: updates the running statistics of the module it runs
    assert torch.equal(maml.module[1].running_mean, original_stats)
    assert not torch.equal(twin.module[1].running_mean, original_stats)
    twin.eval()  # the copy's own mode: its buffers (running statistics) normalise now
    assert not torch.equal(twin.meta_loss(batch), maml.meta_loss(batch))
    restored = pickle.loads(pickle.dumps(maml))
    assert torch.equal(restored.meta_loss(batch), maml.meta_loss(batch))
