"""The constrained learnable prior on a finite response space, end to end through midpo.

A policy that cannot depend on the prompt (``pi(y)``, 5 responses) is trained
on the exact expected MI-DPO loss over all ordered pairs of 3 prompts'
responses, labelled by Bradley-Terry from a known reward; the reference does
depend on the prompt, so the prior changes what the policy can reach. The
prior is ``midpo.algorithms.Constrained`` (a bounded 4-coefficient family),
updated by its own optimiser in alternation with the policy, as the trainer
does.

Shown: (1) the paper's inequality, ``min_{pi, zeta} J <= min_pi J(pi, zeta)``
for every fixed prior of the family, holds for the alternation: its loss is no
higher than the best of a grid of fixed priors, each with its policy fully
optimised; (2) every coefficient stays in its box; (3) without the bounds the
prior alone drives the loss towards zero by giving rejected responses more
prior mass (``prior/log_zeta_gap`` goes very negative) and the policy learns
far less of the reward.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from midpo import algorithms
from midpo.algorithms import diagnostics
from midpo.core import losses, stats

X, Y, T = 3, 5, 4
ALPHA = 1.0


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  reward = rng.uniform(-1.0, 1.0, (X, Y))
  log_ref = np.log(rng.dirichlet(np.ones(Y) * 2.0, X))
  length = np.array([1, 2, 3, 4, 2])
  pairs = [(x, i, j) for x in range(X) for i, j in itertools.permutations(range(Y), 2)]
  xs, ws, ls = (np.array(v) for v in zip(*pairs))
  weight = (1.0 / X) / (Y * (Y - 1)) / (1.0 + np.exp(-(reward[xs, ws] - reward[xs, ls])))
  return dict(reward=reward, log_ref=log_ref, length=length, xs=xs, ws=ws, ls=ls,
              weight=jnp.asarray(weight))


def _side(logpi_y, pb, ys):
  xs = pb["xs"]
  mask = (np.arange(T)[None] < pb["length"][ys][:, None]).astype(np.float64)
  first = lambda v: jnp.zeros((len(ys), T)).at[:, 0].set(v)
  return stats.SequenceStats(logps=first(logpi_y[ys]), mask=jnp.asarray(mask),
                             ref_logps=first(pb["log_ref"][xs, ys]))


def _out(theta, params, prior, pb):
  logpi = jax.nn.log_softmax(theta)
  return losses.mi_dpo_loss(_side(logpi, pb, pb["ws"]), _side(logpi, pb, pb["ls"]), prior,
                            losses.LossConfig(alpha=ALPHA), prior_params=params)


def _loss(theta, params, prior, pb):
  return jnp.sum(pb["weight"] * _out(theta, params, prior, pb).per_pair)


def _best_policy_losses(prior, coefficients, pb):
  """min over the policy for each fixed prior (L-BFGS to convergence, one compile)."""
  opt = optax.lbfgs()

  @jax.jit
  def solve(c):
    params = {"coefficients": c}
    f = lambda th: _loss(th, params, prior, pb)
    vg = optax.value_and_grad_from_state(f)

    def step(carry, _):
      th, st = carry
      v, g = vg(th, state=st)
      up, st = opt.update(g, st, th, value=v, grad=g, value_fn=f)
      return (optax.apply_updates(th, up), st), None

    theta = jnp.zeros(Y)
    (theta, _), _ = jax.lax.scan(step, (theta, opt.init(theta)), None, length=300)
    return f(theta)

  return [float(solve(jnp.asarray(c, jnp.float64))) for c in coefficients]


def _alternate(prior, pb, rounds=400, k_policy=5, k_prior=5):
  """The trainer's schedule: K policy steps, then M prior steps (each its own Adam)."""
  theta = jnp.zeros(Y)
  params = prior.init_params(None, None)
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
  tx_pol, tx_pri = optax.adam(0.05), optax.adam(0.02)
  s_pol, s_pri = tx_pol.init(theta), tx_pri.init(params)
  g_pol = jax.jit(jax.grad(lambda th, p: _loss(th, p, prior, pb)))
  g_pri = jax.jit(jax.grad(lambda p, th: _loss(th, p, prior, pb)))
  trace = []
  for _ in range(rounds):
    for _ in range(k_policy):
      up, s_pol = tx_pol.update(g_pol(theta, params), s_pol)
      theta = optax.apply_updates(theta, up)
    for _ in range(k_prior):
      up, s_pri = tx_pri.update(g_pri(params, theta), s_pri)
      params = prior.project(optax.apply_updates(params, up))
      trace.append(np.asarray(params["coefficients"]))
  return theta, params, np.array(trace)


def _expected_reward(theta, pb):
  pi = np.asarray(jax.nn.softmax(theta))
  return float(np.mean(pb["reward"] @ pi))


BOX = dict(ref_bounds=(0.0, 1.0), pol_bounds=(0.0, 0.5), len_bounds=(-0.5, 0.5),
           kl_bounds=(0.0, 0.0), init=(1.0, 0.0, 0.0, 0.0))


def test_joint_minimisation_is_no_worse_than_every_fixed_prior_and_stays_in_the_box():
  with jax.enable_x64(True):
    pb = _problem()
    prior = algorithms.make_prior("constrained", **BOX)
    theta, params, trace = _alternate(prior, pb)
    joint = float(_loss(theta, params, prior, pb))
    grid = [(r, p, l, 0.0) for r, p, l in
            itertools.product((0.0, 0.5, 1.0), (0.0, 0.25, 0.5), (-0.5, 0.0, 0.5))]
    fixed_losses = _best_policy_losses(prior, grid, pb)
  best_fixed, best_c = min(zip(fixed_losses, grid))
  worst_fixed = max(fixed_losses)
  assert worst_fixed - best_fixed > 1e-3, "the prior should matter for this policy class"
  assert joint <= best_fixed + 1e-5, (joint, best_fixed, best_c)
  low = np.array([b[0] for b in (BOX["ref_bounds"], BOX["pol_bounds"], BOX["len_bounds"],
                                 BOX["kl_bounds"])])
  high = np.array([b[1] for b in (BOX["ref_bounds"], BOX["pol_bounds"], BOX["len_bounds"],
                                  BOX["kl_bounds"])])
  assert np.all(trace >= low - 1e-12) and np.all(trace <= high + 1e-12)
  # The optimum sits on the box's boundary for some coefficient: the bounds bind.
  final = trace[-1]
  assert np.any(np.isclose(final, low) | np.isclose(final, high))


def _finite_problem(seed=1):
  """A finite labelled dataset whose chosen responses are mostly the shorter ones:
  each unordered pair once per prompt, labelled by a reward that favours brevity."""
  pb = _problem(seed)
  rng = np.random.default_rng(seed)
  reward = -0.5 * pb["length"][None, :] + rng.normal(0.0, 0.3, (X, Y))
  pairs = [(x, i, j) if reward[x, i] > reward[x, j] else (x, j, i)
           for x in range(X) for i, j in itertools.combinations(range(Y), 2)]
  xs, ws, ls = (np.array(v) for v in zip(*pairs))
  return dict(pb, reward=reward, xs=xs, ws=ws, ls=ls,
              weight=jnp.full(len(xs), 1.0 / len(xs)))


def test_without_bounds_the_prior_collapses_and_the_alarm_shows_it():
  with jax.enable_x64(True):
    pb = _finite_problem()
    assert np.mean(pb["length"][pb["ws"]] < pb["length"][pb["ls"]]) > 0.6
    bounded = algorithms.make_prior("constrained", **BOX)
    free = algorithms.make_prior("constrained", ref_bounds=(-math.inf, math.inf),
                             pol_bounds=(-math.inf, math.inf), len_bounds=(-math.inf, math.inf),
                             kl_bounds=(0.0, 0.0), init=(1.0, 0.0, 0.0, 0.0))
    th_b, p_b, _ = _alternate(bounded, pb, rounds=100)
    th_f, p_f, _ = _alternate(free, pb, rounds=100)
    loss_b = float(_loss(th_b, p_b, bounded, pb))
    loss_f = float(_loss(th_f, p_f, free, pb))
    out_f, out_b = _out(th_f, p_f, free, pb), _out(th_b, p_b, bounded, pb)
    # The prior takes over the fit: the loss falls below what the bounded family reaches ...
    assert loss_f < loss_b, (loss_f, loss_b)
    # ... by moving prior mass to the rejected (longer) responses: the alarm, the mean
    # over pairs of log zeta(y_w) - log zeta(y_l), goes very negative (-6.7 against -0.7
    # here, and it keeps falling with more steps: the coefficients diverge).
    zeta_gap_f = float(out_f.metrics["prior/log_zeta_gap"])
    zeta_gap_b = float(out_b.metrics["prior/log_zeta_gap"])
    assert zeta_gap_f < zeta_gap_b - 3.0, (zeta_gap_f, zeta_gap_b)
    # The trainer's alarm compares the gap with the reference's (DPO's prior):
    # it fires for the free prior only.
    ref_gap = float(_out(th_f, None, algorithms.make_prior("dpo"), pb).metrics["prior/log_zeta_gap"])
    assert diagnostics.collapse_alarm(zeta_gap_f, ref_gap)
    assert not diagnostics.collapse_alarm(zeta_gap_b, ref_gap)
    assert float(p_f["coefficients"][2]) > BOX["len_bounds"][1]  # c_len left the box
    # And the policy, no longer needed to fit the labels, learns less of the reward.
    r0 = _expected_reward(jnp.zeros(Y), pb)
    gain_f, gain_b = _expected_reward(th_f, pb) - r0, _expected_reward(th_b, pb) - r0
    assert gain_f < gain_b - 0.05, (gain_f, gain_b)
