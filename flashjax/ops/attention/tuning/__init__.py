"""Autotuned attention block sizes: tuning keys, the JSON store, the search.

A Pallas attention backend picks its tiles (`BlockSizes`) with a heuristic; this package
keeps measured better choices in JSON files per device kind and finds them again for a call
(or, when the device kind has none, in the files of another device kind of the same GPU
architecture).
docs/autotune.md is the user guide.

  keys.py    the tuning key of a call: buckets, `make_key`, `key_string`, `mask_features`,
             the device slug of the file names, the architecture / family / SM count of a
             device kind (`device_architecture`, `KNOWN_DEVICES`)
  store.py   the files (user cache, packaged defaults in flashjax/ops/attention/tuned/), the
             locked atomic `save` / `record`, `lookup` and `tuned_block_sizes` (what the
             backends call), `lookup_source` / `tuned_source` (which entry served),
             `disabled()`
  search.py  `candidates` (each tunable backend declares its own `search_space(head_dim)`
             in its module) and `search`, which times them

The study that fills the files is `configs/tune_attention.py` (experiment kind
`experiments/attention_tune.py`). This file imports nothing, so the backends can import
`store` while `search` imports the backends' search spaces.
"""
