"""MLP forward passes of a whole meta-batch without vmap (fewshot.batched) against vmap itself."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from fewshot import MAML, TaskBatch
from fewshot.algorithms.maml import functional_loss, per_task_copies
from fewshot.batched import batched_loss


def per_task_params(module, n_tasks, seed=0):
    """Different parameters for every task, as after an inner step (not expanded copies)."""
    g = torch.Generator().manual_seed(seed)
    return {
        n: (p.detach().expand(n_tasks, *p.shape) + 0.1 * torch.randn(n_tasks, *p.shape, generator=g, dtype=p.dtype)).requires_grad_()
        for n, p in module.named_parameters()
    }  # fmt: skip


CASES = {
    # regression on (tasks, points, 1); mse: the per-task mean without vmap
    "mse": (
        lambda: nn.Sequential(nn.Linear(1, 6), nn.ReLU(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1)),
        F.mse_loss, (4, 7, 1), lambda g: torch.randn(4, 7, 1, generator=g, dtype=torch.float64),
    ),
    # classification, a Linear without bias, Sigmoid and Identity; inputs with two leading
    # dimensions per task (3 x 2 points); the loss through vmap
    "cross_entropy": (
        lambda: nn.Sequential(nn.Linear(5, 6, bias=False), nn.Sigmoid(), nn.Identity(), nn.Linear(6, 3)),
        lambda logits, y: F.cross_entropy(logits.reshape(-1, 3), y.reshape(-1)), (4, 3, 2, 5),
        lambda g: torch.randint(0, 3, (4, 3, 2), generator=g),
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_losses_and_their_gradients_equal_vmaps(case):
    make, loss_fn, x_shape, make_y = CASES[case]
    torch.manual_seed(0)
    module = make().double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(*x_shape, generator=g, dtype=torch.float64), make_y(g)
    params = per_task_params(module, x_shape[0])
    fast = batched_loss(module, loss_fn)
    assert fast is not None
    reference = vmap(functional_loss(module, loss_fn))(params, x, y)
    losses = fast(params, x, y)
    assert losses.shape == (x_shape[0],)
    torch.testing.assert_close(losses, reference, rtol=1e-12, atol=1e-12)
    weights = torch.rand(x_shape[0], generator=g, dtype=torch.float64)  # every task's loss in the gradient
    for a, b in zip(torch.autograd.grad(losses @ weights, list(params.values())), torch.autograd.grad(reference @ weights, list(params.values()))):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


class NotSequential(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 2)

    def forward(self, x):
        return self.linear(x)


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.Sequential(nn.Linear(2, 4), nn.GELU(), nn.Linear(4, 1)),  # an activation it does not know
        lambda: nn.Sequential(nn.Linear(2, 4), nn.LayerNorm(4), nn.Linear(4, 1)),
        lambda: nn.Sequential(nn.ReLU(), nn.Tanh()),  # no Linear at all
        NotSequential,
        lambda: nn.Sequential(),
    ],
)
def test_other_modules_are_left_to_vmap(make):
    assert batched_loss(make(), F.mse_loss) is None


def test_a_layer_with_a_hook_is_left_to_vmap():
    module = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
    module[1].register_forward_hook(lambda *args: None)
    assert batched_loss(module, F.mse_loss) is None


def test_maml_takes_the_mlp_path_and_vmap_once_a_hook_is_added(monkeypatch):
    from fewshot.algorithms import maml as maml_module

    planned = []  # what MAML's batched path got from batched_loss at each meta_loss
    monkeypatch.setattr(maml_module, "batched_loss", lambda *args: planned.append(batched_loss(*args)) or planned[-1])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1)).double()
    maml = MAML(model, F.mse_loss, inner_lr=0.1, inner_steps=2, batched=True)
    g = torch.Generator().manual_seed(2)
    batch = TaskBatch(*(torch.randn(3, 5, 1, generator=g, dtype=torch.float64) for _ in range(4)))
    fast = torch.autograd.grad(maml.meta_loss(batch), list(model.parameters()))
    assert len(planned) == 1 and planned[0] is not None  # the MLP path
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))  # a hook on the whole model: vmap runs it
    slow = torch.autograd.grad(maml.meta_loss(batch), list(model.parameters()))
    assert planned[1] is None and calls  # no plan, and the hook fired: this was vmap's path
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_expanded_copies_of_theta_give_every_task_its_own_gradient():
    # MAML's inner loop starts from expanded (stride-0) views of theta: the gradient must still be per task
    module = nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(3, 6, 1, generator=g, dtype=torch.float64), torch.randn(3, 6, 1, generator=g, dtype=torch.float64)
    theta = {n: p.detach().requires_grad_() for n, p in module.named_parameters()}
    copies = {n: p.expand(3, *p.shape) for n, p in theta.items()}
    fast = torch.autograd.grad(batched_loss(module, F.mse_loss)(copies, x, y).sum(), list(theta.values()))
    reference = [sum(grads) for grads in zip(*(
        torch.autograd.grad(F.mse_loss(functional_call(module, theta, (x[i],)), y[i]), list(theta.values())) for i in range(3)
    ))]  # fmt: skip
    for a, b in zip(fast, reference):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert per_task_copies(theta, 3)["0.weight"].stride()[0] == 0  # what MAML hands it
