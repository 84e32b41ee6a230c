"""Parity checks: does the sharded model compute what transformers computes?

``parity_check`` builds a tiny random copy of an architecture (same config
class, same head counts, few small layers: :mod:`tp_engine.tiny`), runs it
unsharded (transformers itself is the reference), then shards deep copies
of it over ``world_size`` thread ranks (``comm/threads.py``: no processes,
so a check takes well under a second) and compares logits and greedy tokens.

``guard_auto_spec`` is what makes inferred plans safe: ``api.resolve_spec``
calls it for every architecture without a declared spec, and an inferred
plan is used only after it passed this check at the requested split. Every
rank of a real run checks locally (same seed, same tiny model, same verdict),
so the guard needs no collective; the verdict is cached per process.

``hypothesis_verdict`` is the same check for the auto-planner's candidate
plans (which fused layout, whether a part can be split at all), at TP=2;
``inferred_spec`` runs the auto-planner with it as the proof.
Each tiny model and its unsharded reference are built once per process and
structure (``_bench``), and every verdict is kept by the exact tiny model,
spec and split it was computed for, so a check the planner already ran is
not run again by the guard or by ``parity_check``.

Every check shards with an explicit spec (``parallelize.shard_model``), so
nothing here resolves a spec while a check runs.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import threading
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from .comm.base import SingleProcessCommunicator, resolve_gather
from .comm.threads import run_threads
from .models.auto import HYPOTHESIS_WORLD, Unprovable, infer_spec
from .models.registry import declared_spec
from .models.spec import ArchSpec
from .parallelize import describe_spec, shard_model
from .plan import ModelDims, ModelPlan, plan_model
from .tiny import tiny_config, tiny_model

__all__ = [
    "ParityReport", "check_model", "guard_auto_spec", "hypothesis_passes", "hypothesis_verdict", "inferred_spec",
    "parity_check", "reference_problem", "tiny_config", "tiny_model",
]

# ------------------------------------------------------------ parity


@dataclass
class ParityReport:
    """The verdict of one parity check (``reason`` says why when not ``ok``)."""

    ok: bool
    max_abs_diff: float
    greedy_match: bool
    plan_source: str  # "spec" (declared), "auto" (inferred) or "none" (no plan)
    reason: str = ""
    model_type: str = ""
    world_size: int = 0
    shares: tuple | None = None
    # What the plan replicates, in words ("" for a plan that shards every role):
    # "partial: attention replicated in 3/4 layers; ..." (``parallelize.describe_spec``).
    partial: str = ""

    @property
    def plan(self) -> str:
        """The plan's kind: "spec", "auto", "auto (partial: ...)" or "none"."""
        return f"{self.plan_source} ({self.partial})" if self.partial else self.plan_source


PROMPT_LEN = 11


def _prompt(config: Any, seed: int) -> torch.Tensor:
    """A fixed prompt avoiding special tokens (an image token would ask for pixels)."""
    text = getattr(config, "text_config", None) or config
    vocab = int(getattr(text, "vocab_size", None) or getattr(config, "vocab_size"))
    special: set[int] = set()
    for cfg in (config, text):
        for k, v in cfg.to_dict().items():
            if "token" in k or k.endswith("_index") or k.endswith("_id"):
                for x in v if isinstance(v, list) else [v]:
                    if isinstance(x, int) and not isinstance(x, bool):
                        special.add(x)
    allowed = torch.tensor([t for t in range(vocab) if t not in special])
    gen = torch.Generator().manual_seed(seed + 1)
    return allowed[torch.randint(len(allowed), (1, PROMPT_LEN), generator=gen)]


def _forward_and_generate(model: nn.Module, input_ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    try:
        tokens = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
            do_sample=False, pad_token_id=0,
        )
        return logits, tokens, ""
    except Exception as exc:  # reported, the logits still count
        return logits, None, f"{type(exc).__name__}: {exc}"


def _rank_main(comm, model: nn.Module, input_ids: torch.Tensor, shares, new_tokens: int, spec: ArchSpec):
    model = shard_model(model, spec, comm, shares)
    return _forward_and_generate(model, input_ids, new_tokens)


def _plan_source(model: nn.Module, spec: ArchSpec | None) -> tuple[str, ArchSpec | None, str]:
    """("spec"|"auto"|"none", the spec to shard by, why none)."""
    declared = declared_spec(model.config)
    if declared is not None and (spec is None or spec == declared):
        return "spec", declared, ""
    if spec is not None:
        return "auto", spec, ""
    try:
        return "auto", inferred_spec(model), ""
    except ValueError as exc:
        return "none", None, f"auto-planner refused: {exc}"


class _NoBench(Exception):
    """No tiny copy to check on (the message is the reason)."""


# Tiny copies and their unsharded reference outputs, by (class, tiny config,
# seed, tokens): a model type's hypotheses and splits are all checked against
# one reference instead of rebuilding it each time. Small: one walk at a time.
_benches: dict[tuple, tuple] = {}
_benches_lock = threading.Lock()
_BENCHES_KEPT = 4


def _bench(config: Any, model_class: type | None, seed: int, new_tokens: int) -> tuple[nn.Module, torch.Tensor, Any]:
    """(tiny model, prompt, (logits, tokens, generate error) or why the unsharded model fails)."""
    try:
        tiny_cfg = tiny_config(config)
        key = (model_class, type(config), json.dumps(tiny_cfg.to_dict(), sort_keys=True, default=repr), seed, new_tokens)
    except Exception as exc:  # no tiny copy, no verdict: say so
        raise _NoBench(f"the tiny copy does not build: {type(exc).__name__}: {exc}") from None
    with _benches_lock:
        hit = _benches.get(key)
    if hit is not None:
        return hit
    try:
        tiny = tiny_model(config, model_class, seed=seed)
    except Exception as exc:
        raise _NoBench(f"the tiny copy does not build: {type(exc).__name__}: {exc}") from None
    input_ids = _prompt(tiny.config, seed)
    try:
        reference: Any = _forward_and_generate(tiny, input_ids, new_tokens)
    except Exception as exc:
        reference = f"the unsharded tiny model fails: {type(exc).__name__}: {exc}"
    with _benches_lock:
        while len(_benches) >= _BENCHES_KEPT:
            _benches.pop(next(iter(_benches)))
        _benches[key] = (tiny, input_ids, reference)
        # The same bench, asked for by the class the config builds.
        _benches[(type(tiny),) + key[1:]] = (tiny, input_ids, reference)
    return tiny, input_ids, reference


def parity_check(
    model_or_config: Any,
    world_size: int,
    shares: Sequence[float] | None = None,
    *,
    spec: ArchSpec | None = None,
    new_tokens: int = 4,
    atol: float = 1e-4,
    seed: int = 0,
    timeout: float = 120.0,
) -> ParityReport:
    """Shard a tiny random copy over ``world_size`` thread ranks; compare with transformers.

    ``model_or_config``: a model (its class and config are used, never its
    weights) or a config (the class ``AutoModelForCausalLM`` would build).
    ``spec``: check this spec (default: the declared one, else the inferred
    one). The report is ``ok`` when every rank's logits are within ``atol`` of
    the unsharded model's and its greedy tokens are identical. Bad requests
    (impossible split, bad shares) raise ValueError; everything else that goes
    wrong is a failed report with the reason.
    """
    return _parity(model_or_config, world_size, shares, spec, new_tokens, atol, seed, timeout, same_inference=False)


def _parity(
    model_or_config: Any, world_size: int, shares: Sequence[float] | None, spec: ArchSpec | None,
    new_tokens: int, atol: float, seed: int, timeout: float, same_inference: bool,
) -> ParityReport:
    is_model = isinstance(model_or_config, nn.Module)
    config = model_or_config.config if is_model else model_or_config
    model_type = str(getattr(config, "model_type", "?"))
    shares_t = tuple(shares) if shares is not None else None
    partial = ""

    def report(ok: bool, diff: float, match: bool, source: str, reason: str) -> ParityReport:
        return ParityReport(ok, diff, match, source, reason, model_type, world_size, shares_t, partial)

    try:
        tiny, input_ids, reference = _bench(config, type(model_or_config) if is_model else None, seed, new_tokens)
    except _NoBench as exc:
        return report(False, math.nan, False, "none", str(exc))
    try:
        dims = ModelDims.from_config(tiny.config)
    except Exception as exc:  # an architecture the planner cannot describe
        return report(False, math.nan, False, "none", f"the planner cannot read this config: {type(exc).__name__}: {exc}")
    plan_model(dims, world_size, shares)  # a bad request (split, shares): ValueError now
    source, use_spec, why = _plan_source(tiny, spec)
    if use_spec is None:
        return report(False, math.nan, False, source, why)
    partial = describe_spec(tiny, use_spec.for_config(tiny.config))
    if same_inference:
        # The guard checks the spec inferred from the real model on the tiny
        # copy; that only proves something if the copy has the same structure.
        try:
            mine = inferred_spec(tiny)
        except ValueError as exc:
            mine = f"a refusal ({exc})"
        if mine != use_spec:
            return report(False, math.nan, False, source, f"the tiny copy infers {mine}, not the model's {use_spec}")

    if isinstance(reference, str):
        return report(False, math.nan, False, source, reference)
    ref_logits, ref_tokens, ref_gen_error = reference
    # The auto-planner may have run this very check already (the same tiny
    # model, spec and split) while proving the spec: its verdict stands.
    exact = (
        type(tiny), json.dumps(tiny.config.to_dict(), sort_keys=True, default=repr), use_spec, world_size,
        tuple(float(x) for x in shares) if shares is not None else None, new_tokens, atol, seed,
    )
    with _verdicts_lock:
        known = _results.get(exact)
    if known is not None:
        return dataclasses.replace(known, plan_source=source, partial=partial, shares=shares_t)
    verdict = _run_parity(tiny, input_ids, reference, world_size, shares, use_spec, new_tokens, atol, timeout, report, source)
    if "Timeout" not in verdict.reason:  # a run cut short by load proves nothing either way: not kept
        with _verdicts_lock:
            _results[exact] = verdict
    return verdict


def _run_parity(
    tiny: nn.Module, input_ids: torch.Tensor, reference: tuple, world_size: int, shares: Sequence[float] | None,
    use_spec: ArchSpec, new_tokens: int, atol: float, timeout: float, report: Any, source: str,
) -> ParityReport:
    ref_logits, ref_tokens, ref_gen_error = reference

    copies = [copy.deepcopy(tiny) for _ in range(world_size)]
    try:
        results = run_threads(
            lambda comm: _rank_main(comm, copies[comm.rank], input_ids, shares, new_tokens, use_spec),
            world_size, timeout=timeout, barrier_timeout=timeout,
        )
    except Exception as exc:  # the reason is the report
        msg = str(exc).splitlines()[0] if str(exc) else ""
        return report(False, math.nan, False, source, f"sharded run failed: {type(exc).__name__}: {msg}")

    diff, match, problems = 0.0, True, []
    for rank, (logits, tokens, gen_error) in enumerate(results):
        if logits.shape != ref_logits.shape:
            return report(False, math.inf, False, source, f"rank {rank}: logits shape {tuple(logits.shape)} != {tuple(ref_logits.shape)}")
        d = (logits.float() - ref_logits.float()).abs().max().item()
        diff = max(diff, d if d == d else math.inf)  # NaN counts as infinitely wrong
        if ref_tokens is None:
            continue
        if tokens is None:
            match = False
            problems.append(f"rank {rank}: generate failed ({gen_error})")
        elif not torch.equal(tokens, ref_tokens):
            match = False
            problems.append(f"rank {rank}: greedy tokens {tokens[0, input_ids.shape[1]:].tolist()} != {ref_tokens[0, input_ids.shape[1]:].tolist()}")
    if not math.isfinite(ref_logits.abs().max().item()):
        return report(False, diff, match, source, "the unsharded tiny model's logits are not finite")
    if diff > atol:
        problems.insert(0, f"max |logit diff| {diff:.3g} > {atol:g}")
    if ref_tokens is None:
        problems.append(f"greedy tokens not compared: the unsharded model cannot generate ({ref_gen_error})")
        match = False
    ok = diff <= atol and match
    return report(ok, diff, match, source, "" if ok else "; ".join(problems))


# ------------------------------------------------------------ the guard

_verdicts: dict[tuple, ParityReport] = {}
_verdict_locks: dict[tuple, threading.Lock] = {}
_verdicts_lock = threading.Lock()


def _structure_key(model: nn.Module, spec: ArchSpec, world_size: int, shares: Sequence[float] | None) -> tuple:
    """What the verdict depends on: class, structural config (the tiny copy's), plan inputs."""
    d = tiny_config(model.config).to_dict()
    for k in ("transformers_version", "_name_or_path", "name_or_path", "dtype", "torch_dtype"):
        d.pop(k, None)
    return (
        type(model), type(model.config), json.dumps(d, sort_keys=True, default=repr), spec,
        world_size, tuple(float(s) for s in shares) if shares is not None else None,
    )


def guard_auto_spec(model: nn.Module, spec: ArchSpec, world_size: int, shares: Sequence[float] | None = None) -> None:
    """Let an inferred spec through only if it passes the parity check at this split.

    Raises ValueError naming the difference when it does not. Cached per
    (class, structural config, spec, world size, shares) for the process;
    concurrent callers (thread ranks) wait for one check instead of repeating it.
    """
    key = _structure_key(model, spec, world_size, shares)
    with _verdicts_lock:
        verdict = _verdicts.get(key)
        lock = _verdict_locks.setdefault(key, threading.Lock())
    if verdict is None:
        with lock:
            verdict = _verdicts.get(key)
            if verdict is None:
                verdict = _parity(model, world_size, shares, spec, 4, 1e-4, 0, 120.0, same_inference=True)
                with _verdicts_lock:
                    _verdicts[key] = verdict
    if not verdict.ok:
        raise ValueError(
            f"auto plan for {model.config.model_type} failed its parity check: "
            f"max |diff| {verdict.max_abs_diff:.3g}; {verdict.reason}"
        )


# ------------------------------------------------------------ hypotheses

_hypotheses: dict[tuple, ParityReport] = {}
# Every parity verdict, by the exact tiny model checked (class and config), spec and split.
_results: dict[tuple, ParityReport] = {}


def hypothesis_verdict(model: nn.Module, spec: ArchSpec, world_size: int) -> ParityReport:
    """The parity check of a candidate spec on a tiny copy of ``model`` (the auto-planner's proof).

    Same check as ``parity_check`` (logits within 1e-4 and identical greedy
    tokens against unsharded transformers), cached per (class, structural
    config, spec, world size) like the guard's verdicts, so every rank and
    every later inference of the same structure reuses it.
    """
    key = _structure_key(model, spec, world_size, None)
    with _verdicts_lock:
        verdict = _hypotheses.get(key)
        lock = _verdict_locks.setdefault(("hypothesis",) + key, threading.Lock())
    if verdict is None:
        with lock:
            verdict = _hypotheses.get(key)
            if verdict is None:
                try:
                    verdict = _parity(model, world_size, None, spec, 4, 1e-4, 0, 120.0, same_inference=False)
                except ValueError as exc:  # this split is impossible for the model (more ranks than heads)
                    verdict = ParityReport(False, math.nan, False, "auto", str(exc), str(model.config.model_type), world_size)
                with _verdicts_lock:
                    _hypotheses[key] = verdict
    return verdict


_REFERENCE_PROBLEMS = (
    "the tiny copy does not build",
    "the unsharded tiny model fails",
    "the unsharded tiny model's logits are not finite",
    "greedy tokens not compared",
)


def reference_problem(report: ParityReport) -> str | None:
    """Why ``report`` could not judge any plan (the tiny copy or transformers' own
    unsharded run is at fault, not the sharding), or None."""
    for part in report.reason.split("; "):
        if part.startswith(_REFERENCE_PROBLEMS):
            return part
    return None


def hypothesis_passes(model: nn.Module, spec: ArchSpec) -> bool:
    """The auto-planner's proof (``models.auto.Prover``): does ``spec`` pass on a tiny copy
    at ``HYPOTHESIS_WORLD`` ranks? Raises ``Unprovable`` when the tiny copy cannot judge any plan."""
    report = hypothesis_verdict(model, spec, HYPOTHESIS_WORLD)
    problem = reference_problem(report)
    if problem is not None:
        raise Unprovable(f"no plan can be proven on a tiny copy: {problem}")
    return report.ok


def inferred_spec(model: nn.Module) -> ArchSpec:
    """The auto-planner's spec for ``model``, its hypotheses proven on tiny copies.

    Not yet checked at any particular split: ``guard_auto_spec`` does that.
    Raises ValueError saying why when the model cannot be planned safely.
    """
    return infer_spec(model, hypothesis_passes)


# ------------------------------------------------------------ a whole-model dry run


class _DryRunComm(SingleProcessCommunicator):
    """A communicator for sharding a meta-device model without peers.

    Collectives return what a group of identical ranks would (a gather of
    copies, the tensor itself): parallelize only needs them to agree.
    """

    name = "dry-run"

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def all_gather(self, tensor: torch.Tensor, dim: int = -1, sizes: Sequence[int] | None = None) -> torch.Tensor:
        dim, sizes = resolve_gather(tensor, dim, sizes, self.rank, self.world_size)
        if len(set(sizes)) != 1:
            raise ValueError("dry run: uneven all_gather has no meaning without peers")
        return torch.cat([tensor] * self.world_size, dim=dim)


@dataclass
class ModelCheck:
    """What ``tp-engine check`` reports for a config at one split."""

    model_type: str
    model_class: str
    plan_source: str  # "spec" | "auto" | "none"
    spec: ArchSpec | None
    plan: Any  # ModelPlan, or None when there is none
    dtype: torch.dtype
    rank_bytes: list[int]
    parity: ParityReport | None
    ok: bool
    reason: str
    # What an auto plan keeps whole ("" for a full plan), counted on the real
    # model's layers: "partial: attention replicated in 12/24 layers; ...".
    partial: str = ""

    @property
    def plan_kind(self) -> str:
        """"spec", "auto", "auto (partial: ...)" or "none"."""
        return f"{self.plan_source} ({self.partial})" if self.partial else self.plan_source


def _described_plan(plan: Any, note: str) -> Any:
    """``plan`` whose ``describe()`` names what the plan keeps whole on its first line
    (what ``tp-engine check`` prints), so a partial plan is never shown as a full one."""
    if not note:
        return plan

    class DescribedPlan(ModelPlan):
        def describe(self) -> str:
            lines = super().describe().splitlines()
            lines[0] += f"; auto plan {note}"
            return "\n".join(lines)

    return DescribedPlan(plan.dims, plan.world_size, plan.shares, plan.ranks)


def _config_dtype(config: Any) -> torch.dtype:
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) and value.is_floating_point else torch.float32


def check_model(config: Any, world_size: int, shares: Sequence[float] | None = None) -> ModelCheck:
    """Plan ``config``'s model over ``world_size`` ranks and parity-check the plan.

    Reads no weights: the model is built on the meta device to find the spec
    (declared, or inferred and checked the way the guard would) and each
    rank's parameter bytes (``parallelize`` on a meta copy per rank). Bad
    requests (world size, shares) raise ValueError; everything else is in
    the result.
    """
    dtype = _config_dtype(config)
    model_type = str(getattr(config, "model_type", "?"))
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config, dtype=dtype)
    result = ModelCheck(model_type, type(meta).__name__, "none", None, None, dtype, [], None, False, "")
    try:
        dims = ModelDims.from_config(config)
    except Exception as exc:
        result.reason = f"the planner cannot read this config: {type(exc).__name__}: {exc}"
        return result
    result.plan = plan_model(dims, world_size, shares)  # bad split or shares: ValueError to the caller

    declared = declared_spec(config)
    if declared is not None:
        result.plan_source, result.spec = "spec", declared
    else:
        try:
            result.plan_source, result.spec = "auto", inferred_spec(meta)
        except ValueError as exc:
            result.reason = f"auto-planner refused: {exc}"
            return result

    try:
        for rank in range(world_size):
            copy_ = shard_model(copy.deepcopy(meta), result.spec, _DryRunComm(rank, world_size), shares)
            seen: set[int] = set()
            total = 0
            for p in copy_.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    total += p.numel() * p.element_size()
            result.rank_bytes.append(total)
            del copy_
    except Exception as exc:  # a spec that does not fit the model is a failed check
        result.reason = f"sharding the model failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return result

    result.parity = _parity(
        meta, world_size, shares, result.spec, 4, 1e-4, 0, 120.0, same_inference=result.plan_source == "auto"
    )
    if result.plan_source == "auto":
        result.partial = describe_spec(meta, result.spec.for_config(config))
        result.plan = _described_plan(result.plan, result.partial)
    result.ok = result.parity.ok
    result.reason = result.parity.reason
    return result
