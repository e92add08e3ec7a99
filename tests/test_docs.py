"""The docs run and link up: README.md and docs/*.md.

* Every ```python block of README.md and docs/*.md runs here, on CPU, in file order, the
  blocks of one file sharing one namespace (a later block may use an earlier one's names).
  A block that truly cannot run on a CPU is marked by the line right above its fence:

    <!-- docs-test: skip (REASON) -->

  with a non-empty reason (e.g. it needs a GPU or a downloaded checkpoint). Keep these rare:
  use tiny shapes, `interpret=True` for the Pallas backends, or `implementation=None`.
* Every doc under docs/ is linked from README.md, and every relative link of README.md and
  docs/*.md points to a file or folder of the repository.
* No doc or docstring cites the design document that is not in the repository (the design
  is in docs/architecture.md), and no doc cites an internal issue number.
"""

import os
import re
import time

from absl.testing import absltest
from absl.testing import parameterized

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DOCS = ["README.md"] + sorted(os.path.join("docs", name)
                               for name in os.listdir(os.path.join(_REPO, "docs"))
                               if name.endswith(".md"))
_SKIP = re.compile(r"<!--\s*docs-test:\s*skip\s*\((?P<reason>[^)]*)\)\s*-->")
_FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w+-]*)\s*$")
_LINK = re.compile(r"\[[^\]]*\]\((?P<target>[^)\s]+)\)")
# The team's design document, never in the repository (docs/architecture.md holds the design).
_MISSING_DESIGN_DOC = "DESIGN" + ".md"
# Per file: its blocks may take this long in all (tiny shapes keep CI fast).
_SECONDS_PER_FILE = 60.0


def _read(path):
  with open(os.path.join(_REPO, path)) as f:
    return f.read()


def python_blocks(text):
  """[(first line number, code, skip reason or None)] of the ```python blocks of `text`."""
  lines = text.splitlines()
  blocks = []
  i = 0
  while i < len(lines):
    match = _FENCE.match(lines[i])
    if not match:
      i += 1
      continue
    indent, lang = match["indent"], match["lang"]
    end = i + 1
    while end < len(lines) and lines[end].strip() != "```":
      end += 1
    if lang == "python":
      previous = lines[i - 1].strip() if i else ""
      skip = _SKIP.fullmatch(previous)
      body = [line[len(indent):] if line.startswith(indent) else line
              for line in lines[i + 1:end]]
      blocks.append((i + 2, "\n".join(body) + "\n", skip["reason"].strip() if skip else None))
    i = end + 1
  return blocks


def _links(text):
  # Code spans and fenced blocks are not links.
  text = re.sub(r"```.*?```", "", text, flags=re.S)
  text = re.sub(r"`[^`\n]*`", "", text)
  return [m["target"] for m in _LINK.finditer(text)]


class DocsSnippetsTest(parameterized.TestCase):

  @parameterized.named_parameters((path.replace("/", "_").replace(".", "_"), path)
                                  for path in _DOCS)
  def test_python_blocks_run(self, path):
    blocks = python_blocks(_read(path))
    namespace = {"__name__": f"docs_{os.path.basename(path)[:-3]}"}
    start = time.perf_counter()
    for line, code, skip in blocks:
      if skip is not None:
        self.assertTrue(skip, f"{path}:{line}: a skipped block must give its reason")
        continue
      with self.subTest(block=f"{path}:{line}"):
        exec(compile(code, f"{path}:{line}", "exec"), namespace)  # pylint: disable=exec-used
    self.assertLess(time.perf_counter() - start, _SECONDS_PER_FILE,
                    f"{path}: use tinier shapes in its snippets")

  def test_skips_are_rare(self):
    skipped = [(path, line, reason) for path in _DOCS
               for line, _, reason in python_blocks(_read(path)) if reason is not None]
    self.assertLessEqual(len(skipped), 3, skipped)

  def test_block_parser(self):
    text = ("x\n```python\na = 1\n```\n<!-- docs-test: skip (needs a GPU) -->\n```python\n"
            "b = 2\n```\n```\nshell\n```\n  ```python\n  c = 3\n  ```\n")
    self.assertEqual(python_blocks(text), [(3, "a = 1\n", None), (7, "b = 2\n", "needs a GPU"),
                                           (13, "c = 3\n", None)])


class DocsLinksTest(parameterized.TestCase):

  def test_every_doc_is_linked_from_the_readme(self):
    linked = {os.path.normpath(t.split("#")[0]) for t in _links(_read("README.md"))}
    missing = [path for path in _DOCS[1:] if path not in linked]
    self.assertEmpty(missing, "docs not linked from README.md")

  @parameterized.named_parameters((path.replace("/", "_").replace(".", "_"), path)
                                  for path in _DOCS)
  def test_relative_links_resolve(self, path):
    base = os.path.dirname(os.path.join(_REPO, path))
    broken = []
    for target in _links(_read(path)):
      if re.match(r"^[a-z]+:", target) or target.startswith("#"):
        continue  # URLs and anchors of the same page
      if not os.path.exists(os.path.normpath(os.path.join(base, target.split("#")[0]))):
        broken.append(target)
    self.assertEmpty(broken, f"{path}: links to missing files")

  def test_no_missing_files_or_issue_numbers_cited(self):
    offenders = []
    for root, dirs, files in os.walk(_REPO):
      dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("results",)
                 and not d.endswith(".egg-info") and d != "__pycache__"]
      for name in files:
        if not name.endswith((".py", ".md", ".sh", ".toml")):
          continue
        path = os.path.relpath(os.path.join(root, name), _REPO)
        text = _read(path)
        if _MISSING_DESIGN_DOC in text:
          offenders.append(f"{path}: cites {_MISSING_DESIGN_DOC}, which is not in the repository")
        if path.endswith(".md") and re.search(r"\b[Ii]ssue[- ]#?\d", text):
          offenders.append(f"{path}: cites an internal issue number")
    self.assertEmpty(offenders)


if __name__ == "__main__":
  absltest.main()
