"""Architecture specs, looked up by ``config.model_type``."""
from __future__ import annotations

from typing import Any

from .llama import SPECS as _LLAMA_SPECS
from .spec import ArchSpec

SPECS: dict[str, ArchSpec] = {**_LLAMA_SPECS}


def supported_model_types() -> list[str]:
    return sorted(SPECS)


def spec_for(config: Any) -> ArchSpec:
    """The spec for a model config, or a ValueError naming what is supported."""
    model_type = getattr(config, "model_type", None)
    spec = SPECS.get(model_type)
    if spec is None:
        raise ValueError(
            f"unsupported architecture {model_type!r}: tp-engine has specs for "
            f"{', '.join(supported_model_types())}"
        )
    return spec
