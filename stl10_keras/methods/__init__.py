"""Training methods as plug-ins: one module each, found by `base.names()`.

`none` trains on the labeled images alone; the others also learn from the
unlabeled images (docs/semi-supervised.md). See `base.Method` for what a
method module provides.
"""

from stl10_keras.methods.base import (Method, get, names, register, sections,
                                      unregister)

__all__ = ["Method", "get", "names", "register", "sections", "unregister"]
