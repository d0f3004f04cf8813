"""MAML on a conv learner with batch norm (batch statistics, no running stats), float64.

The second-order meta-gradient of the looped path is checked against a central
finite difference of the meta-objective; the batched path against the loop.
Batch norm is where the peers' users got confused (learn2learn #207, higher #55):
each task's support and query batches are normalised with their own statistics.
"""

import pytest
import torch
import torch.nn.functional as F

from fewshot import MAML, TaskBatch, kernels
from fewshot.models import Conv4

from test_maml import flat_meta_grad, rel_error


def directional_finite_differences(maml, batch, directions, eps=1e-6):
    """Central differences of the meta-loss along each direction (a flat vector over the trainable meta-parameters)."""
    params = [p for p in maml.parameters() if p.requires_grad]
    out = []
    with torch.no_grad():
        for v in directions:
            chunks = torch.split(v, [p.numel() for p in params])
            values = []
            for sign in (1, -1):
                for p, d in zip(params, chunks):
                    p.add_(sign * eps * d.view_as(p))
                values.append(maml.meta_loss(batch).item())
                for p, d in zip(params, chunks):
                    p.sub_(sign * eps * d.view_as(p))
            out.append((values[0] - values[1]) / (2 * eps))
    return torch.tensor(out, dtype=torch.float64)


def tiny_conv(seed=0):
    torch.manual_seed(seed)
    return Conv4(n_way=3, in_channels=1, hidden=3, image_size=16).double()


def episodes(n_tasks=2, n_way=3, shots=1, queries=2, seed=1, image_size=16):
    """Random float64 images, labels 0..n_way-1 in class order: (B, N*K, 1, S, S) support, (B, N*Q, ...) query."""
    g = torch.Generator().manual_seed(seed)
    xs = torch.rand(n_tasks, n_way * shots, 1, image_size, image_size, generator=g, dtype=torch.float64)
    xq = torch.rand(n_tasks, n_way * queries, 1, image_size, image_size, generator=g, dtype=torch.float64)
    ys = torch.arange(n_way).repeat_interleave(shots).expand(n_tasks, -1)
    yq = torch.arange(n_way).repeat_interleave(queries).expand(n_tasks, -1)
    return TaskBatch(xs, ys, xq, yq)


@pytest.mark.parametrize("steps", [1, 2])
def test_conv_bn_second_order_meta_gradient_matches_finite_difference(steps):
    maml = MAML(tiny_conv(), F.cross_entropy, inner_lr=0.4, inner_steps=steps)
    assert not maml.batched  # conv + batch norm: the measured choice is the per-task loop
    batch = episodes()
    grad = flat_meta_grad(maml, batch)
    # 12 random directions instead of ~300 coordinates: g . v against d/de L(theta + e v)
    directions = torch.randn(12, grad.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert rel_error(directions @ grad, directional_finite_differences(maml, batch, directions)) < 1e-5


@pytest.mark.parametrize("first_order", [False, True])
def test_conv_bn_batched_path_equals_loop(first_order):
    batch = episodes(n_tasks=4)
    grads = [
        flat_meta_grad(MAML(tiny_conv(), F.cross_entropy, 0.4, 2, first_order=first_order, batched=b), batch)
        for b in (True, False)
    ]
    assert rel_error(grads[0], grads[1]) < 1e-10


def test_compile_is_refused_with_batch_norm_and_its_formulation_is_exact_without():
    # torch.func's grad(vmap(grad)) through native batch norm gives wrong second-order gradients for the
    # parameters before it (2-3% here, torch 2.13; pytorch/functorch#534; the eager batched path is exact), so compile,
    # which traces that formulation, is refused for such models; without norm layers the formulation is exact
    from fewshot.algorithms.maml import meta_gradient_functorch

    with pytest.raises(ValueError, match="compile=True is not offered for models with batch- or instance-norm"):
        MAML(tiny_conv(), F.cross_entropy, 0.4, 2, batched=True, compile=True)
    torch.manual_seed(0)
    nn = torch.nn
    no_norm = nn.Sequential(nn.Conv2d(1, 3, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 8 * 8, 3)).double()
    batch = episodes(n_tasks=3)
    maml = MAML(no_norm, F.cross_entropy, 0.4, 2, batched=False)
    theta = {n: p.detach() for n, p in maml.meta_parameters().items()}
    loss, (grads, _) = meta_gradient_functorch(maml._task_loss, theta, {}, batch, dict.fromkeys(theta, 0.4), 2, False)
    assert rel_error(torch.cat([g.flatten() for g in grads.values()]), flat_meta_grad(maml, batch)) < 1e-10
    assert torch.allclose(loss, maml.meta_loss(batch), rtol=1e-12)


def test_an_episode_is_scored_the_same_whatever_shares_its_batch():
    # batch statistics are per task: adapting task 0 alone or beside others gives the same predictions
    maml = MAML(tiny_conv(), F.cross_entropy, inner_lr=0.4)
    batch = episodes(n_tasks=4)
    together = maml.adaptation_curve(batch, 2)[-1][0]
    alone = maml.adaptation_curve(TaskBatch(*(t[:1] for t in batch[:4])), 2)[-1][0]
    assert torch.allclose(together, alone, atol=1e-12)


@pytest.mark.parametrize("first_order", [False, True])
def test_tasks_on_threads_equal_one_task_at_a_time(first_order):
    # task_threads deals the meta-batch out to threads (each with its own module replica);
    # loss, meta-gradient and evaluation curve must not change with the number of threads
    batch = episodes(n_tasks=5)
    results = []
    threads_before = torch.get_num_threads()
    for threads in (1, 2, 3):
        maml = MAML(tiny_conv(), F.cross_entropy, 0.4, 2, first_order=first_order, task_threads=threads)
        loss = maml.meta_loss(batch)
        grad = flat_meta_grad(maml, batch)
        curve = torch.stack(maml.adaptation_curve(batch, 3))
        results.append((loss.detach(), grad, curve))
    for loss, grad, curve in results[1:]:
        assert torch.allclose(loss, results[0][0], rtol=1e-12)
        assert rel_error(grad, results[0][1]) < 1e-12
        assert torch.allclose(curve, results[0][2], atol=1e-12)
    assert torch.get_num_threads() == threads_before  # the caller's intra-op thread count is restored


def test_task_threads_choice_and_errors():
    maml = MAML(tiny_conv(), F.cross_entropy, task_threads="auto")
    assert maml._threads_for(8, torch.device("cpu")) == max(1, min(torch.get_num_threads(), 8))
    assert maml._threads_for(8, torch.device("meta")) == 1  # only CPU kernels gain from whole tasks side by side
    assert MAML(tiny_conv(), F.cross_entropy, task_threads=4)._threads_for(3, torch.device("cpu")) == 3
    running_stats = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.Flatten())
    assert MAML(running_stats, F.cross_entropy)._threads_for(8, torch.device("cpu")) == 1  # would race on the buffers
    for bad in (0, -1, 1.5, "two", True):
        with pytest.raises(ValueError, match="task_threads must be 'auto' or an integer >= 1"):
            MAML(tiny_conv(), F.cross_entropy, task_threads=bad)


@pytest.mark.parametrize("batched", [False, True])
def test_queries_are_scored_in_batches_of_the_meta_training_query_set_size(batched):
    # eval_query_batch: each class-balanced group of queries is its own forward pass, so batch norm
    # normalises it with its own statistics, as the query set of that size was at meta-training.
    from fewshot.config import Config
    from fewshot.experiment import scores_after_steps

    maml = MAML(tiny_conv(), F.cross_entropy, inner_lr=0.4, batched=batched)
    batch = episodes(n_tasks=2, queries=4)  # 3 classes x 4 queries, class-major
    config = Config(dataset="omniglot", n_way=3, k_shot=1, n_query=1, eval_queries=4)  # groups of 3
    grouped = scores_after_steps(maml, config, batch, 2)[-1]
    whole = scores_after_steps(maml, Config(**{**config.__dict__, "eval_query_batch": 12}), batch, 2)[-1]
    by_hand_grouped, by_hand_whole = [], []
    for i in range(2):
        task = batch.task(i)
        adapted = maml.adapt(task.support, steps=2)
        with torch.no_grad():
            logits = torch.cat([maml(task.query_x[j::4], adapted) for j in range(4)])  # query j of each class
            labels = torch.cat([task.query_y[j::4] for j in range(4)])
            by_hand_grouped.append((logits.argmax(-1) == labels).double().mean())
            by_hand_whole.append((maml(task.query_x, adapted).argmax(-1) == task.query_y).double().mean())
            if i == 0:  # the statistics differ, so do the logits
                assert not torch.allclose(maml(task.query_x, adapted)[0::4], logits[:3])
    assert torch.allclose(grouped.double(), torch.stack(by_hand_grouped))
    assert torch.allclose(whole.double(), torch.stack(by_hand_whole))


def pools_by_route(tensor) -> tuple[int, int, int]:
    """(fused batch-norm/ReLU/pool blocks, pools of channels-last activations, NCHW pools through
    ChannelsLastMaxPool2d) in the autograd graph of ``tensor``."""
    seen, stack, fused_blocks, channels_last, routed = set(), [tensor.grad_fn], 0, 0, 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "MaxPool2DWithIndicesBackward0":
            x = node._saved_self
            channels_last += x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        routed += type(node).__name__ == "ChannelsLastMaxPool2dBackward"
        fused_blocks += type(node).__name__ == "_BatchNormReLUMaxPool2dFunctionBackward"
        stack.extend(next_node for next_node, _ in node.next_functions)
    return fused_blocks, channels_last, routed


@pytest.mark.parametrize("batched", [False, True])
def test_kernel_routes_apply_on_the_looped_path_only(batched, monkeypatch):
    monkeypatch.setattr(kernels, "MIN_ELEMENTS", 0)  # every size (the default), stated for this tiny net
    maml = MAML(tiny_conv(), F.cross_entropy, 0.4, 1, batched=batched, task_threads=1)
    batch = episodes()
    x, y = batch.query_x[0], batch.query_y[0]
    loss = maml.meta_loss(batch, first_order=True) if batched else maml._task_loss(maml.meta_parameters(), x, y)
    # looped: the first convolution turns the activations channels-last, and the four
    # [batch norm, pool, ReLU] blocks run as fused kernels (fewshot.fused)
    assert pools_by_route(loss) == ((0, 0, 0) if batched else (4, 0, 0))
    if not batched:  # the forward with adapted parameters, as the task threads and evaluation call it
        logits = maml(x, maml.meta_parameters())
        assert pools_by_route(logits) == (4, 0, 0) and logits.is_contiguous()


def test_second_order_meta_gradient_is_the_same_with_and_without_the_kernel_routes(monkeypatch):
    batch = episodes()
    grads = []
    for min_elements in (0, 10**9):  # every convolution routed and block fused, none
        monkeypatch.setattr(kernels, "MIN_ELEMENTS", min_elements)
        monkeypatch.setattr(kernels, "POOL_MIN_ELEMENTS", min_elements)  # the NCHW pooling route too
        grads.append(flat_meta_grad(MAML(tiny_conv(), F.cross_entropy, 0.4, 2, task_threads=2), batch))
    assert rel_error(grads[0], grads[1]) < 1e-13  # float64: the same sums, in another order


def test_forward_with_some_parameters_or_with_hooks_runs_the_module_itself():
    maml = MAML(tiny_conv(), F.cross_entropy, 0.4, 1, task_threads=1)
    x = episodes().query_x[0]
    maml(x, maml.meta_parameters())  # the fused twin is made here, a copy of the parameters of now
    assert maml._fused_twin and maml._fused_twin[0] is not None
    with torch.no_grad():
        for p in maml.module.features.parameters():
            p.add_(0.1)  # an optimizer step
    head_only = {n: 2 * p for n, p in maml.meta_parameters().items() if n.startswith("head")}
    expected = torch.func.functional_call(maml.module, head_only, (x,))  # the rest: the live parameters
    assert torch.allclose(maml(x, head_only), expected, rtol=1e-12, atol=1e-12)
    calls = []
    maml.module.features[0].register_forward_hook(lambda *args: calls.append(1))
    maml(x, maml.meta_parameters())
    assert calls == [1]  # a hook on the user's module fires


def authors_conv(seed=0):
    # 20x20 -> 10 -> 5 -> 3 -> 2x2, averaged, as the authors' 28x28 net ends (at 16x16 a 1x1 map: a finite
    # difference along some directions crosses ReLU kinks)
    torch.manual_seed(seed)
    return Conv4(n_way=3, in_channels=1, hidden=3, image_size=20, strided=True, authors=True).double()


def trainable_meta_grad(maml, batch):
    grads = torch.autograd.grad(maml.meta_loss(batch), [p for p in maml.parameters() if p.requires_grad])
    return torch.cat([g.flatten() for g in grads])


@pytest.mark.parametrize("batched", [False, True])
def test_authors_net_meta_gradient_matches_finite_difference_and_the_loop(batched):
    # batch-norm shift meta-learned but not adapted, no scale, averaged last map: the authors' code's learner
    learner = authors_conv()
    maml = MAML(learner, F.cross_entropy, 0.4, 2, batched=batched, inner_params=learner.inner_loop_parameters())
    batch = episodes(n_tasks=3, image_size=20)
    grad = trainable_meta_grad(maml, batch)
    if batched:
        loop = MAML(authors_conv(), F.cross_entropy, 0.4, 2, batched=False, inner_params=learner.inner_loop_parameters())
        assert rel_error(grad, trainable_meta_grad(loop, batch)) < 1e-10
        return
    directions = torch.randn(12, grad.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert rel_error(directions @ grad, directional_finite_differences(maml, batch, directions)) < 1e-5
    not_adapted = {n: p for n, p in learner.named_parameters() if n not in learner.inner_loop_parameters()}
    shifts = [p for p in not_adapted.values() if p.requires_grad]
    assert len(shifts) == 4 and all(p.grad is None for p in shifts)
    maml.meta_loss(batch).backward()
    assert all(p.grad.abs().sum() > 0 for p in shifts)  # meta-learned
    adapted = maml.adapt(batch.task(0).support)
    assert all(adapted[n] is p for n, p in not_adapted.items())  # every task uses them as they are
