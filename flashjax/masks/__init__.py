"""Host-side mask library (numpy) and the kernel-facing BlockMask."""

from flashjax.masks.block_mask import EMPTY, FULL, PARTIAL, BlockMask
from flashjax.masks.rule import Band, ElementRule, element_mask
