"""Test set-up: 8 fake CPU devices and a private TFDS data dir, fixed before jax/tfds are imported."""
import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# 8 fake devices on 2 busy cores: XLA:CPU aborts the process when a device thread reaches a collective
# more than 40 s after another (its default); a loaded machine is slow, not stuck.
if "collective_call_terminate" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += (" --xla_cpu_collective_call_terminate_timeout_seconds=900"
                              " --xla_cpu_collective_call_warn_stuck_timeout_seconds=300")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# A folder per test session, shared by its xdist workers and the processes tests start; fresh each
# session. In it: one TFDS data dir (each embedded dataset is built once: jtl/data/source.py's prepare
# lock makes a second builder wait), one persistent compilation cache (a step that several tests build
# compiles once), and test_docs.py's outputs of commands that several documents run.
SESSION_DIR = os.path.join(tempfile.gettempdir(),
                           f"jtl_test_{os.environ.get('PYTEST_XDIST_TESTRUNUID', os.getpid())}")
os.environ.setdefault("JTL_TEST_SESSION_DIR", SESSION_DIR)
os.environ.setdefault("TFDS_DATA_DIR", os.path.join(SESSION_DIR, "tfds"))
os.environ.setdefault("JTL_COMPILATION_CACHE", os.path.join(SESSION_DIR, "xla_cache"))

from jtl import compile_cache  # noqa: E402  (after the environment above: it imports jax)

compile_cache.enable()
