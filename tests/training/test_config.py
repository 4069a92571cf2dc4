"""Config keys: SimpleTuner's names and defaults, round-trips (dict, JSON, TOML, argparse), every error."""

import argparse
import dataclasses
import json

import pytest

from repa_fused.training.config import (Config, RepaConfig, URepaConfig, add_config_arguments, config_from_args,
                               key_table, known_keys, load_config)

# SimpleTuner's defaults for the keys both trainers share (its OPTIONS.md and field registry).
SIMPLETUNER_DEFAULTS = {
    "crepa_enabled": False, "crepa_block_index": 8, "crepa_lambda": 0.5, "crepa_spatial_align": True,
    "crepa_model": "dinov2_vitg14", "crepa_encoder_image_size": 518, "crepa_use_tae": False,
    "crepa_encoder_frames_batch_size": -1, "crepa_scheduler": "constant", "crepa_warmup_steps": 0,
    "crepa_decay_steps": 0, "crepa_lambda_end": 0.0, "crepa_power": 1.0, "crepa_cutoff_step": 0,
    "crepa_similarity_threshold": None, "crepa_similarity_ema_decay": 0.99, "crepa_threshold_mode": "permanent",
    "urepa_enabled": False, "urepa_lambda": 0.5, "urepa_manifold_weight": 3.0, "urepa_model": "dinov2_vitg14",
    "urepa_encoder_image_size": 518, "urepa_use_tae": False, "urepa_scheduler": "constant",
    "urepa_warmup_steps": 0, "urepa_decay_steps": 0, "urepa_lambda_end": 0.0, "urepa_power": 1.0,
    "urepa_cutoff_step": 0, "urepa_similarity_threshold": None, "urepa_similarity_ema_decay": 0.99,
    "urepa_threshold_mode": "permanent",
}

# A value for every key that differs from its default (0 where 0 is allowed, to check it is honoured).
CHANGED = {
    "crepa_enabled": True, "crepa_block_index": 0, "crepa_lambda": 0.0, "crepa_spatial_align": False,
    "crepa_model": "dinov2_vits14", "crepa_encoder_image_size": 224, "crepa_encoder_aspect": "preserve",
    "crepa_use_tae": True, "crepa_feature_cache": "/tmp/cache", "crepa_projector": "mlp",
    "crepa_projector_dim": 64, "crepa_encoder_frames_batch_size": 0, "crepa_scheduler": "polynomial",
    "crepa_warmup_steps": 10, "crepa_decay_steps": 100, "crepa_lambda_end": 0.1, "crepa_power": 2.0,
    "crepa_cutoff_step": 50, "crepa_similarity_threshold": 0.0, "crepa_similarity_ema_decay": 0.0,
    "crepa_threshold_mode": "recoverable",
    "urepa_enabled": True, "urepa_lambda": 0.0, "urepa_manifold_weight": 0.0, "urepa_model": "dinov2_vitb14",
    "urepa_encoder_image_size": 224, "urepa_encoder_aspect": "preserve", "urepa_use_tae": True,
    "urepa_feature_cache": "/tmp/ucache", "urepa_projector": "mlp", "urepa_projector_dim": 32,
    "urepa_scheduler": "cosine", "urepa_warmup_steps": 0, "urepa_decay_steps": 7, "urepa_lambda_end": 0.25,
    "urepa_power": 0.5, "urepa_cutoff_step": 3, "urepa_similarity_threshold": -0.5,
    "urepa_similarity_ema_decay": 1.0, "urepa_threshold_mode": "recoverable", "urepa_align": "y",
    "urepa_manifold_pairs": "batch",
    "irepa_enabled": True, "irepa_spatial_norm_alpha": 0.0, "irepa_projector_kernel_size": 1,  # shared keys
}


def test_defaults_are_simpletuners():
    d = load_config({}).to_dict()
    for key, value in SIMPLETUNER_DEFAULTS.items():
        assert d[key] == value, key
    assert d["urepa_align"] == "min" and d["crepa_projector"] == "linear"


def test_every_key_changed_round_trips_and_zero_is_honoured(tmp_path):
    cfg = load_config(CHANGED)
    assert cfg.to_dict() == CHANGED  # every key covered, every value (zeros included) kept
    assert cfg.repa.lambda_ == 0.0 and cfg.repa.block_index == 0 and cfg.urepa.manifold_weight == 0.0
    assert cfg.repa.similarity_threshold == 0.0 and cfg.repa.similarity_ema_decay == 0.0
    assert load_config(cfg.to_dict()) == cfg
    path = tmp_path / "config.json"
    path.write_text(json.dumps(CHANGED))
    assert load_config(path) == cfg and load_config(str(path)) == cfg
    assert load_config(cfg) is cfg


def test_toml_and_simpletuner_dash_keys(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('crepa_enabled = true\ncrepa_block_index = 0\nlearning_rate = 1e-4\n')
    cfg = load_config(path)
    assert cfg.repa.enabled and cfg.repa.block_index == 0
    # SimpleTuner's config.json spells keys as flags; other trainer keys are ignored.
    cfg = load_config({"--crepa_enabled": True, "--crepa_lambda": 0, "--learning_rate": 1e-4, "seed": 1})
    assert cfg.repa.enabled and cfg.repa.lambda_ == 0.0


def test_int_accepted_for_float_and_none_means_unset():
    cfg = load_config({"crepa_lambda": 1, "crepa_power": 2, "urepa_manifold_weight": None})
    assert cfg.repa.lambda_ == 1.0 and isinstance(cfg.repa.lambda_, float)
    assert cfg.urepa.manifold_weight == 3.0


def test_aliases_and_encoder_fallback():
    cfg = load_config({"crepa_encoder": "dinov2_vits14"})
    assert cfg.repa.model == "dinov2_vits14"
    assert cfg.urepa.model == "dinov2_vits14"  # SimpleTuner's U-REPA falls back to crepa_model
    assert load_config({"crepa_model": "a", "urepa_model": "b"}).urepa.model == "b"
    assert load_config({"crepa_model": "a", "crepa_encoder": "a"}).repa.model == "a"
    with pytest.raises(ValueError, match="crepa_model='a' and crepa_encoder='b'"):
        load_config({"crepa_model": "a", "crepa_encoder": "b"})


def test_simpletuner_video_keys_load_and_other_teachers_are_refused():
    with pytest.warns(UserWarning, match="crepa_adjacent_distance=2 is a video-CREPA setting") as caught:
        cfg = load_config({"crepa_enabled": True, "crepa_adjacent_distance": 2, "crepa_adjacent_tau": 0.5,
                           "crepa_normalize_by_frames": False, "crepa_cumulative_neighbors": True,
                           "crepa_use_backbone_features": False, "crepa_feature_source": "encoder"})
    assert cfg.repa.enabled
    assert len(caught) == 4  # one warning per inert key, none for the supported teacher settings
    for key, value in (("crepa_use_backbone_features", True), ("crepa_feature_source", "self_flow"),
                       ("crepa_self_flow", True), ("crepa_teacher_block_index", 16)):
        with pytest.raises(ValueError, match=f"{key}=.* is not supported"):
            load_config({key: value})


@pytest.mark.parametrize("key, near", [("crepa_lamda", "crepa_lambda"), ("urepa_manifold_wieght",
                                       "urepa_manifold_weight"), ("crepa_blockindex", "crepa_block_index")])
def test_unknown_key_suggests_nearest(key, near):
    with pytest.raises(ValueError, match=f"unknown config key '{key}'; did you mean '{near}'"):
        load_config({key: 1})


def test_unknown_key_without_a_near_one():
    with pytest.raises(ValueError, match=r"unknown config key 'crepa_zzzzzzzzzzzzzzzzzz'$"):
        load_config({"crepa_zzzzzzzzzzzzzzzzzz": 1})


@pytest.mark.parametrize("key, value, error, message", [
    ("crepa_enabled", 1, TypeError, "crepa_enabled must be of type bool, got int"),
    ("crepa_enabled", "true", TypeError, "crepa_enabled must be of type bool"),
    ("crepa_block_index", 8.0, TypeError, "crepa_block_index must be of type int"),
    ("crepa_block_index", True, TypeError, "crepa_block_index must be of type int, got bool"),
    ("crepa_block_index", -1, ValueError, "crepa_block_index must be ≥ 0"),
    ("crepa_lambda", "0.5", TypeError, "crepa_lambda must be of type float, got str"),
    ("crepa_lambda", -0.1, ValueError, "crepa_lambda must be ≥ 0"),
    ("crepa_lambda", float("inf"), ValueError, "crepa_lambda must be finite"),
    ("crepa_model", 3, TypeError, "crepa_model must be of type str"),
    ("crepa_encoder_image_size", 0, ValueError, "crepa_encoder_image_size must be > 0"),
    ("crepa_encoder_aspect", "wide", ValueError, r"crepa_encoder_aspect must be one of \['square', 'preserve'\]"),
    ("crepa_projector", "conv", ValueError, "crepa_projector must be one of"),
    ("crepa_projector_dim", 0, ValueError, "crepa_projector_dim must be > 0"),
    ("crepa_scheduler", "step", ValueError, "crepa_scheduler must be one of"),
    ("crepa_warmup_steps", -5, ValueError, "crepa_warmup_steps must be ≥ 0"),
    ("crepa_decay_steps", -1, ValueError, "crepa_decay_steps must be ≥ 0"),
    ("crepa_lambda_end", -1.0, ValueError, "crepa_lambda_end must be ≥ 0"),
    ("crepa_power", 0.0, ValueError, "crepa_power must be > 0"),
    ("crepa_cutoff_step", -2, ValueError, "crepa_cutoff_step must be ≥ 0"),
    ("crepa_similarity_threshold", 1.5, ValueError, r"crepa_similarity_threshold must be in \[-1, 1\]"),
    ("crepa_similarity_ema_decay", 1.01, ValueError, r"crepa_similarity_ema_decay must be in \[0, 1\]"),
    ("crepa_threshold_mode", "temporary", ValueError, "crepa_threshold_mode must be one of"),
    ("urepa_manifold_weight", -3.0, ValueError, "urepa_manifold_weight must be ≥ 0"),
    ("urepa_align", "max", ValueError, "urepa_align must be one of"),
    ("urepa_feature_cache", 5, TypeError, "urepa_feature_cache must be of type str"),
])
def test_bad_values_name_the_key(key, value, error, message):
    with pytest.raises(error, match=message):
        load_config({key: value})


def test_dataclasses_validate_direct_construction():
    with pytest.raises(ValueError, match="urepa_lambda must be ≥ 0"):
        URepaConfig(lambda_=-1.0)
    with pytest.raises(ValueError, match="crepa_lambda must be set"):
        RepaConfig(lambda_=None)


def test_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_config(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        load_config(bad)
    with pytest.raises(TypeError, match="config must be a dict, an argparse Namespace or a path"):
        load_config(42)
    with pytest.raises(IsADirectoryError, match="is a directory: pass the JSON or TOML file in it"):
        load_config(tmp_path)
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("crepa_enabled = = true")
    with pytest.raises(ValueError, match="is not valid TOML"):
        load_config(bad_toml)


@pytest.mark.parametrize("key, spelled", [("crepa-lambda", "crepa_lambda"), ("CREPA_lambda", "crepa_lambda"),
                                          ("--Urepa-Manifold-Weight", "urepa_manifold_weight")])
def test_dashed_or_capitalised_keys_are_errors(key, spelled):
    with pytest.raises(ValueError, match=f"config key '{key}' is spelled '{spelled}' here"):
        load_config({key: 1.0})


def test_namespace_is_a_config_source():
    args = argparse.Namespace(urepa_enabled=True, urepa_lambda=None, urepa_align="y", learning_rate=1e-4)
    cfg = load_config(args)
    assert cfg.urepa.enabled and cfg.urepa.align == "y" and cfg.urepa.lambda_ == 0.5  # None = unset


def test_argparse_round_trip():
    parser = argparse.ArgumentParser()
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    add_config_arguments(parser)
    argv = []
    for key, value in CHANGED.items():
        argv += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    args = parser.parse_args(argv)
    assert config_from_args(args) == load_config(CHANGED)
    # Nothing given: every default, and the namespace still has every attribute a trainer may read.
    args = parser.parse_args([])
    assert args.crepa_lambda is None and config_from_args(args) == load_config({})
    # Bare boolean flags, the legacy alias, a threshold turned back off.
    args = parser.parse_args(["--urepa_enabled", "--crepa_encoder", "dinov2_vits14",
                              "--crepa_similarity_threshold", "none", "--crepa_spatial_align", "false"])
    cfg = config_from_args(args)
    assert cfg.urepa.enabled and cfg.repa.model == "dinov2_vits14" and cfg.repa.similarity_threshold is None
    assert cfg.repa.spatial_align is False


def test_argparse_flags_over_a_base(tmp_path):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    base = {"--crepa_enabled": True, "crepa_encoder": "dinov2_vits14", "crepa_block_index": 3, "lr": 1.0}
    cfg = config_from_args(parser.parse_args(["--crepa_block_index", "0", "--crepa_model", "dinov2_vitb14"]), base)
    assert cfg.repa.enabled and cfg.repa.block_index == 0 and cfg.repa.model == "dinov2_vitb14"
    path = tmp_path / "c.json"
    path.write_text(json.dumps(base))
    assert config_from_args(parser.parse_args([]), path).repa.block_index == 3


def test_argparse_rejects_bad_values(capsys):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    for argv in (["--crepa_enabled", "maybe"], ["--crepa_scheduler", "step"], ["--crepa_block_index", "x"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
    with pytest.raises(ValueError, match="crepa_lambda must be ≥ 0"):
        config_from_args(parser.parse_args(["--crepa_lambda", "-1"]))


def test_key_table_lists_every_field():
    table = key_table()
    for cls in (RepaConfig, URepaConfig):
        for f in dataclasses.fields(cls):
            key = f.name if f.metadata["shared"] else f"{cls.PREFIX}{f.name.rstrip('_')}"  # irepa_*: unprefixed
            assert f"`{key}`" in table
    assert "crepa_encoder" in known_keys() and "crepa_adjacent_distance" in known_keys()
    assert isinstance(load_config({}), Config)
