"""The test pool: tests/conftest.py's session folder (one for the whole session, shared by its xdist
workers, removed when the session ends: each session used to leave about 100 MB in the temporary
folder), and `make test`'s `--dist loadgroup` keeping an xdist_group on one worker (the glyph tests
share one dataset build and one trained ProtoNet that way; pytest 9.2 silently broke it)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = """
import os
import pytest

@pytest.mark.parametrize("i", range(4))
def test_probe(i):
  folder = os.environ["JTL_TEST_SESSION_DIR"]
  assert os.path.isdir(folder)
  with open(os.environ["SEEN"], "a") as f:
    f.write(folder + "\\n")
"""


def test_one_session_folder_for_all_workers_and_gone_at_the_end(tmp_path):
  (tmp_path / "test_probe.py").write_text(PROBE)
  seen = tmp_path / "seen.txt"
  env = {k: v for k, v in os.environ.items()
         if k not in ("JTL_TEST_SESSION_DIR", "PYTEST_XDIST_WORKER", "PYTEST_XDIST_TESTRUNUID")}
  env.update(SEEN=str(seen), TMPDIR=str(tmp_path))
  result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "-p", "no:cacheprovider",
                           "-p", "tests.conftest", str(tmp_path / "test_probe.py")],
                          cwd=ROOT, env=env, capture_output=True, text=True)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  folders = set(seen.read_text().split())
  assert len(folders) == 1 and len(seen.read_text().split()) == 4, seen.read_text()
  assert not os.path.exists(folders.pop())


GROUPED = """
import os
import pytest

pytestmark = pytest.mark.xdist_group("one")

@pytest.mark.parametrize("i", range(8))
def test_grouped(i):
  with open(os.environ["SEEN"], "a") as f:
    f.write(os.environ["PYTEST_XDIST_WORKER"] + "\\n")
"""


def test_an_xdist_group_runs_on_one_worker(tmp_path):
  """Eight tests of one group (a module's `pytestmark`, as tests/test_glyphs.py marks its own) run
  by one of two workers under `make test`'s `--dist loadgroup`. Under pytest 9.2 with pytest-xdist
  3.8 they were spread over both, and each worker built and trained what the group shares."""
  (tmp_path / "test_grouped.py").write_text(GROUPED)
  seen = tmp_path / "seen.txt"
  env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
  env.update(SEEN=str(seen))
  result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup",
                           "-p", "no:cacheprovider", str(tmp_path / "test_grouped.py")],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  workers = seen.read_text().split()
  assert len(workers) == 8 and len(set(workers)) == 1, workers
