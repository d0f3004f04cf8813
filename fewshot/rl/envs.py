"""The meta-RL task distributions of Finn et al. 2017 (section 5.3) as gymnasium environments.

A task is an MDP; an environment holds one task at a time and offers the task
interface ``sample_tasks(n, seed) -> list[dict]`` and ``set_task(task)``.
Rollouts for many tasks and trajectories at once go through a *batch*:
``make_batch(tasks, n_trajectories)`` returns an object with
``reset(seed) -> obs (N, obs_dim)`` and ``step(actions (N, act_dim)) -> (obs, reward (N,), done (N,))``,
N = len(tasks) * n_trajectories, task-major. 2D navigation steps all N agents
with one NumPy expression; HalfCheetah steps N MuJoCo simulations in a loop.
"""

from __future__ import annotations

import os
import sys

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from fewshot.rl.config import ENVS, NAV_REWARDS


# --------------------------------------------------------------------------- 2D navigation

NAV_MAX_SPEED = 0.1  # |action| per coordinate, per step
NAV_GOAL_RADIUS = 0.01  # done once both coordinates are this close to the goal (the authors' code)
NAV_HORIZON = 100


def nav_reward(position: np.ndarray, goal: np.ndarray, kind: str) -> np.ndarray:
    """Minus the distance to the goal (the authors' code, the scale of the paper's Table 4), or its square (the paper's text)."""
    squared = ((position - goal) ** 2).sum(-1)
    return -np.sqrt(squared) if kind == "distance" else -squared


def nav_done(position: np.ndarray, goal: np.ndarray) -> np.ndarray:
    return (np.abs(position - goal) < NAV_GOAL_RADIUS).all(-1)


def nav_sample_tasks(n: int, seed: int) -> list[dict]:
    """Goals uniform in the unit square centred on the start (0, 0)."""
    goals = np.random.default_rng(seed).uniform(-0.5, 0.5, size=(n, 2))
    return [{"goal": g} for g in goals]


def nav_test_tasks(n: int) -> list[dict]:
    """The goals of the authors' evaluation (cbfinn/maml_rl, maml_examples/test_maml_point.py: 40 goals
    drawn by ``np.random.seed(1); np.random.uniform(-0.5, 0.5, size=(40, 2))``), the first ``n`` (more continue the stream)."""
    goals = np.random.RandomState(1).uniform(-0.5, 0.5, size=(n, 2))
    return [{"goal": g} for g in goals]


class Navigation2DEnv(gym.Env):
    """A point agent in the plane moves towards an unseen goal (Finn et al. 2017, section 5.3).

    Observation: the position (with ``goal_in_observation``, also the goal: the
    oracle's input). Action: a velocity, clipped to [-0.1, 0.1] per coordinate.
    Reward: minus the distance to the goal (``reward="distance"``) or minus its
    square (``"squared"``). The episode ends within 0.01 of the goal; the horizon
    (100 steps) is gymnasium's TimeLimit: ``make_env("nav2d")`` or
    ``gymnasium.make("fewshot/Navigation2D-v0")``.
    """

    metadata = {"render_modes": []}

    def __init__(self, task: dict | None = None, reward: str = "distance", goal_in_observation: bool = False):
        if reward not in NAV_REWARDS:
            raise ValueError(f"reward={reward!r}: allowed values are {', '.join(NAV_REWARDS)}")
        self.reward_kind, self.goal_in_observation = reward, goal_in_observation
        dim = 4 if goal_in_observation else 2
        self.observation_space = spaces.Box(-np.inf, np.inf, shape=(dim,), dtype=np.float32)
        self.action_space = spaces.Box(-NAV_MAX_SPEED, NAV_MAX_SPEED, shape=(2,), dtype=np.float32)
        self.set_task(task or {"goal": np.zeros(2)})
        self._position = np.zeros(2)

    def sample_tasks(self, n: int, seed: int) -> list[dict]:
        return nav_sample_tasks(n, seed)

    def set_task(self, task: dict) -> None:
        self._goal = np.asarray(task["goal"], dtype=np.float64)

    def _observation(self) -> np.ndarray:
        parts = (self._position, self._goal) if self.goal_in_observation else (self._position,)
        return np.concatenate(parts).astype(np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._position = np.zeros(2)
        return self._observation(), {}

    def step(self, action):
        action = np.clip(np.asarray(action, dtype=np.float64), -NAV_MAX_SPEED, NAV_MAX_SPEED)
        self._position = self._position + action
        reward = float(nav_reward(self._position, self._goal, self.reward_kind))
        done = bool(nav_done(self._position, self._goal))
        return self._observation(), reward, done, False, {"goal": self._goal.copy()}


class Navigation2DBatch:
    """N = tasks x trajectories point agents stepped together: positions (N, 2), goals (N, 2)."""

    horizon = NAV_HORIZON

    def __init__(self, tasks: list[dict], n_trajectories: int, reward: str = "distance", goal_in_observation: bool = False):
        self.goals = np.repeat(np.stack([np.asarray(t["goal"], dtype=np.float64) for t in tasks]), n_trajectories, axis=0)
        self.reward_kind, self.goal_in_observation = reward, goal_in_observation
        self.positions = np.zeros_like(self.goals)

    def _observation(self) -> np.ndarray:
        parts = (self.positions, self.goals) if self.goal_in_observation else (self.positions,)
        return np.concatenate(parts, axis=1).astype(np.float32)  # (N, obs_dim)

    def reset(self, seed: int) -> np.ndarray:
        self.positions = np.zeros_like(self.goals)
        return self._observation()

    def step(self, actions: np.ndarray):
        """``actions`` (N, 2): velocities, clipped to [-0.1, 0.1]."""
        self.positions = self.positions + np.clip(actions, -NAV_MAX_SPEED, NAV_MAX_SPEED)
        reward = nav_reward(self.positions, self.goals, self.reward_kind)
        return self._observation(), reward, nav_done(self.positions, self.goals)


# --------------------------------------------------------------------------- HalfCheetah

CHEETAH_HORIZON = 200


def _new_half_cheetah():
    """gymnasium's HalfCheetah-v5 simulation (needs ``mujoco``: pip install 'fewshot[rl]').

    MuJoCo >= 4 prints a deprecation warning about gymnasium's model file to the
    process's stderr (file descriptor 2) for every model it compiles; it is
    silenced while the model is built, as a meta-batch builds hundreds.
    """
    from gymnasium.envs.mujoco.half_cheetah_v5 import HalfCheetahEnv

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            return HalfCheetahEnv()
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cheetah_sample_tasks(kind: str, n: int, seed: int) -> list[dict]:
    """Velocity: goal velocity uniform in [0, 2]; direction: forward (+1) or backward (-1), equally likely."""
    rng = np.random.default_rng(seed)
    if kind == "cheetah-vel":
        return [{"velocity": v} for v in rng.uniform(0.0, 2.0, size=n)]
    return [{"direction": d} for d in rng.choice([-1.0, 1.0], size=n)]


def cheetah_reward(x_velocity: float, action: np.ndarray, task: dict, ctrl_cost_weight: float) -> float:
    """Velocity task: -|v - v_goal|; direction task: d * v; both minus the control cost (Finn et al. 2017)."""
    if "velocity" in task:
        forward = -abs(x_velocity - task["velocity"])
    else:
        forward = task["direction"] * x_velocity
    return forward - ctrl_cost_weight * float(np.square(action).sum())


class HalfCheetahTaskEnv(gym.Env):
    """gymnasium's MuJoCo HalfCheetah (v5) with a goal velocity or a goal direction as the task."""

    metadata = {"render_modes": []}

    def __init__(self, kind: str = "cheetah-vel", task: dict | None = None, ctrl_cost_weight: float = 0.05):
        if kind not in ENVS[1:]:
            raise ValueError(f"kind={kind!r}: allowed values are {', '.join(ENVS[1:])}")
        self.kind, self.ctrl_cost_weight = kind, ctrl_cost_weight
        self.sim = _new_half_cheetah()
        self.observation_space, self.action_space = self.sim.observation_space, self.sim.action_space
        self.set_task(task or cheetah_sample_tasks(kind, 1, 0)[0])

    def sample_tasks(self, n: int, seed: int) -> list[dict]:
        return cheetah_sample_tasks(self.kind, n, seed)

    def set_task(self, task: dict) -> None:
        self.task = dict(task)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        return self.sim.reset(seed=seed)

    def step(self, action):
        obs, _, terminated, truncated, info = self.sim.step(action)
        reward = cheetah_reward(info["x_velocity"], np.asarray(action), self.task, self.ctrl_cost_weight)
        return obs, reward, terminated, truncated, info

    def close(self):
        self.sim.close()


class HalfCheetahBatch:
    """N = tasks x trajectories HalfCheetah simulations, stepped one after another."""

    horizon = CHEETAH_HORIZON
    _pool: list = []  # MuJoCo models are reused between batches (building one takes milliseconds)

    def __init__(self, kind: str, tasks: list[dict], n_trajectories: int):
        self.kind = kind
        self.tasks = [t for t in tasks for _ in range(n_trajectories)]
        while len(HalfCheetahBatch._pool) < len(self.tasks):
            HalfCheetahBatch._pool.append(HalfCheetahTaskEnv(kind))
        self.envs = HalfCheetahBatch._pool[: len(self.tasks)]
        for env, task in zip(self.envs, self.tasks):
            env.set_task(task)

    def reset(self, seed: int) -> np.ndarray:
        return np.stack([env.reset(seed=seed + i)[0] for i, env in enumerate(self.envs)]).astype(np.float32)

    def step(self, actions: np.ndarray):
        results = [env.step(a) for env, a in zip(self.envs, actions)]
        obs = np.stack([r[0] for r in results]).astype(np.float32)
        return obs, np.array([r[1] for r in results]), np.array([r[2] for r in results])


# --------------------------------------------------------------------------- one entry point


def to_env_action(env: str, actions: np.ndarray) -> np.ndarray:
    """The policy acts in [-1, 1] per coordinate, scaled to the environment's action box and clipped.

    As rllab's ``normalize`` wrapper in the MAML authors' code: for 2D navigation
    a policy action of 1 is the maximal velocity 0.1, so a unit Gaussian is a
    step of the right size; HalfCheetah's box is [-1, 1] already.
    """
    if env == "nav2d":
        return np.clip(NAV_MAX_SPEED * actions, -NAV_MAX_SPEED, NAV_MAX_SPEED)
    return np.clip(actions, -1.0, 1.0)



def sample_tasks(env: str, n: int, seed: int) -> list[dict]:
    if env == "nav2d":
        return nav_sample_tasks(n, seed)
    return cheetah_sample_tasks(env, n, seed)


def make_batch(env: str, tasks: list[dict], n_trajectories: int, goal_in_observation: bool = False, reward: str = "distance"):
    if env == "nav2d":
        return Navigation2DBatch(tasks, n_trajectories, reward, goal_in_observation)
    if goal_in_observation:
        raise ValueError(f"goal_in_observation (the oracle) is defined for nav2d only, not {env}")
    return HalfCheetahBatch(env, tasks, n_trajectories)


def dimensions(env: str, goal_in_observation: bool = False) -> tuple[int, int]:
    """(observation size, action size)."""
    if env == "nav2d":
        return (4 if goal_in_observation else 2), 2
    return 17, 6


def make_env(env: str, task: dict | None = None, **kwargs) -> gym.Env:
    """One environment for ``task``, its episode cut at the task family's horizon (gymnasium's TimeLimit)."""
    from gymnasium.wrappers import TimeLimit

    if env == "nav2d":
        return TimeLimit(Navigation2DEnv(task, **kwargs), NAV_HORIZON)
    return TimeLimit(HalfCheetahTaskEnv(env, task, **kwargs), CHEETAH_HORIZON)


gym.register("fewshot/Navigation2D-v0", entry_point=Navigation2DEnv, max_episode_steps=NAV_HORIZON)
gym.register("fewshot/HalfCheetahVel-v0", entry_point=HalfCheetahTaskEnv, kwargs={"kind": "cheetah-vel"}, max_episode_steps=CHEETAH_HORIZON)
gym.register("fewshot/HalfCheetahDir-v0", entry_point=HalfCheetahTaskEnv, kwargs={"kind": "cheetah-dir"}, max_episode_steps=CHEETAH_HORIZON)
