"""Training methods as plug-ins: the registry, warm starts, and each method from
the command line (train, resume, export, --init-from).

The method-specific references (numpy losses, masks and selections) are in
test_fixmatch.py, test_freematch.py and test_self_training.py.
"""
import dataclasses
import json
import subprocess
import sys
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest

from conftest import ROOT, assert_same_run, saved_model_vs_keras, subprocess_env
from stl10_keras import config as cfg
from stl10_keras import methods
from stl10_keras.config import Config, ConfigError, preset
from stl10_keras.flags import option

UNLABELED_METHODS = ("fixmatch", "freematch", "self_training")


def test_the_registry_holds_the_supervised_and_three_unlabeled_methods():
    assert methods.names()[0] == "none"
    assert set(UNLABELED_METHODS) <= set(methods.names())
    assert cfg.all_variants() == cfg.VARIANTS + tuple(
        n for n in methods.names() if n != "none")


@pytest.mark.parametrize("name", methods.names())
def test_every_registered_method_implements_the_interface(name):
    cls = methods.get(name)
    assert cls.name == name and cls.summary
    for hook in ("training_model", "batches"):
        assert getattr(cls, hook) is not getattr(methods.Method, hook), hook
    if cls.section is not None:
        assert dataclasses.is_dataclass(cls.section) and cls.section.flag_group
        for f in dataclasses.fields(cls.section):
            assert f.metadata.get("help"), f"{name}.{f.name} has no help"
        assert isinstance(preset("smoke", "digits").methods[name], cls.section)
    assert cls.base_variant in cfg.VARIANTS


def test_an_unknown_method_is_one_sentence_naming_the_known_ones():
    with pytest.raises(ConfigError, match="--semi-supervised must be one of none"):
        methods.get("mixmatch")


@dataclass
class ToyConfig:
    flag_group: ClassVar[str] = "toy"
    strength: float = option(0.5, "how much", "--toy-strength")


@pytest.fixture
def toy_method():
    @methods.register
    class Toy(methods.Method):
        name = "toy"
        summary = "a method defined in a test"
        section = ToyConfig
        base_variant = "baseline"

        def training_model(self, model, splits):
            return model

        def batches(self, splits, epochs, dist):
            return None

    yield Toy
    methods.unregister("toy")


def test_one_module_registering_a_method_is_all_it_takes(toy_method):
    from stl10_keras.ablation import parse_variants
    from stl10_keras.cli import build_train_parser, config_from_args

    args = build_train_parser().parse_args(
        ["--dataset", "digits", "--variant", "toy", "--toy-strength", "0.25"])
    config = config_from_args(args)
    assert config.semi_supervised.method == "toy"
    assert config.methods["toy"].strength == 0.25
    assert config.augment.enabled is False and config.kmeans.stages == ()
    assert Config.from_json(config.to_json()) == config
    assert "toy" in parse_variants("all")


def test_a_config_json_from_before_method_sections_loads_the_same():
    # FixMatch's settings were fields of semi_supervised; such a config.json
    # must load to the same config and compare equal to today's.
    config = preset("smoke", "digits", "fixmatch")
    old = json.loads(config.to_json())
    old["semi_supervised"].update(old.pop("methods")["fixmatch"])
    del old["semi_supervised"]["init_from"]
    assert Config.from_dict(old) == config
    assert cfg.with_later_sections(old, config) == json.loads(config.to_json())


def test_init_from_copies_a_runs_weights_and_refuses_another_network(tmp_path):
    import keras

    from stl10_keras.model import build_model
    from stl10_keras.train import _init_from

    config = preset("smoke", "digits", "baseline")
    source = build_model(config, (32, 32, 3))
    source.save(tmp_path / "model.keras")
    keras.utils.set_random_seed(1)
    target = build_model(config, (32, 32, 3))
    assert not np.allclose(target.get_weights()[0], source.get_weights()[0])
    _init_from(str(tmp_path), target, verbose=0)
    for got, want in zip(target.get_weights(), source.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)
    config.model.widths = (4, 4, 4, 4, 4)
    with pytest.raises(ConfigError, match="network differs"):
        _init_from(str(tmp_path), build_model(config, (32, 32, 3)), verbose=0)
    with pytest.raises(ConfigError, match="holds no model.keras"):
        _init_from(str(tmp_path / "nowhere"), target, verbose=0)


def _cli(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "stl10_keras.train", *args],
                          cwd=ROOT, env=subprocess_env(), capture_output=True,
                          text=True, timeout=timeout)


TINY = ["--dataset", "digits", "--preset", "smoke", "--batch-size", "40",
        "--widths", "4,8", "--fc-units", "16", "--verbose", "0"]
METHOD_FLAGS = {"freematch": ["--epochs", "3"],
                "self_training": ["--epochs", "2", "--student-epochs", "3"]}


@pytest.fixture(scope="module")
def start_run(tmp_path_factory):
    """A finished supervised run every method below starts from."""
    run = tmp_path_factory.mktemp("start") / "run"
    proc = _cli(*TINY, "--variant", "baseline", "--epochs", "1", "--no-export",
                "--run-dir", str(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


@pytest.mark.e2e
@pytest.mark.parametrize("method", sorted(METHOD_FLAGS))
def test_a_method_trains_resumes_and_exports_from_the_cli_with_init_from(
        method, start_run, tmp_path):
    from test_train import _kill_after_epochs

    args = [*TINY, *METHOD_FLAGS[method], "--variant", method,
            "--init-from", str(start_run)]
    run, export = tmp_path / "run", tmp_path / "export"
    proc = _cli(*args, "--run-dir", str(run), "--export-dir", str(export))
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = json.loads((run / "metrics.json").read_text())
    assert want["semi_supervised"] == method and want["epochs"] == 3
    diff, accuracy = saved_model_vs_keras(export / "1", run / "model.keras")
    assert diff < 1e-5
    assert accuracy == pytest.approx(want["val_accuracy"], abs=1e-9)
    # Killed after 2 of its 3 epochs, then rerun: the same run.
    resumed = tmp_path / "resumed"
    _kill_after_epochs([*args, "--no-export", "--run-dir", str(resumed)],
                       resumed / "history.csv", 2)
    proc = _cli(*args, "--no-export", "--run-dir", str(resumed))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((resumed / "metrics.json").read_text())
    assert got["resumed"] is True
    assert_same_run(got, want)
