"""Kernel options: the tunables and variants of the SSA Triton kernels, passed explicitly to the host functions.

Every host function (`select_blocks`, `attend_blocks`, `decode_select`, `decode_attend`, `alignment_loss`, ...)
takes `options: KernelOptions | None` (None: the defaults below, the settings measured best on the H200; README.md
beside this file gives the measurements). Tests and benchmarks build variants with `dataclasses.replace`, e.g.
`KernelOptions(poison=True, select=SelectOptions(cap=1))`; nothing is set on a module.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

__all__ = ["KernelOptions", "SelectOptions", "AttendOptions", "DecodeOptions", "DEFAULT_OPTIONS"]


def _check_positive(obj, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{type(obj).__name__}.{name}={value!r}: must be a positive int.")


@dataclass(frozen=True)
class SelectOptions:
    """The prefill / training selection (`select.py`).

    rows: tokens x padded group per program (M); blocks: blocks per step of pass 1; lanes: blocks per step of
    passes 2 and 3 (at least the budget, >= 16 compiled); cap: keys above the lower bound kept per token (more: the
    exact fallback); warps; means_slots: slots per block-means program; interior: chunks that hold only candidates
    of every token of the tile run without masks (True, False, or "auto": on for padded groups of at least
    `interior_min_group` rows, where it was faster on the H200)."""

    rows: int = 64
    blocks: int = 64
    lanes: int = 32
    cap: int = 64
    warps: int = 4
    means_slots: int = 32
    interior: bool | str = "auto"
    interior_min_group: int = 16

    def __post_init__(self):
        _check_positive(self, ("rows", "blocks", "lanes", "cap", "warps", "means_slots", "interior_min_group"))
        if self.interior not in (True, False, "auto"):
            raise ValueError(f"SelectOptions.interior={self.interior!r}: use True, False or 'auto'.")


@dataclass(frozen=True)
class AttendOptions:
    """The sparse attention forward / backward (`attend.py`).

    fwd_keys: keys per step of the query-centric kernels (whole blocks); fwd_warps / fwd_stages; dkv_rows: query
    rows per step of the dk/dv kernel; dkv_item_rows: query rows per dk/dv work item (long block lists are split so
    that the sink block does not run alone at the end); dkv_warps / dkv_stages. Chosen on the H200 by
    `benchmarks/attention.py --sweep`."""

    fwd_keys: int = 64
    fwd_warps: int = 4
    fwd_stages: int = 3
    dkv_rows: int = 64
    dkv_item_rows: int = 2048
    dkv_warps: int = 4
    dkv_stages: int = 1

    def __post_init__(self):
        _check_positive(self, tuple(f.name for f in dataclasses.fields(self)))


@dataclass(frozen=True)
class DecodeOptions:
    """Decode steps (`decode.py`, T <= 4 queries per row): fields are documented there."""


@dataclass(frozen=True)
class KernelOptions:
    """All kernel options. poison: fresh outputs are filled with NaN (integers: a huge sentinel) so that unwritten
    elements fail the tests."""

    select: SelectOptions = field(default_factory=SelectOptions)
    attend: AttendOptions = field(default_factory=AttendOptions)
    decode: DecodeOptions = field(default_factory=DecodeOptions)
    poison: bool = False


DEFAULT_OPTIONS = KernelOptions()
