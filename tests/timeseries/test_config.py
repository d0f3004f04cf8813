import pytest

from fewshot.config import ConfigError
from fewshot.timeseries import config as tscfg
from fewshot.timeseries.forecaster import group_specs, select_series


@pytest.mark.parametrize("name", list(tscfg.PRESETS))
def test_presets_name_real_disjoint_series(name):
    config = tscfg.preset(name)
    evaluated = {s.id for s in select_series(config.evaluate_on)}
    for spec in group_specs(config):
        trained = [s for source in config.sources for s in select_series(source, spec.name)]
        assert trained, (name, spec.name)
        assert not evaluated & {s.id for s in trained}  # never meta-trained on a benchmark series


def test_bad_config_values(tmp_path):
    with pytest.raises(ConfigError, match="unknown forecast preset 'x'; allowed: m1m3-zeroshot"):
        tscfg.preset("x")
    with pytest.raises(ConfigError, match="one value per group"):
        tscfg.ForecastConfig(lags=(6,))
    with pytest.raises(ConfigError, match="source 'm5'"):
        tscfg.ForecastConfig(sources=("m5",))
    with pytest.raises(ConfigError, match="groups='weekly': allowed values are yearly"):
        tscfg.with_overrides(tscfg.preset("m1m3-zeroshot"), ["groups=weekly,quarterly,monthly"])
    with pytest.raises(ConfigError, match="expected key=value"):
        tscfg.with_overrides(tscfg.preset("m1m3-zeroshot"), ["nope=1"])
    config = tscfg.with_overrides(tscfg.preset("m1m3-zeroshot"), ["iterations=5", "lags=4,8,12"])
    (tmp_path / "c.toml").write_text(tscfg.to_toml(config))
    assert tscfg.load(tmp_path / "c.toml") == config
