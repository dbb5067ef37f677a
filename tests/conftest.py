import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

ROOT = Path(__file__).resolve().parents[1]

# XLA's CPU compiler spends most of a tiny JAX run optimising (12 s of 17 s
# before the first step, mostly compiling the random initialisers);
# unoptimised code computes the same values. For JAX subprocesses in tests.
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
sys.path.insert(0, str(ROOT))


def subprocess_env(**extra):
    """Environment for running `python -m stl10_keras...` from the repo root.

    Without the TF_CPP_MIN_LOG_LEVEL set above: a command runs with its own
    default, as it does for a user (pass it in `extra` to set one).
    """
    env = dict(os.environ)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env
