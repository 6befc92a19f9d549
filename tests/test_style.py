"""Style transfer: the Gram matrix and the Gatys et al. losses against hand-written NumPy, and the
`style` objective from the CLI (encoder frozen bit for bit, no weight backward pass, style loss falls,
the picture, resume, one-line errors)."""
import contextlib
import io
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from experiments import cli
from experiments import evaluate as evaluate_entry
from experiments import train as train_entry
from experiments.configs import style_transfer
from jtl import checkpoint, data, train
from jtl.losses import style as style_losses
from jtl.metric_writer import read_jsonl
from jtl.objectives import style as style_objective
from tests.helpers import compile_fast  # noqa: F401  (fixture: fast compiles for these tiny programs)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = os.path.join(ROOT, "experiments/configs/pretrain_digits.py")
STYLE = os.path.join(ROOT, "experiments/configs/style_transfer.py")
ENCODER_ARGS = ("--config.total_steps=30", "--config.batch_size=32", "--config.optim.warmup_steps=0",
                "--config.model.widths=(8,16)", "--config.checkpoint_every=30",
                "--config.log_every=10")


def run(*args):
  """`experiments.train` in-process; returns (exit status, its `error:` lines)."""
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    status = cli.execute(train_entry.define_flags, train_entry.main, ["train", *args])
  return status, [line for line in err.getvalue().splitlines() if line.startswith("error:")]


# --- the losses ----------------------------------------------------------------------------------

def np_gram(f):
  """f [h, w, N] -> G [N, N], G_ij = sum_k F_ik F_jk with F [N, M] (one loop per entry)."""
  flat = f.reshape(-1, f.shape[-1]).T  # [N, M]
  n = flat.shape[0]
  return np.array([[sum(flat[i, k] * flat[j, k] for k in range(flat.shape[1])) for j in range(n)]
                   for i in range(n)])


def test_gram_matrix_and_losses_match_the_papers_formulas():
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)  # B=2, h*w = M = 12, N = 5
  target = rng.normal(size=(3, 4, 5)).astype(np.float32)
  np.testing.assert_allclose(style_losses.gram_matrix(feats), [np_gram(f) for f in feats],
                             rtol=1e-5, atol=1e-5)
  # eq. 1: L_content = 1/2 sum (F - P)^2
  np.testing.assert_allclose(style_losses.content_loss(feats, target[None]),
                             [0.5 * np.sum((f - target) ** 2) for f in feats], rtol=1e-5)
  # eq. 4: E_l = sum (G - A)^2 / (4 N^2 M^2), N = 5 filters, M = 12 positions
  a = np_gram(target)
  expected = [np.sum((np_gram(f) - a) ** 2) / (4 * 5**2 * 12**2) for f in feats]
  np.testing.assert_allclose(style_losses.style_layer_loss(feats, a), expected, rtol=1e-5)
  # eq. 5: L_style = sum_l w_l E_l over layers of different sizes
  small = rng.normal(size=(2, 2, 2, 3)).astype(np.float32)
  small_target = np_gram(rng.normal(size=(2, 2, 3)))
  e_small = [np.sum((np_gram(f) - small_target) ** 2) / (4 * 3**2 * 4**2) for f in small]
  got = style_losses.style_loss({"a": feats, "b": small}, {"a": a, "b": small_target},
                                {"a": 0.25, "b": 2.0})
  np.testing.assert_allclose(got, 0.25 * np.asarray(expected) + 2.0 * np.asarray(e_small), rtol=1e-5)
  # total variation: squared differences of vertical and horizontal neighbours
  images = rng.normal(size=(2, 3, 4, 2))
  tv = [sum((x[i + 1, j, c] - x[i, j, c]) ** 2 for i in range(2) for j in range(4) for c in range(2))
        + sum((x[i, j + 1, c] - x[i, j, c]) ** 2 for i in range(3) for j in range(3) for c in range(2))
        for x in images]
  np.testing.assert_allclose(style_losses.total_variation(jnp.asarray(images, jnp.float32)), tv,
                             rtol=1e-5)


def test_style_loss_ignores_where_a_texture_is():
  """Gram matrices sum over positions: a spatially permuted feature map has the same style."""
  rng = np.random.default_rng(1)
  f = rng.normal(size=(1, 4, 4, 3)).astype(np.float32)
  shuffled = f.reshape(1, 16, 3)[:, rng.permutation(16)].reshape(1, 4, 4, 3)
  gram = style_losses.gram_matrix(f)[0]
  assert float(style_losses.style_layer_loss(shuffled, gram)[0]) < 1e-8
  assert float(style_losses.content_loss(shuffled, f)[0]) > 1.0


# --- the objective, from the CLI -----------------------------------------------------------------

@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
  """A small trained encoder: cnn_small (8, 16) pretrained on digits 0-4 for 30 steps."""
  workdir = str(tmp_path_factory.mktemp("style") / "encoder")
  status, errors = run(f"--config={PRETRAIN}", f"--workdir={workdir}", *ENCODER_ARGS)
  assert status == 0, errors
  return workdir


def style_args(encoder, steps, **options):
  arg = f"encoder={encoder}" + "".join(f",{k}={v}" for k, v in options.items())
  return (f"--config={STYLE}:{arg}", f"--config.total_steps={steps}",
          "--config.checkpoint_every=10", "--config.log_every=5")


@pytest.fixture(scope="module")
def style_run(encoder_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("style") / "run")
  status, errors = run(*style_args(encoder_dir, 40), f"--workdir={workdir}")
  assert status == 0, errors
  return workdir


def setup_of(encoder):
  """The trainer's Setup of the style run's config (nothing compiled) and one batch."""
  config = style_transfer.get_config(f"encoder={encoder}")
  config.total_steps = 40
  batch = next(data.train_iterator(config.data, global_batch_size=config.batch_size, seed=0))
  return train.setup(config, batch), batch


def test_the_run_writes_the_picture_and_logs_both_losses(style_run):
  path = os.path.join(style_run, "plots", "style_transfer.png")
  with Image.open(path) as im:
    width, height = im.size
  # content, style and the checkpoints 0, 10, 20, 30, 40: seven panels side by side
  assert width > 5 * height, (width, height)
  rows = read_jsonl(os.path.join(style_run, "train_metrics.jsonl"))
  assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30, 35, 40]
  for key in ("content_loss", "style_loss", "tv_loss", "style_loss/backbone/stage1", "loss"):
    assert all(np.isfinite(r[key]) for r in rows), key
  assert rows[-1]["style_loss"] < rows[0]["style_loss"]


def test_the_encoder_is_bit_identical_and_has_no_optimizer_state(style_run, encoder_dir):
  _, before = checkpoint.load_variables(encoder_dir)
  _, after = checkpoint.load_variables(style_run, 40)
  jax.tree.map(np.testing.assert_array_equal, before["params"]["backbone"],
               after["params"]["backbone"])
  jax.tree.map(np.testing.assert_array_equal, before["model_state"], after["model_state"])
  _, start = checkpoint.load_variables(style_run, 0)
  assert not np.array_equal(start["params"]["image"], after["params"]["image"])
  # Adam's moments exist for the image's 64 pixels only (mu, nu), not for the encoder's weights.
  s, _ = setup_of(encoder_dir)
  opt_leaves = jax.tree.leaves(s.abstract_state.opt_state)
  assert sum(int(np.prod(x.shape)) for x in opt_leaves) <= 2 * 64 + 4


def test_the_style_loss_of_the_result_falls_below_the_content_images(style_run, encoder_dir):
  """Fixed seed 0, content sklearn_digits@0, style printed_digits@5, 40 Adam steps: the result's
  L_style is below half the content image's (measured: 0.35 of it; the image started as the content
  image)."""
  s, _ = setup_of(encoder_dir)
  _, start = checkpoint.load_variables(style_run, 0)
  _, end = checkpoint.load_variables(style_run, 40)
  losses = jax.jit(s.objective.losses)
  _, at_content = losses(jax.tree.map(jnp.asarray, start["params"]),
                         jax.tree.map(jnp.asarray, start["model_state"]))
  _, at_result = losses(jax.tree.map(jnp.asarray, end["params"]),
                        jax.tree.map(jnp.asarray, end["model_state"]))
  np.testing.assert_array_equal(start["params"]["image"][0], s.objective.content[0])
  assert float(at_result["style_loss"]) < 0.5 * float(at_content["style_loss"]), (
      at_result["style_loss"], at_content["style_loss"])


def test_the_frozen_encoder_costs_no_weight_backward_pass(encoder_dir, monkeypatch):
  s, batch = setup_of(encoder_dir)
  monkeypatch.setattr(style_objective.StyleTransfer, "check_mask", lambda self, rules: None)
  config = s.config.copy_and_resolve_references()
  config.trainable = ((".*", True),)
  everything = train.setup(config, batch)

  def flops(setup):
    step = train.make_train_step(setup)
    return step.lower(setup.abstract_state, setup.abstract_batch).compile().cost_analysis()["flops"]

  encoder = s.objective.encoder
  forward = jax.jit(lambda v, x: encoder.apply(v, x, train=False)).lower(
      {"params": {"backbone": s.abstract_state.params["backbone"]}, **s.abstract_state.model_state},
      jax.ShapeDtypeStruct(s.objective.content.shape, jnp.float32)).compile().cost_analysis()["flops"]
  frozen_flops, trainable_flops = flops(s), flops(everything)
  # The weights' gradients (through the result and both target images, which depend on the weights
  # too) cost about 11 forward passes of one image here (frozen 336k, trainable 862k, forward 48k
  # FLOPs); the frozen step computes none of them. Computing them and merely not applying them (one
  # norm over every gradient, say) leaves a difference of under 2 forward passes.
  assert trainable_flops - frozen_flops > 5 * forward, (trainable_flops, frozen_flops, forward)


def test_resume_continues_exactly(encoder_dir, style_run, tmp_path):
  """20 steps, then the same command to 40: the image (a checkpointed parameter) and Adam's state
  carry over, so the result is the 40-step run's, bit for bit."""
  workdir = str(tmp_path / "resumed")
  assert run(*style_args(encoder_dir, 20), f"--workdir={workdir}")[0] == 0
  assert run(*style_args(encoder_dir, 40), f"--workdir={workdir}")[0] == 0
  _, resumed = checkpoint.load_variables(workdir, 40)
  _, straight = checkpoint.load_variables(style_run, 40)
  np.testing.assert_array_equal(resumed["params"]["image"], straight["params"]["image"])
  assert os.path.exists(os.path.join(workdir, "plots", "style_transfer.png"))


@pytest.mark.parametrize("args, message", [
    (lambda enc, tmp: style_args(str(tmp / "no_such_run"), 10), "train there first"),
    (lambda enc, tmp: style_args(enc, 10, content="sklearn_digits@99999"), "pick an index below"),
    (lambda enc, tmp: style_args(enc, 10, style=str(tmp / "missing.png")), "existing image file"),
    (lambda enc, tmp: (*style_args(enc, 10), "--config.style.content_layer=backbone/stage9"),
     "layer 'backbone/stage9' gives no [B, h, w, N] feature map"),
    (lambda enc, tmp: (*style_args(enc, 10),
                       "--config.style.style_layers=('backbone/stage1','backbone/stag2')"),
     "did you mean 'backbone/stage2'"),
    (lambda enc, tmp: (*style_args(enc, 10), "--config.trainable=((\'.*\', True),)"),
     "trains the image alone"),
])
def test_bad_input_is_one_error_line_and_writes_nothing(encoder_dir, tmp_path, args, message):
  workdir = tmp_path / "work"
  status, errors = run(*args(encoder_dir, tmp_path), f"--workdir={workdir}")
  assert status == 2 and len(errors) == 1 and message in errors[0], errors
  assert not workdir.exists()


def test_a_file_image_is_resized_to_the_encoders_input(encoder_dir, tmp_path):
  """A PNG style image (32x32 RGB stripes) is read as the encoder's 8x8 grey input."""
  stripes = np.zeros((32, 32, 3), np.uint8)
  stripes[:, ::8] = 255
  Image.fromarray(stripes).save(tmp_path / "stripes.png")
  config = style_transfer.get_config(f"encoder={encoder_dir},style={tmp_path / 'stripes.png'}")
  objective = style_objective.StyleTransfer.from_config(config)
  assert objective.style.shape == objective.content.shape == (1, 8, 8, 1)
  assert objective.captions[1] == "stripes.png"
  assert 0.0 <= objective.style.min() < objective.style.max() <= 1.0


# --- AdaIN ---------------------------------------------------------------------------------------

def test_adain_matches_the_hand_formula():
  """AdaIN(x, y) = sigma(y) (x - mu(x)) / sigma(x) + mu(y), statistics per example and channel over
  positions, sigma = sqrt(var + eps) (Huang & Belongie eq. 8)."""
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 3, 4, 5)) * 2 + 1
  y = rng.normal(size=(2, 2, 2, 5)) * 0.5 - 3
  eps = 1e-5
  expected = np.empty_like(x)
  for b in range(2):
    for n in range(5):
      xs, ys = x[b, :, :, n], y[b, :, :, n]
      sx = np.sqrt(np.mean((xs - xs.mean()) ** 2) + eps)
      sy = np.sqrt(np.mean((ys - ys.mean()) ** 2) + eps)
      expected[b, :, :, n] = sy * (xs - xs.mean()) / sx + ys.mean()
  got = style_losses.adain(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), eps)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
  # The result has the style's channel statistics, hence a zero moment loss against it.
  assert np.all(np.asarray(style_losses.moment_loss(got, jnp.asarray(y, jnp.float32))) < 1e-3)


def test_adain_decoder_trains_with_the_encoder_frozen(encoder_dir, tmp_path):
  workdir = str(tmp_path / "adain")
  status, errors = run(f"--config={os.path.join(ROOT, 'experiments/configs/adain_digits.py')}:"
                       f"encoder={encoder_dir}", f"--workdir={workdir}", "--config.total_steps=60",
                       "--config.batch_size=16", "--config.log_every=10",
                       "--config.checkpoint_every=60", "--config.adain.width=16")
  assert status == 0, errors
  rows = read_jsonl(os.path.join(workdir, "train_metrics.jsonl"))
  # window means of steps 1-10 and 51-60 (measured: 0.27 -> 0.13)
  assert rows[-1]["loss"] < 0.7 * rows[0]["loss"], (rows[0], rows[-1])
  _, before = checkpoint.load_variables(encoder_dir)
  _, after = checkpoint.load_variables(workdir, 60)
  jax.tree.map(np.testing.assert_array_equal, before["params"]["backbone"],
               after["params"]["backbone"])
  with Image.open(os.path.join(workdir, "plots", "adain.png")) as im:  # 4 x 4 pairs plus the inputs
    assert im.size[0] == im.size[1] > 100
  # experiments.evaluate has nothing per split to score: one error line, nothing written
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    status = cli.execute(evaluate_entry.define_flags, evaluate_entry.main,
                         ["evaluate", f"--workdir={workdir}"])
  assert status == 2 and "no per-split evaluation" in err.getvalue()
  assert not os.path.exists(os.path.join(workdir, "eval_metrics.jsonl"))
