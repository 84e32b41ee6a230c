"""A registry entry: everything tp-engine knows about one ``config.model_type``.

``Family`` holds the architecture spec (how the model is sharded) and how
the family's checkpoints name their tensors (``CheckpointLayout``: renames
and per-expert stacks). GGUF tensor names need no entry: they come from the
``gguf`` package's table for the file's own architecture
(``gguf_loading._name_map``).
"""
from __future__ import annotations

from dataclasses import dataclass

from .spec import ArchSpec

__all__ = ["CheckpointLayout", "ExpertStack", "Family"]


@dataclass(frozen=True)
class ExpertStack:
    """A fused (experts, rows, cols) parameter stored as per-expert 2-D tensors.

    ``target`` is the parameter's name suffix (``"experts.gate_up_proj"``);
    ``parts`` are the per-expert tensor names replacing that suffix, with
    ``{e}`` for the expert index. Expert e's (rows, cols) slice is its parts
    stacked along their dim 0, in order, each part holding rows/len(parts)
    rows: transformers' ``MergeModulelist(dim=0)`` then ``Concatenate(dim=1)``.
    No transpose: per-expert tensors are nn.Linear (out, in) like the fused
    parameter's last two dims.
    """

    target: str
    parts: tuple[str, ...]


@dataclass(frozen=True)
class CheckpointLayout:
    """How one family's checkpoint names differ from its parameters.

    ``renames``: (checkpoint substring, model substring) pairs applied to every
    checkpoint name, in order; an old part starting with ``^`` matches only at
    the start of the name (transformers' ``^embed_out\\.``: a rename that must
    not hit the same words deeper in a name). ``stacks``: fused parameters a checkpoint may
    store per expert (used when the fused tensor itself is absent).
    """

    renames: tuple[tuple[str, str], ...] = ()
    stacks: tuple[ExpertStack, ...] = ()


@dataclass(frozen=True)
class Family:
    """One model type's entry: its spec and its checkpoint names."""

    spec: ArchSpec
    checkpoint: CheckpointLayout = CheckpointLayout()
