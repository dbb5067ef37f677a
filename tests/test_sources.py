"""The dataset registry: every source has the whole interface, a new source is
accepted everywhere by registering it, and `source_files` lists exactly the
files a load opens (observed with an audit hook, not taken from the code)."""

import inspect
import sys
from pathlib import Path

import numpy as np
import pytest

from stl10_keras import ablation, config, data, sources
from stl10_keras.cli import build_train_parser, config_from_args
from stl10_keras.errors import ConfigError, DataUnavailableError
from stl10_keras.sources import Source, register, unregister
from stl10_keras.sources import fashion_mnist as fm
from stl10_keras.sources.base import array_batches, finish_splits
from test_data import _write_stl10
from test_fashion_mnist import write_fashion_mnist
from test_folder import write_folder

# The interface: what `data`, `config`, `cli` and `ablation` call on a source.
METHODS = ("load", "source_files", "default_val_per_class", "apply_preset",
           "validate", "check_flags", "configure")
ATTRIBUTES = {"name": str, "help": str, "lab_reference": bool,
              "takes_labeled_per_class": bool}
BUILT_IN = ("stl10", "digits", "fashion_mnist", "folder")


# --- the interface --------------------------------------------------------------

@pytest.mark.parametrize("name", BUILT_IN)
def test_every_registered_source_has_the_whole_interface(name):
    assert name in sources.names()
    source = sources.get(name)
    assert isinstance(source, Source) and source.name == name
    assert not type(source).__abstractmethods__
    for attribute, kind in ATTRIBUTES.items():
        assert isinstance(getattr(source, attribute), kind), attribute
    assert source.help.strip()
    for method in METHODS:
        got = inspect.signature(getattr(type(source), method))
        want = inspect.signature(getattr(Source, method))
        assert list(got.parameters) == list(want.parameters), (name, method)


def test_only_stl10_carries_the_labs_reference_numbers():
    # The lab's Table 1 (71.4 / 80.9 / 83.9 / 84.4 %) was measured on STL-10.
    assert [n for n in sources.names() if sources.get(n).lab_reference] == ["stl10"]
    assert ablation.lab_reference("stl10") and not ablation.lab_reference("digits")


def test_the_mandatory_methods_are_abstract():
    assert Source.__abstractmethods__ == {"load", "source_files",
                                          "default_val_per_class"}


@pytest.mark.parametrize("missing", sorted(Source.__abstractmethods__))
def test_a_source_missing_a_method_cannot_be_registered(missing):
    body = {"name": "incomplete", "help": "lacks a method"}
    body.update({m: (lambda self, *a: None) for m in Source.__abstractmethods__
                 if m != missing})
    incomplete = type("Incomplete", (Source,), body)
    with pytest.raises(TypeError, match=missing):
        incomplete()
    with pytest.raises(TypeError, match=missing):
        register(incomplete)
    assert "incomplete" not in sources.names()


def test_a_taken_name_is_refused():
    with pytest.raises(ValueError, match="digits"):
        register(type("Digits2", (type(sources.get("digits")),), {}))
    assert sources.names().count("digits") == 1


def test_an_unknown_dataset_is_one_sentence_listing_the_registered_names():
    with pytest.raises(DataUnavailableError) as info:
        data.load_splits("nope")
    assert str(info.value) == ("Unknown dataset 'nope'; use stl10, digits, "
                               "fashion_mnist or folder.")
    with pytest.raises(ConfigError) as info:
        config.preset("default", "nope")
    assert str(info.value) == ("Unknown dataset 'nope'; choose one of stl10, "
                               "digits, fashion_mnist, folder.")
    with pytest.raises(SystemExit):  # argparse's choices: exit 2
        build_train_parser().parse_args(["--dataset", "nope"])


# --- a new source, registered in the test -----------------------------------------

TOY_CLASSES = ("a", "b", "c")


def toy_images():
    """10 images per class, 8x8x1; pixel (0, 0) is the label, (0, 1) the index."""
    y = np.repeat(np.arange(len(TOY_CLASSES)), 10).astype(np.int32)
    x = np.full((len(y), 8, 8, 1), 50, np.uint8)
    x[:, 0, 0, 0] = y
    x[:, 0, 1, 0] = np.arange(len(y))
    return x, y


class Toy(Source):
    """A dataset in memory, defined in a test and nowhere else."""

    name = "toy_for_tests"
    help = "three classes of planted 8x8 images (a test's)"

    def load(self, data_config, seed):
        x, y = toy_images()
        return finish_splits(self.name, TOY_CLASSES, x, y, x[::5], y[::5],
                             array_batches(x), len(x), "memory",
                             data_config.val_per_class, seed)

    def source_files(self, data_dir):
        return []

    def default_val_per_class(self, labeled_per_class):
        return 2

    def apply_preset(self, config):
        config.augment.flip = False
        config.kmeans.num_images = 30

    def check_flags(self, config, data_dir_given):
        if data_dir_given:
            raise ConfigError("--data-dir is not used by the toy; drop it.")

    def configure(self, config):
        config.model.num_classes = len(TOY_CLASSES)


@pytest.fixture
def toy():
    register(Toy)
    try:
        yield sources.get(Toy.name)
    finally:
        unregister(Toy.name)
    assert Toy.name not in sources.names()


def test_a_registered_source_loads_through_data(toy):
    s = data.load_splits(Toy.name, seed=3)
    x, y = toy_images()
    assert s.name == Toy.name and s.class_names == TOY_CLASSES
    assert s.image_shape == (8, 8, 1)
    # Its default of 2 validation images per class, drawn from its 30.
    assert len(s.y_val) == 6 and np.bincount(s.y_val).tolist() == [2, 2, 2]
    assert len(s.y_train) == 24
    # Each image keeps its planted label.
    for images, labels in ((s.x_train, s.y_train), (s.x_val, s.y_val)):
        np.testing.assert_array_equal(images[:, 0, 0, 0], labels)
    assert data.default_val_per_class(Toy.name) == 2
    assert data.source_files(Toy.name, None) == []
    assert data.source_files_signature(Toy.name, None) is None
    resized = data.load_splits(Toy.name, image_size=(4, 4), channels=3)
    assert resized.image_shape == (4, 4, 3)


def test_a_registered_source_has_presets_and_config_files(toy, tmp_path):
    c = config.preset("default", Toy.name)
    assert c.data.dataset == Toy.name
    assert c.augment.flip is False and c.kmeans.num_images == 30  # its tweaks
    assert config.preset("default", "stl10").augment.flip is True
    assert config.preset("smoke", Toy.name).kmeans.num_images == 64  # smoke's wins
    path = tmp_path / "config.json"
    path.write_text(c.to_json())
    assert config.Config.from_file(path) == c
    c.data.labeled_per_class = 5  # the default: only fashion_mnist takes it
    with pytest.raises(ConfigError, match="fashion_mnist only"):
        config.validate(c)


def test_a_registered_source_is_a_dataset_flag(toy):
    parser = build_train_parser()
    assert f"{Toy.name}: {Toy.help}" in " ".join(parser.format_help().split())
    c = config_from_args(parser.parse_args(["--dataset", Toy.name,
                                            "--preset", "smoke"]))
    assert c.data.dataset == Toy.name and c.augment.flip is False
    assert c.model.num_classes == len(TOY_CLASSES)  # its `configure`
    with pytest.raises(ConfigError, match="not used by the toy"):
        config_from_args(parser.parse_args(["--dataset", Toy.name,
                                            "--data-dir", "somewhere"]))


# --- source_files: the files a load opens -----------------------------------------

_opened: list[str] | None = None


def _record_open(event, args):
    if _opened is not None and event == "open" and isinstance(args[0], (str, Path)):
        _opened.append(str(args[0]))


sys.addaudithook(_record_open)  # stays for the process; idle unless recording


def opened_during(load, under: Path) -> set[Path]:
    """The files under `under` that `load()` opens (Python's `open` audit event:
    builtins.open, numpy's fromfile and memmap, Pillow, gzip)."""
    global _opened
    _opened = []
    try:
        load()
    finally:
        paths, _opened = _opened, None
    under = under.resolve()
    return {p for p in map(lambda s: Path(s).resolve(), paths)
            if p.is_relative_to(under)}


def load_everything(dataset, data_dir, **kwargs):
    """Load every split, the unlabeled stream to its end."""
    s = data.load_splits(dataset, data_dir, **kwargs)
    for _ in s.unlabeled_batches(4):
        pass


def test_stl10_source_files_are_the_files_it_reads(tmp_path):
    _write_stl10(tmp_path / "stl10_binary")
    written = {p.resolve() for p in (tmp_path / "stl10_binary").iterdir()}
    opened = opened_during(lambda: load_everything("stl10", str(tmp_path),
                                                   val_per_class=1), tmp_path)
    listed = data.source_files("stl10", str(tmp_path))
    assert listed == sorted(listed)
    assert opened == {p.resolve() for p in listed} == written
    assert data.source_files("stl10", None) == []  # tensorflow-datasets' copy


@pytest.mark.parametrize("where", ["data_dir", "debian"])
def test_fashion_mnist_source_files_are_the_files_it_reads(tmp_path, monkeypatch,
                                                           where):
    folder = tmp_path / where
    write_fashion_mnist(folder)
    monkeypatch.setattr(fm, "DEBIAN_DIR", folder if where == "debian"
                        else tmp_path / "absent")
    data_dir = str(folder) if where == "data_dir" else None
    written = {p.resolve() for p in folder.iterdir()}
    assert len(written) == 4
    opened = opened_during(lambda: load_everything("fashion_mnist", data_dir,
                                                   labeled_per_class=5), tmp_path)
    listed = data.source_files("fashion_mnist", data_dir)
    assert listed == sorted(listed)
    assert opened == {p.resolve() for p in listed} == written


def test_folder_source_files_are_the_files_it_reads(tmp_path):
    write_folder(tmp_path, per_class=5, test_per_class=2, unlabeled=5)
    written = {p.resolve() for p in tmp_path.rglob("*") if p.is_file()}
    assert len(written) == 3 * 5 + 3 * 2 + 5
    opened = opened_during(lambda: load_everything("folder", str(tmp_path)),
                           tmp_path)
    listed = data.source_files("folder", str(tmp_path))
    assert listed == sorted(listed)
    assert opened == {p.resolve() for p in listed} == written


def test_digits_reads_no_file_of_the_users(tmp_path):
    (tmp_path / "stray.bin").write_bytes(b"x")
    opened = opened_during(lambda: load_everything("digits", None), tmp_path)
    assert opened == set()
    assert data.source_files("digits", None) == []
    assert data.source_files("digits", str(tmp_path)) == []
