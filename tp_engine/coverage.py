"""Which Hugging Face causal LMs does tp-engine shard correctly? Measure it.

    python -m tp_engine.coverage [--markdown docs/coverage.md] [--sample N] [--jobs 2]

For every architecture in the installed transformers'
``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``: build a tiny random model from
``tiny_config(ConfigClass())`` and, when it builds, run ``parity_check`` at
TP=2 and TP=3 (thread ranks). Each row says what the plan is (declared
spec; auto-planner, full or partial, and for a partial plan what it keeps
whole; none) and, per split, pass / fail (max |diff| and why) / refused
(why). The summary is "N built, M pass (x%)": an architecture passes when
both splits pass.

Each architecture runs in a worker process (``--jobs``, default 2) under a
timeout (``--timeout``, default 120 s): a hanging or crashing architecture
is recorded as such and its worker replaced, so the walk always finishes.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import multiprocessing as mp
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Iterable, Sequence

import torch
import transformers
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import logging as hf_logging

from .check import parity_check
from .comm.base import SingleProcessCommunicator
from .runtime import Decoder, RuntimeUnsupported, unsupported_reason
from .runtime_check import runtime_problem
from .tiny import tiny_model

WORLDS = (2, 3)
DEFAULT_TIMEOUT_S = 120.0


@dataclass
class Outcome:
    status: str  # "pass" | "fail" | "refused"
    max_abs_diff: float = math.nan
    reason: str = ""


@dataclass
class Row:
    model_type: str
    model_class: str = ""
    built: bool = False
    build_error: str = ""
    plan_source: str = "none"  # "spec" | "auto" | "none"
    partial: str = ""  # what an auto plan replicates ("" for a full plan), see ParityReport.partial
    results: dict[int, Outcome] = field(default_factory=dict)
    seconds: float = 0.0
    runtime: str = ""  # "" when the lean runtime decodes it, else why transformers' generate does

    @property
    def plan(self) -> str:
        """"spec", "auto", "auto (partial: ...)" or "none"."""
        return f"{self.plan_source} ({self.partial})" if self.partial else self.plan_source

    @property
    def plan_kind(self) -> str:
        """"spec", "auto full", "auto partial" or "none"."""
        if self.plan_source == "auto":
            return "auto partial" if self.partial else "auto full"
        return self.plan_source

    @property
    def passed(self) -> bool:
        return self.built and bool(self.results) and all(o.status == "pass" for o in self.results.values())

    def reasons(self) -> list[str]:
        """Why this row is not a pass (empty for a pass)."""
        if not self.built:
            return [self.build_error]
        return [f"TP={w}: {o.reason}" for w, o in sorted(self.results.items()) if o.status != "pass"]


def architectures() -> list[str]:
    """Every causal-LM model type of the installed transformers, sorted."""
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def deterministic_sample(names: Sequence[str], n: int) -> list[str]:
    """``n`` names picked by a hash of the name: fixed across runs, spread over families, not hand-picked."""
    ranked = sorted(names, key=lambda s: hashlib.sha256(s.encode()).hexdigest())
    return sorted(ranked[:n])


def _one_line(text: str, limit: int = 400) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def decode_path_problem(model: torch.nn.Module) -> str:
    """"" when ``generate`` decodes this (tiny) model on the lean runtime, else why it uses transformers'."""
    reason = unsupported_reason(model) or runtime_problem(model)
    if reason:
        return reason
    try:
        Decoder(model, SingleProcessCommunicator(), fuse_in_place=False)  # a family builder may still refuse
    except RuntimeUnsupported as exc:
        return str(exc).removeprefix("tp-engine runtime: ")
    return ""


def check_architecture(model_type: str, worlds: Iterable[int] = WORLDS) -> Row:
    """Build the tiny model of ``model_type`` and parity-check it at each world size."""
    start = time.perf_counter()
    row = Row(model_type, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, ""))
    try:
        config = CONFIG_MAPPING[model_type]()
        model = tiny_model(config)
    except Exception as exc:  # any build failure is a row, with its reason
        row.build_error = _one_line(f"does not build: {type(exc).__name__}: {exc}")
        row.seconds = time.perf_counter() - start
        return row
    try:
        # Without an unsharded forward there is no reference to compare with.
        with torch.no_grad():
            model(input_ids=torch.tensor([[1, 2, 3, 4]]))
    except Exception as exc:
        row.build_error = _one_line(f"builds but transformers' own forward fails: {type(exc).__name__}: {exc}")
        row.seconds = time.perf_counter() - start
        return row
    row.built = True
    try:
        row.runtime = decode_path_problem(model)
    except Exception as exc:  # a row, never a crash of the walk
        row.runtime = _one_line(f"{type(exc).__name__}: {exc}")
    for world in worlds:
        try:
            report = parity_check(config, world)
        except ValueError as exc:  # an impossible split for this architecture
            row.results[world] = Outcome("refused", math.nan, _one_line(str(exc)))
            continue
        except Exception as exc:
            row.results[world] = Outcome("fail", math.nan, _one_line(f"{type(exc).__name__}: {exc}"))
            continue
        row.plan_source = report.plan_source
        row.partial = report.partial or row.partial
        if report.ok:
            row.results[world] = Outcome("pass", report.max_abs_diff, "")
        elif report.plan_source == "none":
            why = report.reason.removeprefix("auto-planner refused: ")
            row.results[world] = Outcome("refused", math.nan, _one_line(why))
        else:
            row.results[world] = Outcome("fail", report.max_abs_diff, _one_line(report.reason))
    row.seconds = time.perf_counter() - start
    return row


# ------------------------------------------------------------ the walk


def _worker(conn) -> None:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)  # one core per worker; the rank threads share it
    while True:
        task = conn.recv()
        if task is None:
            return
        index, name, worlds = task
        try:
            row = check_architecture(name, worlds)
        except BaseException as exc:  # never let one architecture kill the worker silently
            row = Row(name, built=False, build_error=_one_line(f"checker crashed: {type(exc).__name__}: {exc}"))
        conn.send((index, row))


class _Slot:
    def __init__(self, ctx):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child,), daemon=True)
        self.proc.start()
        child.close()
        self.task: tuple[int, str] | None = None
        self.started = 0.0

    def stop(self, kill: bool = False) -> None:
        if kill:
            self.proc.kill()
        else:
            try:
                self.conn.send(None)
            except OSError:
                pass
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.conn.close()


def walk(
    names: Sequence[str],
    jobs: int = 2,
    timeout: float = DEFAULT_TIMEOUT_S,
    worlds: Sequence[int] = WORLDS,
    progress=None,
) -> list[Row]:
    """Check every architecture in ``names`` on ``jobs`` worker processes; rows in input order."""
    ctx = mp.get_context("spawn")  # no forked copies of torch's thread pools
    pending = list(enumerate(names))[::-1]
    rows: list[Row | None] = [None] * len(names)
    slots = [_Slot(ctx) for _ in range(max(1, min(jobs, len(names))))]
    try:
        while pending or any(s.task for s in slots):
            for slot in slots:
                if slot.task is None and pending:
                    slot.task = pending.pop()
                    slot.started = time.monotonic()
                    slot.conn.send((*slot.task, tuple(worlds)))
            ready = wait([s.conn for s in slots if s.task], timeout=0.5)
            for i, slot in enumerate(slots):
                if slot.task is None:
                    continue
                index, name = slot.task
                row = None
                if slot.conn in ready:
                    try:
                        got_index, row = slot.conn.recv()
                        assert got_index == index
                    except (EOFError, OSError):
                        row = Row(name, build_error=f"checker process died (exit code {slot.proc.exitcode})")
                elif time.monotonic() - slot.started > timeout:
                    row = Row(name, build_error=f"timed out after {timeout:g} s (building or checking hung)")
                elif not slot.proc.is_alive():
                    row = Row(name, build_error=f"checker process died (exit code {slot.proc.exitcode})")
                if row is None:
                    continue
                if not row.built and row.build_error.startswith(("timed out", "checker process died")):
                    slot.stop(kill=True)
                    slots[i] = slot = _Slot(ctx)
                rows[index] = row
                slot.task = None
                if progress is not None:
                    progress(row)
    finally:
        for slot in slots:
            slot.stop(kill=slot.task is not None)
    return [r for r in rows if r is not None]


# ------------------------------------------------------------ reporting


PLAN_KINDS = ("spec", "auto full", "auto partial", "none")


def summary(rows: Sequence[Row]) -> str:
    built = [r for r in rows if r.built]
    passed = [r for r in built if r.passed]
    pct = 100.0 * len(passed) / len(built) if built else 0.0
    return f"{len(built)} built, {len(passed)} pass ({pct:.0f}%)"


def on_runtime(rows: Sequence[Row]) -> int:
    """Passing architectures that decode on the lean runtime."""
    return sum(1 for r in rows if r.passed and not r.runtime)


def by_plan_kind(rows: Sequence[Row]) -> dict[str, tuple[int, int]]:
    """Built architectures per plan kind: (how many, how many pass)."""
    built = [r for r in rows if r.built]
    return {k: (sum(1 for r in built if r.plan_kind == k), sum(1 for r in built if r.plan_kind == k and r.passed)) for k in PLAN_KINDS}


def _cell(o: Outcome | None) -> str:
    if o is None:
        return "-"
    if o.status == "pass":
        return f"pass ({o.max_abs_diff:.1e})"
    if o.status == "fail":
        diff = "" if math.isnan(o.max_abs_diff) else f" {o.max_abs_diff:.2g}"
        return f"fail{diff}: {o.reason}"
    return f"refused: {o.reason}"


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(rows: Sequence[Row], command: str = "python -m tp_engine.coverage --markdown docs/coverage.md") -> str:
    kinds = by_plan_kind(rows)
    lines = [
        "# Architecture coverage",
        "",
        f"**{summary(rows)}** of {len(rows)} causal-LM architectures in transformers {transformers.__version__} "
        f"(torch {torch.__version__}); pass = logits within 1e-4 of unsharded transformers and identical "
        f"greedy tokens at both TP=2 and TP=3 (thread ranks, tiny random float32 copies).",
        "",
        f"Plans among the built: declared spec {kinds['spec'][0]} ({kinds['spec'][1]} pass), "
        f"auto-planner full {kinds['auto full'][0]} ({kinds['auto full'][1]} pass), "
        f"auto-planner partial {kinds['auto partial'][0]} ({kinds['auto partial'][1]} pass), "
        f"none (refused) {kinds['none'][0]}.",
        "",
        f"Decode path: {on_runtime(rows)} of the passing architectures decode on the lean runtime "
        "(declared runtime families, and Llama-layout ones whose tiny copy reproduces transformers' logits "
        "through it); the others decode through transformers' `generate` on the sharded model, for the "
        "reason in the last column.",
        "",
        "A *full* plan shards attention and MLP in every layer and the vocabulary. A *partial* plan "
        "shards what the planner recognises and keeps the rest whole on every rank (correct by "
        "construction, less speed-up); the plan column says what it keeps whole, counted on the tiny "
        "copy's layers. A plan that would shard nothing in any layer is refused.",
        "",
        f"Regenerate: `{command}`",
        "",
        "| model_type | class | plan | TP=2 | TP=3 | decode path |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if not r.built:
            continue
        lines.append(
            f"| {r.model_type} | {r.model_class} | {_md(r.plan)} | "
            f"{_md(_cell(r.results.get(2)))} | {_md(_cell(r.results.get(3)))} | "
            f"{'runtime' if not r.runtime else 'transformers: ' + _md(_one_line(r.runtime, 160))} |"
        )
    not_built = [r for r in rows if not r.built]
    if not_built:
        lines += ["", f"## Not built ({len(not_built)})", "", "| model_type | why |", "| --- | --- |"]
        lines += [f"| {r.model_type} | {_md(r.build_error)} |" for r in not_built]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tp_engine.coverage", description=__doc__.split("\n")[0])
    parser.add_argument("--markdown", default=None, help="write the table to this file (e.g. docs/coverage.md)")
    parser.add_argument("--sample", type=int, default=None, help="check N architectures picked by name hash")
    parser.add_argument("--only", default=None, help="comma-separated model types to check")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per architecture")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    names = architectures()
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            print(f"coverage: not causal-LM model types here: {', '.join(unknown)}", file=sys.stderr)
            return 2
        names = wanted
    if args.sample is not None:
        names = deterministic_sample(names, args.sample)

    def progress(row: Row) -> None:
        if not args.quiet:
            state = "pass" if row.passed else ("not built" if not row.built else "no")
            why = "" if row.passed else f"  {row.reasons()[0][:160]}"
            print(f"{row.model_type:28s} {row.plan_kind:12s} {state:9s} {row.seconds:5.1f}s{why}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    rows = walk(names, jobs=args.jobs, timeout=args.timeout, progress=progress)
    elapsed = time.perf_counter() - t0
    kinds = by_plan_kind(rows)
    split = ", ".join(f"{k} {n} ({p} pass)" for k, (n, p) in kinds.items())
    print(f"{summary(rows)}; {len(rows)} architectures in {elapsed:.0f} s; plans: {split}")
    if args.markdown:
        command = "python -m tp_engine.coverage --markdown " + args.markdown
        if args.sample is not None:
            command += f" --sample {args.sample}"
        os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
        with open(args.markdown, "w") as f:
            f.write(to_markdown(rows, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
