"""`python -m stl10_keras.serving` (the same as `python -m stl10_keras.serve`)."""

import sys

from stl10_keras.serving.cli import main

if __name__ == "__main__":
    sys.exit(main())
