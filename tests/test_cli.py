"""The flags generated from the config's field metadata, and how commands start.

The reference for the flags is the dataclass fields themselves: each field
with a flag must get exactly one, whose value lands in that field and whose
help is the field's help text; a field without one gets none.
"""
import dataclasses
import subprocess
import sys
import typing

import pytest

from conftest import ROOT, subprocess_env
from stl10_keras import config as cfg
from stl10_keras.cli import apply_flags, build_train_parser


def flagged_fields():
    """`(index of the section in cfg.section_classes(), field, annotation)`."""
    for index, cls in enumerate(cfg.section_classes()):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.metadata.get("flag"):
                yield index, f, hints[f.name]


def another_value(f, annotation):
    """A value other than the field's default, and the text that gives it."""
    choices = f.metadata["argparse"].get("choices")
    choices = choices() if callable(choices) else choices
    if choices:
        value = next(c for c in choices if c != f.default)
        return [str(value)], value
    if annotation is bool:
        return [], not f.default
    kind = annotation
    if type(None) in typing.get_args(annotation):  # X | None
        kind = next(k for k in typing.get_args(annotation) if k is not type(None))
    if f.metadata["argparse"].get("also"):
        return ["1.125,1.25"], (1.125, 1.25)
    if typing.get_origin(kind) is tuple:
        return ["3,5"], (3, 5)
    if kind is int:
        return [str((f.default or 0) + 3)], (f.default or 0) + 3
    if kind is float:
        return ["0.375"], 0.375
    return ["some/where"], "some/where"


@pytest.mark.parametrize("index, f, annotation", list(flagged_fields()),
                         ids=lambda x: getattr(x, "name", str(x)))
def test_each_flag_sets_its_own_field_and_no_other(index, f, annotation):
    parser = build_train_parser()
    text, value = another_value(f, annotation)
    flag = f.metadata["flag"]
    if f.metadata["argparse"].get("negatable") and f.default:
        flag = "--no-" + flag.removeprefix("--")
    args = parser.parse_args([flag, *text])
    config = cfg.Config()
    before = [dataclasses.asdict(p) for p in cfg.section_parts(config)]
    apply_flags(config, args)
    after = [dataclasses.asdict(p) for p in cfg.section_parts(config)]
    also = f.metadata["argparse"].get("also")
    if also:
        assert (after[index][f.name], after[index][also]) == value
    else:
        assert after[index][f.name] == value
    changed = {(i, k) for i, part in enumerate(after) for k in part
               if part[k] != before[i][k]}
    assert changed == {(index, f.name)} | ({(index, also)} if also else set())


def test_every_flagged_field_has_one_flag_with_its_help_and_others_none():
    actions = {o: a for a in build_train_parser()._actions for o in a.option_strings}
    for cls in cfg.section_classes():
        for f in dataclasses.fields(cls):
            flag = f.metadata.get("flag")
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
            text = f.metadata["help"]
            if flag:
                assert actions[flag].help == (text() if callable(text) else text)
    flags = [f.metadata["flag"] for _, f, _ in flagged_fields()]
    assert len(flags) == len(set(flags))


def test_a_negatable_switch_gives_both_forms():
    parser = build_train_parser()
    config = cfg.Config()
    apply_flags(config, parser.parse_args(["--no-augment"]))
    assert config.augment.enabled is False
    apply_flags(config, parser.parse_args(["--augment"]))
    assert config.augment.enabled is True


def test_the_train_command_loads_each_module_once():
    # Run as `python -m stl10_keras.train` runs it, up to a config error (after
    # the training module is imported): no source file may be loaded twice
    # (a module run as __main__ and imported again under its name would be).
    script = """
import runpy, sys
sys.argv = ["stl10_keras.train", "--dataset", "digits", "--epochs", "0"]
try:
    runpy.run_module("stl10_keras.train", run_name="__main__", alter_sys=True)
except SystemExit as e:
    assert e.code == 2, e.code
files = [getattr(m, "__file__", None) for m in list(sys.modules.values())]
files = [f for f in files if f and "stl10_keras" in f]
assert any(f.endswith("train/__init__.py") for f in files), files
twice = sorted({f for f in files if files.count(f) > 1})
print("TWICE", twice)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "TWICE []" in proc.stdout, proc.stdout
