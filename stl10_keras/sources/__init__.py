"""Datasets as a registry: one module per dataset, each registering a `Source`.

Importing this package imports every dataset module, so the registry is
complete: `names()` lists the datasets, `get(name)` returns one. To add a
dataset, write `sources/NAME.py` with a `@register`ed `Source` subclass (see
`base.Source`) and import it here; nothing else changes. `images` is a
helper (decode, convert, resize), not a dataset.
"""

from stl10_keras.sources.base import (
    Source,
    Splits,
    get,
    help_text,
    names,
    register,
    unregister,
)

# Registration order is `names()` order: the `--dataset` choices and help.
from stl10_keras.sources import stl10, digits, fashion_mnist, folder  # noqa: E402,F401

__all__ = ["Source", "Splits", "get", "help_text", "names", "register", "unregister"]
