"""``python -m fewshot forecast ...``: train a forecasting preset, forecast or flag anomalies in a long-format file.

    fewshot forecast train PRESET [--out RUN_DIR] [--set key=value] [--resume]
    fewshot forecast predict RUN_DIR --input FILE --output FILE [--horizon H] [--frequency F] [--plot PNG]
    fewshot forecast anomalies RUN_DIR --input FILE --output FILE [--last N] [--frequency F] [--plot PNG]
    fewshot forecast presets

Exit status: 0 done, 1 training diverged, 2 bad input (one line naming the argument),
130 training interrupted by Ctrl-C (a checkpoint is written; ``--resume`` continues it to the
same models as an uninterrupted run).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from fewshot.config import ConfigError
from fewshot.timeseries import config as tscfg
from fewshot.timeseries.data import FREQUENCIES, SeriesInputError
from fewshot.tasks.data_root import DataError


def add_parser(sub) -> None:
    """The ``forecast`` subcommand, added to the main parser's subparsers."""
    forecast = sub.add_parser("forecast", help="few-shot forecasting and anomaly detection for time series")
    commands = forecast.add_subparsers(dest="forecast_command", required=True, metavar="FORECAST_COMMAND")

    train = commands.add_parser("train", help="meta-train a forecasting preset into a run directory")
    train.add_argument("preset", metavar="PRESET", help=f"one of: {', '.join(tscfg.PRESETS)}")
    train.add_argument("--out", type=Path, help="run directory (default: runs/PRESET)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (see `fewshot forecast presets`)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint (same config; a new run if it has none)")

    for name, help in (("predict", "forecast every series of a long-format file"), ("anomalies", "score the last values of every series")):
        command = commands.add_parser(name, help=help)
        command.add_argument("run_dir", type=Path, metavar="RUN_DIR")
        command.add_argument("--input", type=Path, required=True, help="long-format .csv or .parquet: series_id, timestamp, value")
        command.add_argument("--output", type=Path, required=True, help=".csv or .parquet to write")
        command.add_argument("--frequency", choices=FREQUENCIES, help="the frequency of every series (default: detect each series' seasonal period)")
        command.add_argument("--steps", type=int, help="adaptation steps (default: the run's adapt_steps)")
        command.add_argument("--batch-series", type=int, default=4096, help="series adapted together (memory scales with it)")
        command.add_argument("--plot", type=Path, help="also draw the first few series to this PNG")
        if name == "predict":
            command.add_argument("--horizon", type=int, help="values to forecast (default and maximum: the model's horizon)")
        else:
            command.add_argument("--last", type=int, help="score the last N values of each series (default: the model's horizon)")
    commands.add_parser("presets", help="list forecasting presets and config keys")


def run(args) -> int:
    try:
        return _COMMANDS[args.forecast_command](args)
    except (ConfigError, SeriesInputError, DataError) as e:
        print(f"fewshot forecast {args.forecast_command}: error: {e}", file=sys.stderr)
        return 2


def _train(args) -> int:
    from fewshot.timeseries.forecaster import train_run
    from fewshot.train import TrainingDiverged, TrainingInterrupted, prepare_run_dir

    config = tscfg.with_overrides(tscfg.preset(args.preset), args.set)
    run_dir = args.out or Path("runs") / args.preset
    config, resume = prepare_run_dir(run_dir, config, args.resume, dataclasses.asdict(config), extendable=())
    try:
        train_run(run_dir, config, resume=resume)
    except TrainingDiverged as e:
        print(f"fewshot forecast train: error: {e}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:
        print(f"fewshot forecast train: {e}", file=sys.stderr)
        return 130
    print(f"trained {args.preset}: {run_dir}")
    return 0


def _check_positive(name: str, value) -> None:
    minimum = 0 if name == "steps" else 1
    if value is not None and value < minimum:
        raise ConfigError(f"--{name} {value}: must be an integer >= {minimum}")


def _predict(args) -> int:
    from fewshot.timeseries.fleet import predict_file

    for name in ("horizon", "steps", "batch_series"):
        _check_positive(name.replace("_", "-"), getattr(args, name))
    stats = predict_file(args.run_dir, args.input, args.output, horizon=args.horizon, frequency=args.frequency,
                         steps=args.steps, batch_series=args.batch_series, plot=args.plot)  # fmt: skip
    print(f"forecast {stats['series']} series in {stats['seconds']:.1f} s: {args.output}")
    return 0


def _anomalies(args) -> int:
    from fewshot.timeseries.fleet import anomalies_file

    for name in ("last", "steps", "batch_series"):
        _check_positive(name.replace("_", "-"), getattr(args, name))
    stats = anomalies_file(args.run_dir, args.input, args.output, last=args.last, frequency=args.frequency,
                           steps=args.steps, batch_series=args.batch_series, plot=args.plot)  # fmt: skip
    print(f"scored {stats['series']} series in {stats['seconds']:.1f} s, {stats['flagged']} values flagged: {args.output}")
    return 0


def _presets(args) -> int:
    print(tscfg.describe())
    return 0


_COMMANDS = {"train": _train, "predict": _predict, "anomalies": _anomalies, "presets": _presets}
