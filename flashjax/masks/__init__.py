"""Host-side mask library (numpy) and the kernel-facing BlockMask."""

from flashjax.masks.block_mask import EMPTY, FULL, PARTIAL, BlockMask
from flashjax.masks.builders import (block_mask_for, block_mask_from_dense,
                                     block_mask_from_mask, block_mask_from_rule,
                                     expand_block_mask)
from flashjax.masks.masks import (AndMask, CoordinateMask, DenseMask, DilatedMask,
                                  GlobalTokensMask, Mask, OrMask, RuleMask, TreeMask, causal,
                                  dilated, document, from_dense, full, global_tokens, prefix_lm,
                                  random_banded, sliding_window, tree)
from flashjax.masks.rcm import (block_mask_rcm, permute_mask, permute_qkv, rcm_permutation,
                                unpermute_output)
from flashjax.masks.rule import Band, ElementRule, element_mask
