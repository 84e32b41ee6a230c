"""tp-engine: tensor-parallel inference (and fine-tuning) of Hugging Face models."""
from .api import from_pretrained, parallelize, resolve_spec
from .distributed import Runtime, current, init, launch, shutdown
from .generation import generate
from .loading import default_model_path
from .parallelize import synchronize_rng
from .plan import ModelDims, ModelPlan, RankPlan, plan_model

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
