"""Kernels behind weight-only quantization (:mod:`tp_engine.quantize`).

* :mod:`.reference` -- the canonical int8 / int4 layouts and a torch
  implementation of every kernel (runs anywhere; the correctness oracle).
* :mod:`.triton_kernels` -- the Triton versions (CUDA; on CPU only under
  ``TRITON_INTERPRET=1``, for tests). Imported lazily: ``import
  tp_engine.kernels`` never needs triton.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os

import torch

from . import reference

__all__ = ["load_triton", "reference", "triton_available"]


def triton_available(device: str = "cuda") -> bool:
    """Whether the Triton kernels can run on tensors of ``device`` here.

    CUDA: triton importable and a GPU present. CPU: only Triton's
    interpreter (``TRITON_INTERPRET=1``), which is for tests, not speed.
    """
    if importlib.util.find_spec("triton") is None:
        return False
    if device == "cpu":
        return os.environ.get("TRITON_INTERPRET") == "1" and _interpreter_works()
    return torch.cuda.is_available()


@functools.lru_cache(maxsize=None)
def _interpreter_works() -> bool:
    """One tiny launch: TRITON_INTERPRET=1 set only after triton was imported
    leaves the interpreter half-enabled, and every launch fails."""
    try:
        q, scale = reference.quantize_int8(torch.ones(2, 4))
        load_triton().int8_matmul(torch.ones(1, 4), q, scale)
    except Exception:  # any failure means: not usable here
        return False
    return True


def load_triton():
    """The :mod:`.triton_kernels` module (imports triton, an optional dependency: only on first use)."""
    return importlib.import_module(f"{__name__}.triton_kernels")
