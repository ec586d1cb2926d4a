"""REPA alignment objective (and iREPA's z-scored targets) vs float64 NumPy references written from docs/method.md
section 2."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from repa_jax.objectives import alignment

EPS = 1e-6
TEMPERATURE = 0.1

# ---------------------------------------------------------------- NumPy references (float64, explicit loops)


def np_unit(v, eps=EPS):
  """One vector divided by max(||v||, eps)."""
  return v / max(np.sqrt(np.sum(v * v)), eps)


def np_cosine_table(p, f):
  """[B, N] cosine of each token pair."""
  b, n, _ = p.shape
  out = np.empty((b, n))
  for i in range(b):
    for t in range(n):
      out[i, t] = np.dot(np_unit(p[i, t]), np_unit(f[i, t]))
  return out


def np_ntxent_table(p, f, temperature):
  """[B, N]: for token position t, image i's prediction must pick image i's target among the B targets."""
  b, n, _ = p.shape
  out = np.empty((b, n))
  for t in range(n):
    for i in range(b):
      logits = np.array([np.dot(np_unit(p[i, t]), np_unit(f[j, t])) / temperature for j in range(b)])
      m = logits.max()
      log_softmax = logits - m - np.log(np.sum(np.exp(logits - m)))
      out[i, t] = -log_softmax[i]
  return out


def np_alignment(projected, features, objective="cosine", temperature=TEMPERATURE):
  """(loss, mean cosine): per encoder the mean over batch and tokens, then the mean over encoders."""
  projected = [np.asarray(p, np.float64) for p in projected]
  features = [np.asarray(f, np.float64) for f in features]
  mean_cos = np.mean([np_cosine_table(p, f).mean() for p, f in zip(projected, features)])
  if objective == "cosine":
    return -mean_cos, mean_cos
  return np.mean([np_ntxent_table(p, f, temperature).mean() for p, f in zip(projected, features)]), mean_cos


def central_fd(fn, arrays, h=1e-5):
  """Central finite differences of scalar fn(list of float64 arrays) w.r.t. every entry of every array."""
  arrays = [np.array(a, np.float64) for a in arrays]
  grads = []
  for a in arrays:
    g = np.zeros_like(a)
    for idx in np.ndindex(a.shape):
      old = a[idx]
      a[idx] = old + h
      up = fn(arrays)
      a[idx] = old - h
      down = fn(arrays)
      a[idx] = old
      g[idx] = (up - down) / (2 * h)
    grads.append(g)
  return grads


def make_inputs(widths, batch=3, tokens=4, seed=0):
  rng = np.random.default_rng(seed)
  projected = [rng.normal(size=(batch, tokens, c)).astype(np.float32) for c in widths]
  features = [rng.normal(size=(batch, tokens, c)).astype(np.float32) for c in widths]
  return projected, features


WIDTH_SETS = {"one_encoder": (6,), "three_encoders": (6, 3, 9)}


# ---------------------------------------------------------------- values


@pytest.mark.parametrize("objective", ["cosine", "ntxent"])
@pytest.mark.parametrize("widths", WIDTH_SETS.values(), ids=WIDTH_SETS.keys())
def test_value_vs_numpy(objective, widths):
  projected, features = make_inputs(widths)
  loss, mean_cos = alignment.alignment_loss([jnp.asarray(p) for p in projected], [jnp.asarray(f) for f in features],
                                            objective=objective, temperature=TEMPERATURE)
  chex.assert_shape([loss, mean_cos], ())
  chex.assert_type([loss, mean_cos], jnp.float32)
  want_loss, want_cos = np_alignment(projected, features, objective)
  np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(mean_cos), want_cos, rtol=1e-5, atol=1e-6)


def test_encoders_are_averaged_not_pooled():
  """Each encoder contributes equally: the loss is the mean of the single-encoder losses."""
  projected, features = make_inputs((6, 3, 9), seed=1)
  singles = [float(alignment.alignment_loss([jnp.asarray(p)], [jnp.asarray(f)])[0]) for p, f in zip(projected, features)]
  joint = float(alignment.alignment_loss([jnp.asarray(p) for p in projected], [jnp.asarray(f) for f in features])[0])
  np.testing.assert_allclose(joint, np.mean(singles), rtol=1e-6)


def test_mean_cosine_extremes():
  """Aligned (up to positive scale) gives cosine 1 and loss -1; anti-aligned gives cosine -1."""
  projected, _ = make_inputs((5,), seed=2)
  p = jnp.asarray(projected[0])
  loss, cos = alignment.alignment_loss([p], [3.0 * p])
  np.testing.assert_allclose([float(loss), float(cos)], [-1.0, 1.0], atol=1e-6)
  loss, cos = alignment.alignment_loss([p], [-p])
  np.testing.assert_allclose([float(loss), float(cos)], [1.0, -1.0], atol=1e-6)


def test_ntxent_returns_cosine_metric_too():
  projected, features = make_inputs((6, 3))
  args = ([jnp.asarray(p) for p in projected], [jnp.asarray(f) for f in features])
  _, cos_ntxent = alignment.alignment_loss(*args, objective="ntxent")
  loss_cos, cos_cos = alignment.alignment_loss(*args, objective="cosine")
  np.testing.assert_allclose(float(cos_ntxent), float(cos_cos), rtol=1e-6)
  np.testing.assert_allclose(float(loss_cos), -float(cos_cos), rtol=1e-6)


def test_low_precision_inputs_normalised_in_float32():
  projected, features = make_inputs((8,), seed=3)
  p16 = jnp.asarray(projected[0], jnp.bfloat16)
  f16 = jnp.asarray(features[0], jnp.bfloat16)
  loss, cos = alignment.alignment_loss([p16], [f16])
  chex.assert_type([loss, cos], jnp.float32)
  want, _ = np_alignment([np.asarray(p16.astype(jnp.float32))], [np.asarray(f16.astype(jnp.float32))])
  np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("objective", ["cosine", "ntxent"])
@pytest.mark.parametrize("widths", WIDTH_SETS.values(), ids=WIDTH_SETS.keys())
def test_gradient_vs_finite_differences(objective, widths):
  """float32 autodiff w.r.t. the projector outputs vs central differences (h=1e-5) of the float64 reference."""
  projected, features = make_inputs(widths, batch=3, tokens=2, seed=4)
  feats = [jnp.asarray(f) for f in features]
  grads = jax.grad(lambda ps: alignment.alignment_loss(ps, feats, objective=objective,
                                                       temperature=TEMPERATURE)[0])([jnp.asarray(p) for p in projected])
  want = central_fd(lambda ps: np_alignment(ps, features, objective)[0], projected)
  for g, w in zip(grads, want):
    chex.assert_shape(g, w.shape)
    assert np.abs(w).max() > 1e-3  # the gradient is not trivially zero
    # float32 relative round-off ~1e-7 on values O(1); scale tolerance to the gradient's magnitude.
    np.testing.assert_allclose(np.asarray(g), w, rtol=1e-3, atol=1e-4 * np.abs(w).max())


# ---------------------------------------------------------------- epsilon behaviour


@pytest.mark.parametrize("objective", ["cosine", "ntxent"])
@pytest.mark.parametrize("where", ["projected", "features"])
def test_zero_vector_gives_finite_loss_and_gradient(objective, where):
  projected, features = make_inputs((5,), seed=5)
  p, f = projected[0], features[0]
  if where == "projected":
    p[1, 2] = 0.0
  else:
    f[1, 2] = 0.0

  def loss_fn(p, f):
    return alignment.alignment_loss([p], [f], objective=objective, temperature=TEMPERATURE)[0]

  loss = loss_fn(jnp.asarray(p), jnp.asarray(f))
  gp, gf = jax.grad(loss_fn, argnums=(0, 1))(jnp.asarray(p), jnp.asarray(f))
  assert np.isfinite(float(loss))
  assert np.all(np.isfinite(np.asarray(gp))) and np.all(np.isfinite(np.asarray(gf)))
  want, _ = np_alignment([p], [f], objective)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-6)
  # The zero token's cosine is exactly 0.
  cos = alignment.token_cosine(jnp.asarray(p[None, 1]), jnp.asarray(f[None, 1]))
  assert float(cos[0, 2]) == 0.0


def test_all_zero_inputs_are_finite():
  z = jnp.zeros((2, 3, 4))
  loss, cos = alignment.alignment_loss([z], [z])
  g = jax.grad(lambda x: alignment.alignment_loss([x], [z], objective="ntxent")[0])(z)
  assert float(loss) == 0.0 and float(cos) == 0.0
  assert np.all(np.isfinite(np.asarray(g)))


# ---------------------------------------------------------------- errors


def test_shape_mismatch_raises():
  a = jnp.zeros((2, 4, 6))
  with pytest.raises(ValueError, match="encoder 0"):
    alignment.alignment_loss([a], [jnp.zeros((2, 4, 5))])
  with pytest.raises(ValueError, match="encoder 1"):
    alignment.alignment_loss([a, a], [a, jnp.zeros((2, 3, 6))])


def test_encoder_count_mismatch_raises():
  a = jnp.zeros((2, 4, 6))
  with pytest.raises(ValueError):
    alignment.alignment_loss([a, a], [a])
  with pytest.raises(ValueError):
    alignment.alignment_loss([], [])


def test_unknown_objective_raises():
  a = jnp.ones((2, 4, 6))
  with pytest.raises(ValueError, match=r"config\.align\.objective"):
    alignment.alignment_loss([a], [a], objective="mse")


# ---------------------------------------------------------------- iREPA: z-scored targets, convolution projector


def np_zscore(f, gamma, eps=EPS):
  """Per image and channel, over the tokens with explicit loops: (f - gamma * mean) / (unbiased std + eps)."""
  b, n, c = f.shape
  out = np.empty_like(f, dtype=np.float64)
  for i in range(b):
    for k in range(c):
      column = f[i, :, k].astype(np.float64)
      mean = column.sum() / n
      std = np.sqrt(((column - mean) ** 2).sum() / (n - 1))
      out[i, :, k] = (column - gamma * mean) / (std + eps)
  return out


@pytest.mark.parametrize("gamma", [0.0, 0.6, 1.0])
def test_zscore_targets_vs_numpy(gamma):
  f = np.random.default_rng(0).normal(2.0, 3.0, (3, 9, 5)).astype(np.float32)
  np.testing.assert_allclose(alignment.zscore_tokens(jnp.asarray(f), gamma), np_zscore(f, gamma), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_array_equal(alignment.normalize_targets(jnp.asarray(f), "none", gamma), f)
  with pytest.raises(ValueError, match="config.align.target_norm='l2'"):
    alignment.normalize_targets(jnp.asarray(f), "l2", gamma)


def test_loss_gradient_with_zscored_targets_vs_numpy():
  rng = np.random.default_rng(1)
  p, f = rng.normal(size=(2, 4, 6)), rng.normal(1.0, 2.0, size=(2, 4, 6))
  target = np_zscore(f, 0.6)

  def np_loss(pred):
    return -np_cosine_table(pred, target).mean()

  loss = lambda x: alignment.alignment_loss([x], [alignment.zscore_tokens(jnp.asarray(f, jnp.float32), 0.6)])[0]
  grad = np.asarray(jax.grad(loss)(jnp.asarray(p, jnp.float32)))
  numeric = np.zeros_like(p)
  for index in np.ndindex(p.shape):
    step = np.zeros_like(p)
    step[index] = 1e-5
    numeric[index] = (np_loss(p + step) - np_loss(p - step)) / 2e-5
  np.testing.assert_allclose(float(loss(jnp.asarray(p, jnp.float32))), np_loss(p), rtol=1e-5)
  np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-5)
