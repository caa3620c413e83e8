"""The engine config: files, environment overrides, one error listing every problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.config import (
    EngineConfig,
    TrainingBudget,
    demo_config,
    load_config,
    parse_config,
    training_minutes,
)
from storage.errors import ConfigError

TOML = """
root = "/data/engine"
run_name = "nightly"

[stage1]
rounds = 4
images_per_round = 10

[stage1.train]
minutes = 2.5

[label_studio]
url = "http://ls.example:8080"
token = "super-secret-token"
"""

YAML = """
root: s3://bucket/engine
endpoint_url: http://127.0.0.1:9000
stage3:
  points_per_side: 32
  crop_n_layers: 2
annotator:
  kind: simulated
  click_budget: 5
"""


def test_defaults_fill_everything_but_the_root() -> None:
    config = parse_config({"root": "/tmp/x"})
    assert config.source.synthetic
    assert config.annotator.kind == "simulated"
    assert config.stage1.rounds == 3 and config.stage3.rounds == 1
    # The synthetic pool is sized to what the rounds consume.
    assert config.pool_images_needed() == 3 * 6 + 2 * 6 + 1 * 16


def test_toml_file_with_nested_sections(tmp_path: Path) -> None:
    path = tmp_path / "engine.toml"
    path.write_text(TOML)
    config = load_config(path)
    assert config.root == "/data/engine" and config.run_name == "nightly"
    assert config.stage1.rounds == 4 and config.stage1.images_per_round == 10
    assert config.stage1.train.minutes == 2.5
    assert config.label_studio.url == "http://ls.example:8080"
    assert config.label_studio.token is not None
    assert config.label_studio.token.get_secret_value() == "super-secret-token"


def test_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "engine.yaml"
    path.write_text(YAML)
    config = load_config(path)
    assert config.root == "s3://bucket/engine"
    assert config.endpoint_url == "http://127.0.0.1:9000"
    assert config.stage3.points_per_side == 32 and config.stage3.crop_n_layers == 2
    assert config.annotator.click_budget == 5


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = tmp_path / "engine.toml"
    path.write_text(TOML)
    config = load_config(
        path,
        environ={
            "DATA_ENGINE_STAGE1__ROUNDS": "2",
            "DATA_ENGINE_ROOT": "/elsewhere",
            "DATA_ENGINE_STAGE3__WORKERS": "none",
            "LABEL_STUDIO_URL": "http://other:8080",
            "LABEL_STUDIO_API_KEY": "from-env",
            "UNRELATED": "ignored",
        },
    )
    assert config.stage1.rounds == 2
    assert config.root == "/elsewhere"
    assert config.stage3.workers is None
    assert config.label_studio.url == "http://other:8080"
    assert config.label_studio.token is not None
    assert config.label_studio.token.get_secret_value() == "from-env"


def test_every_problem_is_listed_in_one_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        """
root = "/x"
colour = "blue"
[stage1]
rounds = "three"
speed = 3
[annotator]
kind = "robot"
[label_studio]
token = 12345
"""
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={"DATA_ENGINE_STAGE9__ROUNDS": "1"})
    message = str(caught.value)
    assert str(path) in message
    assert "5 problem(s)" in message or "6 problem(s)" in message
    for expected in (
        "colour: unknown key",
        "stage1.rounds",
        "stage1.speed: unknown key",
        "annotator.kind",
        "label_studio.token",
        "DATA_ENGINE_STAGE9__ROUNDS: unknown setting",
    ):
        assert expected in message, expected
    assert "12345" not in message  # a secret's value is never echoed


def test_missing_root_and_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="root: required"):
        parse_config({})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("root = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)
    other = tmp_path / "engine.json"
    other.write_text("{}")
    with pytest.raises(ConfigError, match=r"\.toml, \.yaml or \.yml"):
        load_config(other)


def test_a_real_source_needs_holdout_truth_and_simulation_needs_pool_truth() -> None:
    with pytest.raises(ConfigError, match="pool_coco"):
        parse_config({"root": "/x", "source": {"images": "/images"}})
    with pytest.raises(ConfigError, match="holdout_coco"):
        parse_config(
            {
                "root": "/x",
                "source": {"images": "/images"},
                "annotator": {"kind": "label_studio"},
            }
        )
    config = parse_config(
        {
            "root": "/x",
            "source": {"images": "/images", "holdout": "/h", "holdout_coco": "/h/a.json"},
            "annotator": {"kind": "label_studio"},
        }
    )
    assert not config.source.synthetic


def test_the_token_never_shows_in_dumps_or_reprs() -> None:
    config = parse_config({"root": "/x", "label_studio": {"token": "s3cr3t-value"}})
    assert "s3cr3t-value" not in repr(config)
    assert "s3cr3t-value" not in str(config.redacted())
    assert "s3cr3t-value" not in config.model_dump_json()


def test_demo_config_scales_images_and_minutes() -> None:
    default = demo_config("/x")
    assert isinstance(default, EngineConfig)
    small = demo_config("/x", images=12, minutes=2.0)
    assert small.pool_images_needed() < default.pool_images_needed()
    assert all(small.stage(n).images_per_round >= 1 for n in (1, 2, 3))
    assert training_minutes(small) == pytest.approx(2.0)
    with pytest.raises(ConfigError, match="--minutes"):
        demo_config("/x", minutes=0)


def test_the_example_config_is_valid_and_states_the_defaults() -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "config.toml"
    assert load_config(example) == parse_config({"root": "./engine-data"})


def test_every_training_budget_setting_reaches_the_train_config() -> None:
    from flows.versions import _train_config

    budget = TrainingBudget(
        steps=7,
        minutes=None,
        images_per_step=3,
        masks_per_image=5,
        lr=3e-4,
        warmup_steps=2,
        num_rounds=4,
        no_point_rounds=2,
        focal_weight=2.0,
        focal_gamma=1.0,
        focal_alpha=0.5,
        freeze_image_encoder=True,
    )
    config = _train_config(budget, seed=9)
    assert config.seed == 9
    # replay_fraction shapes the retrain's data, not the loop (tests/flows/test_tasks.py).
    for name in set(TrainingBudget.model_fields) - {"replay_fraction"}:
        assert getattr(config, name) == getattr(budget, name), name


def test_retrains_replay_pretraining_scenes_only_for_the_engines_own_model() -> None:
    own = parse_config({"root": "r"})
    imported = parse_config({"root": "r", "model": {"checkpoint": "sam_vit_b.pth"}})
    assert [own.replay_fraction(n) for n in (1, 2, 3)] == [0.5, 0.5, 0.5]
    assert [imported.replay_fraction(n) for n in (1, 2, 3)] == [0.0, 0.0, 0.0]
    chosen = parse_config({"root": "r", "stage2": {"train": {"replay_fraction": 0.2}}})
    assert chosen.replay_fraction(2) == 0.2 and chosen.replay_fraction(1) == 0.5
    with pytest.raises(ConfigError, match="replay_fraction"):
        parse_config({"root": "r", "stage1": {"train": {"replay_fraction": 1.0}}})
