"""KV caches for converted models and CUDA-graph decoding.

==================  ==============================================================================================
module              what
==================  ==============================================================================================
``cache``           `SSACache` (dynamic, keeps block means), `SSAStaticCache` (transformers' static cache plus block
                    means for compiled steps), `build_ssa_caches` (what `convert` installs so that `generate()`
                    builds them)
``static``          `StaticSSACache` (an `SSAStaticCache` filled from a prefill, attending with positions on the
                    device) and `static_generate`: each decode step of the model replayed from one CUDA graph
==================  ==============================================================================================

How a cache takes part in SSA attention: the attention function asks the layer's cache through two optional
methods, and transformers' own caches have neither (the layer then attends over the keys they return):
``attend(layer_idx, q, k, v, *, config, scale)`` (the cache attends itself: `StaticSSACache`, whose positions live
on the device) and ``block_means(layer_idx, keys, doc_start, block_size)`` (decode steps select from the cache's
block means: `SSACache`, whose ``block_means_before_append`` leaves a step's completed block to the one-launch
decode step).
"""

from .cache import LayerMeans, SSACache, SSAStaticCache, build_ssa_caches
from .static import StaticSSACache, static_generate

__all__ = ["SSACache", "SSAStaticCache", "StaticSSACache", "LayerMeans", "build_ssa_caches", "static_generate"]
