"""What the study configs share: their variants (and which one runs on a CPU host), and the
base fields of the attention_bench and decode_bench kinds that several studies build on
(`attention_base`; `decode_base`, `decode_fast_timing`, `decode_cpu_settings`,
`decode_sweep`). A study config imports this module, never a sibling study config.

A config module lists its variants (the `ARG` of `--config=FILE:ARG`) in a module-level
`VARIANTS` dict of `Variant`s and calls `choose_variant` in `get_config`:

  VARIANTS = {"gpu": Variant("..."), "full": Variant("..."), "cpu": Variant("...", cpu=True)}

  def get_config(arg=None):
    arg = common.choose_variant(arg, VARIANTS, default="full")
    ...
    common.tag(c, arg, VARIANTS)

* No argument: the default variant, except on a host where JAX runs on CPU, which gets the
  config's CPU variant (tiny shapes, Pallas in interpret mode) and says so in the log.
* An explicit variant is built as asked (tests inspect the GPU grids on a CPU).
* `tag` records the variant in the config (`study_variant`), so that the launcher refuses a
  GPU-sized variant on a CPU host with a message naming the CPU variant to run instead
  (`check_platform`; `--allow_interpret` runs it anyway, in interpret mode).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Mapping

from absl import logging
import jax
import ml_collections

# The config field that records the variant (excluded from the launcher's resume check).
FIELD = "study_variant"


@dataclasses.dataclass(frozen=True)
class Variant:
  """One `--config=FILE:ARG` variant of a study config.

  Attributes:
    summary: one line for `launch --help` (shapes, points, expected time).
    cpu: sized for a CPU host (tiny shapes, Pallas in interpret mode).
  """
  summary: str
  cpu: bool = False


def on_cpu() -> bool:
  """Whether JAX's default backend is the CPU."""
  return jax.default_backend() == "cpu"


def cpu_variant(variants: Mapping[str, Variant]) -> str | None:
  """Name of the first CPU-sized variant, or None when the config has none."""
  return next((name for name, v in variants.items() if v.cpu), None)


def choose_variant(arg: str | None, variants: Mapping[str, Variant], *, default: str,
                   cpu: bool | None = None) -> str:
  """The variant `get_config(arg)` builds.

  Args:
    arg: the `:ARG` of `--config=FILE:ARG`; None or "" picks the default.
    variants: the config's VARIANTS.
    default: the variant without an argument on an accelerator host.
    cpu: whether JAX runs on CPU (default: asks JAX).

  Returns:
    `arg` when given, else the CPU variant on a CPU host, else `default`.

  Raises:
    ValueError: `arg` is not one of `variants`.
  """
  if arg:
    if arg not in variants:
      raise ValueError(f"{arg=} must be one of {sorted(variants)}")
    return arg
  cpu_name = cpu_variant(variants)
  if cpu_name is not None and (on_cpu() if cpu is None else cpu):
    if cpu_name != default:
      logging.info("JAX runs on CPU: using the %r variant (tiny shapes, Pallas in interpret "
                   "mode); pass :%s for the %r grid", cpu_name, default, default)
    return cpu_name
  return default


def tag(c: ml_collections.ConfigDict, name: str, variants: Mapping[str, Variant], *,
        cpu_alternative: str = "") -> None:
  """Records variant `name` in `c.study_variant` (name, cpu, cpu_variant).

  Args:
    c: the config being built.
    name: the variant it was built as.
    variants: the config's VARIANTS.
    cpu_alternative: for a config without a CPU variant, the `FILE:ARG` a CPU host should
      run instead (named in the launcher's refusal).
  """
  if name not in variants:
    raise ValueError(f"variant {name!r} is not one of {sorted(variants)}")
  with c.unlocked():
    c[FIELD] = ml_collections.ConfigDict(
        {"name": name, "cpu": variants[name].cpu,
         "cpu_variant": cpu_variant(variants) or cpu_alternative})


def rewrite_main(doc: str, write: Callable[[str], str]) -> None:
  """`python -m configs.STUDY --workdir=DIR`: rewrites a study's report from DIR/results.jsonl
  with `write(DIR)` (which returns the text it wrote) and prints it."""
  parser = argparse.ArgumentParser(description=doc.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  print(write(parser.parse_args().workdir))


def platform_problem(config: ml_collections.ConfigDict | Mapping, config_file: str, *,
                     cpu: bool | None = None) -> str | None:
  """Why `config` should not run on this host, or None.

  A variant sized for an accelerator (its `study_variant.cpu` is False) would run its GPU
  grid in interpret mode on a CPU host: hours, not minutes.

  Args:
    config: the study config (ConfigDict or its JSON dict).
    config_file: the config file as given to `--config` (without `:ARG`), for the message.
    cpu: whether JAX runs on CPU (default: asks JAX).

  Returns:
    The message naming the variant to run instead, or None when the config fits the host
    (or records no variant).
  """
  info = config.get(FIELD) if hasattr(config, "get") else None
  if not info or info["cpu"] or not (on_cpu() if cpu is None else cpu):
    return None
  name, cpu_name = info["name"], info["cpu_variant"]
  message = (f"--config={config_file}:{name} is sized for a GPU, and JAX runs on CPU here "
             "(its Pallas kernels would run in interpret mode for hours). ")
  if cpu_name and ".py" in cpu_name:
    message += (f"This config has no CPU variant; run --config={cpu_name} instead (tiny "
                "shapes)")
  elif cpu_name:
    message += (f"Run --config={config_file}:{cpu_name} instead (tiny shapes, the same "
                "code paths)")
  else:
    message += ("This config has no CPU variant; --config=configs/quickstart.py:cpu runs the "
                "attention backends on a CPU")
  return message + ", or pass --allow_interpret to run it anyway."


# The attention_bench and decode_bench fields several study configs start from.


def mask_fields(c: ml_collections.ConfigDict, small: bool, *, window: int, doc_len: int,
                num_global: int, doc_len_dist: str | None = None) -> None:
  """Sets the mask family parameters of attention_bench (flashjax.masks.families.build).

  Args:
    c: the config being built.
    small: CPU settings (a denser random_banded band: decay 0.05, floor 2e-3).
    window: sliding window / dilated / global: window.
    doc_len: document and prefix_lm: mean document length.
    num_global: global: number of global tokens.
    doc_len_dist: also set doc_len_dist (after doc_len) when given.
  """
  c.window = window
  c.window_right = 0
  c.doc_len = doc_len
  if doc_len_dist is not None:
    c.doc_len_dist = doc_len_dist
  c.tree_span = 16  # tree: parent within tree_span earlier nodes
  c.band_peak = 0.5  # random_banded: P(allowed) = max(peak * exp(-decay |i - j|), floor)
  c.band_decay = 0.05 if small else 0.01
  c.band_floor = 2e-3 if small else 2e-4
  c.dilation = 2
  c.num_global = num_global


def attention_base(small: bool) -> ml_collections.ConfigDict:
  """Every attention_bench field, at benchmark (GPU) or tiny (CPU, interpret) settings.

  Args:
    small: CPU settings (float32, tiny shapes, few timed calls, Pallas in interpret mode).

  Returns:
    A ConfigDict without sweep and report.
  """
  c = ml_collections.ConfigDict()
  c.experiment = "attention_bench"
  c.implementation = "pallas_triton"
  c.mask = "dense"
  c.mode = "fwd"
  c.batch = 1 if small else 2
  c.q_len = c.kv_len = 128 if small else 4096
  c.num_heads = c.num_kv_heads = 2 if small else 16
  c.head_dim = 32 if small else 128
  c.dtype = "float32" if small else "bfloat16"
  c.block_q = ml_collections.FieldReference(None, field_type=int)
  c.block_kv = ml_collections.FieldReference(None, field_type=int)

  mask_fields(c, small, window=32 if small else 1024, doc_len=32 if small else 512,
              num_global=4 if small else 32, doc_len_dist="uniform")
  c.block_density_target = 0.25
  c.mask_block = ml_collections.FieldReference(None, field_type=int)
  c.medusa_heads = 4
  c.medusa_topk = 3

  c.timing = "wall"
  c.warmup = 1 if small else 3
  c.iters = 3 if small else 30
  c.input_sets = 1 if small else 2
  c.seed = 0
  c.interpret = ml_collections.FieldReference(None, field_type=bool)
  c.check = True
  c.torch_keep_alive = True
  return c


# The decode_bench report: bandwidth and step time against the batch.
DECODE_REPORT = {
    "columns": ["groups", "us_per_step", "kv_tbps", "pct_of_ceiling", "dense_equiv_tbps",
                "median_us_wall", "kv_tbps_wall", "input_sets", "launch_splits",
                "launch_block_kv", "max_abs_err", "within_tol"],
    "plots": [{"x": "batch", "y": "kv_tbps", "logx": True},
              {"x": "batch", "y": "dense_equiv_tbps", "logx": True},
              {"x": "batch", "y": "us_per_step", "logx": True, "logy": True}],
}


def decode_sweep(c: ml_collections.ConfigDict) -> list[dict[str, object]]:
  """Sweep over c's lists (implementation outermost, batch innermost), as field references.

  Args:
    c: a config with the fields implementations, kv_lens, kv_heads, densities, batches.

  Returns:
    The sweep axes.
  """
  return [{"implementation": c.get_ref("implementations")}, {"kv_len": c.get_ref("kv_lens")},
          {"num_kv_heads": c.get_ref("kv_heads")}, {"head_density": c.get_ref("densities")},
          {"batch": c.get_ref("batches")}]


def decode_fast_timing(c: ml_collections.ConfigDict) -> None:
  """Sets c's timing fields for about a second per point (configs/bench_decode_gpu.py, "grid")."""
  c.wall_timing = False
  c.loop_target_ms = 10.0
  c.loop_min_iters = 3
  c.loop_repeats = 5
  c.warmup = 2
  c.iters = 10
  c.check_rows = 8


def decode_cpu_settings(c: ml_collections.ConfigDict) -> None:
  """Sets c's precision, timing and memory fields for tiny interpret-mode CPU runs."""
  c.dtype = "float32"
  c.loop_iters = 4
  c.loop_repeats = 2
  c.input_sets = 2
  c.min_rotation_mb = None
  c.torch_memory_gb = None
  c.chunk_mb = 1.0


def decode_base() -> ml_collections.ConfigDict:
  """The decode_bench fields at GPU settings: Nq=32, D=128, bf16, H200-sized budgets."""
  c = ml_collections.ConfigDict()
  c.experiment = "decode_bench"
  c.implementation = "pallas_triton"
  c.batch = 1
  c.kv_len = 4096
  c.num_heads = 32
  c.num_kv_heads = 32
  c.head_dim = 128
  c.dtype = "bfloat16"
  c.head_density = 1.0
  c.ragged = False
  c.num_splits = ml_collections.FieldReference(None, field_type=int)
  c.block_kv = ml_collections.FieldReference(None, field_type=int)
  c.xla_merge = False

  c.wall_timing = True
  c.warmup = 3
  c.iters = 20
  c.loop_iters = ml_collections.FieldReference(None, field_type=int)
  c.loop_target_ms = 50.0
  c.loop_min_iters = 20
  c.loop_max_iters = 2000
  c.loop_repeats = 5
  c.input_sets = 16
  c.min_rotation_mb = ml_collections.FieldReference(256.0, field_type=float)
  c.memory_budget_gb = ml_collections.FieldReference(None, field_type=float)
  c.torch_memory_gb = ml_collections.FieldReference(100.0, field_type=float)
  c.torch_keep_alive = True
  c.chunk_mb = 256.0
  c.seed = 0
  c.interpret = ml_collections.FieldReference(None, field_type=bool)
  c.check = True
  c.check_rows = ml_collections.FieldReference(None, field_type=int)
  c.report = ml_collections.ConfigDict(DECODE_REPORT)
  return c


def adamw(peak_lr: float, warmup_steps: int) -> ml_collections.ConfigDict:
  """The model studies' optimizer fields (training.OptimizerConfig): AdamW with warm-up and
  a cosine decay to 0.1 x peak, weight decay 0.1, betas (0.9, 0.95), clipping at norm 1."""
  return ml_collections.ConfigDict({
      "peak_lr": peak_lr, "warmup_steps": warmup_steps, "final_lr_fraction": 0.1,
      "weight_decay": 0.1, "b1": 0.9, "b2": 0.95, "eps": 1e-8, "clip_norm": 1.0})


def model_implementations(c: ml_collections.ConfigDict, impl: str | None, *names: str) -> None:
  """Sets c.<name> (e.g. attention_impl, decode_impl) to `impl` and c.interpret to None
  (Pallas interpret mode exactly on CPU), as overridable FieldReferences."""
  for name in names:
    c[name] = ml_collections.FieldReference(impl, field_type=str)
  c.interpret = ml_collections.FieldReference(None, field_type=bool)

