"""The meta-RL side of ``python -m fewshot``: train / eval / plot dispatch here for RL presets and run directories."""

from __future__ import annotations

import json

from fewshot.rl import config as rl_config


def is_rl(preset_or_runs) -> bool:
    if isinstance(preset_or_runs, str):
        return preset_or_runs in rl_config.PRESETS
    return any(rl_config.is_rl_run(run_dir) for run_dir in preset_or_runs)


def _require_gymnasium() -> None:
    try:
        import gymnasium  # noqa: F401
    except ImportError:
        raise rl_config.ConfigError("meta-RL needs gymnasium (and mujoco for HalfCheetah): pip install 'fewshot[rl]'") from None


def training():
    """(the training function, the preset lookup, a checkpoint's keys) of meta-RL runs, for ``fewshot train``."""
    _require_gymnasium()
    from fewshot.rl.train import CHECKPOINT_KEYS, train

    return train, rl_config.preset, CHECKPOINT_KEYS


def evaluate(args) -> int:
    _require_gymnasium()
    from fewshot.rl import evaluate

    results = evaluate.evaluate_runs(args.run_dirs)
    if args.json:
        for result in results.values():
            print(json.dumps(result))
    else:
        print(evaluate.markdown_table(results))
    return 0


def plot(args) -> int:
    _require_gymnasium()
    from fewshot.rl import evaluate

    out = args.out or args.run_dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    for path in evaluate.plot_runs(args.run_dirs, out):
        print(f"wrote {path}")
    return 0
