"""flashjax.benchmarking.source_tree_hash: rows name their code beside the git commit."""

import os
import shutil
import tempfile

from absl.testing import absltest

from flashjax import benchmarking


class SourceTreeHashTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.root = tempfile.mkdtemp(prefix="fj_tree_hash_")
    self.addCleanup(shutil.rmtree, self.root, ignore_errors=True)
    for rel, text in {"flashjax/a.py": "x = 1\n", "flashjax/sub/b.py": "y = 2\n",
                      "configs/c.py": "z = 3\n", "experiments/e.py": "w = 4\n",
                      "flashjax/notes.txt": "not code\n"}.items():
      self.write(rel, text)

  def write(self, rel, text):
    path = os.path.join(self.root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      f.write(text)

  def test_changes_when_a_file_changes(self):
    before = benchmarking.source_tree_hash(self.root)
    self.assertRegex(before, r"^sha256:[0-9a-f]{64}$")
    self.assertEqual(benchmarking.source_tree_hash(self.root), before)  # deterministic
    self.write("flashjax/sub/b.py", "y = 3\n")
    edited = benchmarking.source_tree_hash(self.root)
    self.assertNotEqual(edited, before)
    self.write("configs/new.py", "")  # an added (even empty) file counts
    added = benchmarking.source_tree_hash(self.root)
    self.assertNotEqual(added, edited)
    os.rename(os.path.join(self.root, "configs/new.py"),
              os.path.join(self.root, "configs/renamed.py"))
    self.assertNotEqual(benchmarking.source_tree_hash(self.root), added)

  def test_ignores_non_python_files_and_caches(self):
    before = benchmarking.source_tree_hash(self.root)
    self.write("flashjax/notes.txt", "edited\n")
    self.write("flashjax/__pycache__/a.cpython-312.py", "compiled\n")
    self.assertEqual(benchmarking.source_tree_hash(self.root), before)

  def test_parts_and_errors(self):
    only_lib = benchmarking.source_tree_hash(self.root, parts=("flashjax",))
    self.write("experiments/e.py", "w = 5\n")
    self.assertEqual(benchmarking.source_tree_hash(self.root, parts=("flashjax",)), only_lib)
    with self.assertRaisesRegex(ValueError, "none of"):
      benchmarking.source_tree_hash(self.root, parts=("missing",))
    with self.assertRaisesRegex(ValueError, "at least one"):
      benchmarking.source_tree_hash(self.root, parts=())

  def test_environment_info_records_this_tree(self):
    info = benchmarking.environment_info()
    self.assertEqual(info["source_hash"], benchmarking.source_tree_hash())
    self.assertIn("git_commit", info)


if __name__ == "__main__":
  absltest.main()
