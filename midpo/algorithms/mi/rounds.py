"""The 'mi' prior's trainer side: its network, its input, its refits.

Every ``train.policy_steps_per_round`` policy steps, a round starts: sample
``train.prior_samples`` responses from the current policy (temperature 1) on
fresh held-out prompts of the synthetic task's 'prior' split, then take
``train.prior_steps_per_round`` maximum-likelihood steps of ``zeta_phi`` on
them (the first round: ``train.prior_warmup_samples`` and
``train.prior_warmup_steps``). Logged per round (stage ``prior/mle``): the
prior's NLL on the fresh samples before and after the fit, and the
Monte-Carlo ``E_x KL(pi(.|x) || zeta) = E[log pi(y|x) - log zeta(y)]`` before
(an unbiased estimate for the prior the policy just trained with) and after.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from midpo import sampling
from midpo.algorithms import diagnostics
from midpo.algorithms.mi import response_model
from midpo.algorithms.mi.prior import ModelPrior
from midpo.data import packing, pipeline, synthetic
from midpo.models import config as model_config_lib
from midpo.training import config as config_lib
from midpo.training import env as env_lib
from midpo.training import inputs, optim, recipes

PyTree = Any


def network_config(env: env_lib.Env, prior) -> model_config_lib.ModelConfig:
  """The model configuration of ``zeta_phi``: the named ``prior.network`` with
  the policy's vocabulary and dtypes.

  Raises:
    ConfigError: ``prior.network`` names no model configuration.
  """
  mc = env.model_config
  try:
    base = model_config_lib.get_config(prior.network)
  except ValueError as e:
    raise config_lib.ConfigError(f"config.prior.network: {e}") from None
  return base.replace(vocab_size=mc.vocab_size, bos_token_id=mc.bos_token_id,
                      eos_token_id=mc.eos_token_id, pad_token_id=mc.pad_token_id,
                      dtype=mc.dtype, param_dtype=mc.param_dtype, remat=mc.remat,
                      attention_impl=mc.attention_impl)


def make_response_model(env: env_lib.Env, prior: ModelPrior) -> response_model.ResponseModel:
  """The network that scores responses for a prior that is a model: the
  policy's architecture for a conditional prior without a ``network`` of its
  own ('ema'), else ``zeta_phi``."""
  if getattr(prior, "network", None) is None:
    graphdef = env.graphdef
  else:
    graphdef = env_lib.model_graphdef(network_config(env, prior), env.mesh)
  tok = env.tokenizer
  start = tok.bos_id if tok.bos_id is not None else tok.eos_id
  return response_model.ResponseModel(graphdef, bool(prior.conditional), bos_id=int(start),
                                      pad_id=int(tok.pad_id),
                                      vocab_chunk=env.config.train.vocab_chunk)


@inputs.register_input("prior_logps")
def prior_logps(env, prior) -> inputs.Provider:
  """``prior_logps``: ``log zeta_phi`` of each response token under the
  prior's network and parameters, frozen."""
  model = make_response_model(env, prior)

  def compute(ctx: inputs.InputContext):
    r = ctx.rows
    return jax.lax.stop_gradient(model.token_logps(ctx.prior_params, r["tokens"],
                                                   r["attention_mask"], r["response_mask"]))

  return inputs.Provider(compute)


def prior_prompts(env: env_lib.Env, round_index: int) -> list[str]:
  """Round ``r``'s held-out prompts: fresh each round, from the synthetic
  task's 'prior' split (disjoint from the training and test prompts)."""
  t = env.config.train
  if round_index == 0:
    start, n = 0, t.prior_warmup_samples
  else:
    start, n = t.prior_warmup_samples + (round_index - 1) * t.prior_samples, t.prior_samples
  return synthetic.prompts(env.config.data.synthetic.seed, "prior", n, start=start)


def sample_rows(env: env_lib.Env, samples: sampling.Samples, *,
                multiple: int = 0) -> dict[str, np.ndarray]:
  """Samples as ``[N, T]`` preference rows ``[bos] prompt response [eos]``:
  ``T`` at least ``data.max_length``, a multiple of 8 (the same shape every
  round); with ``multiple``, the longest row rounded up to a multiple of it."""
  prompts, responses = sampling.sample_ids(env, samples)
  longest = max(len(p) + len(r) for p, r in zip(prompts, responses))
  if multiple:
    return sampling.response_rows(prompts, responses, pipeline.round_up(longest, multiple),
                                  env.tokenizer.pad_id)
  width = max(env.config.data.max_length, longest)
  return sampling.response_rows(prompts, responses, pipeline.round_up(width, 8),
                                env.tokenizer.pad_id)


def pack_width(env: env_lib.Env, conditional: bool) -> int:
  """Tokens per packed row: ``train.prior_pack_width``, or more when the longest
  possible sequence (``[bos]`` and ``eval.max_new_tokens`` response tokens; with
  the prompt, up to ``data.max_length``, for a conditional prior) needs it."""
  longest = env.config.eval.max_new_tokens + 1
  if conditional:
    longest += env.config.data.max_length
  return max(int(env.config.train.prior_pack_width), pipeline.round_up(longest, 8))


def packed_sequences(env: env_lib.Env, samples: sampling.Samples, model) -> tuple[list, list]:
  """What ``zeta_phi`` reads of each sample, and where its scored tokens start:
  ``[bos] response`` (from 1) for the unconditional prior, ``prompt response``
  (from the prompt's length) for the conditional one."""
  prompts, responses = sampling.sample_ids(env, samples)
  if model.conditional:
    return [p + r for p, r in zip(prompts, responses)], [len(p) for p in prompts]
  return [[model.bos_id] + r for r in responses], [1] * len(responses)


def global_rows(env: env_lib.Env, rows: dict, index: np.ndarray) -> dict[str, jax.Array]:
  """Global rows ``index`` (every process holds all rows) -> a sharded batch."""
  per = len(index) // env.process_count
  mine = index[env.process_index * per:(env.process_index + 1) * per]
  return env.global_batch({k: v[mine] for k, v in rows.items()})


def batched_logps(env: env_lib.Env, seq_logps, params, rows: dict,
                  batch_size: int) -> np.ndarray:
  """``seq_logps(params, batch) -> [B]`` over all ``rows`` in batches of
  ``batch_size`` (the last one wraps around), ``[N]`` on every process."""
  n = len(rows["tokens"])
  out = []
  for start in range(0, n, batch_size):
    index = np.arange(start, start + batch_size) % n
    out.append(env_lib.gather(seq_logps(params, global_rows(env, rows, index))))
  return np.concatenate(out)[:n]


class Packer:
  """A round's samples as packed rows (``midpo.data.packing``): the MLE steps'
  batches and the per-sequence log-likelihoods, without the padding of rows
  as wide as the longest sample."""

  def __init__(self, env: env_lib.Env, model, samples: sampling.Samples):
    self.env = env
    self.sequences, self.starts = packed_sequences(env, samples, model)
    self.width = pack_width(env, model.conditional)
    # The mesh is global: data x fsdp counts every process's devices.
    shards = env.mesh.shape["data"] * env.mesh.shape["fsdp"]
    self.row_multiple = int(np.lcm(4, shards))

  def batch(self, index: np.ndarray) -> dict[str, jax.Array]:
    """Sequences ``index`` packed, as a global batch (every process packs all
    of them and keeps its rows)."""
    rows = packing.pack([self.sequences[i] for i in index], [self.starts[i] for i in index],
                        width=self.width, pad_id=self.env.tokenizer.pad_id,
                        row_multiple=self.row_multiple)
    rows = {k: rows[k] for k in ("tokens", "segment_ids", "target_mask", "sequence_index")}
    return global_rows(self.env, rows, np.arange(len(rows["tokens"])))

  def sequence_logps(self, seq_logps, params, batch_size: int) -> np.ndarray:
    """``[N]`` ``log zeta_phi(y)`` of every sample, ``batch_size`` sequences at a
    time (the last batch wraps around)."""
    n = len(self.sequences)
    out = []
    for start in range(0, n, batch_size):
      index = np.arange(start, start + batch_size) % n
      out.append(env_lib.gather(seq_logps(params, self.batch(index), batch_size)))
    return np.concatenate(out)[:n]


class MaximumLikelihood(recipes.PriorUpdate):
  """``zeta_phi`` refit by maximum likelihood on the policy's samples at the
  start of every round, its own Adam at a constant rate (it tracks a moving
  target); the policy steps between the refits. With the learned-prior
  diagnostics."""

  def __init__(self):
    super().__init__(monitor=diagnostics.make_monitor)

  def optimizer(self, env):
    t = env.config.train
    return optim.constant_adamw(t.prior_learning_rate, t.prior_weight_decay, t.grad_clip)

  def init_params(self, env, prior, ref_params, batches):
    del ref_params, batches
    key = jax.random.fold_in(jax.random.key(env.config.seed), 5)
    seed = int(jax.random.randint(key, (), 0, 2**30))
    return env_lib.init_params(env, seed, network_config(env, prior))

  def restore_target(self, env, prior, ref_params):
    del ref_params
    return env_lib.abstract_params(env, network_config(env, prior))

  def start(self, run):
    env = run.env
    self.env, self.round_index = env, run.round_index
    self.model = make_response_model(env, run.prior)
    self.base_key = jax.random.fold_in(jax.random.fold_in(jax.random.key(env.config.seed), 6),
                                       run.round_index)
    self.mle_step = response_model.make_mle_step(
        functools.partial(response_model.nll, self.model), run.prior_tx,
        param_shardings=run.shard["prior"], opt_shardings=run.shard["prior_opt"])
    self.packed = bool(env.config.train.prior_packing)
    if self.packed:
      self.mle_step = response_model.make_mle_step(
          functools.partial(response_model.packed_nll, self.model), run.prior_tx,
          param_shardings=run.shard["prior"], opt_shardings=run.shard["prior_opt"])
      self.seq_logps = jax.jit(self.model.packed_sequence_logps, static_argnums=2)
    else:
      self.seq_logps = jax.jit(self.model.sequence_logps)
    super().start(run)

  def before_step(self, run, state, step_index):
    k = run.env.config.train.policy_steps_per_round
    if step_index % k == 0:
      state = self.fit(state, step_index // k, step_index)
    return super().before_step(run, state, step_index)

  # -- one maximum-likelihood round -------------------------------------------

  def fit(self, state: dict, round_in_stage: int, step_index: int) -> dict:
    """One maximum-likelihood round of ``zeta_phi`` on fresh policy samples."""
    env, t = self.env, self.env.config.train
    t0 = time.perf_counter()
    key = jax.random.fold_in(self.base_key, round_in_stage)
    steps = t.prior_warmup_steps if round_in_stage == 0 else t.prior_steps_per_round
    prompts = prior_prompts(env, round_in_stage)
    logging.info("prior round %d (step %d): sampling %d responses, then %d MLE steps",
                 round_in_stage, step_index, len(prompts), steps)
    samples = sampling.sample(env, state["policy"], prompts,
                              jax.random.fold_in(key, 0), temperature=1.0)
    t_sampled = time.perf_counter()
    if self.packed:
      packer = Packer(env, self.model, samples)
      n_tokens = np.array([len(q) - s for q, s in zip(packer.sequences, packer.starts)])
      get_batch = packer.batch
      logps = lambda p: packer.sequence_logps(self.seq_logps, p, t.prior_batch_size)
    else:
      rows = sample_rows(env, samples)
      n_tokens = rows["response_mask"].sum(axis=1)
      get_batch = functools.partial(global_rows, env, rows)
      logps = lambda p: batched_logps(env, self.seq_logps, p, rows, t.prior_batch_size)
    before = logps(state["prior"])
    rng = np.random.default_rng([int(env.config.seed), self.round_index, round_in_stage])
    n, bsz = len(samples.prompts), t.prior_batch_size
    order = np.concatenate([rng.permutation(n) for _ in range(-(-steps * bsz // n) + 1)])
    # Copies: the steps donate their inputs, and a stop signal mid-round
    # leaves the state before the round to be checkpointed.
    params, opt = jax.tree.map(jnp.copy, (state["prior"], state["prior_opt"]))
    logging.info("prior round %d (step %d): %d samples drawn in %.1f s; fitting", round_in_stage,
                 step_index, n, t_sampled - t0)
    for j in range(steps):
      env_lib.check_stop(env, f"prior round {round_in_stage}'s fit ({j} of {steps} steps)")
      params, opt, _ = self.mle_step(params, opt, get_batch(order[j * bsz:(j + 1) * bsz]))
    after = logps(params)
    kl_before = samples.logps - before
    kl_after = samples.logps - after
    m = {"nll_per_token": float(-before.sum() / n_tokens.sum()),
         "nll_per_token_fit": float(-after.sum() / n_tokens.sum()),
         **sampling.summary("nll_per_sequence", -before),
         **sampling.summary("kl_policy_prior", kl_before),
         **sampling.summary("kl_policy_prior_fit", kl_after),
         "mle_steps": steps, "samples": n,
         "sample_length": float(samples.lengths.mean()),
         "sample_finished_fraction": float(samples.finished.mean()),
         "seconds": time.perf_counter() - t0, "sampling_seconds": t_sampled - t0}
    env.writer.write("prior/mle", step_index, m)
    logging.info("prior round %d (step %d): %d samples, %d MLE steps in %.1f s; NLL/token "
                 "%.3f -> %.3f; E_x KL(pi||zeta) %.2f +- %.2f -> %.2f", round_in_stage,
                 step_index, n, steps, m["seconds"], m["nll_per_token"],
                 m["nll_per_token_fit"], m["kl_policy_prior"], m["kl_policy_prior_se"],
                 m["kl_policy_prior_fit"])
    return dict(state, prior=params, prior_opt=opt)


def default_config() -> ml_collections.ConfigDict:
  """The 'mi' prior's keys of ``config.train`` (see the module docstring):
  samples and maximum-likelihood steps of each round, and of the first."""
  return ml_collections.ConfigDict({
      "prior_samples": 256, "prior_batch_size": 64, "prior_warmup_samples": 2048,
      "prior_warmup_steps": 100,
      # The fit's sequences packed into rows of at least prior_pack_width tokens
      # (midpo.data.packing; the same loss to float32 rounding, without the
      # padding of rows as wide as the longest sample), or padded rows (False).
      "prior_packing": True, "prior_pack_width": 128})


def validate_run(config, prior, batch_shards, process_count) -> None:
  """The 'mi' prior's config rules."""
  t = config.train
  if config.data.source != "synthetic":
    config_lib.fail("prior.name", "prior 'mi' samples the policy on the synthetic task's "
                    "held-out prompts ('prior' split); with data.source='files' use 'ema' or "
                    "'constrained'")
  if t.policy_steps_per_round < 1:
    config_lib.fail("train.policy_steps_per_round", "must be >= 1: the policy steps between "
                    "two maximum-likelihood rounds of the 'mi' prior")
  for key in ("prior_samples", "prior_warmup_samples", "prior_batch_size"):
    if not isinstance(t[key], int) or t[key] < 1:
      config_lib.fail(f"train.{key}", f"must be a positive int; got {t[key]!r}")
  if not isinstance(t.prior_warmup_steps, int) or t.prior_warmup_steps < 0:
    config_lib.fail("train.prior_warmup_steps",
                    f"must be a non-negative int; got {t.prior_warmup_steps!r}")
  if not isinstance(t.prior_packing, bool):
    config_lib.fail("train.prior_packing", f"must be True or False; got {t.prior_packing!r}")
  if not isinstance(t.prior_pack_width, int) or t.prior_pack_width < 2:
    config_lib.fail("train.prior_pack_width",
                    f"must be an int >= 2 (tokens per packed row); got {t.prior_pack_width!r}")
  for key in ("prior_samples", "prior_warmup_samples"):
    if t.prior_batch_size > t[key]:
      config_lib.fail("train.prior_batch_size", f"{t.prior_batch_size} is more than the "
                      f"{t[key]} samples of a round (train.{key})")
  try:
    model_config_lib.get_config(prior.network)
  except ValueError as e:
    config_lib.fail("prior.network", str(e))
  if t.prior_batch_size % (process_count * batch_shards):
    config_lib.fail("train.prior_batch_size", f"{t.prior_batch_size} must divide over the "
                    f"{process_count} processes and data x fsdp = {batch_shards} batch shards")


config_lib.register_config_block("train", default_config)
recipes.register_recipe("mi", recipes.Recipe(update=lambda prior: MaximumLikelihood(),
                                             validate=validate_run))
