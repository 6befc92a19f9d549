"""Test set-up: 8 fake CPU devices and a private TFDS data dir, fixed before jax/tfds are imported."""
import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One data dir per pytest-xdist worker, so two workers never build the same dataset at once.
os.environ.setdefault(
    "TFDS_DATA_DIR",
    tempfile.mkdtemp(prefix=f"jtl_tfds_{os.environ.get('PYTEST_XDIST_WORKER', 'main')}_"))
