"""Architecture specs: the schema (``spec.py``), one registry entry per
``config.model_type`` (``registry.py``; the families' modules declare them),
and the auto-planner for model types without one (``auto.py``).

Nothing here chooses between a declared and an inferred spec or runs a
parity check: that is ``tp_engine.api.resolve_spec``, one layer up.
"""
from .family import CheckpointLayout, ExpertStack, Family
from .registry import REGISTRY, checkpoint_layout, declared_spec, lookup, spec_for, supported_model_types
from .spec import ArchSpec

__all__ = [
    "REGISTRY",
    "ArchSpec",
    "CheckpointLayout",
    "ExpertStack",
    "Family",
    "checkpoint_layout",
    "declared_spec",
    "lookup",
    "spec_for",
    "supported_model_types",
]
