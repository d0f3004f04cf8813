"""The meta-RL side of ``python -m fewshot``: train / eval / plot dispatch here for RL presets and run directories."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fewshot.config import with_overrides
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


def train(args) -> int:
    _require_gymnasium()
    from fewshot.rl.train import prepare_run_dir, train
    from fewshot.train import TrainingDiverged, TrainingInterrupted

    flags = [f"{k}={v}" for k, v in (("iterations", args.iterations), ("seed", args.seed)) if v is not None]
    config = with_overrides(rl_config.preset(args.preset), args.set + flags)
    explicit = {a.partition("=")[0] for a in args.set + flags}
    run_dir = args.out or Path("runs") / args.preset
    config, resume = prepare_run_dir(run_dir, config, args.resume, {k: getattr(config, k) for k in explicit})
    try:
        train(run_dir, config, resume=resume, progress=not args.no_progress)
    except TrainingInterrupted as e:
        print(f"fewshot train: {e}", file=sys.stderr)
        return 130
    except TrainingDiverged as e:
        print(f"fewshot train: error: {e}", file=sys.stderr)
        return 1
    print(f"trained {args.preset} for {config.iterations} iterations: {run_dir}")
    return 0


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
