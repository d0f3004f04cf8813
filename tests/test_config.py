import pytest

from fewshot import config as cfg


def test_presets_resolve_and_round_trip_through_toml():
    for name in cfg.PRESETS:
        config = cfg.preset(name)
        assert cfg.from_toml(cfg.to_toml(config)) == config
    assert cfg.preset("sine-fomaml").first_order and cfg.preset("sine-pretrained").method == "pretrained"


def test_overrides_parse_by_type():
    config = cfg.with_overrides(cfg.preset("sine-maml"), ["k_shot=5", "inner_lr=0.1", "first_order=true", "hidden=20,20,20"])
    assert (config.k_shot, config.inner_lr, config.first_order, config.hidden) == (5, 0.1, True, (20, 20, 20))


@pytest.mark.parametrize(
    "assignment, message",
    [
        ("k_shot=0", "k_shot=0: must be >= 1"),
        ("inner_lr=-0.5", "inner_lr=-0.5: must be >= 0"),
        ("outer_lr=nan", "outer_lr=nan: must be a finite number"),
        ("colour=red", "--set colour: unknown key; allowed: dataset, n_way"),
        ("method=reptile", "method='reptile': allowed values are maml, pretrained, oracle"),
        ("k_shot=three", "k_shot='three': expected an integer"),
        ("first_order=maybe", "expected true or false"),
        ("eval_shots=5,30", "eval_shots=30: must be <= 20"),
        ("k_shot", "expected key=value"),
        ("loss_reduction=per_shot", "loss_reduction='per_shot': applies to MAML classification only; allowed here: mean"),
        ("loss_reduction=sum", "loss_reduction='sum': allowed values are mean, per_shot"),
        ("learner=authors", "learner='authors': applies to MAML classification only; allowed here: paper"),
        ("learner=mine", "learner='mine': allowed values are paper, authors"),
    ],
)
def test_bad_overrides_name_the_key_and_allowed_values(assignment, message):
    with pytest.raises(cfg.ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        cfg.with_overrides(cfg.preset("sine-maml"), [assignment])


def test_config_file_is_parsed_not_executed():
    with pytest.raises(cfg.ConfigError, match="unknown keys"):
        cfg.from_toml('__import__ = "os"\n')
    with pytest.raises(cfg.ConfigError, match="k_shot = '5': expected an integer"):
        cfg.from_toml('k_shot = "5"\n')
    with pytest.raises(cfg.ConfigError, match="not valid TOML"):
        cfg.from_toml("k_shot = \n")


def test_unknown_preset_lists_the_allowed_ones():
    with pytest.raises(cfg.ConfigError, match="unknown preset 'sine'; allowed: sine-maml, sine-fomaml"):
        cfg.preset("sine")


@pytest.mark.parametrize(
    "assignments, message",
    [
        (["eval_query_batch=7"], "eval_query_batch=7: must be n_way=5 times a divisor of eval_queries=15"),
        (["eval_query_batch=50"], "eval_query_batch=50: must be n_way=5 times a divisor"),
        (["n_query=4"], r"eval_query_batch=0 \(n_way x n_query = 20\): must be n_way=5 times a divisor of eval_queries=15"),
    ],
)
def test_query_batches_must_hold_the_same_number_of_every_class(assignments, message):
    with pytest.raises(cfg.ConfigError, match=message):
        cfg.with_overrides(cfg.preset("omniglot-5w1s-maml"), assignments)


def test_query_group_size_defaults_to_the_meta_training_query_set():
    assert cfg.preset("omniglot-5w1s-maml").query_group_size == 5  # 5 classes x 1 query, as at meta-training
    assert cfg.preset("omniglot-20w5s-maml").query_group_size == 100
    assert cfg.with_overrides(cfg.preset("omniglot-5w1s-maml"), ["eval_query_batch=75"]).query_group_size == 75
