"""Forecasting runs: one frozen config per run, named presets, TOML in the run directory.

A source names series by competition, optionally one frequency and one half:
``"m1"``, ``"m3/monthly"``, ``"m3/monthly/even"`` (the even-numbered series of M3
monthly; ``odd`` is the disjoint other half). Each group is one meta-model with its
own lag window, horizon, number of support windows and seasonal period.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from fewshot.config import ConfigError, _toml_value, check_fields
from fewshot.config import load as base_load
from fewshot.config import to_toml as base_to_toml

GROUPS = ("yearly", "quarterly", "monthly", "all")


def _f(default, help: str, **checks):
    return field(default=default, metadata={"help": help, **checks})


@dataclass(frozen=True)
class ForecastConfig:
    sources: tuple = _f(("m1", "tourism"), "meta-train series: competition[/frequency[/even|odd]]")
    evaluate_on: str = _f("m3", "the benchmark series (never meta-trained on): competition[/frequency[/even|odd]]")
    groups: tuple = _f(("yearly", "quarterly", "monthly"), "one meta-model per frequency group; 'all' pools every series in one", choices=GROUPS)
    lags: tuple = _f((6, 12, 24), "lag window L per group", min=1)
    horizons: tuple = _f((6, 8, 18), "forecast horizon H per group", min=1)
    windows: tuple = _f((16, 24, 48), "support windows K per group (the last L + K values adapt the model)", min=1)
    hidden: int = _f(64, "width of the MLP's two hidden layers", min=1)
    inner_lr: float = _f(0.1, "initial inner step size alpha (learned per tensor, Meta-SGD)", min=0.0)
    inner_steps: int = _f(2, "inner steps at meta-training; 0 trains a global model without adaptation", min=0)
    adapt_steps: int = _f(2, "inner steps when forecasting", min=0)
    outer_lr: float = _f(1e-3, "Adam step size", min=0.0)
    meta_batch: int = _f(64, "series per meta-iteration", min=1)
    iterations: int = _f(2000, "meta-iterations per group", min=1)
    val_every: int = _f(250, "iterations between validations (metrics.csv rows)", min=1)
    seed: int = _f(0, "seed of weights and task stream", min=0)

    def __post_init__(self):
        check_fields(self, skip=("sources",))
        if not (len(self.groups) == len(self.lags) == len(self.horizons) == len(self.windows)):
            raise ConfigError("groups, lags, horizons and windows need one value per group each")
        for source in (*self.sources, self.evaluate_on):
            parse_source(source)


PERIOD_OF_GROUP = {"yearly": 1, "quarterly": 4, "monthly": 12, "all": 1}

PRESETS: dict[str, dict] = {
    # M1 + Tourism -> M3: zero-shot transfer across competitions (Oreshkin et al. 2021's meta-learning view of N-BEATS)
    "m1m3-zeroshot": {},
    # the same, one pooled model for every frequency (measures whether grouping helps)
    "m1m3-pooled": {"groups": ("all",), "lags": (12,), "horizons": (18,), "windows": (32,)},
    # the pooled model made cheaper for fleets: half the width, half the support windows
    "m1m3-fleet": {"groups": ("all",), "lags": (12,), "horizons": (18,), "windows": (16,), "hidden": 32},
    # the same groups, trained as a global model without adaptation (no inner loop)
    "m1m3-global": {"inner_steps": 0, "adapt_steps": 0},
    # a disjoint half of M3 monthly -> the other half
    "m3-monthly-maml": {"sources": ("m3/monthly/even",), "evaluate_on": "m3/monthly/odd", "groups": ("monthly",), "lags": (24,), "horizons": (18,), "windows": (48,)},
    # M1 + M3 -> Tourism (Tourism's own horizons: yearly 4, quarterly 8, monthly 24)
    "tourism-maml": {"sources": ("m1", "m3"), "evaluate_on": "tourism", "horizons": (4, 8, 24), "lags": (6, 12, 36)},
}


def parse_source(source: str) -> tuple[str, str | None, str | None]:
    from fewshot.timeseries.data import COMPETITIONS, FREQUENCIES

    parts = source.split("/")
    competition = parts[0]
    frequency = parts[1] if len(parts) > 1 else None
    half = parts[2] if len(parts) > 2 else None
    if competition not in COMPETITIONS or (frequency is not None and frequency not in FREQUENCIES) or half not in (None, "even", "odd") or len(parts) > 3:
        raise ConfigError(
            f"source {source!r}: expected competition[/frequency[/even|odd]] with competition one of "
            f"{', '.join(COMPETITIONS)} and frequency one of {', '.join(FREQUENCIES)}"
        )
    return competition, frequency, half


def preset(name: str) -> ForecastConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown forecast preset {name!r}; allowed: {', '.join(PRESETS)}")
    return ForecastConfig(**PRESETS[name])


def with_overrides(config: ForecastConfig, assignments: list[str]) -> ForecastConfig:
    """Apply ``key=value`` strings (tuples comma-separated); unknown keys and bad values raise ConfigError."""
    fields = {f.name: f for f in dataclasses.fields(ForecastConfig)}
    changes = {}
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep or key not in fields:
            raise ConfigError(f"--set {assignment!r}: expected key=value with key one of {', '.join(fields)}")
        changes[key] = _parse(fields[key], text)
    return dataclasses.replace(config, **changes)


def _parse(f: dataclasses.Field, text: str):
    kind = type(f.default)
    try:
        if kind is tuple:
            parts = tuple(text.split(","))
            return parts if isinstance(f.default[0], str) else tuple(int(p) for p in parts)
        return kind(text)
    except ValueError:
        raise ConfigError(f"{f.name}={text!r}: expected {kind.__name__}") from None


def to_toml(config: ForecastConfig) -> str:
    return base_to_toml(config)


def load(path: Path) -> ForecastConfig:
    return base_load(Path(path), cls=ForecastConfig)


def describe() -> str:
    lines = [f"  {f.name} = {_toml_value(f.default)}: {f.metadata['help']}" for f in dataclasses.fields(ForecastConfig)]
    presets = [f"  {name}: {overrides or 'the defaults'}" for name, overrides in PRESETS.items()]
    return "forecast presets:\n" + "\n".join(presets) + "\n\nkeys (--set key=value):\n" + "\n".join(lines)
