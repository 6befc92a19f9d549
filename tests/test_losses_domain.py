"""Domain losses against plain numpy: gradient reversal, the DANN schedule, Deep CORAL and MMD."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtl.losses import domain

# Hand example: 3 source and 4 target features of dimension 2.
SOURCE = np.array([[1.0, 2.0], [3.0, 5.0], [0.0, 1.0]], np.float32)
TARGET = np.array([[2.0, 0.0], [1.0, 1.0], [4.0, 3.0], [0.0, 0.0]], np.float32)


def test_gradient_reversal_is_the_identity_forward_and_minus_lambda_backward():
  x = jax.random.normal(jax.random.key(0), (5, 3))
  upstream = jax.random.normal(jax.random.key(1), (5, 3))
  lam = jnp.float32(0.37)
  out, vjp = jax.vjp(domain.gradient_reversal, x, lam)
  np.testing.assert_array_equal(out, x)
  dx, dlam = jax.jit(vjp)(upstream)
  np.testing.assert_array_equal(dx, -lam * upstream)  # exactly, element by element
  assert float(dlam) == 0.0  # lambda is a schedule value: never differentiated


def test_gradient_reversal_inside_a_loss_flips_only_what_passes_through_it():
  w = np.array([1.0, -2.0, 0.5], np.float32)
  x = np.array([0.3, 0.1, -0.7], np.float32)

  def loss(x, lam):  # one path through the reversal, one around it
    return jnp.sum(w * domain.gradient_reversal(x, lam) ** 2) + jnp.sum(x)

  dx, dlam = jax.grad(loss, argnums=(0, 1))(x, 2.0)
  np.testing.assert_allclose(dx, -2.0 * 2 * w * x + 1.0, rtol=1e-6)
  assert float(dlam) == 0.0


def test_dann_lambda_schedule_matches_the_paper_formula():
  p = np.array([0.0, 0.05, 0.1, 0.3, 0.5, 1.0], np.float32)
  expected = 2.0 / (1.0 + np.exp(-10.0 * p)) - 1.0
  np.testing.assert_allclose(domain.dann_lambda(p), expected, rtol=1e-6, atol=1e-7)
  assert float(domain.dann_lambda(0.0)) == 0.0
  assert float(domain.dann_lambda(7.0)) == pytest.approx(expected[-1])  # progress clipped at 1


def np_cov(x):
  """Sun & Saenko eq. 2-3, written in their raw-moment form."""
  n = x.shape[0]
  ones = np.ones((1, n))
  return (x.T @ x - (ones @ x).T @ (ones @ x) / n) / (n - 1)


def test_coral_equals_the_paper_formula_on_a_hand_example():
  s, t = SOURCE.astype(np.float64), TARGET.astype(np.float64)
  # By hand: C_s = [[7/3, 19/6], [19/6, 13/3]], C_t = [[35/12, 2], [2, 2]], so the squared
  # differences sum to 49/144 + 2 * 49/36 + 49/9 = 1225/144, and d = 2 divides it by 16.
  np.testing.assert_allclose(np_cov(s), [[7 / 3, 19 / 6], [19 / 6, 13 / 3]], rtol=1e-12)
  np.testing.assert_allclose(np_cov(t), [[35 / 12, 2], [2, 2]], rtol=1e-12)
  expected = np.sum((np_cov(s) - np_cov(t)) ** 2) / (4 * 2 ** 2)
  assert expected == pytest.approx(1225 / 2304, rel=1e-12)
  np.testing.assert_allclose(domain.coral(SOURCE, TARGET), expected, rtol=1e-6)


def test_coral_is_zero_for_identical_batches_and_ignores_the_means():
  x = jax.random.normal(jax.random.key(2), (16, 6))
  assert float(domain.coral(x, x)) == 0.0
  shifted = domain.coral(SOURCE + 100.0, TARGET - 3.0)
  np.testing.assert_allclose(shifted, domain.coral(SOURCE, TARGET), rtol=1e-4)
  assert float(domain.coral(SOURCE, TARGET)) == pytest.approx(float(domain.coral(TARGET, SOURCE)))


def np_mmd(s, t, scales, estimator):
  """Squared MMD with k(x, y) = sum_k exp(-|x - y|^2 / s_k), by explicit loops over pairs."""
  k = lambda a, b: sum(np.exp(-np.sum((a - b) ** 2) / sc) for sc in scales)  # noqa: E731
  n, m = len(s), len(t)
  kss = sum(k(s[i], s[j]) for i in range(n) for j in range(n) if estimator == "biased" or i != j)
  ktt = sum(k(t[i], t[j]) for i in range(m) for j in range(m) if estimator == "biased" or i != j)
  kst = sum(k(s[i], t[j]) for i in range(n) for j in range(m))
  pairs_ss = n * n if estimator == "biased" else n * (n - 1)
  pairs_tt = m * m if estimator == "biased" else m * (m - 1)
  return kss / pairs_ss + ktt / pairs_tt - 2 * kst / (n * m)


@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
def test_mmd_equals_the_pairwise_formula_on_a_hand_example(estimator):
  s, t = SOURCE.astype(np.float64), TARGET.astype(np.float64)
  scales = (1.0, 4.0, 16.0)
  np.testing.assert_allclose(domain.mmd(SOURCE, TARGET, estimator=estimator, scales=scales),
                             np_mmd(s, t, scales, estimator), rtol=1e-5, atol=1e-7)
  # Data-dependent bandwidths: multiples of the mean squared distance over distinct pooled pairs.
  pooled = np.concatenate([s, t])
  d2 = [np.sum((a - b) ** 2) for i, a in enumerate(pooled) for j, b in enumerate(pooled) if i != j]
  base = np.mean(d2)
  np.testing.assert_allclose(
      domain.mmd(SOURCE, TARGET, estimator=estimator, multipliers=(0.5, 2.0)),
      np_mmd(s, t, (0.5 * base, 2.0 * base), estimator), rtol=1e-5, atol=1e-7)


def test_biased_mmd_is_zero_for_identical_batches_and_positive_for_shifted_ones():
  x = jax.random.normal(jax.random.key(3), (12, 4))
  np.testing.assert_allclose(domain.mmd(x, x), 0.0, atol=1e-6)
  assert float(domain.mmd(x, x + 1.0)) > 0.05
  np.testing.assert_allclose(domain.mmd(x, x + 1.0), domain.mmd(x + 1.0, x), rtol=1e-6)


def test_discrepancies_have_finite_gradients_on_collapsed_features():
  """All features equal (e.g. dead ReLUs): no 0/0 in the bandwidth, no NaN in the gradient."""
  @jax.jit
  def gradients(x):
    losses = (domain.coral, domain.mmd, lambda a, b: domain.mmd(a, b, estimator="unbiased"))
    return [jax.grad(loss, argnums=(0, 1))(x, x) for loss in losses]

  assert all(np.isfinite(g).all() for g in jax.tree.leaves(gradients(jnp.zeros((8, 4)))))
