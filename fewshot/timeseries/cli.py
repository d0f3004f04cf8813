"""``python -m fewshot forecast ...``: train a forecasting preset, forecast or flag anomalies in a long-format file.

    fewshot forecast train PRESET [--out RUN_DIR] [--set key=value] [--resume]
    fewshot forecast predict RUN_DIR --input FILE --output FILE [--horizon H] [--frequency F] [--plot PNG]
    fewshot forecast anomalies RUN_DIR --input FILE --output FILE [--last N] [--frequency F] [--plot PNG]
    fewshot forecast monitor RUN_DIR --input FILE --forecast FILE --anomalies FILE [--horizon H] [--last N] [--workers W]
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
        _add_engine_arguments(command)
    _add_monitor_parser(commands)
    commands.add_parser("presets", help="list forecasting presets and config keys")


def _add_engine_arguments(command) -> None:
    command.add_argument("--workers", type=int, default=0, help="run on Dask with this many local worker processes (Parquet input; default 0: this process)")
    command.add_argument("--scheduler", metavar="ADDRESS", help="run on the Dask cluster at this scheduler address (Parquet input, a file system all workers see)")


def _add_monitor_parser(commands) -> None:
    monitor = commands.add_parser("monitor", help="forecast every series and score its last values, in one pass")
    monitor.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    monitor.add_argument("--input", type=Path, required=True, help="long-format .csv or .parquet: series_id, timestamp, value")
    monitor.add_argument("--forecast", type=Path, required=True, help=".csv or .parquet to write the forecasts to (the output of `predict`)")
    monitor.add_argument("--anomalies", type=Path, required=True, help=".csv or .parquet to write the scores to (the output of `anomalies`)")
    monitor.add_argument("--horizon", type=int, help="values to forecast (default and maximum: the model's horizon)")
    monitor.add_argument("--last", type=int, help="score the last N values of each series (default: the model's horizon)")
    monitor.add_argument("--frequency", choices=FREQUENCIES, help="the frequency of every series (default: detect each series' seasonal period)")
    monitor.add_argument("--steps", type=int, help="adaptation steps (default: the run's adapt_steps)")
    monitor.add_argument("--batch-series", type=int, default=4096, help="series adapted together (memory scales with it)")
    _add_engine_arguments(monitor)


def run(args) -> int:
    try:
        return _COMMANDS[args.forecast_command](args)
    except (ConfigError, SeriesInputError, DataError) as e:
        print(f"fewshot forecast {args.forecast_command}: error: {e}", file=sys.stderr)
        return 2


def _train(args) -> int:
    from fewshot.timeseries.forecaster import train_run
    from fewshot.train import prepare_run_dir, training_exit_status

    config = tscfg.with_overrides(tscfg.preset(args.preset), args.set)
    run_dir = args.out or Path("runs") / args.preset
    config, resume = prepare_run_dir(run_dir, config, args.resume, dataclasses.asdict(config), extendable=())
    stopped = training_exit_status("fewshot forecast train", lambda: train_run(run_dir, config, resume=resume))
    if stopped is not None:
        return stopped
    print(f"trained {args.preset}: {run_dir}")
    return 0


def _check_counts(args, *names: str) -> None:
    """--steps and --workers may be 0, the other counts must be positive; unset flags are skipped."""
    for name in names:
        value, minimum = getattr(args, name), 0 if name in ("steps", "workers") else 1
        if value is not None and value < minimum:
            raise ConfigError(f"--{name.replace('_', '-')} {value}: must be an integer >= {minimum}")


def _predict(args) -> int:
    from fewshot.timeseries.fleet import predict_file

    _check_counts(args, "horizon", "steps", "batch_series", "workers")
    stats = predict_file(args.run_dir, args.input, args.output, horizon=args.horizon, frequency=args.frequency,
                         steps=args.steps, batch_series=args.batch_series, plot=args.plot, **_engine(args))  # fmt: skip
    print(f"forecast {stats['series']} series in {stats['seconds']:.1f} s: {args.output}")
    return 0


def _anomalies(args) -> int:
    from fewshot.timeseries.fleet import anomalies_file

    _check_counts(args, "last", "steps", "batch_series", "workers")
    stats = anomalies_file(args.run_dir, args.input, args.output, last=args.last, frequency=args.frequency,
                           steps=args.steps, batch_series=args.batch_series, plot=args.plot, **_engine(args))  # fmt: skip
    print(f"scored {stats['series']} series in {stats['seconds']:.1f} s, {stats['flagged']} values flagged: {args.output}")
    return 0


def _monitor(args) -> int:
    from fewshot.timeseries.fleet import monitor_file

    _check_counts(args, "horizon", "last", "steps", "batch_series", "workers")
    stats = monitor_file(args.run_dir, args.input, args.forecast, args.anomalies, horizon=args.horizon, last=args.last,
                         frequency=args.frequency, steps=args.steps, batch_series=args.batch_series, **_engine(args))  # fmt: skip
    print(f"forecast and scored {stats['series']} series in {stats['seconds']:.1f} s, {stats['flagged']} values flagged: "
          f"{args.forecast}, {args.anomalies}")  # fmt: skip
    return 0


def _engine(args) -> dict:
    if args.workers and args.scheduler:
        raise ConfigError(f"--workers {args.workers} --scheduler {args.scheduler}: give one of them (local workers, or a running cluster)")
    return {"workers": args.workers, "scheduler": args.scheduler}


def _presets(args) -> int:
    print(tscfg.describe())
    return 0


_COMMANDS = {"train": _train, "predict": _predict, "anomalies": _anomalies, "monitor": _monitor, "presets": _presets}
