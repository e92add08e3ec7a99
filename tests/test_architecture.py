"""The package's layering rules, checked on its source (docs/architecture.md).

* No import circle among flashjax's modules (module-level imports; an import inside a
  function is a deliberate late binding and is not an edge).
* No module imports another module's private name (`from a import _b`), and no
  `protected-access` pragma silences the linter instead.
* The layers only import downwards: masks -> ops -> layers -> models; nothing in flashjax
  imports experiments or configs when it is imported.
"""

from __future__ import annotations

import ast
import pathlib

from absl.testing import absltest

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_PACKAGE = _ROOT / "flashjax"


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(_ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, tuple[pathlib.Path, ast.Module]]:
  return {_module_name(p): (p, ast.parse(p.read_text(), str(p)))
          for p in sorted(_PACKAGE.rglob("*.py"))}


def _resolve(module: str, path: pathlib.Path, node: ast.ImportFrom) -> str:
  if not node.level:
    return node.module or ""
  package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
  base = package[:len(package) - node.level + 1]
  return ".".join(base + ([node.module] if node.module else []))


def _import_time_nodes(tree: ast.Module):
  """The nodes that run when the module is imported: not function bodies, not
  `if TYPE_CHECKING:` blocks."""
  stack = list(tree.body)
  while stack:
    node = stack.pop()
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
      continue
    if isinstance(node, ast.If) and _is_type_checking(node.test):
      continue
    yield node
    stack.extend(ast.iter_child_nodes(node))


def _top_level_imports(module: str, path: pathlib.Path, tree: ast.Module, known: set[str]
                       ) -> set[str]:
  """flashjax modules `module` imports at import time."""
  found = set()
  for node in _import_time_nodes(tree):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names if alias.name in known)
    elif isinstance(node, ast.ImportFrom):
      target = _resolve(module, path, node)
      for alias in node.names:
        sub = f"{target}.{alias.name}"
        found.add(sub if sub in known else target)
  return {m for m in found if m in known and m != module}


def _is_type_checking(test: ast.expr) -> bool:
  return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
      isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state: dict[str, int] = {}
  trail: list[str] = []

  def visit(node):
    state[node] = 1
    trail.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 1:
        return trail[trail.index(nxt):] + [nxt]
      if nxt not in state:
        cycle = visit(nxt)
        if cycle:
          return cycle
    state[node] = 2
    trail.pop()
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


class ArchitectureTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.sources = _sources()

  def test_no_import_circle(self):
    known = set(self.sources)
    graph = {m: _top_level_imports(m, p, t, known) for m, (p, t) in self.sources.items()}
    self.assertIsNone(_find_cycle(graph))

  def test_the_cycle_finder_finds_a_planted_circle(self):
    self.assertEqual(_find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}), ["a", "b", "c", "a"])
    self.assertIsNone(_find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}))

  def test_no_private_name_imported_across_modules(self):
    offenders = []
    for module, (path, tree) in self.sources.items():
      for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("flashjax"):
          offenders += [f"{module}: from {node.module} import {a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
      if "protected-access" in path.read_text():
        offenders.append(f"{module}: a protected-access pragma")
    self.assertEqual(offenders, [])

  def test_flashjax_does_not_import_experiments_or_configs(self):
    # At import time: the `flashjax-launch` entry point (flashjax/cli.py) runs the
    # repository's launcher from inside its main(), by design.
    offenders = []
    for module, (_, tree) in self.sources.items():
      for node in _import_time_nodes(tree):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                 else [])
        offenders += [f"{module}: {n}" for n in names
                      if n.split(".")[0] in ("experiments", "configs")]
    self.assertEqual(offenders, [])

  def test_layers_import_downwards(self):
    order = ["masks", "ops", "layers", "models"]
    offenders = []
    known = set(self.sources)
    for module, (path, tree) in self.sources.items():
      parts = module.split(".")
      if len(parts) < 2 or parts[1] not in order:
        continue
      rank = order.index(parts[1])
      for dep in _top_level_imports(module, path, tree, known):
        dep_parts = dep.split(".")
        if len(dep_parts) > 1 and dep_parts[1] in order and order.index(dep_parts[1]) > rank:
          offenders.append(f"{module} -> {dep}")
    self.assertEqual(offenders, [])


if __name__ == "__main__":
  absltest.main()
