"""Configuration of a meta-RL run: a frozen dataclass, presets, TOML (the same machinery as fewshot.config)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fewshot import config as fewshot_config
from fewshot.config import ConfigError, _f, check_fields

ENVS = ("nav2d", "cheetah-vel", "cheetah-dir")
METHODS = ("maml", "pretrained", "oracle")
NAV_REWARDS = ("distance", "squared")


@dataclass(frozen=True)
class RLConfig:
    """Defaults: 2D navigation with the paper's hyperparameters (Finn et al. 2017, section 5.3 and appendix A.2)."""

    env: str = _f("nav2d", "task family: nav2d (2D navigation), cheetah-vel or cheetah-dir (MuJoCo HalfCheetah)", choices=ENVS)
    method: str = _f("maml", "maml (meta-trained for the return after inner_steps policy-gradient steps); pretrained (TRPO on all tasks, no inner loop); oracle (nav2d: TRPO with the goal in the observation)", choices=METHODS)
    reward: str = _f("distance", "nav2d reward: distance (minus the distance to the goal, the authors' code and the scale of the paper's Table 4) or squared (minus its square, the paper's text)", choices=NAV_REWARDS)
    hidden: tuple[int, ...] = _f((100, 100), "hidden layer widths of the policy MLP (ReLU)", min=1)
    inner_lr: float = _f(0.1, "policy-gradient step size alpha of the inner loop (and of adaptation at evaluation)", min=0.0)
    inner_steps: int = _f(1, "policy-gradient steps of the inner loop at meta-training (fresh trajectories before each)", min=0)
    trajectories: int = _f(20, "trajectories per task per policy-gradient step, K", min=2)
    meta_batch: int = _f(20, "tasks per meta-iteration", min=1)
    first_order: bool = _f(False, "first-order MAML: the inner gradient is a constant in the meta-gradient")
    gamma: float = _f(0.99, "discount of the returns the advantages are computed from", min=0.0, max=1.0)
    max_kl: float = _f(0.01, "TRPO trust region: mean KL divergence of the adapted policies", min=0.0)
    cg_iterations: int = _f(10, "conjugate gradient iterations of the TRPO step", min=1)
    cg_damping: float = _f(1e-5, "damping added to the KL Hessian-vector products", min=0.0)
    hvp_tasks: int = _f(5, "tasks of the meta-batch whose KL gives the Hessian-vector products of the TRPO step (a subset, like rllab's subsample_factor, because each product is the dominant cost); 0: all", min=0)
    line_search_steps: int = _f(15, "backtracking steps of the TRPO line search (step halved each time)", min=1)
    iterations: int = _f(300, "meta-iterations (2D navigation: about 20 minutes on 2 CPU cores, BENCHMARKS.md)", min=1)
    seed: int = _f(0, "seed of the initial policy, the training tasks and the action noise", min=0)
    checkpoint_every: int = _f(10, "meta-iterations between checkpoints", min=1)
    n_test_tasks: int = _f(40, "fixed evaluation tasks, the same for every run of a task family (2D navigation: the goals of the authors' test script, those of the paper's Table 4)", min=1)
    eval_steps: int = _f(3, "evaluate the return after 0..eval_steps policy-gradient steps", min=0)
    eval_trajectories: int = _f(40, "trajectories per task before each evaluation step (the authors' test script, maml_examples/test_maml_point.py: 4,000 steps = 40 trajectories of 100)", min=2)
    eval_later_lr_scale: float = _f(0.5, "evaluation steps after the first have step size inner_lr times this (the authors' test script: 0.5; 1.0: every step inner_lr)", min=0.0)

    def __post_init__(self):
        check_fields(self)
        if self.method == "oracle" and self.env != "nav2d":
            raise ConfigError(f"method='oracle' with env={self.env!r}: allowed: env=nav2d")

    @property
    def trained_inner_steps(self) -> int:
        """Inner steps at meta-training: none for the pretrained and oracle policies."""
        return self.inner_steps if self.method == "maml" else 0


_CHEETAH = {"meta_batch": 40, "trajectories": 20, "iterations": 500, "hvp_tasks": 10}  # horizon 200 (the environment's)
PRESETS: dict[str, dict] = {
    "nav2d-maml": {},
    "nav2d-fomaml": {"first_order": True},
    "nav2d-pretrained": {"method": "pretrained"},
    "nav2d-oracle": {"method": "oracle"},
    "cheetah-vel-maml": {"env": "cheetah-vel", **_CHEETAH},
    "cheetah-vel-pretrained": {"env": "cheetah-vel", "method": "pretrained", **_CHEETAH},
    "cheetah-dir-maml": {"env": "cheetah-dir", **_CHEETAH},
    "cheetah-dir-pretrained": {"env": "cheetah-dir", "method": "pretrained", **_CHEETAH},
}


def preset(name: str) -> RLConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; allowed: {', '.join(PRESETS)}")
    return RLConfig(**PRESETS[name])


def describe() -> str:
    return fewshot_config.describe(RLConfig, PRESETS)


def is_rl_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a meta-RL run (its config.toml has an ``env`` key)."""
    path = Path(run_dir) / "config.toml"
    return path.is_file() and any(line.startswith("env = ") for line in path.read_text().splitlines())
