"""Lines that say what a run is doing: the first step's compilation, the embedded dataset's
preparation, and TensorFlow's start-up notices once (end to end: tests/test_lock.py's trainers)."""
import itertools
import logging
import os
import subprocess
import sys

from jtl import progress, startup_notices
from jtl.data import printed_digits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_first_call_is_announced_and_timed_once(caplog):
  caplog.set_level(logging.INFO, logger="absl")
  calls = []
  step = progress.announce_first_call(lambda x: calls.append(x) or x + 1, "the train step")
  assert [step(1), step(2), step(3)] == [2, 3, 4] and calls == [1, 2, 3]
  lines = [r.getMessage() for r in caplog.records]
  assert lines[0] == "compiling the train step (the first step waits for XLA)"
  assert lines[1].startswith("compiled the train step in ") and lines[1].endswith(" s")
  assert len(lines) == 2


def test_printed_digits_render_lazily_and_say_how_far(monkeypatch, caplog, tmp_path):
  """The builder hands TFDS each example as it is rendered (so its progress bar counts), and a line
  says how far rendering got."""
  caplog.set_level(logging.INFO, logger="absl")
  monkeypatch.setattr(printed_digits, "PROGRESS_EVERY_S", 0.0)
  rendered = []
  real = printed_digits.render_example
  monkeypatch.setattr(printed_digits, "render_example",
                      lambda *a, **k: rendered.append(a[1]) or real(*a, **k))
  builder = printed_digits.PrintedDigits(config="elastic", data_dir=str(tmp_path))
  first_three = list(itertools.islice(builder._generate_examples("train"), 3))
  assert len(rendered) == 3  # one example rendered per example taken, not all 10,000 first
  assert [example["label"] for _, example in first_three] == [0, 1, 2]
  lines = [r.getMessage() for r in caplog.records]
  assert lines[0].startswith("printed_digits/elastic train: 1 of 10000 examples rendered (")
  assert "s to go)" in lines[0] and len(lines) >= 2


def test_repeated_startup_notices_are_written_once():
  output = (b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
            b"I0000 00:00:1796520340.935445   10871 port.cc:153] oneDNN custom operations are on.\n"
            b"a line of its own\n"
            b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
            b"I0000 00:00:1796520352.830080   10871 port.cc:153] oneDNN custom operations are on.\n")
  assert startup_notices.dedupe(output) == b"".join(output.splitlines(keepends=True)[:3])


def test_entry_points_import_tensorflow_without_keras_and_keras_still_loads_on_demand():
  """An entry point's start-up (experiments/cli.py) leaves Keras out of TF's import, and so does
  writing the run's HParams record (jtl/hparams.py); tf.data works, and `import keras` / `tf.keras`
  load it afterwards as usual."""
  script = (
      "import sys, tempfile\n"
      "from experiments import cli\n"
      "import tensorflow as tf\n"
      "import ml_collections\n"
      "from jtl import hparams\n"
      "hparams.write(tempfile.mkdtemp(), ml_collections.ConfigDict({'optim': {'lr': 0.1}}))\n"
      "assert not [m for m in sys.modules if m == 'keras' or m.startswith('keras.')], 'keras loaded'\n"
      "assert list(tf.data.Dataset.range(3).map(lambda x: 2 * x).as_numpy_iterator()) == [0, 2, 4]\n"
      "import keras\n"
      "assert tf.keras.layers.Dense is keras.layers.Dense\n"
      "print('ok')\n")
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
  env.pop("TF_USE_LEGACY_KERAS", None)
  result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
