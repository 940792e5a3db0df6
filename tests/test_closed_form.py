"""The paper's eq. 5 on a finite response space, end to end through midpo's loss.

A tabular policy ``pi(y|x)`` over 3 prompts and 5 responses (of lengths 1 to 4
tokens) is trained by minimising the exact expected MI-DPO loss over every
ordered pair, each labelled by Bradley-Terry from a known reward ``r``. For a
prior that does not depend on the policy the minimiser is
``pi*(y|x) = zeta(y) exp(r(x,y)/alpha) / Z(x)``; for H-DPO's policy-dependent
prior it is ``(pi_ref exp(r/alpha))^(1/eta) / Z``. We check both to 1e-3.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from midpo import algorithms
from midpo.core import losses, stats

X, Y, T = 3, 5, 4
ALPHA = 0.5


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  reward = rng.uniform(-1.0, 1.0, (X, Y))
  log_ref = np.log(rng.dirichlet(np.ones(Y), X))
  log_prev = np.log(rng.dirichlet(np.ones(Y), X))
  length = np.array([1, 2, 3, 4, 2])
  p_x = np.array([0.5, 0.3, 0.2])
  pairs = [(x, i, j) for x in range(X) for i, j in itertools.permutations(range(Y), 2)]
  xs, ws, ls = (np.array(v) for v in zip(*pairs))
  # Pairs drawn uniformly, labelled y_w = i with probability sigmoid(r_i - r_j).
  weight = p_x[xs] / (Y * (Y - 1)) / (1.0 + np.exp(-(reward[xs, ws] - reward[xs, ls])))
  return dict(reward=reward, log_ref=log_ref, log_prev=log_prev, length=length, xs=xs, ws=ws,
              ls=ls, weight=weight)


def _side(logpi, pb, ys):
  """One response per row: its whole log-probability on the first token."""
  xs = pb["xs"]
  mask = (np.arange(T)[None] < pb["length"][ys][:, None]).astype(np.float64)
  first = lambda v: jnp.zeros((len(ys), T)).at[:, 0].set(v)
  return stats.SequenceStats(logps=first(logpi[xs, ys]), mask=jnp.asarray(mask),
                             ref_logps=first(pb["log_ref"][xs, ys]),
                             prev_logps=first(pb["log_prev"][xs, ys]))


def _solve(prior, pb, steps=400):
  weight = jnp.asarray(pb["weight"])

  def expected_loss(theta):
    logpi = jax.nn.log_softmax(theta, axis=-1)
    out = losses.mi_dpo_loss(_side(logpi, pb, pb["ws"]), _side(logpi, pb, pb["ls"]), prior,
                             losses.LossConfig(alpha=ALPHA))
    return jnp.sum(weight * out.per_pair)

  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(expected_loss)

  @jax.jit
  def run(theta):
    def step(carry, _):
      theta, state = carry
      value, grad = value_and_grad(theta, state=state)
      updates, state = opt.update(grad, state, theta, value=value, grad=grad,
                                  value_fn=expected_loss)
      return (optax.apply_updates(theta, updates), state), None
    (theta, _), _ = jax.lax.scan(step, (theta, opt.init(theta)), None, length=steps)
    return theta

  theta = run(jnp.zeros((X, Y)))
  return np.asarray(jax.nn.softmax(theta, axis=-1)), float(expected_loss(theta)), \
      float(expected_loss(jnp.asarray(_target_logits(prior, pb))))


def _target_logits(prior, pb):
  r = pb["reward"] / ALPHA
  if prior.name == "dpo":
    return pb["log_ref"] + r
  if prior.name == "dice":
    return pb["log_prev"] + r
  if prior.name == "rdpo":
    return pb["log_ref"] + (pb["reward"] - prior.length_coef * pb["length"][None]) / ALPHA
  if prior.name == "hdpo":
    return (pb["log_ref"] + r) / prior.eta
  raise AssertionError(prior.name)


@pytest.mark.parametrize("prior", [
    algorithms.make_prior("dpo"),
    algorithms.make_prior("rdpo", length_coef=0.3),
    algorithms.make_prior("dice"),
    algorithms.make_prior("hdpo", eta=0.8),
], ids=lambda p: p.name)
def test_gradient_descent_reaches_the_closed_form_optimum(prior):
  with jax.enable_x64(True):
    pb = _problem()
    pi, loss_at_solution, loss_at_target = _solve(prior, pb)
    target = np.exp(_target_logits(prior, pb))
    target /= target.sum(-1, keepdims=True)
  assert np.abs(pi - target).max() < 1e-3, (pi, target)
  # And the closed form is (numerically) the minimum of the expected loss.
  assert loss_at_target <= loss_at_solution + 1e-9
  # The optimum differs from the prior itself: the reward moved it.
  zeta = np.exp(pb["log_prev"] if prior.name == "dice" else pb["log_ref"])
  assert np.abs(pi - zeta).max() > 0.05
