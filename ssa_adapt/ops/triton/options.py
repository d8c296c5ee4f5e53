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
    exact fallback); warps; stages: the software pipeline's depth for the block means' loads (shared memory per
    program grows with it: 32 KB at D = 64, 64 KB at D = 128 with 3); means_slots: slots per block-means program;
    interior: chunks that hold only candidates of every token of the tile run without masks, in loops of their own
    (True, False, or "auto": on for padded groups of at least `interior_min_group` rows; every group since the
    loops were split); max_registers: a cap on the selection kernel's registers per thread (ptxas `.maxnreg`), so
    that more programs share an SM (65536 registers / (128 threads x cap)); None leaves the count to the compiler
    (157 at G = 3-4, 255 at G = 1-2 with Triton 3.6: three and two programs per SM). Compiled for sm_90 the three
    passes stay free of spills down to 96 (README.md section 1). The defaults, interior chunks at every group and
    a cap of 128, won summed over the sweep's shapes on the H100 at 32k (2026-12-07: 8.95 ms against 9.85 without
    either). skip_chunks: pass 2 also keeps each token's best importance per chunk (bfloat16, `[B, T, H, chunks]`
    of scratch), and pass 3 skips the chunks where no token of the tile reaches its bound (README.md section 1:
    most chunks on a trained model's activations, none on random inputs); not yet timed, so off. survivor_masks:
    pass 3 stores one word of survivor bits per token and 32 blocks instead of each survivor's importance and block
    (no prefix count and no layout conversions in its loop: 164 instead of 302 instructions per thread and step at
    G = 3, sm_90), then the words become the tokens' survivor lists and the survivors' importances are recomputed,
    on tiles with at least `mask_min_chunks` chunks of pass 3 (shorter tiles: the plain pass 3, since the decoding
    and the recomputation cost about what ~12 chunks save); excludes skip_chunks; not yet timed, so off.
    running_bound: pass 1 also keeps lane maxima of the importances under its running statistics, rescaled as the
    normalisers grow (a lower bound at any point), and pass 3 runs on their bound without pass 2; a tile where some
    token then has more than `cap` survivors runs pass 2 and pass 3 again (exact either way). At G = 3 pass 1 costs
    ~64% more per block (sm_90) and pass 2 (1.3x pass 1's default) goes; excludes skip_chunks (which reads pass 2's
    chunk maxima); needs blocks >= lanes (else off); not yet timed, so off.
    longest_first: the grid's first programs take the last tiles of the causal triangle (the most blocks), so that
    the longest tiles do not start last and run alone at the end; the selection does not change."""

    rows: int = 64
    blocks: int = 64
    lanes: int = 32
    cap: int = 64
    warps: int = 4
    stages: int = 3
    means_slots: int = 32
    interior: bool | str = "auto"
    interior_min_group: int = 1
    max_registers: int | None = 128
    skip_chunks: bool = False
    survivor_masks: bool = False
    mask_min_chunks: int = 16
    running_bound: bool = False
    longest_first: bool = True

    def __post_init__(self):
        tiles = ("rows", "blocks", "lanes", "cap", "warps", "stages", "means_slots")
        _check_positive(self, (*tiles, "interior_min_group", "mask_min_chunks"))
        for name in ("skip_chunks", "survivor_masks", "running_bound", "longest_first"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"SelectOptions.{name}={getattr(self, name)!r}: use True or False.")
        if self.skip_chunks and self.survivor_masks:
            raise ValueError(
                "SelectOptions(skip_chunks=True, survivor_masks=True): pass 3 either skips chunks or stores survivor "
                "masks; set one of them."
            )
        if self.skip_chunks and self.running_bound:
            raise ValueError(
                "SelectOptions(skip_chunks=True, running_bound=True): chunk skipping reads pass 2's chunk maxima, "
                "which the running bound leaves out; set one of them."
            )
        if self.interior not in (True, False, "auto"):
            raise ValueError(f"SelectOptions.interior={self.interior!r}: use True, False or 'auto'.")
        r = self.max_registers
        if r is not None and (not isinstance(r, int) or isinstance(r, bool) or not 24 <= r <= 255 or r % 8):
            raise ValueError(
                f"SelectOptions.max_registers={r!r}: use None (the compiler's choice) or a multiple of 8 from 24 to "
                "248 (registers per thread)."
            )


@dataclass(frozen=True)
class AttendOptions:
    """The sparse attention forward / backward (`attend.py`).

    fwd_keys: keys per step of the query-centric kernels (forward and dq; whole blocks); fwd_warps / fwd_stages
    (None: by head dimension, `FWD_BY_HEAD_DIM`); dkv_rows: query rows per step of the dk/dv kernel; dkv_item_rows:
    query rows per dk/dv work item (long block lists are split so that the sink block does not run alone at the
    end); dkv_warps / dkv_stages. Chosen by `benchmarks/attention.py --sweep`."""

    fwd_keys: int | None = None
    fwd_warps: int | None = None
    fwd_stages: int | None = None
    dkv_rows: int = 64
    dkv_item_rows: int = 2048
    dkv_warps: int = 4
    dkv_stages: int = 1

    def __post_init__(self):
        fwd = ("fwd_keys", "fwd_warps", "fwd_stages")
        _check_positive(self, tuple(f.name for f in dataclasses.fields(self) if f.name not in fwd))
        _check_positive(self, tuple(n for n in fwd if getattr(self, n) is not None))

    def fwd_launch(self, head_dim: int) -> tuple[int, int, int]:
        """(keys per step, warps, stages) of the forward and dq kernels for this head dimension: the fields where
        set, else `FWD_BY_HEAD_DIM` (the largest entry not below head_dim, the last beyond it)."""
        dims = sorted(FWD_BY_HEAD_DIM)
        default = FWD_BY_HEAD_DIM[next((d for d in dims if d >= head_dim), dims[-1])]
        return tuple(
            default[i] if v is None else v for i, v in enumerate((self.fwd_keys, self.fwd_warps, self.fwd_stages))
        )


# (keys per step, warps, stages) of the forward / dq kernels by head dimension. One warp per (token, KV head) at
# D = 64 keeps each step's row statistics inside a warp (no barriers): on the H100 at 32k (2026-12-07) the forward
# took 0.49-1.94 ms instead of 0.93-3.70 with 4 warps and 64 keys, the backward 9-20% less; at D = 128 one warp
# spills in dq, and 2 warps with 2 stages won (forward 4.68 against 5.52 ms, backward 7.53 against 8.39).
FWD_BY_HEAD_DIM = {64: (32, 1, 3), 128: (64, 2, 2)}


@dataclass(frozen=True)
class DecodeOptions:
    """Decode steps (`decode.py`, T <= 4 queries per row, inference only): the selection's scoring and finishing
    launches and the split-KV attention. Measured on the H200: README.md section 6 and the files cited below
    (benchmarks/results/)."""

    # Blocks per step of the scoring kernel, its warps
    score_blocks: int = 64
    score_warps: int = 4
    # The logits' products: "tf32x3" (three tf32 tensor-core products, hi*hi + hi*lo + lo*hi: ~2^-21 relative
    # error, the products' rounding of float32 itself is 2^-24) or "ieee" (exact float32 FMAs on the CUDA cores; the
    # group is padded to 16 rows, so 16 / G times the useful work). Measured on the H200: README.md section 6.
    score_precision: str = "tf32x3"
    # The finishing pass: "chunks" (one launch over (row, chunk of chunk_blocks blocks); the row's last chunk
    # merges), "row" (one program per row scans every block), or "auto": chunks while they make at most
    # chunk_programs_per_sm programs per SM, else row. On the H200 at 128k (whole step, CUDA graph, (9, 3, 64) /
    # (32, 8, 64) x batch 1 / 8, decode-h200-chunks-auto.json): row 34.3 / 58.5 / 42.1 / 88.8 us, chunks of 2048
    # 26.7 / 47.8 / 33.7 / 82.1; chunks of 1024, 512, 256 lost to 2048 (each program ranks its survivors, and the
    # last one merges NCH * S candidates). (A third pass, "split", lost everywhere and was removed: README.md.)
    finish: str = "auto"
    chunk_blocks: int = 2048
    chunk_programs_per_sm: int = 2
    chunk_small: int = 32  # a chunk's survivors up to this many are ranked in a 32 x 32 comparison (else finish_cap)
    chunk_pairs: int = 256  # merged candidates up to this many are ranked by pairwise comparison, more by bisection
    # Blocks per chunk of the row finisher's passes (its lanes): swept on the H200 2026-12-02
    # (decode-h200-sweep-tf32x3.json, in git history), 1024 beat 512 and 2048. Warps of both finishing kernels.
    finish_blocks: int = 1024
    finish_warps: int = 8
    finish_groups: int = 64  # lane groups whose maxima bound the threshold from below
    finish_cap: int = 128  # surviving keys ranked exactly; more (or a lane's third key chosen) take the bisection path
    finish_fast: bool = True  # False: always the bisection path (tests)
    # Splits whose statistics the finishing kernels read in one load (a power of two); None: all of them, up to
    # 2048 values (a loop over single splits waits for each load in turn). Tests set a small one.
    stats_chunk: int | None = None
    # Keys per step of the attention kernel, its warps
    attend_keys: int = 32
    attend_warps: int = 4
    # Programs per SM the split heuristics (scoring and attention) aim at: swept on the H200
    # (decode-h200-sweep.json, in git history), 8 beat 2
    programs_per_sm: int = 8
    # Eager decode steps (an SSACache, `generate()` without a static cache): selection and attention in one launch
    # per layer (`decode/step.py`: programs per (query, KV head) score, the last one finishes and attends), True,
    # or the split launches above (four per layer), False. Eager decoding is bound by the host's launch cost; the
    # static-cache paths (CUDA graphs, compiled steps) always run the split launches. step_warps: its warps.
    fused_step: bool = True
    step_warps: int = 8
    # The one-launch step splits a row's scoring over programs of this many blocks each (grid (rows, splits); the
    # row's last program to finish scoring finishes and attends), so that a long context is not scanned by one
    # program alone (8192 blocks at 128k); None: one program per row at every length.
    step_split_blocks: int | None = 512
    # The one-launch step launched through the compiled kernel Triton returned for the same specialisation
    # (`compiled_launch.CompiledLaunch`: Triton's per-call binding and key hashing skipped), True, or through
    # Triton's launcher each call, False. H200 (2026-12-07): 44-76 us of host time per call against 65-106. On since
    # its GPU test (`test_decode_step_cached_launch_equals_triton_launch_gpu`: the same bits as Triton's launcher)
    # passed on the H100 (2026-12-07); eager generate on SmolLM2's architecture there, ms per step: 27.9 against
    # 29.7 at 4k, 43.4 against 44.0 at 128k (batch 1).
    cached_launch: bool = True

    def __post_init__(self):
        tiles = ("score_blocks", "chunk_blocks", "chunk_small", "finish_blocks", "finish_groups", "finish_cap",
                 "attend_keys", "score_warps", "finish_warps", "attend_warps", "step_warps")  # fmt: skip
        tiles += ("stats_chunk",) if self.stats_chunk is not None else ()
        tiles += ("step_split_blocks",) if self.step_split_blocks is not None else ()
        _check_positive(self, (*tiles, "chunk_programs_per_sm", "chunk_pairs", "programs_per_sm"))
        for name, value in ((n, getattr(self, n)) for n in tiles):
            if value & (value - 1):
                raise ValueError(f"DecodeOptions.{name}={value}: must be a power of two (a Triton tile size).")
        if self.score_precision not in ("tf32x3", "ieee"):
            raise ValueError(f"DecodeOptions.score_precision={self.score_precision!r}: use 'tf32x3' or 'ieee'.")
        if self.finish not in ("auto", "chunks", "row"):
            raise ValueError(f"DecodeOptions.finish={self.finish!r}: use 'auto', 'chunks' or 'row'.")
        for name in ("finish_fast", "fused_step", "cached_launch"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"DecodeOptions.{name}={getattr(self, name)!r}: must be a bool.")


@dataclass(frozen=True)
class KernelOptions:
    """All kernel options. poison: fresh outputs are filled with NaN (integers: a huge sentinel) so that unwritten
    elements fail the tests."""

    select: SelectOptions = field(default_factory=SelectOptions)
    attend: AttendOptions = field(default_factory=AttendOptions)
    decode: DecodeOptions = field(default_factory=DecodeOptions)
    poison: bool = False


DEFAULT_OPTIONS = KernelOptions()
