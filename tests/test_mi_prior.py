"""The mutual-information prior: its update, on finite spaces by exact enumeration.

Lemma 1 of the paper: the prior minimising ``E_x KL(pi(.|x) || zeta)`` is the
policy's marginal ``q(y) = sum_x p(x) pi(y|x)``, and the minimum is the mutual
information ``I(X; Y)``. The 'mi' prior's update is maximum likelihood of
``zeta_phi`` on the policy's responses; here the "samples" are the whole
finite space, each row weighted by its exact probability ``p(x) pi(y|x)``, so
the update's objective is exact. Every expectation the tests check against is
recomputed in float64 numpy from the tables, not from midpo.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from midpo import algorithms, sampling
from midpo.algorithms.mi import response_model
from midpo.models.config import get_config
from midpo.models.transformer import Transformer


def _tables(seed=0, num_x=4, num_y=6):
  rng = np.random.default_rng(seed)
  p_x = rng.dirichlet(np.ones(num_x) * 2.0)
  pi = rng.dirichlet(np.ones(num_y) * 0.7, size=num_x)  # pi[x, y], far from uniform
  return p_x, pi


def _expected_kl(p_x, pi, zeta):
  """sum_x p(x) KL(pi(.|x) || zeta), float64."""
  zeta = np.asarray(zeta, np.float64)
  return float(np.sum(p_x[:, None] * pi * (np.log(pi) - np.log(zeta)[None, :])))


def _mutual_information(p_x, pi):
  """I(X; Y) = H(Y) - H(Y | X), float64."""
  q = p_x @ pi
  h_y = -np.sum(q * np.log(q))
  h_y_x = -np.sum(p_x[:, None] * pi * np.log(pi))
  return float(h_y - h_y_x)


def test_tabular_mi_update_converges_to_the_marginal_and_never_increases_the_kl():
  with jax.enable_x64(True):
    p_x, pi = _tables()
    num_x, num_y = pi.shape
    # Every (x, y) of the finite space, weighted by p(x) pi(y|x).
    ys = np.tile(np.arange(num_y), num_x)
    weights = (p_x[:, None] * pi).reshape(-1)
    batch = {"y": jnp.asarray(ys), "weights": jnp.asarray(weights)}

    def loss_fn(params, batch):
      logz = jax.nn.log_softmax(params["logits"])[batch["y"]]
      loss = -jnp.sum(batch["weights"] * logz) / jnp.sum(batch["weights"])
      return loss, {"nll": loss}

    # Plain gradient steps with a step below 1 / L (the softmax cross-entropy's
    # curvature is at most 1): each step is a descent step of the objective,
    # which is E_x KL(pi || zeta) minus a constant.
    step = response_model.make_mle_step(loss_fn, optax.sgd(1.0))
    params = {"logits": jnp.zeros(num_y, jnp.float64)}
    opt = optax.sgd(1.0).init(params)
    kls = [_expected_kl(p_x, pi, np.asarray(jax.nn.softmax(params["logits"])))]
    for _ in range(3000):
      params, opt, _ = step(params, opt, batch)
      kls.append(_expected_kl(p_x, pi, np.asarray(jax.nn.softmax(params["logits"]))))
    zeta = np.asarray(jax.nn.softmax(params["logits"]), np.float64)
  marginal = p_x @ pi
  tv = 0.5 * np.abs(zeta - marginal).sum()
  assert tv < 1e-3, tv
  increases = np.diff(kls)
  assert increases.max() <= 1e-15, increases.max()  # never increases
  assert kls[0] - kls[-1] > 0.1  # and it did move
  # At the marginal the term is the mutual information (Lemma 1).
  assert abs(kls[-1] - _mutual_information(p_x, pi)) < 1e-6
  assert all(k >= _mutual_information(p_x, pi) - 1e-12 for k in kls)


# -- the same update with the real prior network -------------------------------

PAD, BOS, EOS = 0, 1, 2
PROMPTS = (3, 4, 5)          # one-token prompts x
WORDS = (6, 7, 8)            # response tokens
# The finite response space: every sequence of 1 or 2 words, then EOS.
RESPONSES = [list(w) for n in (1, 2) for w in itertools.product(WORDS, repeat=n)]


def _network(conditional=False):
  config = get_config("micro", vocab_size=16, hidden_size=32, intermediate_size=64,
                      num_heads=2, num_kv_heads=2, head_dim=16, bos_token_id=BOS,
                      eos_token_id=EOS, pad_token_id=PAD)
  model = Transformer(config, rngs=nnx.Rngs(params=0))
  graphdef, state = nnx.split(model)
  return (response_model.ResponseModel(graphdef, conditional, bos_id=BOS, pad_id=PAD),
          nnx.to_pure_dict(state))


def _rows(prompt_lengths=None):
  """Every (x, y) as a preference-style row [bos x y eos]."""
  prompts, responses = [], []
  for i, x in enumerate(PROMPTS):
    extra = [] if prompt_lengths is None else [x] * prompt_lengths[i]
    for y in RESPONSES:
      prompts.append([BOS, x] + extra)
      responses.append(y + [EOS])
  return sampling.response_rows(prompts, responses, 10, PAD)


def test_prior_network_mle_on_an_exact_enumeration_reaches_the_marginal():
  p_x, pi = _tables(seed=1, num_x=len(PROMPTS), num_y=len(RESPONSES))
  rows = _rows()
  batch = {k: jnp.asarray(v) for k, v in rows.items()}
  batch["weights"] = jnp.asarray((p_x[:, None] * pi).reshape(-1), jnp.float32)
  model, params = _network()
  tx = optax.adam(1e-2)
  opt = tx.init(params)
  step = response_model.make_mle_step(lambda p, b: response_model.nll(model, p, b), tx)
  seq = jax.jit(model.sequence_logps)
  one_x = {k: v[:len(RESPONSES)] for k, v in batch.items() if k != "weights"}

  def zeta_and_tv():
    zeta = np.exp(np.asarray(seq(params, one_x), np.float64))
    marginal = p_x @ pi
    # Mass the model puts outside the finite space counts against it.
    return zeta, 0.5 * (np.abs(zeta - marginal).sum() + max(0.0, 1.0 - zeta.sum()))

  _, tv0 = zeta_and_tv()
  kl0 = _expected_kl(p_x, pi, zeta_and_tv()[0])
  for _ in range(1500):
    params, opt, _ = step(params, opt, batch)
  zeta, tv = zeta_and_tv()
  assert tv0 > 0.5
  assert tv < 1e-3, tv
  kl = _expected_kl(p_x, pi, zeta)
  assert kl < kl0 and abs(kl - _mutual_information(p_x, pi)) < 1e-2
  # Unconditional: the prompt does not change the prior's score.
  all_rows = np.asarray(seq(params, {k: v for k, v in batch.items() if k != "weights"}))
  np.testing.assert_allclose(all_rows.reshape(len(PROMPTS), -1),
                             np.broadcast_to(all_rows[:len(RESPONSES)],
                                             (len(PROMPTS), len(RESPONSES))), atol=1e-5)


@pytest.mark.parametrize("conditional", [False, True])
def test_token_logps_are_aligned_with_the_rows_whatever_the_prompt_length(conditional):
  """The prior's token log-probs sit at the policy's target positions; the
  unconditional model reads [bos] y only, however long the prompt."""
  model, params = _network(conditional)
  rows = _rows(prompt_lengths=[0, 2, 4])
  lp = np.asarray(model.token_logps(params, jnp.asarray(rows["tokens"]),
                                    jnp.asarray(rows["attention_mask"]),
                                    jnp.asarray(rows["response_mask"])))
  net = nnx.merge(model.graphdef, params)
  for i in (0, len(RESPONSES) + 4, 2 * len(RESPONSES) + 11):
    tokens = rows["tokens"][i]
    resp = rows["response_mask"][i]
    start, n = int(np.argmax(resp)), int(resp.sum())
    assert np.all(lp[i][resp[1:] == 0] == 0.0)
    # The direct computation: the model on [bos] y (or on the whole row).
    seq = np.concatenate([[BOS], tokens[start:start + n]]) if not conditional else tokens[
        :start + n]
    logits = np.asarray(net(jnp.asarray(seq[None, :-1]), jnp.ones((1, len(seq) - 1), jnp.int32)))
    want = np.asarray(jax.nn.log_softmax(logits[0]))[np.arange(len(seq) - 1), seq[1:]]
    np.testing.assert_allclose(lp[i][start - 1:start - 1 + n], want[-n:], rtol=1e-5, atol=1e-5)
  if not conditional:  # the same response after prompts of 1, 3 and 5 tokens
    j = 5
    sums = lp[[j, len(RESPONSES) + j, 2 * len(RESPONSES) + j]].sum(axis=1)
    np.testing.assert_allclose(sums, sums[0], rtol=1e-5)


def test_ema_update_moves_the_prior_towards_the_policy():
  prior = {"w": jnp.zeros(3)}
  policy = {"w": jnp.ones(3)}
  update = algorithms.ema.ema_update(0.9)
  prior = update(prior, policy)
  np.testing.assert_allclose(np.asarray(prior["w"]), 0.1, rtol=1e-6)
  prior = update(prior, policy)
  np.testing.assert_allclose(np.asarray(prior["w"]), 1 - 0.9 ** 2, rtol=1e-6)
