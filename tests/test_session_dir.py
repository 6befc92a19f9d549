"""tests/conftest.py's session folder: one for the whole session, shared by its xdist workers, and
removed when the session ends (each session used to leave about 100 MB in the temporary folder)."""
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
