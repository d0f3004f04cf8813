"""``python -m fewshot`` / ``fewshot``: train, eval, plot, presets.

Exit status: 0 done, 1 training diverged, 2 bad input (one line naming the
argument and the allowed values), 130 interrupted with a checkpoint written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from fewshot import config as cfg
from fewshot.rl import cli as rl_cli
from fewshot.rl import config as rl_cfg


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fewshot", description="Meta-learning on PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="meta-train a preset into a run directory")
    train.add_argument("preset", metavar="PRESET", help=f"one of: {', '.join([*cfg.PRESETS, *rl_cfg.PRESETS])}")
    train.add_argument("--out", type=Path, help="run directory (default: runs/PRESET)")
    train.add_argument("--iterations", type=int, help="meta-iterations (overrides the preset)")
    train.add_argument("--seed", type=int, help="seed of weights and task stream (overrides the preset)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint (a new run if it has none)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (see `fewshot presets`)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")

    evaluate = sub.add_parser("eval", help="evaluate runs on the fixed meta-test tasks")
    evaluate.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object per run instead of the table")
    evaluate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                          help=f"override an evaluation key of the runs' configs: {', '.join(cfg.EVALUATION_KEYS)}")  # fmt: skip

    plot = sub.add_parser("plot", help="draw the paper's Figures 2 and 3 for one or more runs")
    plot.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    plot.add_argument("--out", type=Path, help="folder for the PNGs (default: the first RUN_DIR)")
    for command in (train, evaluate, plot):
        command.add_argument("--data-root", help="folder holding the datasets (default: $FEWSHOT_DATA, else the per-user data folder)")
        command.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, or auto (cuda when present); not part of the run's config")

    data = sub.add_parser("data", help="check a dataset and build its cache; prints its splits")
    data.add_argument("dataset", choices=["omniglot", "miniimagenet"], help="the dataset")
    data.add_argument("--data-root", help="folder holding the datasets (default: $FEWSHOT_DATA, else the per-user data folder)")
    data.add_argument("--cache-dir", help="folder for decoded caches (default: $FEWSHOT_CACHE, else the per-user cache folder)")

    sub.add_parser("presets", help="list presets and config keys")

    from fewshot.timeseries.cli import add_parser as add_forecast_parser

    add_forecast_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    from fewshot.tasks.data_root import DataError

    if getattr(args, "data_root", None) and args.command != "data":
        os.environ["FEWSHOT_DATA"] = args.data_root  # read by the dataset loaders of this process
    try:
        return _COMMANDS[args.command](args)
    except (cfg.ConfigError, DataError) as e:
        print(f"fewshot {args.command}: error: {e}", file=sys.stderr)
        return 2
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Shut down torchrun's process group if this process joined one: left to interpreter exit,
    gloo's threads once aborted a process ("terminate called without an active exception")."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _prepare_device(name: str) -> None:
    """Check ``--device`` (ConfigError naming the allowed values); on the CPU, keep freed memory for reuse."""
    from fewshot.device import keep_freed_cpu_memory, resolve_device

    if resolve_device(name).type == "cpu":
        keep_freed_cpu_memory()  # large tensors reuse memory instead of paying page faults (fewshot.device)


def _train(args) -> int:
    from fewshot.train import CHECKPOINT_KEYS, check_trainable, prepare_run_dir, rank_and_world, train, training_exit_status

    _prepare_device(args.device)  # a bad --device fails before the run directory is touched
    preset, on_device, check, checkpoint_keys = cfg.preset, {"device": args.device}, check_trainable, CHECKPOINT_KEYS
    if rl_cli.is_rl(args.preset):  # meta-RL presets: fewshot.rl's config and training loop
        if args.device != "cpu":
            raise cfg.ConfigError(f"--device {args.device!r}: meta-RL presets run on the CPU (NumPy/MuJoCo rollouts): allowed: cpu")
        train, preset, checkpoint_keys = rl_cli.training()
        on_device, check = {}, None
    flags = [f"{k}={v}" for k, v in (("iterations", args.iterations), ("seed", args.seed)) if v is not None]
    config = cfg.with_overrides(preset(args.preset), args.set + flags)
    explicit = {a.partition("=")[0] for a in args.set + flags}
    run_dir = args.out or Path("runs") / args.preset
    config, resume = prepare_run_dir(
        run_dir, config, args.resume, {k: getattr(config, k) for k in explicit}, check=check, checkpoint_keys=checkpoint_keys
    )
    stopped = training_exit_status(
        "fewshot train", lambda: train(run_dir, config, resume=resume, progress=not args.no_progress, **on_device)
    )
    if stopped is not None:
        return stopped
    if rank_and_world()[0] == 0:  # resumed: the run's stored config, whatever preset was named
        print(f"trained {run_dir} for {config.iterations} iterations" + ("" if resume else f" ({args.preset})"))
    return 0


def _evaluated_runs(run_dirs: list[Path], device: str = "cpu", overrides: list[str] = ()) -> dict[str, tuple]:
    """name -> (config, method, result) for every run, results saved into each run directory.

    ``overrides`` (KEY=VALUE) may change only ``cfg.EVALUATION_KEYS`` of each run's config.
    """
    from fewshot import evaluate, experiment
    from fewshot.train import load_run

    _prepare_device(device)  # a bad --device is reported before any run is read
    cfg.check_evaluation_overrides(overrides)
    loaded = []  # every run read and its data checked before any is evaluated: bad input writes nothing
    for run_dir in run_dirs:
        config, method, state = load_run(run_dir, device)
        config = cfg.with_overrides(config, overrides)
        experiment.check_episodes(config, splits=("val", "test"))
        loaded.append((run_dir, config, method, state))
    runs = {}
    for run_dir, config, method, state in loaded:
        result = evaluate.evaluate(method, config)
        evaluate.save(result, run_dir, state["iteration"])
        name = run_dir.name if run_dir.name and run_dir.name not in runs else str(run_dir)
        runs[name] = (config, method, result)
    return runs


def _eval(args) -> int:
    if rl_cli.is_rl(args.run_dirs):
        if args.set:
            raise cfg.ConfigError("--set: meta-RL runs have no evaluation keys to override")
        return rl_cli.evaluate(args)
    from fewshot.evaluate import markdown_table

    results = {name: result for name, (_, _, result) in _evaluated_runs(args.run_dirs, args.device, args.set).items()}
    if args.json:
        for result in results.values():
            print(json.dumps(result))
    else:
        print(markdown_table(results))
    return 0


def _plot(args) -> int:
    if rl_cli.is_rl(args.run_dirs):
        return rl_cli.plot(args)
    from fewshot import plots

    runs = _evaluated_runs(args.run_dirs, args.device)
    out = args.out or args.run_dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    paths = [plots.figure3({name: result for name, (_, _, result) in runs.items()}, out)]
    paths.append(plots.learning_curves({name: run_dir for name, run_dir in zip(runs, args.run_dirs)}, out))
    regression = {name: (config, method) for name, (config, method, _) in runs.items() if config.dataset == "sinusoid"}
    if regression:  # Figure 2 draws fitted curves: regression only
        paths.append(plots.figure2(regression, out))
    gates = {name: (config, method) for name, (config, method, _) in runs.items() if config.method == "metalstm"}
    if gates:  # Ravi & Larochelle 2017, Figure 3: the Meta-LSTM's input and forget gates per layer
        paths.append(plots.metalstm_gates(gates, out))
    for path in paths:
        print(f"wrote {path}")
    return 0


def _data(args) -> int:
    from fewshot.tasks import miniimagenet, omniglot

    if args.dataset == "miniimagenet":
        for split in miniimagenet.SPLITS:
            part = miniimagenet.load_miniimagenet(split, args.data_root)
            print(f"miniimagenet {split}: {len(part.classes)} classes, {len(part)} images, all present")
        return 0

    collection = omniglot.load_omniglot(args.data_root, args.cache_dir)
    characters = omniglot.character_splits()
    print(f"omniglot: {len(collection.images)} images of {omniglot.N_CHARACTERS} characters, cache ok")
    for name, chars in characters.items():
        print(f"  {name}: {len(chars)} characters, {len(chars) * collection.rotations} classes with rotations")
    return 0


def _presets(args) -> int:
    print(cfg.describe())
    print("\nmeta-RL " + rl_cfg.describe())
    return 0


def _forecast(args) -> int:
    from fewshot.timeseries.cli import run

    return run(args)


_COMMANDS = {"train": _train, "eval": _eval, "plot": _plot, "data": _data, "presets": _presets, "forecast": _forecast}
