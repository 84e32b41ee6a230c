"""tp-engine: tensor-parallel inference (and fine-tuning) of Hugging Face models."""
import os as _os
import sys as _sys

if "torch" not in _sys.modules:
    # GNU OpenMP's threads (torch's) spin after every parallel op by default, on the cores the
    # kernels' own thread pool needs for the next matmul (kernels/pool.c): with 2 threads a
    # decode ran 4-6x slower. Read once when torch loads, so only before it; a user's own
    # OMP_WAIT_POLICY wins. The launcher sets the same in every rank it starts (spawn.py).
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from .api import from_pretrained, parallelize, resolve_spec  # noqa: E402 - after the OpenMP setting above
from .distributed import Runtime, current, init, launch, shutdown  # noqa: E402
from .generation import generate  # noqa: E402
from .loading import default_model_path  # noqa: E402
from .parallelize import synchronize_rng  # noqa: E402
from .plan import ModelDims, ModelPlan, RankPlan, plan_model  # noqa: E402

__all__ = [
    "ModelDims",
    "ModelPlan",
    "RankPlan",
    "Runtime",
    "current",
    "default_model_path",
    "from_pretrained",
    "generate",
    "init",
    "launch",
    "parallelize",
    "plan_model",
    "resolve_spec",
    "shutdown",
    "synchronize_rng",
]
__version__ = "0.1.0"
