import numpy as np
import torch

from fewshot.timeseries.accuracy import smape
from fewshot.timeseries.anomalies import forecaster_scores, inject
from fewshot.timeseries.forecaster import SHORT, adapt_batched, adapt_one, choose_group, forecast, load_run, select_series
from fewshot.timeseries.windows import history_matrix, make_tasks


def test_batched_adaptation_equals_per_series_adaptation(quarterly_run):
    _, models = load_run(quarterly_run)
    spec, maml = models["quarterly"]
    series = [s.history for s in select_series("m3/quarterly")[:6]]
    tasks = make_tasks(history_matrix(series, spec.lags + spec.windows), spec.lags, spec.horizon)
    batched = adapt_batched(maml, tasks.support_x, tasks.support_y, steps=3)
    for i in range(len(series)):
        one = adapt_one(maml, tasks.support_x[i], tasks.support_y[i], steps=3)
        for name in one:
            torch.testing.assert_close(batched[name][i], one[name], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(batched["0.weight"][0], batched["0.weight"][1])  # each series got its own parameters


def test_adapted_forecast_beats_unadapted_on_held_out_real_series(quarterly_run):
    """Meta-trained on M1 quarterly; scored on 300 M3 quarterly series' official test horizons."""
    _, models = load_run(quarterly_run)
    spec, maml = models["quarterly"]
    series = select_series("m3/quarterly")[:300]
    errors = {}
    for steps in (0, 2):
        result = forecast(maml, spec, [s.history for s in series], steps)
        errors[steps] = np.mean([smape(s.actual, result.mean[i]) for i, s in enumerate(series)])
    assert errors[2] < errors[0] - 0.2, errors
    assert errors[2] < 15  # M3 quarterly, seasonal naive scores about 11.4 on all 756 series


def test_forecast_interval_and_short_series(quarterly_run):
    _, models = load_run(quarterly_run)
    spec, maml = models["quarterly"]
    values = [np.arange(1.0, 41.0), np.array([5.0, 6.0])]  # the second is shorter than the lag window
    result = forecast(maml, spec, values, steps=2, horizon=4)
    assert result.mean.shape == (2, 4)
    assert (result.lower[0] < result.mean[0]).all() and (result.mean[0] < result.upper[0]).all()
    assert result.method == ["maml/quarterly", SHORT]
    assert result.mean[1].tolist() == [6.0] * 4 and np.isnan(result.upper[1]).all()


def test_injected_spikes_are_found(quarterly_run):
    """Spikes (3-6 noise units) injected into 100 real M3 quarterly test horizons of 8 values:
    the top-scored value is the spike in most series (chance: 1 in 8)."""
    _, models = load_run(quarterly_run)
    spec, maml = models["quarterly"]
    rng = np.random.default_rng(0)
    series = select_series("m3/quarterly")[:100]
    values, labels = [], []
    for s in series:
        region, label = inject(s.history, s.actual, s.period, "spike", rng)
        values.append(np.concatenate([s.history, region]))
        labels.append(label)
    scores = forecaster_scores(maml, spec, values, last=spec.horizon, steps=2).score
    hits = np.mean([np.argmax(score) == np.argmax(label) for score, label in zip(scores, labels)])
    assert hits > 0.55, hits


def test_group_choice_by_frequency_or_detected_period(quarterly_run):
    _, models = load_run(quarterly_run)
    specs = [spec for spec, _ in models.values()]
    seasonal = 10 + np.sin(2 * np.pi * np.arange(60) / 4)
    assert choose_group(specs, seasonal).name == "quarterly"
    assert choose_group(specs, seasonal, "other").name == "quarterly"  # M3 'other' is served by quarterly
