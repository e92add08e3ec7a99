r"""Runs a study: a sweep of points, one JSON line of results per point.

  python -m experiments.launch --config=configs/quickstart.py --workdir=/tmp/fj_quick
  python -m experiments.launch --config=configs/quickstart.py:gpu --workdir=DIR \
      --config.iters=50

The config file's `get_config(arg)` returns a ConfigDict with at least
  experiment  module under experiments/ (else any importable module) with
              `run_point(config, point) -> dict`
  sweep       list of axes; the points are the product of the axes in order, and an axis with
              several fields zips them: [{"mask": [...]}, {"seq_len": [...], "block": [...]}]
and optionally `report` (see experiments.report). docs/studies.md describes the schema.

The launcher writes DIR/config.json, skips points whose results are already in
DIR/results.jsonl (so a re-run after a crash resumes), calls run_point with the config where
the point's fields are set, appends one row per point (flush + fsync; a failing point is
recorded with its error and the sweep goes on; NotImplementedError gives status
"unsupported", which a re-run does not retry), and renders DIR/report.md and plots.
An experiment module may define `check_point(config)`: the launcher calls it on every point
still to run before it runs any, so a bad value (e.g. --config.batch=-1) stops the study at
once with an error naming it. The exit status is 1 when a point of the sweep ended in
"error" (after the report is written), or when the config cannot run; 0 otherwise.
"""

from __future__ import annotations

import ast
import copy
import datetime
import importlib
import itertools
import json
import os
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags
import numpy as np
import tqdm

from experiments import report
from flashjax import benchmarking

_CONFIG = config_flags.DEFINE_config_file("config", None, "Study config file (get_config).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config.json, results, report.")
_RETRY_FAILED = flags.DEFINE_bool("retry_failed", True,
                                  "Re-run points whose latest row has status 'error'.")
_ALLOW_INTERPRET = flags.DEFINE_bool(
    "allow_interpret", False,
    "Run a GPU-sized config variant on a CPU host anyway (its Pallas kernels in interpret "
    "mode: slow). Without it the launcher refuses and names the config's CPU variant.")

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.jsonl"
# Config fields that may change between runs sharing a workdir (the sweep may grow), besides
# the fields the sweep references; study_variant (configs/common.py) only labels the config.
_MUTABLE_FIELDS = ("sweep", "report", "study_variant")
# The repository's study configs (configs/ beside experiments/).
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "configs")
_NOT_STUDIES = ("__init__.py", "common.py")


def expand_sweep(sweep: Sequence[Mapping[str, Sequence[Any]]] | None) -> list[dict[str, Any]]:
  """Points of a sweep: the product of its axes, each axis zipping its fields.

  Args:
    sweep: list of axes, each a mapping field -> list of values (or a FieldReference to
      one); all lists of one axis have the same length. None or [] gives one empty point.

  Returns:
    List of points (dicts field -> value), first axis outermost.
  """
  axes = []
  seen = set()
  for axis in sweep or ():
    if not isinstance(axis, Mapping) or not axis:
      raise ValueError(f"each sweep axis must be a non-empty mapping field -> values: {axis=}")
    # A value may be config.get_ref("field"): `--config.field=...` then changes the sweep.
    axis = {name: values.get() if isinstance(values, ml_collections.FieldReference) else values
            for name, values in axis.items()}
    lengths = {name: len(values) for name, values in axis.items()}
    if len(set(lengths.values())) != 1:
      raise ValueError(f"zipped sweep fields must have equal lengths: {lengths=}")
    if seen & set(axis):
      raise ValueError(f"sweep fields repeated across axes: {sorted(seen & set(axis))}")
    seen |= set(axis)
    names = list(axis)
    axes.append([dict(zip(names, values)) for values in zip(*(axis[n] for n in names))])
  return [dict(item for part in combo for item in part.items())
          for combo in itertools.product(*axes)]


def _json_default(value: Any) -> Any:
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  if hasattr(value, "tolist"):  # jax arrays
    return np.asarray(value).tolist()
  return str(value)


def to_json(value: Any) -> Any:
  """Plain-JSON copy (tuples become lists, numpy scalars Python numbers)."""
  return json.loads(json.dumps(value, default=_json_default))


def point_key(point: Mapping[str, Any]) -> str:
  """Identity of a point in results.jsonl: its parameters as sorted JSON."""
  return json.dumps(to_json(dict(point)), sort_keys=True)


def apply_point(config: ml_collections.ConfigDict,
                point: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Copy of `config` with the point's fields set (dotted names reach nested fields)."""
  config = copy.deepcopy(config)
  for name, value in point.items():
    *parents, leaf = name.split(".")
    node = config
    for part in parents:
      if part not in node:
        raise ValueError(f"sweep field {name!r} is not in the config")
      node = node[part]
    if leaf not in node:
      raise ValueError(f"sweep field {name!r} is not in the config")
    with node.unlocked():
      node[leaf] = value
  return config


def load_experiment(name: str) -> ModuleType:
  """The experiment module: experiments.<name> if it exists, else the module `name`."""
  try:
    module = importlib.import_module(f"experiments.{name}")
  except ModuleNotFoundError as e:
    if e.name != f"experiments.{name}":
      raise
    module = importlib.import_module(name)
  if not callable(getattr(module, "run_point", None)):
    raise ValueError(f"experiment {name=} has no run_point(config, point) function")
  return module


def append_row(path: str, row: Mapping[str, Any]) -> None:
  """Appends one JSON line with a single write, then flush and fsync."""
  line = json.dumps(row, default=_json_default) + "\n"
  with open(path, "a") as f:
    f.write(line)
    f.flush()
    os.fsync(f.fileno())


def _drop_torn_tail(path: str) -> None:
  """Truncates a last line left without its newline by a crash (it is not valid JSON)."""
  if not os.path.exists(path):
    return
  with open(path, "rb+") as f:
    data = f.read()
    if data and not data.endswith(b"\n"):
      end = data.rfind(b"\n") + 1
      logging.warning("dropping a torn last line of %s (%d bytes)", path, len(data) - end)
      f.truncate(end)


def _sweep_fields(config: ml_collections.ConfigDict) -> set[str]:
  """Dotted names of the config fields that sweep axes reference with get_ref."""
  probe = copy.deepcopy(config)  # get_ref turns a plain field into a reference: not here
  refs = [values for axis in probe.get("sweep") or () for values in axis.values()
          if isinstance(values, ml_collections.FieldReference)]
  names = set()

  def is_swept(node, name):
    try:
      field = node.get_ref(name)
    except ValueError:  # a plain None field (get_ref refuses it): no axis references it
      return False
    return any(field is ref for ref in refs)

  def visit(node, prefix):
    for name in list(node.keys()):
      if isinstance(node[name], ml_collections.ConfigDict):
        visit(node[name], f"{prefix}{name}.")
      elif is_swept(node, name):
        names.add(prefix + name)

  visit(probe, "")
  return names


def _without(config_json: dict[str, Any], names: set[str]) -> dict[str, Any]:
  out = copy.deepcopy(config_json)
  for name in names:
    *parents, leaf = name.split(".")
    node = out
    for part in parents:
      node = node.get(part, {})
    node.pop(leaf, None)
  return out


def _check_config(workdir: str, config: ml_collections.ConfigDict,
                  config_json: dict[str, Any]) -> None:
  """Refuses a workdir whose results came from another config (the sweep may change)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(os.path.join(workdir, RESULTS_FILE)) or not os.path.exists(path):
    return
  with open(path) as f:
    previous = json.load(f)
  mutable = set(_MUTABLE_FIELDS) | _sweep_fields(config)
  previous, current = _without(previous, mutable), _without(config_json, mutable)
  if previous != current:
    changed = sorted(k for k in set(previous) | set(current)
                     if previous.get(k) != current.get(k))
    raise ValueError(f"{workdir=} holds results of a different config (fields {changed}); "
                     "use a new workdir")


class ConfigError(ValueError):
  """A config the study cannot run (sweep, workdir, or a point's values), before any point."""


def run(config: ml_collections.ConfigDict, workdir: str, *, retry_failed: bool = True,
        progress: bool = True) -> list[dict[str, Any]]:
  """Runs the sweep of `config` in `workdir` (see the module docstring).

  Args:
    config: the study config.
    workdir: output directory (created if missing).
    retry_failed: re-run points whose latest row has status "error".
    progress: show a tqdm progress bar.

  Returns:
    The latest row of every point of the sweep that has one.

  Raises:
    ConfigError: a misspelt sweep field, a config that differs from the workdir's, or a point
      the experiment's `check_point` refuses; raised before any point runs.
  """
  experiment = load_experiment(config.experiment)
  try:
    points = expand_sweep(config.get("sweep"))
    for point in points[:1]:
      apply_point(config, point)  # fails early on a misspelt sweep field
    os.makedirs(workdir, exist_ok=True)
    config_json = json.loads(config.to_json_best_effort())
    _check_config(workdir, config, config_json)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
    json.dump(config_json, f, indent=2)
  results = os.path.join(workdir, RESULTS_FILE)
  _drop_torn_tail(results)
  latest = {row["key"]: row for row in report.latest_rows(report.read_rows(workdir))}
  done = {key for key, row in latest.items()
          if row["status"] != "error" or not retry_failed}
  todo = [p for p in points if point_key(p) not in done]
  check_point = getattr(experiment, "check_point", None)
  if check_point is not None:  # refuse a bad point before any point runs
    for point in todo:
      try:
        check_point(apply_point(config, point))
      except ValueError as e:
        raise ConfigError(f"point {point_key(point)}: {e}") from e
  logging.info("%d points, %d already done, %d to run", len(points), len(points) - len(todo),
               len(todo))
  env = benchmarking.environment_info()
  bar = tqdm.tqdm(total=len(points), initial=len(points) - len(todo), unit="point",
                  desc=str(config.experiment), disable=not progress)
  for point in todo:
    start = time.perf_counter()
    row = {"key": point_key(point), "point": to_json(point)}
    try:
      metrics = experiment.run_point(apply_point(config, point), point)
      row.update(status="ok", metrics=to_json(metrics))
    except NotImplementedError as e:  # the implementation cannot run this point
      row.update(status="unsupported", error=f"NotImplementedError: {e}")
    except Exception as e:  # a failing point is recorded; the sweep goes on
      logging.exception("point %s failed", row["key"])
      row.update(status="error", error=f"{type(e).__name__}: {e}",
                 traceback=traceback.format_exc(limit=20))
    row.update(wall_s=time.perf_counter() - start,
               finished=datetime.datetime.now(datetime.timezone.utc).isoformat(), env=env)
    append_row(results, row)
    latest[row["key"]] = row
    bar.set_postfix_str(f"{row['status']}: {row['key'][:60]}")
    bar.update()
  bar.close()
  rows = [latest[point_key(p)] for p in points if point_key(p) in latest]
  print(report.format_table(rows, report.table_columns(config_json, rows), config_json))
  report.render(workdir, config_json)
  return rows


def list_configs(configs_dir: str = CONFIGS_DIR) -> str:
  """One paragraph per study config of `configs_dir`: its first docstring line and variants.

  A config's variants come from its module-level VARIANTS (configs/common.py); the one marked
  cpu is what a CPU host runs without an argument.
  """
  if not os.path.isdir(configs_dir):
    return f"(no configs directory at {configs_dir})"
  lines = []
  for name in sorted(os.listdir(configs_dir)):
    if not name.endswith(".py") or name in _NOT_STUDIES:
      continue
    path = os.path.join("configs", name)
    try:
      module = importlib.import_module(f"configs.{name[:-3]}")
    except Exception as e:  # a broken config must not break --help
      lines += [f"  {path}: cannot be imported ({type(e).__name__}: {e})", ""]
      continue
    title = ((module.__doc__ or "").strip().splitlines() or [""])[0]
    lines.append(f"  {path}: {title}")
    variants = getattr(module, "VARIANTS", None)
    if not variants:
      lines.append("      variants: see get_config's docstring")
    for arg, variant in (variants or {}).items():
      lines.append(f"      :{arg}  {variant.summary}")
    lines.append("")
  return "\n".join(lines)


def usage() -> str:
  """The module docstring followed by the list of configs and their variants."""
  return (f"{__doc__}\nConfigs (--config=configs/FILE.py[:VARIANT]; without a variant a CPU "
          f"host gets the :cpu one):\n\n{list_configs()}")


class WrongPlatformError(ValueError):
  """A config variant sized for another platform than the one JAX runs on."""


def check_platform(config: ml_collections.ConfigDict, config_spec: str, *,
                   allow_interpret: bool = False, cpu: bool | None = None) -> None:
  """Refuses a GPU-sized config variant on a CPU host (configs/common.py), naming the CPU one.

  Args:
    config: the loaded study config.
    config_spec: the --config value (FILE or FILE:ARG).
    allow_interpret: run it anyway.
    cpu: whether JAX runs on CPU (default: asks JAX).

  Raises:
    WrongPlatformError: the variant is sized for a GPU and JAX runs on CPU.
  """
  if allow_interpret:
    return
  from configs import common  # pylint: disable=import-outside-toplevel
  config_file = config_spec
  head, sep, _ = config_spec.rpartition(":")
  if sep and head.endswith(".py"):
    config_file = head
  problem = common.platform_problem(config, config_file, cpu=cpu)
  if problem:
    raise WrongPlatformError(problem)


def variant_line(config: ml_collections.ConfigDict, config_spec: str) -> str | None:
  """The line the launcher prints about the variant it runs, or None (no variant recorded)."""
  info = config.get("study_variant")
  if not info:
    return None
  head, sep, _ = config_spec.rpartition(":")
  chosen = not (sep and head.endswith(".py"))
  config_file = config_spec if chosen else head
  line = f"running {config_file}:{info.name}"
  if chosen and info.cpu:
    line += " (no variant given and JAX runs on CPU: the CPU variant; launch --help lists all)"
  return line


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  spec = config_flags.get_config_filename(flags.FLAGS["config"])
  try:
    check_platform(_CONFIG.value, spec, allow_interpret=_ALLOW_INTERPRET.value)
  except WrongPlatformError as e:
    raise SystemExit(f"error: {e}") from None
  line = variant_line(_CONFIG.value, spec)
  if line:
    print(line, flush=True)
  try:
    rows = run(_CONFIG.value, _WORKDIR.value, retry_failed=_RETRY_FAILED.value)
  except ConfigError as e:  # a config or workdir the study cannot run: no traceback
    raise SystemExit(f"error: {e}") from None
  failed = [row for row in rows if row["status"] == "error"]
  if failed:
    raise SystemExit(f"error: {len(failed)} of {len(rows)} points failed (status 'error' in "
                     f"{os.path.join(_WORKDIR.value, RESULTS_FILE)}; a re-run retries them)")


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing, with a --config.FIELD override that names no config field turned
  into one line (ml_collections raises it as an AttributeError, quoted twice) and exit 1."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    text = str(e)
    try:  # the message of a KeyError, as its repr
      text = ast.literal_eval(text) if text[:1] in "'\"" else text
    except (ValueError, SyntaxError):
      pass
    sys.stderr.write(f"FATAL Flags parsing error: a --config override names no field of the "
                     f"config: {' '.join(str(text).split())}\n")
    sys.exit(1)


def run_main(argv: Sequence[str] | None = None) -> None:
  """Command-line entry point (python -m experiments.launch, flashjax-launch)."""
  argv = list(sys.argv if argv is None else argv)
  if any(a in ("-h", "-?", "--help", "--helpshort", "--helpfull") for a in argv[1:]):
    # absl prints the __main__ module's docstring as the usage text.
    sys.modules["__main__"].__doc__ = usage()
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, argv=argv, flags_parser=parse_flags)


if __name__ == "__main__":
  run_main()
