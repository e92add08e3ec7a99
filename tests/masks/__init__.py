"""Tests of flashjax.masks: mask library, BlockMask builders, RCM."""
