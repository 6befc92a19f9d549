"""Test set-up: 8 fake CPU devices and a private TFDS data dir, fixed before jax/tfds are imported."""
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# 8 fake devices on 2 busy cores: XLA:CPU aborts the process when a device thread reaches a collective
# more than 40 s after another (its default); a loaded machine is slow, not stuck.
if "collective_call_terminate" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += (" --xla_cpu_collective_call_terminate_timeout_seconds=900"
                              " --xla_cpu_collective_call_warn_stuck_timeout_seconds=300")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# A folder per test session, shared by its xdist workers (they inherit this process's environment) and
# the processes tests start; fresh each session, removed at its end by the process that made it. In
# it: one TFDS data dir (each embedded dataset is built once: jtl/data/source.py's prepare lock makes a
# second builder wait), one persistent compilation cache (a step that several tests build compiles
# once), and test_docs.py's outputs of commands that several documents run.
_OWN_SESSION_DIR = "JTL_TEST_SESSION_DIR" not in os.environ
if _OWN_SESSION_DIR:
  os.environ["JTL_TEST_SESSION_DIR"] = tempfile.mkdtemp(prefix="jtl_test_")
SESSION_DIR = os.environ["JTL_TEST_SESSION_DIR"]
os.environ.setdefault("TFDS_DATA_DIR", os.path.join(SESSION_DIR, "tfds"))
os.environ.setdefault("JTL_COMPILATION_CACHE", os.path.join(SESSION_DIR, "xla_cache"))

from jtl import compile_cache  # noqa: E402  (after the environment above: it imports jax)

compile_cache.enable()


def pytest_sessionfinish(session):  # pylint: disable=unused-argument
  if _OWN_SESSION_DIR:  # the xdist controller (after its workers), or the only process
    shutil.rmtree(SESSION_DIR, ignore_errors=True)
