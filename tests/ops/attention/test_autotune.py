"""Tests of attention block-size tuning (flashjax.ops.attention.tuning): keys, store, search."""

import json
import os
import pathlib
import shutil
import tempfile
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from flashjax import masks
from flashjax.ops.attention.block_sizes import BlockSizes
from flashjax.ops.attention.tuning import keys
from flashjax.ops.attention.tuning import search
from flashjax.ops.attention.tuning import store

_DEVICE = "NVIDIA H200"


def _key(**overrides):
  fields = dict(device_kind=_DEVICE, dtype="bfloat16", head_dim=128, q_len=4096,
                kv_len=4096, causal=True, density=0.5, group=1)
  fields.update(overrides)
  backend = fields.pop("backend", "pallas_mosaic_gpu")
  return keys.make_key(backend, **fields)


def _lookup(**overrides):
  fields = dict(device_kind=_DEVICE, dtype="bfloat16", head_dim=128, q_len=4096,
                kv_len=4096, causal=True, density=0.5, group=1)
  fields.update(overrides)
  backend = fields.pop("backend", "pallas_mosaic_gpu")
  return store.lookup(backend, **fields)


class TuningTestCase(parameterized.TestCase):
  """Fresh user and packaged directories per test, lookup enabled, caches cleared."""

  def setUp(self):
    super().setUp()
    root = tempfile.mkdtemp(prefix="fj_autotune_")
    self.addCleanup(shutil.rmtree, root, ignore_errors=True)
    self.user_dir = pathlib.Path(root, "user")
    self.packaged_dir = pathlib.Path(root, "packaged")
    self.user_dir.mkdir()
    self.packaged_dir.mkdir()
    self.enter_context(mock.patch.dict(os.environ, {store.ENV_DIR: str(self.user_dir)}))
    os.environ.pop(store.ENV_ENABLE, None)
    self.enter_context(mock.patch.object(store, "PACKAGED_DIR", self.packaged_dir))
    store.clear_cache()
    self.addCleanup(store.clear_cache)

  @property
  def user_file(self):
    return self.user_dir / "nvidia_h200.json"

  @property
  def packaged_file(self):
    return self.packaged_dir / "nvidia_h200.json"


class KeyTest(parameterized.TestCase):

  @parameterized.named_parameters(
      (f"{n=}", n, want) for n, want in
      ((1, 128), (128, 128), (129, 256), (3000, 4096), (4096, 4096), (10**7, 131072)))
  def test_length_bucket(self, n, want):
    self.assertEqual(keys.bucket_length(n), want)

  @parameterized.named_parameters(
      (f"{density=}", density, want) for density, want in
      ((1.0, 1.0), (0.9, 1.0), (0.516, 0.5), (0.3, 0.25), (0.078, 0.0625), (1e-3, 1 / 64),
       (0.0, 1 / 64), (None, None)))
  def test_density_bucket(self, density, want):
    self.assertEqual(keys.bucket_density(density), want)

  def test_key_fields_and_text(self):
    key = _key(head_dim=80, q_len=3000, kv_len=5000, dtype=jnp.bfloat16, density=0.3,
               group=4)
    self.assertEqual(key, {"backend": "pallas_mosaic_gpu", "device_kind": _DEVICE,
                           "dtype": "bfloat16", "head_dim": 128, "causal": True,
                           "density": 0.25, "q_len": 4096, "kv_len": 8192, "group": 4})
    reordered = dict(reversed(list(key.items())))
    self.assertEqual(keys.key_string(reordered), keys.key_string(key))
    self.assertEqual(json.loads(keys.key_string(key)), key)
    self.assertEqual(keys.device_slug(_DEVICE), "nvidia_h200")
    self.assertEqual(keys.padded_head_dim(8), 16)

  @parameterized.named_parameters(
      ("q_len=0", dict(q_len=0), "n="), ("density=1.5", dict(density=1.5), "density="),
      ("group=0", dict(group=0), "group="), ("head_dim=0", dict(head_dim=0), "head_dim="),
      ("device_kind=''", dict(device_kind=""), "device_kind="))
  def test_bad_key_inputs(self, overrides, message):
    with self.assertRaisesRegex(ValueError, message):
      _key(**overrides)

  def test_block_sizes_round_trip(self):
    sizes = BlockSizes(block_q=64, block_kv=128, num_stages=3, persistent=True)
    fields = store.block_sizes_to_dict(sizes)
    self.assertEqual(fields, {"block_q": 64, "block_kv": 128, "num_stages": 3,
                              "persistent": True})
    self.assertEqual(store.block_sizes_from_dict(fields), sizes)
    self.assertEqual(search.describe(sizes), "64x128 s3 persistent")
    with self.assertRaisesRegex(ValueError, "unknown BlockSizes fields"):
      store.block_sizes_from_dict({"block_q": 64, "warps": 4})

  @parameterized.named_parameters(
      (f"{backend=}_{head_dim=}", backend, head_dim, count) for backend, head_dim, count in
      (("pallas_mosaic_gpu", 128, 16), ("pallas_mosaic_gpu", 256, 8),
       ("pallas_triton", 64, 24)))
  def test_candidates(self, backend, head_dim, count):
    space = search.candidates(backend, head_dim)
    self.assertLen(space, count)
    self.assertLen(set(space), count)
    if backend == "pallas_mosaic_gpu":
      self.assertTrue(all(s.block_q in (64, 128) and s.block_kv >= 64 for s in space))
      self.assertEqual({s.persistent for s in space}, {False, True})
    with self.assertRaisesRegex(ValueError, "backend="):
      search.candidates("xla", head_dim)


class DeviceArchitectureTest(parameterized.TestCase):

  @parameterized.named_parameters(
      (name, name, arch, family, sms) for name, arch, family, sms in
      (("NVIDIA H100 80GB HBM3", "sm90", "h100", 132), ("NVIDIA H100 PCIe", "sm90", "h100", 114),
       ("NVIDIA H100 NVL", "sm90", "h100", 132), ("NVIDIA H200", "sm90", "h200", 132),
       ("nvidia_h200", "sm90", "h200", 132), ("NVIDIA H800", "sm90", "h800", 132),
       ("NVIDIA H20", "sm90", "h20", 78), ("NVIDIA GH200 480GB", "sm90", "gh200", 132),
       ("NVIDIA A100-SXM4-80GB", "sm80", "a100", 108), ("NVIDIA B200", "sm100", "b200", None),
       ("cpu", None, None, None), ("TPU v5 lite", None, None, None),
       ("NVIDIA H2000", None, None, None)))
  def test_known_names(self, name, arch, family, sms):
    self.assertEqual(keys.device_architecture(name), arch)
    self.assertEqual(keys.device_family(name), family)
    self.assertEqual(keys.device_sm_count(name), sms)

  def test_compute_capability_wins_over_the_name(self):
    self.assertEqual(keys.device_architecture("NVIDIA Hopper Sample", "9.0"), "sm90")
    self.assertEqual(keys.device_architecture("NVIDIA H100 80GB HBM3", "8.0"), "sm80")
    self.assertEqual(keys.device_architecture("NVIDIA B200", "10.0a"), "sm100")
    self.assertEqual(keys.device_architecture("NVIDIA H100", ""), "sm90")  # empty: by name
    with self.assertRaisesRegex(ValueError, "compute_capability='nine'"):
      keys.device_architecture("NVIDIA H100", "nine")
    with self.assertRaisesRegex(ValueError, "device_kind="):
      keys.device_architecture("")

  def test_device_distance(self):
    h100 = "NVIDIA H100 80GB HBM3"
    self.assertEqual(keys.device_distance(h100, "NVIDIA H100 NVL"), (0, 0))
    self.assertEqual(keys.device_distance(h100, "NVIDIA H200"), (0, 1))
    self.assertEqual(keys.device_distance(h100, "NVIDIA H100 PCIe"), (1, 0))
    self.assertEqual(keys.device_distance(h100, "NVIDIA H20"), (1, 1))
    self.assertEqual(keys.device_distance(h100, "NVIDIA H100 PCIe", sm_count=114), (0, 0))
    self.assertEqual(keys.device_distance("NVIDIA Hopper Sample", "NVIDIA H200"), (1, 1))


class MaskFeaturesTest(parameterized.TestCase):

  def test_features(self):
    t = 1024  # 8 x 8 tiles of 128: causal keeps 36 of 64
    self.assertEqual(keys.mask_features(None, t, t), (False, 1.0))
    self.assertEqual(keys.mask_features(None, t, t, is_causal=True), (True, 36 / 64))
    self.assertEqual(keys.mask_features(masks.causal(t, t), t, t), (True, 36 / 64))
    ids = np.repeat(np.arange(4), 256)[None]
    causal, density = keys.mask_features(masks.document(ids), t, t)
    self.assertTrue(causal)
    self.assertAlmostEqual(density, 4 * 3 / 64)  # 2 x 2 tiles per document, 3 non-empty
    full_docs = masks.document(ids, causal=False)
    self.assertEqual(keys.mask_features(full_docs, t, t), (False, 16 / 64))
    self.assertEqual(keys.mask_features(full_docs, t, t, is_causal=True), (True, 12 / 64))
    self.assertFalse(keys.mask_features(masks.sliding_window(t, t, 128, 128), t, t)[0])
    self.assertEqual(keys.mask_features(None, t, t, has_segment_ids=True), (False, None))
    bool_mask = jnp.ones((1, 1, t, t), bool)
    self.assertEqual(keys.mask_features(bool_mask, t, t, is_causal=True), (True, None))


class LookupTest(TuningTestCase):

  def _record(self, path, sizes, **key_overrides):
    store.record(store.make_entry(_key(**key_overrides), sizes, 1.0), path)

  def test_missing_files_give_none(self):
    self.assertIsNone(_lookup())

  def test_user_file_over_packaged(self):
    self._record(self.packaged_file, BlockSizes(64, 64))
    self.assertEqual(_lookup(), BlockSizes(64, 64))
    self._record(self.user_file, BlockSizes(128, 128, num_stages=3))
    self.assertEqual(_lookup(), BlockSizes(128, 128, num_stages=3))

  def test_exact_packaged_over_nearest_user(self):
    self._record(self.packaged_file, BlockSizes(64, 64))
    self._record(self.user_file, BlockSizes(128, 128), q_len=8192, kv_len=8192)
    self.assertEqual(_lookup(), BlockSizes(64, 64))

  def test_nearest_entry(self):
    self._record(self.user_file, BlockSizes(64, 64), q_len=1024, kv_len=1024)
    self._record(self.user_file, BlockSizes(128, 128), q_len=16384, kv_len=16384)
    self._record(self.user_file, BlockSizes(64, 128), density=1 / 16)
    self._record(self.user_file, BlockSizes(128, 64), causal=False, q_len=8192, kv_len=8192)
    self.assertEqual(_lookup(q_len=8192, kv_len=8192), BlockSizes(128, 128))
    self.assertEqual(_lookup(q_len=2048, kv_len=2048), BlockSizes(64, 64))
    self.assertEqual(_lookup(density=0.1), BlockSizes(64, 128))
    self.assertEqual(_lookup(density=0.4), BlockSizes(64, 128))  # 3 halvings < 2 + 2 doublings
    self.assertEqual(_lookup(causal=False), BlockSizes(128, 64))
    self.assertIsNone(_lookup(group=4))
    self.assertIsNone(_lookup(dtype="float16"))
    self.assertIsNone(_lookup(head_dim=64))
    self.assertIsNone(_lookup(backend="pallas_triton"))
    self.assertIsNone(_lookup(device_kind="NVIDIA A100-SXM4-80GB"))  # not Hopper
    self.assertIsNone(_lookup(device_kind="cpu"))  # no architecture

  def test_unknown_density_prefers_the_denser_entry(self):
    self._record(self.user_file, BlockSizes(64, 64), density=1 / 16)
    self._record(self.user_file, BlockSizes(128, 128), density=1.0)
    self.assertEqual(_lookup(density=None), BlockSizes(128, 128))

  def test_disabled_by_env_and_context(self):
    self._record(self.user_file, BlockSizes(64, 64))
    self.assertEqual(_lookup(), BlockSizes(64, 64))
    with store.disabled():
      self.assertIsNone(_lookup())
    self.assertEqual(_lookup(), BlockSizes(64, 64))
    for value in ("0", "false", "OFF"):
      with mock.patch.dict(os.environ, {store.ENV_ENABLE: value}):
        self.assertIsNone(_lookup(), value)
    with mock.patch.dict(os.environ, {store.ENV_ENABLE: "1"}):
      self.assertEqual(_lookup(), BlockSizes(64, 64))

  def test_rewritten_file_is_seen(self):
    self._record(self.user_file, BlockSizes(64, 64))
    self.assertEqual(_lookup(), BlockSizes(64, 64))
    self._record(self.user_file, BlockSizes(64, 128))
    self.assertEqual(_lookup(), BlockSizes(64, 128))

  def test_tuned_block_sizes_from_call_arguments(self):
    device = jax.devices()[0].device_kind
    q = jnp.zeros((1, 1024, 4, 64), jnp.bfloat16)
    k = jnp.zeros((1, 1024, 2, 64), jnp.bfloat16)
    path = self.user_dir / f"{keys.device_slug(device)}.json"
    store.record(store.make_entry(
        keys.make_key("pallas_triton", device_kind=device, dtype="bfloat16", head_dim=64,
                          q_len=1024, kv_len=1024, causal=True, density=36 / 64, group=2),
        BlockSizes(64, 32)), path)
    call = dict(mask=None, is_causal=True, q_segment_ids=None)
    self.assertEqual(store.tuned_block_sizes("pallas_triton", q, k, **call),
                     BlockSizes(64, 32))
    self.assertIsNone(store.tuned_block_sizes("pallas_triton", q, k, interpret=True,
                                                 **call))
    block_mask = masks.BlockMask.from_mask(masks.causal(1024, 1024), 64, 32)
    self.assertIsNone(store.tuned_block_sizes("pallas_triton", q, k, mask=block_mask))


_H100 = "NVIDIA H100 80GB HBM3"


class ArchitectureFallbackTest(TuningTestCase):
  """Other device kinds of the caller's architecture serve when its own files have nothing."""

  def _record(self, device_kind, sizes, *, packaged=False, **key_overrides):
    directory = self.packaged_dir if packaged else self.user_dir
    path = directory / f"{keys.device_slug(device_kind)}.json"
    store.record(store.make_entry(_key(device_kind=device_kind, **key_overrides), sizes,
                                  1.0), path)
    return str(path)

  def test_h100_takes_the_h200_entry(self):
    path = self._record(_DEVICE, BlockSizes(128, 64, num_stages=3), packaged=True)
    source = store.lookup_source("pallas_mosaic_gpu", **dict(
        device_kind=_H100, dtype="bfloat16", head_dim=128, q_len=4096, kv_len=4096,
        causal=True, density=0.5, group=1))
    self.assertEqual(source.block_sizes, BlockSizes(128, 64, num_stages=3))
    self.assertEqual((source.path, source.device_kind, source.match),
                     (path, _DEVICE, "architecture-exact"))
    self.assertEqual(json.loads(source.key), _key())
    self.assertEqual(source.as_dict()["block_sizes"],
                     {"block_q": 128, "block_kv": 64, "num_stages": 3})
    self.assertEqual(_lookup(device_kind=_H100), BlockSizes(128, 64, num_stages=3))
    near = store.lookup_source("pallas_mosaic_gpu", device_kind=_H100, dtype="bfloat16",
                               head_dim=128, q_len=8192, kv_len=8192, causal=True,
                               density=0.5, group=1)
    self.assertEqual((near.block_sizes, near.match),
                     (BlockSizes(128, 64, num_stages=3), "architecture-nearest"))
    self.assertIsNone(_lookup(device_kind=_H100, causal=False))  # shared fields still hold
    self.assertIsNone(_lookup(device_kind=_H100, group=2))

  def test_own_device_entries_win(self):
    self._record(_DEVICE, BlockSizes(64, 64), packaged=True)
    path = self._record(_H100, BlockSizes(128, 128, persistent=True))
    source = store.lookup_source("pallas_mosaic_gpu", device_kind=_H100, dtype="bfloat16",
                                 head_dim=128, q_len=4096, kv_len=4096, causal=True,
                                 density=0.5, group=1)
    self.assertEqual((source.block_sizes, source.path, source.device_kind, source.match),
                     (BlockSizes(128, 128, persistent=True), path, _H100, "exact"))
    # A nearest entry of the H100 itself still beats an exact one of the H200.
    self.assertEqual(_lookup(device_kind=_H100, q_len=2048, kv_len=2048),
                     BlockSizes(128, 128, persistent=True))
    self.assertEqual(_lookup(), BlockSizes(64, 64))  # and the H200 keeps its own

  def test_exact_over_nearest_then_closest_device(self):
    self._record("NVIDIA H100 PCIe", BlockSizes(64, 128), packaged=True)
    self._record("NVIDIA H20", BlockSizes(128, 32), q_len=8192, kv_len=8192)
    self._record(_DEVICE, BlockSizes(128, 64), packaged=True)
    # Exact entries of the PCIe H100 (same family, 114 SMs) and of the H200 (132 SMs as the
    # SXM H100): the SM count decides; with 114 SMs of the device, the PCIe entry wins.
    self.assertEqual(_lookup(device_kind=_H100), BlockSizes(128, 64))
    self.assertEqual(_lookup(device_kind=_H100, sm_count=114), BlockSizes(64, 128))
    self.assertEqual(_lookup(device_kind="NVIDIA H100 NVL"), BlockSizes(128, 64))
    # The H20 has the only 8k entry: exact in every field but the device, it beats both.
    self.assertEqual(_lookup(device_kind=_H100, q_len=8192, kv_len=8192),
                     BlockSizes(128, 32))
    # At 16k no entry is exact: the H20 is nearest (distance 2 < 4).
    self.assertEqual(_lookup(device_kind=_H100, q_len=16384, kv_len=16384),
                     BlockSizes(128, 32))
    with self.assertRaisesRegex(ValueError, "sm_count=0"):
      _lookup(device_kind=_H100, sm_count=0)

  def test_user_file_of_another_device_over_its_packaged_file(self):
    self._record(_DEVICE, BlockSizes(64, 64), packaged=True)
    path = self._record(_DEVICE, BlockSizes(64, 128))
    source = store.lookup_source("pallas_mosaic_gpu", device_kind=_H100, dtype="bfloat16",
                                 head_dim=128, q_len=4096, kv_len=4096, causal=True,
                                 density=0.5, group=1)
    self.assertEqual((source.block_sizes, source.path), (BlockSizes(64, 128), path))

  def test_architecture_by_name_or_compute_capability(self):
    self._record(_DEVICE, BlockSizes(128, 64, num_stages=3), packaged=True)
    self.assertEqual(_lookup(device_kind="NVIDIA H100 NVL"),
                     BlockSizes(128, 64, num_stages=3))
    self.assertEqual(_lookup(device_kind="NVIDIA GH200 480GB"),
                     BlockSizes(128, 64, num_stages=3))
    self.assertIsNone(_lookup(device_kind="NVIDIA Hopper Sample"))  # unknown name
    self.assertEqual(_lookup(device_kind="NVIDIA Hopper Sample", compute_capability="9.0"),
                     BlockSizes(128, 64, num_stages=3))
    self.assertIsNone(_lookup(device_kind="NVIDIA A100-SXM4-80GB"))
    self.assertIsNone(_lookup(device_kind="NVIDIA Ampere Sample", compute_capability="8.0"))
    # A file named for a Hopper part holding entries of another architecture: not used.
    self._record("NVIDIA A100-SXM4-80GB", BlockSizes(32, 32))
    (self.user_dir / "nvidia_a100_sxm4_80gb.json").rename(self.user_dir / "nvidia_h800.json")
    store.clear_cache()
    self.assertEqual(_lookup(device_kind=_H100), BlockSizes(128, 64, num_stages=3))

  def test_disabled(self):
    self._record(_DEVICE, BlockSizes(128, 64), packaged=True)
    self.assertEqual(_lookup(device_kind=_H100), BlockSizes(128, 64))
    with store.disabled():
      self.assertIsNone(_lookup(device_kind=_H100))
    with mock.patch.dict(os.environ, {store.ENV_ENABLE: "0"}):
      self.assertIsNone(_lookup(device_kind=_H100))
      self.assertIsNone(store.lookup_source("pallas_mosaic_gpu", device_kind=_H100,
                                            dtype="bfloat16", head_dim=128, q_len=4096,
                                            kv_len=4096, causal=True, density=0.5, group=1))

  def test_new_and_changed_files_of_other_devices_are_seen(self):
    # Files written behind the store's back (no `record`, which clears the caches): the
    # cached lookups must notice by the files' listing, mtimes and sizes.
    def write(sizes, mtime_ns):
      self.packaged_file.write_text(json.dumps({
          "format": store.FILE_FORMAT, "version": store.FILE_VERSION,
          "entries": [store.make_entry(_key(), sizes, 1.0)]}))
      os.utime(self.packaged_file, ns=(mtime_ns, mtime_ns))

    self.assertIsNone(_lookup(device_kind=_H100))
    write(BlockSizes(128, 64), 10**18)  # a new file
    self.assertEqual(_lookup(device_kind=_H100), BlockSizes(128, 64))
    write(BlockSizes(64, 64, num_stages=3), 2 * 10**18)  # rewritten
    self.assertEqual(_lookup(device_kind=_H100), BlockSizes(64, 64, num_stages=3))
    self.packaged_file.unlink()
    self.assertIsNone(_lookup(device_kind=_H100))

  def test_malformed_file_of_the_architecture_names_the_file(self):
    bad = self.user_dir / "nvidia_h800.json"
    bad.write_text("{entries: []")
    with self.assertRaisesRegex(ValueError, str(bad)):
      _lookup(device_kind=_H100)
    self.assertIsNone(_lookup(device_kind="NVIDIA A100-SXM4-80GB"))  # not consulted


class _FakeGpu:
  platform = "gpu"

  def __init__(self, device_kind, compute_capability, core_count):
    self.device_kind = device_kind
    self.compute_capability = compute_capability
    self.core_count = core_count


class PackagedFallbackTest(parameterized.TestCase):
  """The shipped H100 and H200 tables serve their own cards and the other Hopper parts
  (values read from nvidia_h100_80gb_hbm3.json and nvidia_h200.json)."""

  def setUp(self):
    super().setUp()
    root = tempfile.mkdtemp(prefix="fj_autotune_")
    self.addCleanup(shutil.rmtree, root, ignore_errors=True)
    self.user_dir = pathlib.Path(root)
    self.enter_context(mock.patch.dict(os.environ, {store.ENV_DIR: root}))
    os.environ.pop(store.ENV_ENABLE, None)
    store.clear_cache()
    self.addCleanup(store.clear_cache)

  def _source(self, device_kind, **overrides):
    fields = dict(device_kind=device_kind, dtype="bfloat16", head_dim=128, q_len=4096,
                  kv_len=4096, causal=True, density=1 / 8, group=1)
    fields.update(overrides)
    return store.lookup_source("pallas_mosaic_gpu", **fields)

  @parameterized.named_parameters(
      ("h100_sxm", _H100, None, _H100, ""), ("h200", "NVIDIA H200", None, "NVIDIA H200", ""),
      ("h100_nvl", "NVIDIA H100 NVL", None, _H100, "architecture-"),
      ("h100_pcie", "NVIDIA H100 PCIe", None, _H100, "architecture-"),
      # An sm90 part no table knows: the two shipped tables are equally close; the tie goes
      # to the first device kind by name.
      ("unknown_name_sm90", "NVIDIA Hopper Sample", "9.0", _H100, "architecture-"))
  def test_hopper_parts_get_a_tuned_entry(self, device_kind, capability, table, match):
    packaged = str(store.PACKAGED_DIR / f"{keys.device_slug(table)}.json")
    documents = self._source(device_kind, compute_capability=capability)
    self.assertEqual(documents.block_sizes,
                     BlockSizes(128, 64, num_stages=2, persistent=False))
    self.assertEqual((documents.path, documents.device_kind, documents.match),
                     (packaged, table, match + "exact"))
    dense = self._source(device_kind, compute_capability=capability, causal=False,
                         density=1.0, q_len=16384, kv_len=16384)
    self.assertEqual(dense.block_sizes, BlockSizes(128, 128, num_stages=2, persistent=True))
    # No 8k x 16k causal entry: the nearest is the 16k one (distance 1 against 3 for 4k).
    causal = self._source(device_kind, compute_capability=capability, density=0.5,
                          q_len=16384, kv_len=8192)
    self.assertEqual((causal.block_sizes, causal.match),
                     (BlockSizes(128, 128, num_stages=2, persistent=True), match + "nearest"))
    # The two cards' tables differ here: the H100 runs dense D = 64 on the persistent grid.
    d64 = self._source(device_kind, compute_capability=capability, head_dim=64,
                       causal=False, density=1.0, q_len=2048, kv_len=2048)
    self.assertEqual(d64.block_sizes,
                     BlockSizes(128, 128, num_stages=3, persistent=table == _H100))

  def test_non_hopper_and_unknown_devices_get_none(self):
    self.assertIsNone(self._source("NVIDIA A100-SXM4-80GB"))
    self.assertIsNone(self._source("NVIDIA Hopper Sample"))  # no compute capability
    self.assertIsNone(self._source("NVIDIA Hopper Sample", compute_capability="8.0"))
    self.assertIsNone(self._source("cpu"))

  def test_user_entry_of_the_h100_wins(self):
    key = keys.make_key("pallas_mosaic_gpu", device_kind=_H100, dtype="bfloat16",
                        head_dim=128, q_len=4096, kv_len=4096, causal=True, density=1 / 8,
                        group=1)
    store.record(store.make_entry(key, BlockSizes(64, 64, num_stages=3), 1.0),
                 store.user_file(_H100))
    source = self._source(_H100)
    self.assertEqual((source.block_sizes, source.match, source.path),
                     (BlockSizes(64, 64, num_stages=3), "exact", str(store.user_file(_H100))))
    # Other keys still come from the shipped H100 table.
    other = self._source(_H100, causal=False, density=1.0, q_len=16384, kv_len=16384)
    self.assertEqual((other.block_sizes, other.path),
                     (BlockSizes(128, 128, num_stages=2, persistent=True),
                      str(store.PACKAGED_DIR / "nvidia_h100_80gb_hbm3.json")))

  def test_disabled(self):
    with store.disabled():
      self.assertIsNone(self._source(_H100))
    with mock.patch.dict(os.environ, {store.ENV_ENABLE: "off"}):
      self.assertIsNone(self._source(_H100))
    self.assertIsNotNone(self._source(_H100))

  def test_backend_call_on_an_h100(self):
    q = jax.ShapeDtypeStruct((1, 16384, 8, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, 16384, 8, 128), jnp.bfloat16)
    h100 = _FakeGpu(_H100, "9.0", 132)
    with mock.patch.object(jax, "devices", return_value=[h100]):
      source = store.tuned_source("pallas_mosaic_gpu", q, k, mask=None, is_causal=False)
      sizes = store.tuned_block_sizes("pallas_mosaic_gpu", q, k, mask=None, is_causal=False)
      self.assertIsNone(store.tuned_source("pallas_mosaic_gpu", q, k, interpret=True))
      with store.disabled():
        self.assertIsNone(store.tuned_block_sizes("pallas_mosaic_gpu", q, k))
    self.assertEqual(sizes, BlockSizes(128, 128, num_stages=2, persistent=True))
    self.assertEqual((source.block_sizes, source.device_kind, source.match),
                     (sizes, _H100, "exact"))
    # Another Hopper part with fewer SMs falls back to a shipped table of its architecture.
    h20 = _FakeGpu("NVIDIA H20", "9.0", 78)
    with mock.patch.object(jax, "devices", return_value=[h20]):
      other = store.tuned_source("pallas_mosaic_gpu", q, k, mask=None, is_causal=False)
    self.assertEqual((other.block_sizes, other.match), (sizes, "architecture-exact"))
    # The device's compute capability decides the fallback, not the name (a device kind
    # with a table of its own reads it whatever its capability).
    ampere = _FakeGpu("NVIDIA H100 NVL", "8.0", 108)
    with mock.patch.object(jax, "devices", return_value=[ampere]):
      self.assertIsNone(store.tuned_block_sizes("pallas_mosaic_gpu", q, k))


class FileTest(TuningTestCase):

  def test_merge_keeps_existing_entries(self):
    first = store.make_entry(_key(), BlockSizes(64, 64), 2.0)
    second = store.make_entry(_key(causal=False), BlockSizes(128, 64), 1.0,
                                 heuristic_ms=1.5)
    store.record(first, self.user_file)
    store.record(second, self.user_file)
    entries = store.load_entries(self.user_file)
    self.assertLen(entries, 2)
    self.assertEqual(entries[keys.key_string(second["key"])]["heuristic_ms"], 1.5)
    replacement = store.make_entry(_key(), BlockSizes(128, 128), 1.0)
    store.save([replacement], self.user_file)
    entries = store.load_entries(self.user_file)
    self.assertLen(entries, 2)
    self.assertEqual(entries[keys.key_string(first["key"])]["block_sizes"],
                     {"block_q": 128, "block_kv": 128})
    leftovers = [p.name for p in self.user_dir.iterdir() if p.name.endswith(".tmp")]
    self.assertEmpty(leftovers)
    data = json.loads(self.user_file.read_text())
    self.assertEqual((data["format"], data["version"]),
                     (store.FILE_FORMAT, store.FILE_VERSION))
    nested = self.user_dir / "new" / "dir.json"
    store.record(first, nested)  # creates the directory
    self.assertLen(store.load_entries(nested), 1)

  @parameterized.named_parameters(
      ("not_json", "{entries: []"),
      ("wrong_format", json.dumps({"format": "other", "version": 1, "entries": []})),
      ("entries_not_list", json.dumps({"format": store.FILE_FORMAT, "version": 1,
                                       "entries": {}})),
      ("key_missing_field", json.dumps({"format": store.FILE_FORMAT, "version": 1,
                                        "entries": [{"key": {"backend": "x"},
                                                     "block_sizes": {}}]})),
      ("bad_block_sizes", json.dumps({"format": store.FILE_FORMAT, "version": 1,
                                      "entries": [{"key": _key(),
                                                   "block_sizes": {"block_q": 96}}]})))
  def test_malformed_file_names_the_file(self, text):
    self.user_file.write_text(text)
    with self.assertRaisesRegex(ValueError, str(self.user_file)):
      _lookup()
    with self.assertRaisesRegex(ValueError, str(self.user_file)):
      store.record(store.make_entry(_key(), BlockSizes(64, 64)), self.user_file)
    self.assertEqual(self.user_file.read_text(), text)  # left as it was

  def test_bad_entry_is_refused(self):
    with self.assertRaisesRegex(ValueError, "exactly the fields"):
      store.record({"key": {"backend": "x"}, "block_sizes": {}}, self.user_file)
    self.assertFalse(self.user_file.exists())


class PackagedFilesTest(parameterized.TestCase):
  """The shipped files (flashjax/ops/attention/tuned/, package data) parse and are found."""

  def test_packaged_files_parse_and_are_found(self):
    paths = sorted(store.PACKAGED_DIR.glob("*.json"))
    self.assertNotEmpty(paths)
    for path in paths:
      entries = store.load_entries(path)
      self.assertNotEmpty(entries)
      device_kind = next(iter(entries.values()))["key"]["device_kind"]
      self.assertEqual(store.packaged_file(device_kind), path)
      for entry in entries.values():
        self.assertIn(entry["key"]["backend"], search.TUNABLE)
        self.assertIsInstance(store.block_sizes_from_dict(entry["block_sizes"]), BlockSizes)


class SearchTest(parameterized.TestCase):

  def test_skips_failures_and_picks_the_fastest(self):
    space = [BlockSizes(64, 64), BlockSizes(128, 64), BlockSizes(128, 128),
             BlockSizes(64, 128)]
    times = {BlockSizes(64, 64): 3.0, BlockSizes(128, 64): 1.5, BlockSizes(64, 128): 2.0}

    def time_fn(sizes):
      if sizes not in times:
        raise ValueError(f"tiles {sizes.block_q}x{sizes.block_kv} overflow shared memory")
      return times[sizes]

    best, rows = search.search(space, time_fn, key=_key())
    self.assertEqual(best, BlockSizes(128, 64))
    self.assertEqual([r["ms"] for r in rows], [3.0, 1.5, None, 2.0])
    self.assertEqual(rows[2]["error"], "ValueError: tiles 128x128 overflow shared memory")
    self.assertEqual(rows[2]["label"], "128x128")
    self.assertEqual(rows[1]["block_sizes"], {"block_q": 128, "block_kv": 64})

  def test_no_candidate_runs(self):
    def time_fn(sizes):
      raise NotImplementedError(f"no {sizes.block_q}")

    with self.assertRaisesRegex(RuntimeError, "no candidate ran.*no 64.*no 128"):
      search.search([BlockSizes(64, 64), BlockSizes(128, 64)], time_fn, key=_key())
    with self.assertRaisesRegex(ValueError, "no candidates"):
      search.search([], time_fn)

  def test_errors_outside_skip_propagate(self):
    def time_fn(sizes):
      raise TypeError(f"bug {sizes}")

    with self.assertRaises(TypeError):
      search.search([BlockSizes(64, 64)], time_fn, skip=(ValueError,))

  def test_non_finite_time_is_a_failure(self):
    best, rows = search.search([BlockSizes(64, 64), BlockSizes(128, 64)],
                                 lambda s: float("nan") if s.block_q == 128 else 1.0)
    self.assertEqual(best, BlockSizes(64, 64))
    self.assertIn("nan", rows[1]["error"])


class BackendWiringTest(parameterized.TestCase):
  """Backends use a recorded entry when the caller gives no block_sizes (lookup mocked:
  interpret mode itself never looks up)."""

  def _qkv(self, dtype):
    rng = np.random.default_rng(0)
    return tuple(jnp.asarray(rng.standard_normal((1, 256, 2, 32)), dtype) for _ in range(3))

  def test_pallas_triton_takes_tuned_forward_tiles(self):
    from flashjax.ops.attention import pallas_triton  # pylint: disable=g-import-not-at-top
    q, k, _ = self._qkv(jnp.float32)
    with mock.patch.object(store, "tuned_block_sizes",
                           return_value=BlockSizes(64, 32, num_warps=8)) as spy:
      fwd, _, sizes = pallas_triton.block_masks(
          None, q, k, is_causal=True, q_segment_ids=None, kv_segment_ids=None,
          block_sizes=None, interpret=True)
    self.assertEqual(spy.call_args.args[0], "pallas_triton")
    self.assertEqual((fwd.block_q, fwd.block_kv, sizes.num_warps), (64, 32, 8))
    with mock.patch.object(store, "tuned_block_sizes") as spy:
      pallas_triton.block_masks(
          None, q, k, is_causal=True, q_segment_ids=None, kv_segment_ids=None,
          block_sizes=BlockSizes(32, 32), interpret=True)
    spy.assert_not_called()

  def test_pallas_mosaic_gpu_takes_tuned_tiles(self):
    from flashjax.ops.attention import pallas_mosaic_gpu  # pylint: disable=g-import-not-at-top
    q, k, v = self._qkv(jnp.float16)
    forward = pallas_mosaic_gpu._forward  # pylint: disable=protected-access
    with mock.patch.object(store, "tuned_block_sizes",
                           return_value=BlockSizes(128, 64, persistent=True)), \
        mock.patch.object(pallas_mosaic_gpu, "_forward", wraps=forward) as spy:
      jax.eval_shape(lambda q, k, v: pallas_mosaic_gpu.dot_product_attention(
          q, k, v, is_causal=True, interpret=True), q, k, v)
    bm, config = spy.call_args.args[3], spy.call_args.args[4]
    self.assertEqual((bm.block_q, bm.block_kv, config.persistent), (128, 64, True))


if __name__ == "__main__":
  absltest.main()
