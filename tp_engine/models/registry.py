"""The registry: one ``Family`` entry per ``config.model_type``.

Every per-family table lives here, once: the declared spec and the
checkpoint layout of each model type (``models/family.py``). A model type
without an entry may still be sharded by an inferred spec
(``models/auto.py``), which ``tp_engine.api.resolve_spec`` uses only after
its parity guard passes.
"""
from __future__ import annotations

from typing import Any

from . import bert, bloom, falcon, gpt2, gpt_neox, gptj, llama, moe, opt, phi3
from .family import CheckpointLayout, Family
from .spec import ArchSpec

__all__ = ["REGISTRY", "checkpoint_layout", "declared_spec", "lookup", "spec_for", "supported_model_types"]


def _gather(*modules: Any) -> dict[str, Family]:
    registry: dict[str, Family] = {}
    for module in modules:
        for model_type, entry in module.FAMILIES.items():
            if model_type in registry:
                raise ValueError(f"model type {model_type!r} is registered twice ({module.__name__})")
            registry[model_type] = entry
    return registry


REGISTRY: dict[str, Family] = _gather(llama, gpt2, gpt_neox, phi3, falcon, gptj, bloom, opt, bert, moe)


def supported_model_types() -> list[str]:
    """The model types with a declared spec, sorted."""
    return sorted(REGISTRY)


def lookup(model_type: str | None) -> Family | None:
    """The registry entry for ``model_type``, or None."""
    return REGISTRY.get(model_type) if model_type is not None else None


def declared_spec(config: Any) -> ArchSpec | None:
    """The declared spec for a model config, or None when its family has none."""
    entry = lookup(getattr(config, "model_type", None))
    return entry.spec if entry is not None else None


def spec_for(config: Any) -> ArchSpec:
    """The declared spec for a model config, or a ValueError naming what is supported."""
    spec = declared_spec(config)
    if spec is None:
        raise ValueError(
            f"unsupported architecture {getattr(config, 'model_type', None)!r}: tp-engine has specs for "
            f"{', '.join(supported_model_types())}"
        )
    return spec


def checkpoint_layout(model_type: str | None) -> CheckpointLayout:
    """How ``model_type``'s checkpoints name their tensors (no renames for an unregistered type)."""
    entry = lookup(model_type)
    return entry.checkpoint if entry is not None else CheckpointLayout()
