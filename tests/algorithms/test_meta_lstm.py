"""Meta-LSTM (Ravi & Larochelle 2017): preprocessing, the SGD limit, meta-gradients, episodes kept apart, Omniglot.

Expected numbers come from the formulas by hand (preprocessing), from MAML's
inner loop (the SGD limit), from a per-coordinate reference loop with the LSTM
equations written out, and from float64 central finite differences of the
query loss with the learner's losses and gradients held at their recorded
values (the paper's dropped second derivatives, section 3.2).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fewshot.algorithms.maml import adapt, functional_loss
from fewshot.algorithms.meta_lstm import (
    MetaLSTM,
    learner_gradient,
    preprocess,
    sgd_rule,
    support_batches,
    unroll,
)
from fewshot.models import Conv4
from fewshot.tasks.base import TaskBatch

from test_maml_conv import episodes


def tiny_learner(seed=0):
    torch.manual_seed(seed)
    return Conv4(n_way=3, in_channels=1, hidden=2, image_size=8, strided=True).double()  # 159 coordinates, batch norm


def episode(n_way=3, shots=2, queries=2, seed=1, n_tasks=1):
    return episodes(n_tasks, n_way, shots, queries, seed, image_size=8)


def meta_lstm(steps=3, batch_size=0, seed=0):
    model = MetaLSTM(tiny_learner(seed), F.cross_entropy, steps=steps, batch_size=batch_size, hidden=5, grad_clip=0.0)
    torch.manual_seed(seed + 1)
    with torch.no_grad():  # gates away from their saturated start, so every meta-parameter matters
        model.meta_learner.gate_bias.copy_(torch.tensor([1.0, -1.0]))
        for p in (model.meta_learner.gate_weight, model.meta_learner.gate_previous):
            p.normal_(0, 0.3)
    return model.double()


def flat_grad(model, tasks):
    model.zero_grad()
    model.training_loss(tasks).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


# --------------------------------------------------------------------------- preprocessing


def test_preprocessing_matches_the_formula_on_both_sides_of_the_threshold():
    p, threshold = 10.0, math.exp(-10.0)  # e^-10 = 4.54e-5
    above = [3.0, -0.02, 1e-4, -1e-4, threshold]
    below = [3e-5, -1e-6, 0.0]
    x = torch.tensor(above + below, dtype=torch.float64)
    expected = [(math.log(abs(v)) / p, math.copysign(1.0, v)) for v in above]
    expected += [(-1.0, math.exp(p) * v) for v in below]
    assert torch.allclose(preprocess(x, p), torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert preprocess(torch.tensor(3e-5), 10.0)[1].item() == pytest.approx(0.6608, abs=1e-4)  # e^10 * 3e-5


# --------------------------------------------------------------------------- the update rule


def test_forget_gate_one_and_constant_input_gate_is_plain_gradient_descent():
    model = meta_lstm(steps=4)
    lr = 0.3
    with torch.no_grad():  # f = sigmoid(60) = 1.0 exactly in float64; i = sigmoid(logit(lr)) = lr
        model.meta_learner.gate_weight.zero_()
        model.meta_learner.gate_previous.zero_()
        model.meta_learner.gate_bias.copy_(torch.tensor([60.0, math.log(lr / (1 - lr))], dtype=torch.float64))
    task = episode().task(0)
    batches = list(support_batches(task.support_x, task.support_y, 0, 4))
    gradient = learner_gradient(model.flat, F.cross_entropy)
    theta_lstm, states = unroll(model.meta_learner.rule(), model.initial_params.detach(), gradient, batches)
    assert torch.all(states[-1].forget == 1.0) and torch.allclose(states[-1].input, torch.tensor(lr, dtype=torch.float64))
    # the same skeleton with the SGD rule, and MAML's inner loop on the untouched learner
    theta_sgd, _ = unroll(sgd_rule(lr), model.initial_params.detach(), gradient, batches)
    learner = tiny_learner()
    params = adapt(functional_loss(learner, F.cross_entropy), dict(learner.named_parameters()), task.support, dict.fromkeys(model.flat.names, lr), 4, True)
    theta_maml = torch.cat([p.detach().flatten() for p in params.values()])
    assert torch.allclose(theta_lstm, theta_sgd, rtol=1e-12, atol=1e-14)
    assert torch.allclose(theta_lstm, theta_maml, rtol=1e-12, atol=1e-14)


def test_training_starts_near_small_step_gradient_descent():
    model = MetaLSTM(Conv4(5, hidden=4, image_size=16), F.cross_entropy, steps=2)
    bias = model.meta_learner.gate_bias
    assert 4 <= bias[0] <= 5 and -5 <= bias[1] <= -4  # forget ~ sigmoid(4.5) = 0.99, input ~ sigmoid(-4.5) = 0.01
    gates = model.gate_means(TaskBatch(torch.rand(1, 5, 1, 16, 16), torch.arange(5)[None], torch.rand(1, 5, 1, 16, 16), torch.arange(5)[None]))
    assert gates["forget"].min() > 0.97 and gates["input"].max() < 0.03
    assert gates["layers"] == ["features.0", "features.1", "features.4", "features.5", "features.8", "features.9",
                               "features.12", "features.13", "head"]  # fmt: skip


def test_support_batches_cover_the_support_set_each_epoch_in_the_same_order_every_call():
    x, y = torch.arange(10.0)[:, None], torch.arange(10)
    batches = list(support_batches(x, y, 4, 6))  # 3 batches an epoch: 4, 4, 2
    assert [len(b) for b, _ in batches] == [4, 4, 2, 4, 4, 2]
    assert sorted(torch.cat([b for b, _ in batches[:3]]).flatten().tolist()) == list(range(10))
    assert all(torch.equal(b[:, 0].long(), c) for b, c in batches)  # examples stay with their labels
    again = list(support_batches(x, y, 4, 6))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    assert all(b is x for b, _ in support_batches(x, y, 0, 3))  # 0: the whole set


# --------------------------------------------------------------------------- meta-gradients


def reference_query_loss(model: MetaLSTM, task: TaskBatch, batches) -> torch.Tensor:
    """The same episode one coordinate at a time, the two layers' equations written out (PyTorch's LSTM gate order i, f, g, o)."""
    meta = model.meta_learner
    w_ih, w_hh, b_ih, b_hh = meta.lstm.weight_ih, meta.lstm.weight_hh, meta.lstm.bias_ih, meta.lstm.bias_hh
    learner = tiny_learner()  # batch statistics: the meta-training convention
    names = [n for n, _ in learner.named_parameters()]
    shapes = [p.shape for p in learner.parameters()]

    def prep(v):  # appendix A of Andrychowicz et al. 2016, p = 10
        return torch.stack([v.abs().log() / 10, v.sign()]) if v.abs() >= math.exp(-10) else torch.stack([-torch.ones_like(v), math.exp(10) * v])

    def as_params(theta):
        chunks = torch.split(torch.stack(theta), [math.prod(s) for s in shapes])
        return {n: c.view(s) for n, c, s in zip(names, chunks, shapes)}

    theta = list(model.initial_params.unbind())
    n, hidden = len(theta), meta.hidden
    h, c = [torch.zeros(hidden, dtype=torch.float64)] * n, [torch.zeros(hidden, dtype=torch.float64)] * n
    f_prev, i_prev = [torch.zeros((), dtype=torch.float64)] * n, [torch.zeros((), dtype=torch.float64)] * n
    for x, y in batches:
        leaf = torch.stack(theta).detach().requires_grad_()
        loss = F.cross_entropy(functional_call(learner, as_params(list(leaf.unbind())), (x,)), y)
        grad = torch.autograd.grad(loss, leaf)[0]
        loss = loss.detach()
        for j in range(n):
            z = w_ih @ torch.cat([prep(grad[j]), prep(loss)]) + b_ih + w_hh @ h[j] + b_hh
            zi, zf, zg, zo = z.chunk(4)
            c[j] = torch.sigmoid(zf) * c[j] + torch.sigmoid(zi) * torch.tanh(zg)
            h[j] = torch.sigmoid(zo) * torch.tanh(c[j])
            inputs = torch.cat([h[j], theta[j].reshape(1)])
            f = torch.sigmoid(inputs @ meta.gate_weight[:, 0] + meta.gate_previous[0] * f_prev[j] + meta.gate_bias[0])
            i = torch.sigmoid(inputs @ meta.gate_weight[:, 1] + meta.gate_previous[1] * i_prev[j] + meta.gate_bias[1])
            theta[j], f_prev[j], i_prev[j] = f * theta[j] - i * grad[j], f, i
    return F.cross_entropy(functional_call(learner, as_params(theta), (task.query_x,)), task.query_y)


@pytest.mark.parametrize("batch_size", [0, 4])
def test_meta_gradient_through_T_steps_equals_a_per_coordinate_reference_loop(batch_size):
    model, tasks = meta_lstm(steps=3, batch_size=batch_size), episode()
    task = tasks.task(0)
    batches = list(support_batches(task.support_x, task.support_y, batch_size, 3))
    reference = reference_query_loss(model, task, batches)
    params = [p for p in model.parameters() if p.requires_grad]
    expected = torch.cat([g.flatten() for g in torch.autograd.grad(reference, params)])
    assert model.query_loss(task).item() == pytest.approx(reference.item(), rel=1e-12)
    got = flat_grad(model, tasks)
    assert (got - expected).norm() / expected.norm() < 1e-10


def test_meta_gradient_matches_finite_differences_with_the_learner_gradients_held_fixed():
    """d L_query(theta_T) / d(meta-parameters), the learner's (L_t, grad_t) constants at their recorded values."""
    model, tasks = meta_lstm(steps=3), episode()
    task = tasks.task(0)
    recorded = []
    real = learner_gradient(model.flat, F.cross_entropy)

    def record(theta, x, y):
        recorded.append(real(theta, x, y))
        return recorded[-1]

    with torch.no_grad():
        model.query_loss(task, gradient=record)

    def replayed_loss():
        replay = iter(recorded)
        return model.query_loss(task, gradient=lambda theta, x, y: next(replay)).item()

    grad = flat_grad(model, tasks)
    params = [p for p in model.parameters() if p.requires_grad]
    directions = torch.randn(10, grad.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    eps, differences = 1e-6, []
    with torch.no_grad():
        for v in directions:
            chunks = [d.view_as(p) for d, p in zip(torch.split(v, [p.numel() for p in params]), params)]
            values = []
            for sign in (1, -1):
                for p, d in zip(params, chunks):
                    p.add_(sign * eps * d)
                values.append(replayed_loss())
                for p, d in zip(params, chunks):
                    p.sub_(sign * eps * d)
            differences.append((values[0] - values[1]) / (2 * eps))
    differences = torch.tensor(differences, dtype=torch.float64)
    assert (directions @ grad - differences).norm() / differences.norm() < 1e-6


def test_meta_gradient_is_clipped_to_grad_clip():
    model, tasks = meta_lstm(steps=2), episode()
    unclipped = flat_grad(model, tasks)
    model.grad_clip = 0.1 * unclipped.norm().item()
    clipped = flat_grad(model, tasks)
    assert clipped.norm().item() == pytest.approx(model.grad_clip, rel=1e-5)
    assert torch.allclose(clipped / clipped.norm(), unclipped / unclipped.norm(), atol=1e-12)


# --------------------------------------------------------------------------- meta-test: episodes kept apart


def test_no_state_leaks_between_episodes():
    model, tasks = meta_lstm(steps=3), episode(n_tasks=3, seed=5)
    first = model.adaptation_curve(TaskBatch(*(t[:1] for t in tasks[:4])), 3)
    model.adaptation_curve(TaskBatch(*(t[1:] for t in tasks[:4])), 3)  # other episodes in between
    model.training_loss(TaskBatch(*(t[1:] for t in tasks[:4])))  # and a meta-training pass
    again = model.adaptation_curve(TaskBatch(*(t[:1] for t in tasks[:4])), 3)
    together = model.adaptation_curve(tasks, 3)
    for a, b, c in zip(first, again, together):
        assert torch.equal(a, b)
        assert torch.allclose(a[0], c[0], rtol=0, atol=1e-12)


def test_meta_test_normalises_the_query_set_with_the_support_sets_running_averages():
    """With T = 0 updates the query is normalised by the statistics of the support set alone, not its own."""
    model, tasks = meta_lstm(steps=0), episode(seed=3)
    task = tasks.task(0)
    learner = tiny_learner()
    bn_layers = [m for m in learner.modules() if isinstance(m, nn.BatchNorm2d)]
    captured = []

    def support_statistics(module, inputs):  # the support batch's per-channel mean and biased variance
        x = inputs[0].detach()
        captured.append((x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=True)))

    handles = [m.register_forward_pre_hook(support_statistics) for m in bn_layers]
    learner(task.support_x)
    for h in handles:
        h.remove()
    for m, (mean, var) in zip(bn_layers, captured):
        m.track_running_stats, m.running_mean, m.running_var = True, mean, var
    expected = learner.eval()(task.query_x)
    got = model.adaptation_curve(tasks, 0)[0][0]
    assert torch.allclose(got, expected, atol=1e-10)
    assert not torch.allclose(got, learner.train()(task.query_x), atol=1e-3)  # not the query's own statistics


# --------------------------------------------------------------------------- real learning


def test_metalstm_beats_chance_on_omniglot(tmp_path, shared_data, omniglot_cache, monkeypatch):
    from fewshot.config import preset, with_overrides
    from fewshot.evaluate import evaluate
    from fewshot.experiment import test_episode_batches
    from fewshot.train import prepare_run_dir, train

    monkeypatch.setenv("FEWSHOT_DATA", str(shared_data))
    monkeypatch.setenv("FEWSHOT_CACHE", str(omniglot_cache))
    overrides = ["channels=8", "inner_steps=3", "eval_steps=3", "n_query=5", "iterations=80", "outer_lr=0.01",
                 "val_every=80", "n_val_tasks=10", "n_test_tasks=60", "eval_queries=5"]  # fmt: skip
    config = with_overrides(preset("omniglot-5w1s-metalstm"), overrides)
    config, _ = prepare_run_dir(tmp_path / "run", config, False, {})
    method = train(tmp_path / "run", config, progress=False)
    result = evaluate(method, config)
    # chance is 0.2 (and so is the accuracy before any update); 60 episodes x 25 queries give a 95% CI of
    # about +-0.04; measured 0.56 after 3 updates
    assert result["metric"] == "accuracy" and result["n_tasks"] == 60
    assert result["curve"][0]["mean"] < 0.3 and result["mean"] > 0.4

    # Figure 3 of the paper from the trained run: mean gates per layer and update step
    from fewshot.plots import metalstm_gates

    path = metalstm_gates({"run": (config, method)}, tmp_path, n_episodes=4)
    assert path.name == "metalstm_gates.png" and path.stat().st_size > 10_000
    gates = method.gate_means(next(iter(test_episode_batches(config))))
    assert gates["input"].shape == gates["forget"].shape == (50, 3, len(gates["layers"]))
    assert ((gates["input"] > 0) & (gates["input"] < 1) & (gates["forget"] > 0) & (gates["forget"] < 1)).all()
