"""The ablation's rows (the paper's strategies and the gate variants) and the columns they are scored in."""

from __future__ import annotations

import dataclasses

from ..fusion import PAPER_IDS, PAPER_NAMES, STRATEGY_TABLE
from .shapesbench import CATEGORIES

COLUMNS = (*CATEGORIES, "overall", "fidelity")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row: a paper strategy, what its time gates read,
    and whether it is trained or only sampled differently."""

    name: str
    paper_id: str  # the strategy (b1..s3, fusedit)
    gate_signal: str = "nominal"
    samples: str | None = None  # sampling-only: the row whose checkpoints it samples (with the gate shift)
    # train.freeze_fusion_after as a fraction of the run's steps (GRAN-TED's warm-up phase); 0: never
    freeze_fraction: float = 0.0


SHIPPED_BY = {spec.paper_id: spec.shipped_by for spec in STRATEGY_TABLE.values()}

# In the order of the tables: each gate variant follows its nominal strategy.
VARIANTS: dict[str, Variant] = {
    **{sid: Variant(PAPER_NAMES[sid], sid) for sid in ("b1", "b2", "b3", "fusedit", "s1")},
    "s1s": Variant("S1 time-wise, shifted gate", "s1", samples="s1"),
    "s1e": Variant("S1 time-wise, estimated gate", "s1", gate_signal="estimated"),
    "s2": Variant(PAPER_NAMES["s2"], "s2"),
    "s3": Variant(PAPER_NAMES["s3"], "s3"),
    "s3e": Variant("S3 joint, estimated gate", "s3", gate_signal="estimated"),
    # The schemes of released models; GRAN-TED's learned weights frozen after the first quarter of the steps
    # (the length of its warm-up phase is our choice).
    **{
        sid: Variant(f"{PAPER_NAMES[sid]} ({SHIPPED_BY[sid]})", sid)
        for sid in ("flux2", "unifusion", "hidream")
    },
    "granted": Variant("B3 frozen after 1/4 (GRAN-TED)", "b3", freeze_fraction=0.25),
}
ROW_NAMES = {vid: v.name for vid, v in VARIANTS.items()}
# The paper's own rows (its strategies and FuseDiT), and the released models' schemes set beside them.
PAPER_ROWS = tuple(v for v in VARIANTS if v in PAPER_IDS and not SHIPPED_BY.get(v))
RELEASED_ROWS = tuple(v for v in VARIANTS if SHIPPED_BY.get(v) or VARIANTS[v].freeze_fraction)


def parse_strategies(text: str) -> list[str]:
    """'b1,s2' -> row ids in the table's order; unknown ids are an error listing the valid ones."""
    ids = [s.strip().lower() for s in text.split(",") if s.strip()]
    unknown = [s for s in ids if s not in VARIANTS]
    if unknown or not ids:
        gates = [v for v in VARIANTS if v not in PAPER_ROWS and v not in RELEASED_ROWS]
        raise ValueError(
            f"unknown strategies {unknown or text!r}; valid: {', '.join(PAPER_ROWS)} (the paper's), "
            f"{', '.join(gates)} (gate variants), {', '.join(RELEASED_ROWS)} (schemes of released models)"
        )
    return [s for s in VARIANTS if s in ids]
