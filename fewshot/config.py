"""Run configuration: one dataclass, named presets, ``--set key=value`` overrides, TOML files.

Every field carries its help text; the CLI lists them (``fewshot presets``) and
parses overrides by the field's type, so a config is data, never code: it is
written as TOML and read back with ``tomllib``.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DATASETS = ("sinusoid", "omniglot", "miniimagenet")
METHODS = ("maml", "pretrained", "oracle", "protonet", "matchingnet", "finetune", "nearest", "metalstm")
METHODS_FOR = {
    "sinusoid": ("maml", "pretrained", "oracle"),
    "classification": ("maml", "protonet", "matchingnet", "finetune", "nearest", "metalstm"),
}
LEARN_INNER_LR = ("none", "per_tensor", "per_element")
BATCHED = ("auto", "yes", "no")
INITS = ("torch", "maml")
LOSS_REDUCTIONS = ("mean", "per_shot")
LEARNERS = ("paper", "authors")


class ConfigError(ValueError):
    """Bad configuration input; the message names the key and what is allowed."""


SINUSOID_VAL_SHOTS = 20  # support points of each fixed sinusoid meta-val/meta-test task (fewshot.tasks.sinusoid.fixed_tasks)


def _f(default, help: str, **checks):
    return field(default=default, metadata={"help": help, **checks})


@dataclass(frozen=True)
class Config:
    """A run; defaults are the paper's sinusoid regression (Finn et al. 2017, section 5.1)."""

    dataset: str = _f("sinusoid", "task distribution: sinusoid (regression), omniglot or miniimagenet (N-way K-shot)", choices=DATASETS)
    n_way: int = _f(5, "classes per episode (classification)", min=1)
    channels: int = _f(64, "filters per conv layer (classification learner)", min=1)
    learner: str = _f("paper", "classification, maml: the Conv4 the paper describes (paper: batch-norm scale and shift adapted, flattened last map, PyTorch's initialisation) or the authors' code's (authors: batch-norm shift only, meta-learned and not adapted, Omniglot's last map averaged, Xavier/N(0, 1) initialisation; README.md)", choices=LEARNERS)
    eval_queries: int = _f(15, "query examples per class in the meta-val/meta-test episodes (classification)", min=1)
    method: str = _f("maml", "algorithm: maml (with first_order for FOMAML); sinusoid: pretrained, oracle; classification: protonet, matchingnet, finetune, nearest (a classifier pre-trained on all meta-train classes, then fine-tuned or nearest-neighbour)", choices=METHODS)
    k_shot: int = _f(10, "support examples per task (sinusoid) or per class (classification), K", min=1)
    n_query: int = _f(10, "query examples per task (sinusoid) or per class (classification) at meta-training", min=1)
    meta_batch: int = _f(25, "tasks per meta-iteration", min=1)
    hidden: tuple[int, ...] = _f((40, 40), "hidden layer widths of the ReLU MLP", min=1)
    init: str = _f("torch", "initial weights: torch (PyTorch's default) or maml (the authors' code: N(0, 0.01) truncated, zero bias)", choices=INITS)
    inner_lr: float = _f(0.01, "inner-loop step size alpha (fine-tuning step size of the baselines)", min=0.0)
    inner_steps: int = _f(1, "inner gradient steps at meta-training", min=0)
    first_order: bool = _f(False, "first-order MAML: drop second derivatives")
    loss_reduction: str = _f("mean", "classification, maml: a task's cross-entropy averaged over its examples (mean), or summed and divided by k_shot (per_shot), the loss of the authors' code, on which the paper's step sizes act as on n_way x the mean", choices=LOSS_REDUCTIONS)
    learn_inner_lr: str = _f("none", "learn alpha (Meta-SGD): none, per_tensor or per_element", choices=LEARN_INNER_LR)
    tune_inner_lr: bool = _f(False, "pick the fine-tuning step size on meta-val tasks (the paper's pretrained baseline)")
    batched: str = _f("auto", "adapt the meta-batch in one vmapped call: auto (measured choice), yes, no", choices=BATCHED)
    compile: bool = _f(False, "torch.compile the meta-gradient (MAML, batched path, no batch/instance norm; the first iteration compiles)")
    outer_lr: float = _f(1e-3, "Adam step size of the outer loop", min=0.0)
    iterations: int = _f(30_000, "meta-iterations (the paper's code: 70,000; validation error is nearly flat after 30,000, BENCHMARKS.md)", min=1)
    seed: int = _f(0, "seed of the initial weights and of the meta-training task stream", min=0)
    val_every: int = _f(1000, "iterations between validations, metrics rows and checkpoints", min=1)
    n_val_tasks: int = _f(200, "fixed meta-validation tasks", min=1)
    n_test_tasks: int = _f(600, "fixed meta-test tasks (the same for every method and run)", min=1)
    eval_shots: tuple[int, ...] = _f((5, 10, 20), "K values evaluated at meta-test (sinusoid)", min=1, max=20)
    eval_steps: int = _f(10, "evaluate after 0..eval_steps inner steps", min=0)
    eval_query_batch: int = _f(0, "classification: queries scored per forward pass at validation and test, the same number of every class (batch norm normalises each such batch with its own statistics); 0: n_way x n_query, the query-set size at meta-training, as the authors' code scores its test tasks; n_way x eval_queries: all of a task's queries at once", min=0)
    support_batch: int = _f(0, "metalstm: support examples per learner update (0: the whole support set)", min=0)
    grad_clip: float = _f(0.0, "metalstm: clip the meta-gradient's norm to this (0: no clipping)", min=0.0)
    grad_clip_value: float = _f(0.0, "clip each element of the meta-gradient (the meta-batch's, after the processes' all-reduce) to [-X, X] before the Adam step (0: no clipping); the authors' miniImageNet code clips at 10 on its loss, which is n_way x n_query / k_shot times the mean cross-entropy", min=0.0)

    def __post_init__(self):
        check_fields(self)
        allowed = METHODS_FOR["sinusoid" if self.dataset == "sinusoid" else "classification"]
        if self.method not in allowed:
            raise ConfigError(f"method={self.method!r} with dataset={self.dataset!r}: allowed: {', '.join(allowed)}")
        if self.dataset == "sinusoid" and self.k_shot > SINUSOID_VAL_SHOTS:
            raise ConfigError(f"k_shot={self.k_shot}: sinusoid's fixed validation tasks have {SINUSOID_VAL_SHOTS} support points; allowed: 1..{SINUSOID_VAL_SHOTS}")
        if self.loss_reduction != "mean" and (self.dataset == "sinusoid" or self.method != "maml"):
            raise ConfigError(f"loss_reduction={self.loss_reduction!r}: applies to MAML classification only; allowed here: mean")
        if self.learner != "paper" and (self.dataset == "sinusoid" or self.method != "maml"):
            raise ConfigError(f"learner={self.learner!r}: applies to MAML classification only; allowed here: paper")
        if self.dataset != "sinusoid":
            group, per_class = self.query_group_size, self.query_group_size // self.n_way
            if per_class < 1 or group % self.n_way or self.eval_queries % per_class:
                raise ConfigError(
                    f"eval_query_batch={self.eval_query_batch}"
                    + (f" (n_way x n_query = {group})" if not self.eval_query_batch else "")
                    + f": must be n_way={self.n_way} times a divisor of eval_queries={self.eval_queries}"
                )

    @property
    def query_group_size(self) -> int:
        """Queries per forward pass when scoring a classification task (``eval_query_batch`` resolved)."""
        return self.eval_query_batch or self.n_way * self.n_query


PRESETS: dict[str, dict] = {
    "sine-maml": {},
    "sine-fomaml": {"first_order": True},
    "sine-metasgd": {"learn_inner_lr": "per_element"},
    # Ordinary regression: validation error is flat after a few thousand iterations (BENCHMARKS.md).
    "sine-pretrained": {"method": "pretrained", "tune_inner_lr": True, "iterations": 10_000},
    "sine-oracle": {"method": "oracle", "iterations": 10_000},
}


def _classification_presets() -> dict[str, dict]:
    """The paper's classification hyperparameters (Finn et al. 2017, section 5.2 and appendix A.1)."""
    presets = {}
    omniglot = {"dataset": "omniglot", "channels": 64, "outer_lr": 1e-3, "iterations": 60_000, "val_every": 500, "n_val_tasks": 100}
    for ways, shots in ((5, 1), (5, 5), (20, 1), (20, 5)):
        # 5-way: 1 step at lr 0.4, meta-batch 32, evaluated after 3 steps (the paper; its code 10: the curve has both);
        # 20-way: 5 steps at lr 0.1, meta-batch 16, evaluated after 5. Query set: K per class (the authors' code).
        steps = {"inner_steps": 1, "inner_lr": 0.4, "meta_batch": 32, "eval_steps": 10} if ways == 5 else {"inner_steps": 5, "inner_lr": 0.1, "meta_batch": 16, "eval_steps": 5}
        presets[f"omniglot-{ways}w{shots}s-maml"] = {**omniglot, "n_way": ways, "k_shot": shots, "n_query": shots, **steps}
    for shots, meta_batch in ((1, 4), (5, 2)):
        # 32 filters, 5 steps at lr 0.01, 10 at meta-test, 15 queries per class.
        presets[f"miniimagenet-5w{shots}s-maml"] = {
            "dataset": "miniimagenet", "channels": 32, "n_way": 5, "k_shot": shots, "n_query": 15, "inner_steps": 5,
            "inner_lr": 0.01, "eval_steps": 10, "meta_batch": meta_batch, "iterations": 60_000, "val_every": 500, "n_val_tasks": 100,
        }  # fmt: skip
    for name in list(presets):
        presets[name.replace("-maml", "-fomaml")] = {**presets[name], "first_order": True}
        # the metric-learning baselines on the same episodes (no inner loop: one forward pass)
        presets[name.replace("-maml", "-protonet")] = {**presets[name], "method": "protonet"}
        presets[name.replace("-maml", "-matchingnet")] = {**presets[name], "method": "matchingnet"}
        # an ordinary classifier over all meta-train classes, then fine-tuned by SGD (step size picked on the
        # meta-validation episodes from pretrained_classifier.STEP_SIZE_GRID, 0.001-1.0; inner_lr is the untuned value) or nearest neighbour
        presets[name.replace("-maml", "-finetune")] = {**presets[name], "method": "finetune", "inner_lr": 0.1, "tune_inner_lr": True}
        presets[name.replace("-maml", "-nearest")] = {**presets[name], "method": "nearest"}
    for shots in (1, 5):
        for algorithm in ("maml", "fomaml"):
            # the authors' code (cbfinn/maml, maml.py) clips miniImageNet's meta-gradient by value at 10, on a
            # loss summed over the N x Q queries and divided by K: the same clip on the mean is 10 K / (N Q)
            p = presets[f"miniimagenet-5w{shots}s-{algorithm}"]
            p["grad_clip_value"] = 10 * p["k_shot"] / (p["n_way"] * p["n_query"])
    return presets


PRESETS.update(_classification_presets())


def _metalstm_presets() -> dict[str, dict]:
    """Meta-LSTM (Ravi & Larochelle 2017) with the hyperparameters of the authors' code as reproduced by
    markdtw/meta-learning-lstm-pytorch (scripts/train_5s_5c.sh): the paper's 32-filter learner, Adam 1e-3,
    meta-gradient norm clipped at 0.25, one episode per meta-iteration, 15 queries per class; 1-shot:
    T = 12 updates on batches of 5, 5-shot: T = 8 updates on batches of 25 (the whole support set).
    Omniglot uses the same learner family (strided, 28x28) and the same fixed test episodes as MAML."""
    presets = {}
    for dataset in ("omniglot", "miniimagenet"):
        for shots, steps in ((1, 12), (5, 8)):
            presets[f"{dataset}-5w{shots}s-metalstm"] = {
                "dataset": dataset, "method": "metalstm", "channels": 32, "n_way": 5, "k_shot": shots, "n_query": 15,
                "inner_steps": steps, "eval_steps": steps, "support_batch": 5 * shots, "meta_batch": 1, "outer_lr": 1e-3,
                "grad_clip": 0.25, "iterations": 50_000, "val_every": 500, "n_val_tasks": 100,
            }  # fmt: skip
    return presets


PRESETS.update(_metalstm_presets())


# Keys that only change how a trained run is scored: `fewshot eval --set` may override them.
EVALUATION_KEYS = ("eval_query_batch", "eval_steps", "tune_inner_lr")


def check_evaluation_overrides(assignments: list[str]) -> None:
    """KEY=VALUE overrides at evaluation may name only ``EVALUATION_KEYS``."""
    for assignment in assignments:
        key = assignment.partition("=")[0].strip()
        if key not in EVALUATION_KEYS:
            raise ConfigError(f"--set {key}: not an evaluation key (training keys are fixed once trained); allowed: {', '.join(EVALUATION_KEYS)}")


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; allowed: {', '.join(PRESETS)}")
    return Config(**PRESETS[name])


def check_fields(config, skip: tuple[str, ...] = ()) -> None:
    """Every field of a config dataclass against the checks in its metadata (``_f``), but ``skip``."""
    for f in dataclasses.fields(config):
        if f.name not in skip:
            _check(f, getattr(config, f.name))


def _check(f: dataclasses.Field, value) -> None:
    meta = f.metadata
    values = value if isinstance(value, tuple) else (value,)
    if isinstance(value, tuple) and not value:
        raise ConfigError(f"{f.name}: needs at least one value")
    for v in values:
        if "choices" in meta and v not in meta["choices"]:
            raise ConfigError(f"{f.name}={v!r}: allowed values are {', '.join(meta['choices'])}")
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{f.name}={v}: must be a finite number")
        if "min" in meta and v < meta["min"]:
            raise ConfigError(f"{f.name}={v}: must be >= {meta['min']}")
        if "max" in meta and v > meta["max"]:
            raise ConfigError(f"{f.name}={v}: must be <= {meta['max']}")


def _parse_value(f: dataclasses.Field, text: str):
    kind = type(f.default)
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        if kind is tuple:
            return tuple(int(part) for part in text.split(","))
        return kind(text)
    except ValueError:
        raise ConfigError(f"{f.name}={text!r}: expected {_type_name(f)}") from None


def _type_name(f: dataclasses.Field) -> str:
    kind = type(f.default)
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        kind, "comma-separated integers"
    )


def with_overrides(config: Config, assignments: list[str]) -> Config:
    """Apply ``key=value`` strings; unknown keys and bad values raise ConfigError (any config dataclass)."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    changes = {}
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep:
            raise ConfigError(f"--set {assignment!r}: expected key=value")
        if key not in fields:
            raise ConfigError(f"--set {key}: unknown key; allowed: {', '.join(fields)}")
        changes[key] = _parse_value(fields[key], text)
    return dataclasses.replace(config, **changes)


def describe(cls=Config, presets: dict | None = None) -> str:
    """Every key with its default and help, for ``fewshot presets``."""
    lines = [f"  {f.name} = {_toml_value(f.default)}: {f.metadata['help']}" for f in dataclasses.fields(cls)]
    presets = [f"  {name}: {overrides or 'the defaults'}" for name, overrides in (PRESETS if presets is None else presets).items()]
    return "presets:\n" + "\n".join(presets) + "\n\nkeys (--set key=value):\n" + "\n".join(lines)


# --------------------------------------------------------------------------- TOML


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def to_toml(config: Config) -> str:
    return "".join(f"{k} = {_toml_value(v)}\n" for k, v in dataclasses.asdict(config).items())


def from_toml(text: str, source: str = "config", cls=Config) -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML ({e})") from None
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ConfigError(f"{source}: unknown keys {sorted(unknown)}; allowed: {', '.join(fields)}")
    values = {}
    for key, value in data.items():
        expected = type(fields[key].default)
        if expected is tuple and isinstance(value, list):
            value = tuple(value)
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        element = type(fields[key].default[0]) if expected is tuple and fields[key].default else int
        if type(value) is not expected or (expected is tuple and not all(type(v) is element for v in value)):
            raise ConfigError(f"{source}: {key} = {value!r}: expected {_type_name(fields[key])}")
        values[key] = value
    try:
        return cls(**values)
    except ConfigError as e:  # a check across keys (__post_init__): name the file
        raise ConfigError(f"{source}: {e}") from None


def load(path: Path, cls=Config) -> Config:
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the run's config ({type(e).__name__}: {e.strerror if isinstance(e, OSError) else e})") from None
    return from_toml(text, source=str(path), cls=cls)
