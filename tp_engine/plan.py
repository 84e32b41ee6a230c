"""Head-aware partition planning: which slice of every layer each rank holds.

Pure Python, no torch: the planner is a function from model dimensions,
world size and shares to per-rank ranges, so it can be property-tested
in-process.

Attention is split by Q heads and never inside a head. A rank's Q heads are
a contiguous range; the KV heads it holds are exactly those its Q heads read.
For the rank-local attention to be ordinary grouped-query attention, every
KV head a rank holds must serve the same number of its Q heads (HF's
``repeat_kv`` uses one ratio per module). With ``g`` Q heads per KV group,
a contiguous range satisfies that when it is

* inside one group (the KV head is then replicated on several ranks),
* a run of whole groups, or
* the tail of one group and an equally long head of the next.

Among the valid cuts, dynamic programming picks the one closest to each
rank's share, preferring fewer replicated KV heads on ties.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Sequence


@dataclass(frozen=True)
class ModelDims:
    """The dimensions the planner needs, read from a model config."""

    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int

    def __post_init__(self) -> None:
        for name in ("num_q_heads", "num_kv_heads", "head_dim", "hidden_size", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.intermediate_size, int) or self.intermediate_size < 0:
            raise ValueError(f"intermediate_size must be a non-negative integer, got {self.intermediate_size!r}")
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_q_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )

    @property
    def group_size(self) -> int:
        """Q heads per KV head."""
        return self.num_q_heads // self.num_kv_heads

    @classmethod
    def from_config(cls, config: Any) -> "ModelDims":
        """Read the dimensions from a Hugging Face ``PretrainedConfig``.

        Per-layer configs (Gemma 4's ``per_layer_config``, Gemma 3n's list of
        intermediate sizes) give layer 0's values: the auto-planner checks
        each layer against them and replicates what does not match.
        """
        config = getattr(config, "text_config", None) or config
        heads = _first_attr(config, "num_attention_heads", "n_head", "num_heads")
        kv_heads = _get(config, "num_key_value_heads")
        if kv_heads is None and _get(config, "new_decoder_architecture"):
            kv_heads = _get(config, "num_kv_heads")  # Falcon-40B/180B grouped layout
        if kv_heads is None and _get(config, "multi_query"):
            kv_heads = 1  # Falcon-7B style multi-query attention: one shared KV head
        kv_heads = kv_heads or heads
        hidden = _first_attr(config, "hidden_size", "n_embd", "d_model")
        head_dim = _get(config, "head_dim") or hidden // heads
        # GPT-2/GPT-J: n_inner (None means 4 x hidden); OPT: ffn_dim; Falcon: ffn_hidden_size.
        intermediate = (
            _get(config, "intermediate_size")
            or _get(config, "n_inner")
            or _get(config, "ffn_dim")
            or _get(config, "ffn_hidden_size")
            or 4 * hidden
        )
        if isinstance(intermediate, (list, tuple)) and intermediate and all(isinstance(x, int) for x in intermediate):
            intermediate = intermediate[0]  # one width per layer (Gemma 3n): layer 0's
        return cls(
            num_q_heads=int(heads),
            num_kv_heads=int(kv_heads),
            head_dim=int(head_dim),
            hidden_size=int(hidden),
            intermediate_size=int(intermediate),
            vocab_size=int(config.vocab_size),
        )


def _get(config: Any, name: str) -> Any:
    """``getattr(config, name, None)``; for per-layer attributes of heterogeneous
    configs (which raise on a global read), layer 0's value."""
    try:
        return getattr(config, name, None)
    except Exception:  # transformers' AmbiguousGlobalPerLayerAttributeError and kin
        per_layer = getattr(config, "per_layer_config", None)
        try:
            return getattr(per_layer[0], name, None)
        except Exception:
            raise ValueError(f"config.{name} varies per layer and layer 0's value cannot be read") from None


def _first_attr(obj: Any, *names: str) -> Any:
    for name in names:
        value = _get(obj, name)
        if value is not None:
            return value
    raise ValueError(f"config has none of {names}")


@dataclass(frozen=True)
class RankPlan:
    """The slices one rank holds. Ranges are global indices, end exclusive."""

    rank: int
    q_heads: range
    kv_heads: range
    mlp_columns: range
    vocab: range

    @property
    def q_per_kv(self) -> int:
        """Local Q heads per local KV head (the module's num_key_value_groups)."""
        return len(self.q_heads) // len(self.kv_heads)


@dataclass(frozen=True)
class ModelPlan:
    dims: ModelDims
    world_size: int
    shares: tuple[int, ...]
    ranks: tuple[RankPlan, ...] = field(repr=False)
    mlp_unit: int = 1  # MLP cuts fall on multiples of this (quantization blocks)

    def __getitem__(self, rank: int) -> RankPlan:
        return self.ranks[rank]

    @property
    def replicated_kv_heads(self) -> frozenset[int]:
        """KV heads held by more than one rank (their gradients need summing)."""
        seen: dict[int, int] = {}
        for r in self.ranks:
            for h in r.kv_heads:
                seen[h] = seen.get(h, 0) + 1
        return frozenset(h for h, n in seen.items() if n > 1)

    def describe(self) -> str:
        """A human-readable table of the plan, one line per rank."""
        d = self.dims
        lines = [
            f"world {self.world_size}, shares {list(self.shares)}: "
            f"{d.num_q_heads} Q / {d.num_kv_heads} KV heads x {d.head_dim}, "
            f"MLP {d.intermediate_size}, vocab {d.vocab_size}"
            + (f"; MLP cut in blocks of {self.mlp_unit} columns" if self.mlp_unit > 1 else "")
        ]
        for r in self.ranks:
            lines.append(
                f"  rank {r.rank}: Q heads {_fmt(r.q_heads)}, KV heads {_fmt(r.kv_heads)}, "
                f"MLP cols {_fmt(r.mlp_columns)}, vocab {_fmt(r.vocab)}"
            )
        return "\n".join(lines)


def _fmt(r: range) -> str:
    return f"[{r.start}, {r.stop}) ({len(r)})"


def normalize_shares(world_size: int, shares: Sequence[float] | None) -> tuple[Fraction, ...]:
    """Check ``shares`` and return them as exact fractions (equal if None)."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world size must be a positive integer, got {world_size!r}")
    if shares is None:
        return tuple(Fraction(1) for _ in range(world_size))
    shares = list(shares)
    if len(shares) != world_size:
        raise ValueError(f"shares has {len(shares)} entries but there are {world_size} ranks: {shares}")
    out = []
    for s in shares:
        if isinstance(s, bool) or not isinstance(s, (int, float, Fraction)) or not s > 0 or s != s or s == float("inf"):
            raise ValueError(f"every share must be a positive finite number, got {shares}")
        out.append(Fraction(s).limit_denominator(10**6))
    return tuple(out)


def split_by_shares(total: int, shares: Sequence[Fraction], minimum: int = 0) -> list[range]:
    """Split ``range(total)`` into contiguous pieces proportional to ``shares``.

    Largest-remainder rounding; each piece gets at least ``minimum``.
    """
    n = len(shares)
    if total < minimum * n:
        raise ValueError(f"cannot give each of {n} ranks at least {minimum} of {total}")
    weight = sum(shares)
    free = total - minimum * n
    exact = [free * s / weight for s in shares]
    counts = [int(e) for e in exact]
    # Ties go to the earlier rank, so the result is deterministic.
    order = sorted(range(n), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: free - sum(counts)]:
        counts[i] += 1
    pieces, start = [], 0
    for c in counts:
        pieces.append(range(start, start + c + minimum))
        start += c + minimum
    return pieces


def _kv_span(start: int, stop: int, g: int) -> range | None:
    """KV heads read by Q heads [start, stop), or None if the range is not valid."""
    first, last = start // g, (stop - 1) // g
    if first == last:  # inside one group
        return range(first, first + 1)
    if start % g == 0 and stop % g == 0:  # whole groups
        return range(first, last + 1)
    tail = g - start % g  # tail of one group + equal head of the next
    if last == first + 1 and start % g and stop - start == 2 * tail:
        return range(first, last + 1)
    return None


def split_heads(num_q: int, num_kv: int, shares: Sequence[Fraction]) -> list[tuple[range, range]]:
    """Cut Q heads into contiguous per-rank ranges; return (q_heads, kv_heads) per rank."""
    world = len(shares)
    if world > num_q:
        raise ValueError(
            f"cannot split {num_q} attention heads over {world} ranks: a head is never split, "
            f"so at most {num_q} ranks can be used"
        )
    g = num_q // num_kv
    weight = sum(shares)
    targets = [num_q * s / weight for s in shares]
    inf = (float("inf"), 0, 0)
    # best[r][j]: (squared deviation, KV heads held, sum of rank * heads) of
    # cutting heads [0, j) over ranks [0, r); compared lexicographically.
    best = [[inf] * (num_q + 1) for _ in range(world + 1)]
    cut = [[0] * (num_q + 1) for _ in range(world + 1)]
    best[0][0] = (Fraction(0), 0, 0)
    for r in range(1, world + 1):
        for j in range(r, num_q - (world - r) + 1):
            for i in range(r - 1, j):
                prev = best[r - 1][i]
                if prev == inf:
                    continue
                kv = _kv_span(i, j, g)
                if kv is None:
                    continue
                cand = (
                    prev[0] + (j - i - targets[r - 1]) ** 2,
                    prev[1] + len(kv),
                    prev[2] + (r - 1) * (j - i),
                )
                if cand < best[r][j]:
                    best[r][j] = cand
                    cut[r][j] = i
    if best[world][num_q] == inf:  # pragma: no cover - single-head ranges are always valid
        raise ValueError(f"no valid split of {num_q} Q / {num_kv} KV heads over {world} ranks")
    bounds, j = [], num_q
    for r in range(world, 0, -1):
        i = cut[r][j]
        bounds.append((i, j))
        j = i
    bounds.reverse()
    return [(range(i, j), _kv_span(i, j, g)) for i, j in bounds]


def split_in_units(total: int, shares: Sequence[Fraction], unit: int = 1) -> list[range]:
    """Split ``range(total)`` by ``shares`` with every cut on a multiple of ``unit``.

    For a row-parallel matrix stored in quantization blocks of ``unit``
    inputs (GGUF: 32, or 256 for K-quants), each rank's columns must be whole
    blocks. The pieces are :func:`split_by_shares` of the ``ceil(total /
    unit)`` units, scaled back; a last partial unit (``total`` not a
    multiple of ``unit``) goes to the rank holding the end.
    """
    if not isinstance(unit, int) or unit < 1:
        raise ValueError(f"unit must be a positive integer, got {unit!r}")
    if unit == 1:
        return split_by_shares(total, shares)
    units = split_by_shares(-(-total // unit), shares)
    return [range(min(p.start * unit, total), min(p.stop * unit, total)) for p in units]


def plan_model(
    dims: ModelDims, world_size: int, shares: Sequence[float] | None = None, mlp_unit: int = 1
) -> ModelPlan:
    """Plan the tensor-parallel split of a model over ``world_size`` ranks.

    ``shares`` weights the ranks (``[3, 1]``: rank 0 takes about three
    quarters of heads, MLP columns and vocabulary). ``mlp_unit``: MLP
    columns are cut only on multiples of it (the block size of a quantized
    down projection, see :func:`split_in_units`). Raises ValueError for
    requests that cannot be met.
    """
    fractions = normalize_shares(world_size, shares)
    heads = split_heads(dims.num_q_heads, dims.num_kv_heads, fractions)
    mlp = split_in_units(dims.intermediate_size, fractions, mlp_unit)
    vocab = split_by_shares(dims.vocab_size, fractions, minimum=1 if dims.vocab_size >= world_size else 0)
    ranks = tuple(
        RankPlan(rank=r, q_heads=q, kv_heads=kv, mlp_columns=mlp[r], vocab=vocab[r])
        for r, (q, kv) in enumerate(heads)
    )
    return ModelPlan(
        dims=dims,
        world_size=world_size,
        shares=tuple(int(s) if s.denominator == 1 else float(s) for s in fractions),
        ranks=ranks,
        mlp_unit=mlp_unit,
    )


# ------------------------------------------------------------ pipeline stages


def plan_stages(num_layers: int, pp: int, shares: Sequence[float] | None = None) -> list[range]:
    """Cut ``num_layers`` decoder layers into ``pp`` contiguous, non-empty stages by ``shares``.

    ``shares`` weights the stages by memory or speed (``[3, 1]``: the first
    stage takes about three quarters of the layers); None is an even cut
    (uneven counts: the earlier stages get the extra layer). Raises
    ValueError for more stages than layers or shares of the wrong length.
    """
    if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
        raise ValueError(f"number of layers must be a positive integer, got {num_layers!r}")
    if not isinstance(pp, int) or isinstance(pp, bool) or pp < 1:
        raise ValueError(f"pipeline stages (pp) must be a positive integer, got {pp!r}")
    if pp > num_layers:
        raise ValueError(f"cannot cut {num_layers} layers into {pp} pipeline stages: each stage needs a layer")
    if shares is not None and len(list(shares)) != pp:
        raise ValueError(f"stage shares has {len(list(shares))} entries but there are {pp} pipeline stages: {list(shares)}")
    return split_by_shares(num_layers, normalize_shares(pp, shares), minimum=1)


PIPELINE_ORDERS = ("tp_inner", "pp_inner")


@dataclass(frozen=True)
class HybridLayout:
    """Where each rank of a TP x PP world sits: ``world_size = tp * pp``.

    ``order="tp_inner"``: stage s holds ranks ``[s * tp, (s + 1) * tp)``; a
    launcher that numbers each host's ranks consecutively then keeps every
    tensor-parallel group (two all-reduces per layer) inside a host and sends
    only activations between hosts. ``order="pp_inner"``: rank =
    ``tp_rank * pp + stage``, so consecutive ranks are stages (pipeline inside
    a host, tensor parallelism across hosts).
    """

    world_size: int
    pp: int
    order: str = "tp_inner"

    def __post_init__(self) -> None:
        if not isinstance(self.world_size, int) or self.world_size < 1:
            raise ValueError(f"world size must be a positive integer, got {self.world_size!r}")
        if not isinstance(self.pp, int) or isinstance(self.pp, bool) or self.pp < 1:
            raise ValueError(f"pipeline stages (pp) must be a positive integer, got {self.pp!r}")
        if self.world_size % self.pp:
            raise ValueError(f"pp={self.pp} does not divide the world of {self.world_size} ranks "
                             f"(world = tp x pp)")
        if self.order not in PIPELINE_ORDERS:
            raise ValueError(f"unknown rank order {self.order!r}; choose one of {', '.join(PIPELINE_ORDERS)}")

    @property
    def tp(self) -> int:
        return self.world_size // self.pp

    def rank_of(self, stage: int, tp_rank: int) -> int:
        if not (0 <= stage < self.pp and 0 <= tp_rank < self.tp):
            raise ValueError(f"no rank at stage {stage}, tp rank {tp_rank} in a {self.tp} x {self.pp} layout")
        return stage * self.tp + tp_rank if self.order == "tp_inner" else tp_rank * self.pp + stage

    def position(self, rank: int) -> tuple[int, int]:
        """(stage, tp_rank) of ``rank``."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside a world of {self.world_size}")
        if self.order == "tp_inner":
            return divmod(rank, self.tp)
        tp_rank, stage = divmod(rank, self.pp)
        return stage, tp_rank

    def stage_ranks(self, stage: int) -> list[int]:
        """The tensor-parallel group of ``stage``, in tp-rank order."""
        return [self.rank_of(stage, t) for t in range(self.tp)]

    @property
    def tp_groups(self) -> list[list[int]]:
        return [self.stage_ranks(s) for s in range(self.pp)]
