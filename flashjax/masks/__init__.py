"""Host-side mask library (numpy) and the kernel-facing BlockMask.

Modules, each importing only those before it: rule -> masks -> rcm -> block_mask -> builders;
`families` (the studies' mask families) uses only the public constructors of `masks`.
"""

from flashjax.masks.rule import Band, ElementRule, element_mask
from flashjax.masks.masks import (EMPTY, FULL, PARTIAL, AndMask, CoordinateMask, DenseMask,
                                  DilatedMask, GlobalTokensMask, Mask, OrMask, RuleMask,
                                  TreeMask, causal, dilated, document, from_dense, full,
                                  global_tokens, prefix_lm, random_banded, sliding_window,
                                  tree)
from flashjax.masks.rcm import (permute_mask, permute_qkv, rcm_permutation,
                                unpermute_output)
from flashjax.masks.block_mask import BlockMask, block_mask_rcm
from flashjax.masks.builders import (block_mask_for, block_mask_from_dense,
                                     block_mask_from_mask, block_mask_from_rule,
                                     expand_block_mask)
from flashjax.masks import families
