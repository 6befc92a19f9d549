"""The mutation harness's list stays applicable (each old text once in its file, each mapped test
present), and an entry whose old text is missing is an error, never a silent pass. Fast: nothing
is mutated or run here (`make mutants` does that)."""
import os

import pytest

from experiments import mutants


def test_every_entry_applies_to_this_tree_and_names_existing_tests():
  assert len(mutants.MUTATIONS) >= 25
  assert len({m.name for m in mutants.MUTATIONS}) == len(mutants.MUTATIONS)
  for m in mutants.MUTATIONS:
    with open(os.path.join(mutants.ROOT, m.path)) as f:
      assert f.read().count(m.old) == 1, m.name
    assert m.old != m.new and m.tests, m.name
    for test in m.tests:
      path, _, name = test.partition("::")
      with open(os.path.join(mutants.ROOT, path)) as f:
        assert not name or f"def {name.split('[')[0]}(" in f.read(), (m.name, test)


def test_an_old_text_not_found_exactly_once_is_an_error(tmp_path):
  (tmp_path / "a.py").write_text("x = 1\nx = 1\n")
  missing = mutants.Mutation("missing", "", "a.py", "y = 2", "y = 3", ("t.py",))
  twice = mutants.Mutation("twice", "", "a.py", "x = 1", "x = 2", ("t.py",))
  for m in (missing, twice):
    with pytest.raises(mutants.EntryError, match=m.name):
      mutants.apply(str(tmp_path), m)
  assert (tmp_path / "a.py").read_text() == "x = 1\nx = 1\n"
  once = mutants.Mutation("once", "", "a.py", "x = 1\nx", "x = 2\nx", ("t.py",))
  assert mutants.apply(str(tmp_path), once) == "x = 1\nx = 1\n"
  assert (tmp_path / "a.py").read_text() == "x = 2\nx = 1\n"
