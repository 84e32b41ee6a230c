"""Architecture specs, looked up by ``config.model_type``.

``resolve_spec`` is the one entry point ``parallelize`` uses: a declared spec
when the family has one, else a plan inferred from the module structure
(``models/auto.py``), which must then pass a parity check on a tiny random
copy of the same architecture before it is used (``tp_engine/check.py``).
"""
from __future__ import annotations

from typing import Any, Sequence

from .bert import SPECS as _BERT_SPECS
from .bloom import SPECS as _BLOOM_SPECS
from .falcon import SPECS as _FALCON_SPECS
from .gpt2 import SPECS as _GPT2_SPECS
from .gpt_neox import SPECS as _GPT_NEOX_SPECS
from .gptj import SPECS as _GPTJ_SPECS
from .llama import SPECS as _LLAMA_SPECS
from .moe import SPECS as _MOE_SPECS
from .opt import SPECS as _OPT_SPECS
from .phi3 import SPECS as _PHI3_SPECS
from .spec import ArchSpec

SPECS: dict[str, ArchSpec] = {
    **_LLAMA_SPECS,
    **_GPT2_SPECS,
    **_GPT_NEOX_SPECS,
    **_PHI3_SPECS,
    **_FALCON_SPECS,
    **_GPTJ_SPECS,
    **_BLOOM_SPECS,
    **_OPT_SPECS,
    **_BERT_SPECS,
    **_MOE_SPECS,
}


def supported_model_types() -> list[str]:
    return sorted(SPECS)


def spec_for(config: Any) -> ArchSpec:
    """The declared spec for a model config, or a ValueError naming what is supported."""
    model_type = getattr(config, "model_type", None)
    spec = SPECS.get(model_type)
    if spec is None:
        raise ValueError(
            f"unsupported architecture {model_type!r}: tp-engine has specs for "
            f"{', '.join(supported_model_types())}"
        )
    return spec


def resolve_spec(model: Any, world_size: int, shares: Sequence[float] | None = None) -> ArchSpec:
    """The spec ``parallelize`` uses for ``model``: declared, or inferred and parity-checked.

    Raises ValueError (with the reason) when the model has no declared spec
    and no safe inferred one.
    """
    spec = SPECS.get(getattr(model.config, "model_type", None))
    if spec is not None:
        return spec
    try:
        from .auto import infer_spec
    except ImportError:  # auto-planner not available: only declared specs
        return spec_for(model.config)
    spec = infer_spec(model)  # raises ValueError naming why inference is unsafe
    from ..check import guard_auto_spec

    guard_auto_spec(model, spec, world_size, shares)  # raises ValueError if parity fails
    return spec
