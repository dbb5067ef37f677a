"""`python -m stl10_keras.train`: the command line is `stl10_keras.cli.main`.

A package's `__main__`, so that the training module is imported once, as
`stl10_keras.train`, rather than a second time as `__main__`.
"""

import sys

from stl10_keras.cli import main

sys.exit(main())
