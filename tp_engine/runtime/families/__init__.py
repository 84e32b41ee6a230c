"""Family builders, one table keyed by ``config.model_type``.

Each builder turns a (sharded or not) Hugging Face model of its family into
the runtime's blocks (:mod:`tp_engine.runtime.blocks`).
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from ..build import BuildContext, Parts, RuntimeUnsupported
from . import bloom, falcon, gpt2, gpt_neox, gptj, llama, moe, olmo2, opt, phi3

Builder = Callable[[nn.Module, BuildContext], Parts]

BUILDERS: dict[str, Builder] = {
    **llama.BUILDERS,
    **gpt_neox.BUILDERS,
    **phi3.BUILDERS,
    **falcon.BUILDERS,
    **moe.BUILDERS,
    **gpt2.BUILDERS,
    **opt.BUILDERS,
    **bloom.BUILDERS,
    **gptj.BUILDERS,
    **olmo2.BUILDERS,
}


def builder_for(model: nn.Module) -> Builder:
    """The family's builder; for an architecture without one that is laid out like Llama module
    for module, the Llama builder (callers must prove it first: see :func:`is_declared`)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    builder = BUILDERS.get(model_type)
    if builder is not None:
        return builder
    if llama.matches_layout(model):
        return llama.build
    raise RuntimeUnsupported(
        f"model_type {model_type!r} has no runtime blocks and is not laid out like Llama "
        f"(runtime families: {', '.join(sorted(BUILDERS))})"
    )


def is_declared(model: nn.Module) -> bool:
    """Whether the model's family has its own builder (proven by the test suite), rather than the
    Llama blocks chosen by module layout (which ``generate`` proves on a tiny copy first)."""
    return getattr(getattr(model, "config", None), "model_type", None) in BUILDERS
