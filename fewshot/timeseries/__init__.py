"""Few-shot forecasting and anomaly detection for fleets of time series.

One small MLP forecaster per frequency group, meta-trained with MAML
(``fewshot.algorithms.maml``) so that a few gradient steps on a series' own
recent history adapt it to that series; the adapted forecaster predicts the
next ``horizon`` values with an interval, and flags observations that its
standardised residuals call unlikely.

Modules: ``data`` (competition data and long-format CSV/Parquet readers),
``windows`` (series as tasks: lag windows, per-series scaling), ``forecaster``
(the model, meta-training, batched adaptation and forecasting), ``accuracy``
(sMAPE, MASE, seasonal naive), ``anomalies`` (scores, injected anomalies,
detection metrics), ``timestamps`` (the forecasts' timestamps), ``fleet`` (streaming
Parquet -> Parquet: predict, anomalies, both in one pass), ``distributed`` (the same
jobs on Dask), ``cli``.
"""
