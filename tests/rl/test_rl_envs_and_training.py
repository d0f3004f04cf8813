"""The task environments, a short meta-training run that learns to move toward the goal, resume, and the CLI."""

import dataclasses

import numpy as np
import pytest
import torch

gymnasium = pytest.importorskip("gymnasium")
from gymnasium.utils.env_checker import check_env  # noqa: E402

from fewshot.cli import main  # noqa: E402
from fewshot.rl import envs, evaluate, maml_rl, rollouts  # noqa: E402
from fewshot.rl.config import RLConfig  # noqa: E402
from fewshot.rl.train import build_policy, load_run  # noqa: E402


def test_navigation_env_passes_gymnasium_check_env_and_follows_the_task():
    env = envs.Navigation2DEnv()
    check_env(env, skip_render_check=True)
    task = env.sample_tasks(1, seed=0)[0]
    env.set_task(task)
    obs, _ = env.reset(seed=0)
    assert obs.tolist() == [0.0, 0.0]
    obs, reward, terminated, truncated, _ = env.step(np.array([5.0, -5.0]))  # clipped to (0.1, -0.1)
    assert np.allclose(obs, [0.1, -0.1])
    assert reward == pytest.approx(-np.linalg.norm(np.array([0.1, -0.1]) - task["goal"]))
    assert not terminated and not truncated
    squared = envs.Navigation2DEnv({"goal": np.array([0.05, 0.0])}, reward="squared")
    squared.reset(seed=0)
    assert squared.step(np.array([0.05, 0.0]))[1:3] == (pytest.approx(0.0), True)  # at the goal: done
    made = gymnasium.make("fewshot/Navigation2D-v0")
    made.reset(seed=0)
    steps = 1
    while not made.step(np.zeros(2))[3]:  # until truncated
        steps += 1
    assert steps == envs.NAV_HORIZON
    with pytest.raises(ValueError, match="reward='l1': allowed values are distance, squared"):
        envs.Navigation2DEnv(reward="l1")


def test_navigation_tasks_are_seeded_goals_in_the_unit_square():
    a, b = envs.sample_tasks("nav2d", 50, seed=1), envs.sample_tasks("nav2d", 50, seed=1)
    goals = np.stack([t["goal"] for t in a])
    assert np.array_equal(goals, np.stack([t["goal"] for t in b]))
    assert goals.min() >= -0.5 and goals.max() <= 0.5 and goals.std() > 0.2


def test_navigation_test_goals_are_the_authors():
    """cbfinn/maml_rl test_maml_point.py: np.random.seed(1); uniform(-0.5, 0.5, (40, 2)); np.random.seed(1); rand() = 0.417022..."""
    goals = np.stack([t["goal"] for t in evaluate.test_tasks(RLConfig())])
    assert goals.shape == (40, 2) and np.all(np.abs(goals) <= 0.5)
    np.testing.assert_allclose(goals[0], [0.417022004702574 - 0.5, 0.7203244934421581 - 0.5])
    np.testing.assert_array_equal(np.stack([t["goal"] for t in envs.nav_test_tasks(3)]), goals[:3])


def test_batched_navigation_equals_the_gymnasium_env_step_by_step():
    tasks = envs.sample_tasks("nav2d", 3, seed=2)
    batch = envs.Navigation2DBatch(tasks, n_trajectories=2)
    actions = np.random.default_rng(0).normal(0, 0.2, size=(5, 6, 2))
    batched = [batch.reset(seed=0)] + [batch.step(a) for a in actions]
    for i in range(6):
        env = envs.Navigation2DEnv(tasks[i // 2])
        obs, _ = env.reset(seed=0)
        assert np.allclose(obs, batched[0][i])
        for t in range(5):
            obs, reward, done, _, _ = env.step(actions[t, i])
            assert np.allclose(obs, batched[t + 1][0][i], atol=1e-6) and reward == pytest.approx(batched[t + 1][1][i])


def test_half_cheetah_task_envs_pass_check_env_and_reward_the_task():
    pytest.importorskip("mujoco")
    for kind in ("cheetah-vel", "cheetah-dir"):
        env = envs.HalfCheetahTaskEnv(kind)
        check_env(env, skip_render_check=True)
    env = envs.HalfCheetahTaskEnv("cheetah-dir", {"direction": -1.0})
    env.reset(seed=0)
    action = np.full(6, 0.5)
    _, reward, _, _, info = env.step(action)
    assert reward == pytest.approx(-info["x_velocity"] - 0.05 * 6 * 0.25)
    velocities = [t["velocity"] for t in envs.sample_tasks("cheetah-vel", 100, seed=0)]
    assert 0 <= min(velocities) and max(velocities) <= 2


def _final_distance(episodes, tasks) -> float:
    """Mean distance between each trajectory's last position and its goal."""
    goals = torch.tensor(np.stack([t["goal"] for t in tasks]), dtype=torch.float32)
    last = (episodes.mask.sum(1).long() - 1)[:, None, :, None].expand(-1, 1, -1, 2)  # (B, 1, K, 2)
    final = torch.gather(episodes.obs, 1, last).squeeze(1)  # (B, K, 2)
    return (final - goals[:, None]).norm(dim=-1).mean().item()


def test_short_meta_training_run_adapts_toward_the_goal(tmp_path):
    config = RLConfig(hidden=(32, 32), meta_batch=8, trajectories=10, hvp_tasks=2, max_kl=0.03, iterations=10, checkpoint_every=10)
    assert main(["train", "nav2d-maml", "--out", str(tmp_path / "run"), "--no-progress",
                 *(f"--set={k}={v}" for k, v in (("hidden", "32,32"), ("meta_batch", 8), ("trajectories", 10), ("hvp_tasks", 2), ("max_kl", 0.03))),
                 "--iterations", "10"]) == 0  # fmt: skip
    stored, policy, state = load_run(tmp_path / "run")
    assert stored == config and state["iteration"] == 10
    tasks = envs.sample_tasks("nav2d", 20, seed=123)
    before, after = (_final_distance(e, tasks) for e in maml_rl.adaptation_episodes(policy, tasks, config, 1, seed=5))
    start = float(np.mean([np.linalg.norm(t["goal"]) for t in tasks]))  # every episode starts at (0, 0)
    assert after < 0.9 * start and after < 0.8 * before
    untrained = maml_rl.adaptation_episodes(build_policy(config), tasks, config, 1, seed=5)[1]
    assert after < 0.8 * _final_distance(untrained, tasks)


def test_evaluation_follows_the_authors_test_protocol():
    """40 trajectories per task before each step; the first step at alpha, later ones at alpha / 2 (test_maml_point.py)."""
    config = RLConfig(hidden=(8, 8), inner_lr=0.5)
    assert maml_rl.evaluation_step_sizes(config, 3) == [0.5, 0.25, 0.25]
    assert maml_rl.evaluation_step_sizes(config, 2, inner_lr=0.1) == [0.1, 0.05]
    assert maml_rl.evaluation_step_sizes(RLConfig(eval_later_lr_scale=1.0), 2) == [0.1, 0.1]
    tasks = envs.sample_tasks("nav2d", 3, seed=1)
    sampled = maml_rl.adaptation_episodes(build_policy(config), tasks, dataclasses.replace(config, eval_trajectories=7), 2, seed=3)
    assert [tuple(e.mask.shape) for e in sampled] == [(3, 100, 7)] * 3  # (tasks, horizon, trajectories)


TINY = ["--no-progress", "--set", "hidden=8,8", "--set", "meta_batch=2", "--set", "trajectories=3", "--set", "n_test_tasks=4",
        "--set", "eval_steps=2", "--set", "hvp_tasks=0", "--set", "checkpoint_every=1"]  # fmt: skip


def test_resume_gives_the_policy_of_an_uninterrupted_run(tmp_path):
    assert main(["train", "nav2d-maml", "--out", str(tmp_path / "full"), "--iterations", "3", *TINY]) == 0
    assert main(["train", "nav2d-maml", "--out", str(tmp_path / "split"), "--iterations", "1", *TINY]) == 0
    assert main(["train", "nav2d-maml", "--out", str(tmp_path / "split"), "--iterations", "3", "--resume", "--no-progress"]) == 0
    full, split = load_run(tmp_path / "full")[1].state_dict(), load_run(tmp_path / "split")[1].state_dict()
    assert all(torch.equal(full[k], split[k]) for k in full)
    assert (tmp_path / "full" / "metrics.csv").read_text().splitlines()[1:] != []
    rows = (tmp_path / "split" / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("iteration,return_before,return_after") and [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3"]


def test_cli_eval_and_plot_of_rl_runs(tmp_path, capsys):
    for preset in ("nav2d-maml", "nav2d-pretrained", "nav2d-oracle"):
        assert main(["train", preset, "--out", str(tmp_path / preset), "--iterations", "1", *TINY]) == 0
    dirs = [str(tmp_path / p) for p in ("nav2d-maml", "nav2d-pretrained", "nav2d-oracle")]
    capsys.readouterr()
    assert main(["eval", *dirs]) == 0
    table = capsys.readouterr().out
    assert "| nav2d-oracle (not adapted) |" in table and "| random init |" in table and "| 0 steps | 1 step | 2 steps |" in table
    assert main(["plot", *dirs, "--out", str(tmp_path / "plots")]) == 0
    for name in ("figure5_returns.png", "figure4_trajectories.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "nav2d-maml", "--set", "env=ant"], "env='ant': allowed values are nav2d, cheetah-vel, cheetah-dir"),
        (["train", "cheetah-vel-maml", "--set", "method=oracle"], "method='oracle' with env='cheetah-vel': allowed: env=nav2d"),
        (["train", "nav2d-maml", "--set", "trajectories=1"], "trajectories=1: must be >= 2"),
    ],
)
def test_bad_rl_input_exits_2_naming_the_argument(argv, message, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path / "x")]) == 2
    assert message in capsys.readouterr().err
