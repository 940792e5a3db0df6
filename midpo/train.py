"""The training pipeline: SFT, preference training under any prior, evaluation.

``train_and_evaluate(config, workdir)`` runs the stages ``config.stages`` names:

* ``sft``: trains the reference (and initial policy) on the SFT split by
  maximum likelihood of the responses. Skipped when ``config.sft.checkpoint``
  or ``config.model.hf_path`` gives the reference.
* ``preference``: MI-DPO training of the policy under ``config.prior``. The
  pairs come from the dataset or (``pairs_from='reference'``) are sampled from
  the reference and labelled by Bradley-Terry on the known reward. Policy
  and prior parameters are separate pytrees with separate optax states and
  separately jitted steps, each donating only what it updates.
* ``eval``: samples on held-out prompts (``midpo.evaluate``), writes
  ``eval.json``.

Every stage checkpoints with orbax under the workdir, resumes automatically
from its latest checkpoint, and saves before exiting on SIGTERM. Parameters
and optimiser states are created directly sharded on the mesh from
``config.mesh`` by the models' logical-axis rules; each batch is sharded over
``data`` x ``fsdp``. Metrics go to ``metrics.jsonl`` and TensorBoard, fetched
one step late so that the host never waits for the device.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import signal
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from midpo import batches as batches_lib
from midpo import checkpoint as ckpt_lib
from midpo import config_lib, learned_prior, losses, priors, stats
from midpo import token_weights as token_weights_lib
from midpo import evaluate as eval_lib
from midpo import metrics_writer
from midpo.data import pipeline, synthetic, tfds_builders
from midpo.models import config as model_config_lib
from midpo.models import hf_checkpoint, sharding, tokenizer as tokenizer_lib

PyTree = Any


class Preempted(SystemExit):
  """Raised after the checkpoint taken on SIGTERM is on disk."""

  def __init__(self, step: int):
    super().__init__(143)
    self.step = step


class _SigtermFlag:
  """Set by SIGTERM; the loops check it between steps."""

  def __init__(self):
    self.received = False
    self._previous = None

  def install(self):
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint after the current step.")
    self.received = True

  def uninstall(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


# ---------------------------------------------------------------------------
# The run's environment: mesh, tokenizer, model definition.
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Env:
  config: Any
  workdir: str
  mesh: jax.sharding.Mesh
  tokenizer: Any
  model_config: model_config_lib.ModelConfig
  graphdef: Any
  writer: metrics_writer.MetricsWriter
  sigterm: _SigtermFlag

  @property
  def process_index(self) -> int:
    return jax.process_index()

  @property
  def process_count(self) -> int:
    return jax.process_count()

  @property
  def batch_sharding(self):
    return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(("data", "fsdp")))

  def global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows -> one global array per key, sharded over the batch.

    With several processes, arrays with a length axis (the last) are first
    padded to the longest of any process, so that shapes agree.
    """
    if self.process_count > 1:
      lengths = [np.asarray(v).shape[-1] for v in local.values() if np.ndim(v) >= 2]
      if lengths:
        t = int(np.max(multihost_utils.process_allgather(np.array(max(lengths)))))
        local = {k: _pad_last(np.asarray(v), t) if np.ndim(v) >= 2 else v
                 for k, v in local.items()}
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, v)
            for k, v in local.items()}

  def model(self, params) -> nnx.Module:
    return nnx.merge(self.graphdef, params)


def _pad_last(x: np.ndarray, t: int) -> np.ndarray:
  pad = [(0, 0)] * (x.ndim - 1) + [(0, t - x.shape[-1])]
  return np.pad(x, pad) if x.shape[-1] < t else x


def make_tokenizer(config):
  if config.tokenizer == "synthetic":
    return synthetic.SyntheticTokenizer()
  return tokenizer_lib.load_tokenizer(config.tokenizer)


def _model_config(config, tok) -> model_config_lib.ModelConfig:
  overrides = dict(dtype=config.model.dtype, param_dtype=config.model.param_dtype,
                   remat=config.model.remat)
  if config.model.hf_path:
    mc = hf_checkpoint.read_hf_config(config.model.hf_path, **overrides)
  else:
    try:
      base = model_config_lib.get_config(config.model.name)
    except ValueError as e:
      raise config_lib.ConfigError(f"config.model.name: {e}") from None
    mc = base.replace(vocab_size=_round_up(tok.vocab_size, 8), bos_token_id=tok.bos_id,
                      eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, **overrides)
  tokenizer_lib.check_fits(tok, mc.vocab_size)
  return mc


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def make_env(config, workdir: str) -> Env:
  config_lib.validate(config)
  shape = config_lib.mesh_shape(config, jax.device_count())
  mesh = sharding.make_mesh(**shape)
  tok = make_tokenizer(config)
  mc = _model_config(config, tok)
  abstract = nnx.eval_shape(lambda: _new_model(mc, mesh, 0))
  graphdef = nnx.graphdef(abstract)
  writer = metrics_writer.MetricsWriter(workdir, enabled=jax.process_index() == 0)
  return Env(config, workdir, mesh, tok, mc, graphdef, writer, _SigtermFlag())


def _new_model(mc, mesh, seed):
  from midpo.models.transformer import Transformer
  model = Transformer(mc, rngs=nnx.Rngs(params=seed))
  model.activation_sharding = (mesh, tuple(sharding.DEFAULT_RULES))
  return model


def init_params(env: Env, seed: int) -> PyTree:
  """Randomly initialised parameters, created directly sharded."""
  model = sharding.create_sharded_model(env.model_config, env.mesh, seed=seed)
  return nnx.to_pure_dict(nnx.state(model))


def abstract_params(env: Env, model_config=None) -> PyTree:
  """``ShapeDtypeStruct`` targets, with their shardings, of the model's parameters
  (or of another model configuration's; no array is created: for restoring
  checkpoints)."""
  mc = model_config or env.model_config
  abstract = nnx.eval_shape(lambda: _new_model(mc, env.mesh, 0))
  state = nnx.state(abstract)
  shardings = nnx.to_pure_dict(sharding.state_shardings(state, env.mesh))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      nnx.to_pure_dict(state), shardings)


def load_hf_params(env: Env) -> PyTree:
  c = env.config.model
  model = hf_checkpoint.load_hf_checkpoint(c.hf_path, mesh=env.mesh, dtype=c.dtype,
                                           param_dtype=c.param_dtype, remat=c.remat)
  return nnx.to_pure_dict(nnx.state(model))


def shardings_of(tree):
  return jax.tree.map(lambda x: x.sharding, tree)


# ---------------------------------------------------------------------------
# The generic training loop.
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class LoopSpec:
  stage: str
  directory: str
  total_steps: int
  iterator: Any
  tokens_per_step: Callable[[dict], int]
  step: Callable[[dict, dict, int], tuple[dict, dict]]  # (state, batch, step) -> (state, metrics)


def run_loop(env: Env, spec: LoopSpec, state: dict) -> dict:
  """Runs ``spec.step`` to ``spec.total_steps``: resume, checkpoints, logs, SIGTERM.

  ``state`` is a dict of pytrees (every one is checkpointed). Metrics of step
  ``n`` are fetched after step ``n + 1`` is dispatched.
  """
  config = env.config
  ckpt = ckpt_lib.Checkpointer(spec.directory, max_to_keep=config.max_checkpoints)
  start = 0
  latest = ckpt.latest_step()
  if latest is not None:
    state, meta = ckpt.restore(latest, ckpt_lib.abstract_like(state))
    spec.iterator.set_state(meta["data"])
    start = int(meta["step"])
    logging.info("%s: resumed from step %d (%s)", spec.stage, start, spec.directory)
  if start >= spec.total_steps:
    ckpt.close()
    return state

  def save(step, force=False):
    ckpt.save(step, state, {"step": step, "stage": spec.stage,
                            "data": spec.iterator.get_state()}, force=force)

  pending = None
  window: dict[str, list[float]] = {}
  tokens = 0
  t0 = time.perf_counter()
  last_good = latest

  def drain(item):
    nonlocal tokens, t0
    step, metrics, ntok = item
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    loss = values.get("loss", 0.0)
    if not math.isfinite(loss):
      ckpt.wait()
      raise FloatingPointError(
          f"{spec.stage}: non-finite loss ({loss}) at step {step}; the last good checkpoint "
          f"is step {last_good} in {spec.directory}")
    for k, v in values.items():
      window.setdefault(k, []).append(v)
    tokens += ntok
    done = step + 1
    if done % config.log_every == 0 or done == spec.total_steps:
      means = {k: float(np.mean(v)) for k, v in window.items()}
      elapsed = time.perf_counter() - t0
      n = len(window.get("loss", [1]))
      rate = n / max(elapsed, 1e-9)
      means["perf/steps_per_sec"] = rate
      means["perf/tokens_per_sec"] = tokens / max(elapsed, 1e-9)
      env.writer.write(spec.stage, done, means)
      eta = (spec.total_steps - done) / max(rate, 1e-9)
      logging.info("%s step %d/%d  loss %.4f  %.2f steps/s  %.0f tokens/s  ETA %s",
                   spec.stage, done, spec.total_steps, means.get("loss", float("nan")), rate,
                   means["perf/tokens_per_sec"], _fmt_eta(eta))
      window.clear()
      tokens = 0
      t0 = time.perf_counter()

  env.sigterm.install()
  try:
    for step in range(start, spec.total_steps):
      if _should_stop(env, step):
        if pending is not None:
          drain(pending)
          pending = None
        if last_good != step:  # not already saved by the periodic checkpoint
          save(step, force=True)
        ckpt.wait()
        logging.warning("%s: checkpoint at step %d saved after SIGTERM; exiting.", spec.stage,
                        step)
        raise Preempted(step)
      local = next(spec.iterator)
      state, metrics = spec.step(state, local, step)
      if pending is not None:
        drain(pending)
      pending = (step, metrics, spec.tokens_per_step(local))
      if (step + 1) % config.checkpoint_every == 0 and step + 1 < spec.total_steps:
        drain(pending)
        pending = None
        save(step + 1)
        last_good = step + 1
    if pending is not None:
      drain(pending)
    save(spec.total_steps, force=True)
    ckpt.close()
  finally:
    env.sigterm.uninstall()
    env.writer.flush()
  return state


def _should_stop(env: Env, step: int) -> bool:
  """SIGTERM on any process stops every process at the same step."""
  del step
  if env.process_count > 1:
    flags = multihost_utils.process_allgather(np.array(env.sigterm.received, np.int32))
    return bool(np.max(flags))
  return env.sigterm.received


def _fmt_eta(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _tokens(batch: dict) -> int:
  return int(np.asarray(batch["attention_mask"]).sum())


def _schedule(lr: float, warmup: int, steps: int):
  """Linear warmup from 0 (when ``warmup > 0``), then cosine decay to lr / 10."""
  if steps <= 1:
    return optax.constant_schedule(lr)
  if warmup <= 0:
    return optax.cosine_decay_schedule(lr, steps, alpha=0.1)
  warmup = min(warmup, steps - 1)
  return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps, end_value=0.1 * lr)


def _adamw(lr, warmup, steps, weight_decay, clip):
  chain = [optax.clip_by_global_norm(clip)] if clip else []
  chain.append(optax.adamw(_schedule(lr, warmup, steps), weight_decay=weight_decay))
  return optax.chain(*chain)


def _init_opt(tx, params, mesh):
  """The optimiser state, on the mesh: moments sharded like their parameters,
  anything else (step counts) replicated."""
  state = jax.jit(tx.init)(params)

  def place(x):
    s = getattr(x, "sharding", None)
    if isinstance(s, jax.sharding.NamedSharding) and s.mesh == mesh:
      return x
    return jax.device_put(x, sharding.replicated(mesh))

  return jax.tree.map(place, state)


# ---------------------------------------------------------------------------
# SFT.
# ---------------------------------------------------------------------------


def sft_loss(graphdef, params, batch):
  """Token-mean NLL of the response tokens."""
  tokens, att = batch["tokens"], batch["attention_mask"]
  mask = batch["response_mask"][:, 1:].astype(jnp.float32)
  logits = nnx.merge(graphdef, params)(tokens[:, :-1], att[:, :-1])
  lp = stats.token_logprobs(logits, tokens[:, 1:], mask)
  n = jnp.maximum(jnp.sum(mask), 1.0)
  loss = -jnp.sum(lp) / n
  return loss, {"loss": loss, "tokens": jnp.sum(mask)}


def run_sft(env: Env) -> PyTree:
  config = env.config
  if config.sft.checkpoint:
    return restore_params(env, config.sft.checkpoint)
  if config.model.hf_path:
    return load_hf_params(env)
  it = make_batches(env, _data_config(env), "sft", mode="sft")
  params = init_params(env, config.seed)
  tx = _adamw(config.sft.learning_rate, config.sft.warmup_steps, config.sft.steps,
              config.sft.weight_decay, 1.0)
  opt = _init_opt(tx, params, env.mesh)
  graphdef = env.graphdef

  def update(params, opt, batch):
    (_, metrics), grads = jax.value_and_grad(functools.partial(sft_loss, graphdef),
                                             has_aux=True)(params, batch)
    updates, opt = tx.update(grads, opt, params)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return optax.apply_updates(params, updates), opt, metrics

  jitted = jax.jit(update, donate_argnums=(0, 1),
                   out_shardings=(shardings_of(params), shardings_of(opt), None))

  def step(state, local, step_index):
    del step_index
    p, o, m = jitted(state["params"], state["opt"], env.global_batch(_sft_arrays(local)))
    return {"params": p, "opt": o}, m

  spec = LoopSpec("sft", os.path.join(env.workdir, "sft"), config.sft.steps, it, _tokens, step)
  state = run_loop(env, spec, {"params": params, "opt": opt})
  return state["params"]


def make_batches(env: Env, data_config, split: str, mode: str) -> batches_lib.ShardedBatches:
  """This process's share of ``split`` (see ``midpo.batches``)."""
  return batches_lib.ShardedBatches(data_config, env.tokenizer, split, env.workdir,
                                    process_index=env.process_index,
                                    process_count=env.process_count, mode=mode)


def _sft_arrays(local):
  return {k: np.asarray(local[k]) for k in ("tokens", "attention_mask", "response_mask")}


def restore_params(env: Env, directory: str, item: str = "params") -> PyTree:
  """Model parameters (``item``) of the latest checkpoint in a midpo stage directory."""
  ckpt = ckpt_lib.Checkpointer(directory)
  step = ckpt.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {directory}")
  target = {item: abstract_params(env)}
  trees, _ = ckpt.restore(step, target)
  ckpt.close()
  return trees[item]


def _data_config(env: Env, **synthetic_overrides):
  c = env.config.data.copy_and_resolve_references()
  if not c.data_dir:
    c.data_dir = os.path.join(env.workdir, "tfds")
  for k, v in synthetic_overrides.items():
    setattr(c.synthetic, k, v)
  return c


# ---------------------------------------------------------------------------
# Preference training.
# ---------------------------------------------------------------------------


def _pair_arrays(local: dict, fields: tuple[str, ...]) -> dict[str, np.ndarray]:
  """``[chosen rows; rejected rows]`` -> pair-major ``[B, 2, ...]`` arrays.

  Pair-major keeps each pair's two rows together when processes' rows are
  concatenated into one global batch.
  """
  out = {}
  for k in fields:
    x = np.asarray(local[k])
    b = x.shape[0] // 2
    out[k] = np.stack([x[:b], x[b:]], axis=1)
  return out


def make_pair_stats(env: Env, fields, *, reference: Optional[str] = None,
                    prior_model: Optional[learned_prior.ResponseModel] = None) -> Callable:
  """``stats(policy, prior_params, frozen, batch) -> (chosen, rejected)`` SequenceStats
  with the ``fields`` a prior reads (several priors' union for diagnostics).

  ``frozen`` holds the frozen models' parameters: ``reference`` and, for DICE,
  ``previous`` (the previous round's policy), for TIS-DPO's contrastive
  weights ``plus`` and ``minus``. ``prior_model`` scores the responses for
  priors that are models (``prior_logps``: 'mi', 'ema'), with ``prior_params``.
  """
  graphdef = env.graphdef
  fields = set(fields)
  # The reference forward runs in the step unless its log-probs are cached;
  # a prior that never reads the reference (SimPO) skips it altogether.
  reference = reference or env.config.train.reference
  uses_reference = bool(fields & {"ref_logps", "kl_ref_policy", "kl_policy_ref", "ref_hidden"})
  online = reference == "online" and uses_reference
  cached = reference == "cached" and uses_reference
  klr = "kl_ref_policy" in fields
  klp = "kl_policy_ref" in fields
  want_hidden = "ref_hidden" in fields
  chunk = env.config.train.vocab_chunk
  if "prior_logps" in fields and prior_model is None:
    raise ValueError("prior_logps needs the prior's model (prior_model)")

  tis = env.config.tis

  def contrastive_weights(frozen, inputs, in_mask, targets, mask):
    """TIS-DPO weights from the contrastive models; rows are pair-major
    (chosen, rejected, chosen, ...), so the raw score's sign alternates."""
    lp = {}
    for name in ("plus", "minus"):
      logits = nnx.merge(graphdef, frozen[name])(inputs, in_mask)
      lp[name] = stats.token_logprobs(logits, targets, mask, vocab_chunk=chunk)
    sign = jnp.where(jnp.arange(mask.shape[0]) % 2 == 0, 1.0, -1.0)[:, None]
    raw = sign * (lp["plus"] - lp["minus"])
    return jax.lax.stop_gradient(token_weights_lib.tis_weights(raw, mask, tis.transform))

  def stats_fn(policy_params, prior_params, frozen, batch):
    flat = lambda x: x.reshape((-1,) + x.shape[2:])
    tokens, att = flat(batch["tokens"]), flat(batch["attention_mask"])
    inputs, targets, in_mask = tokens[:, :-1], tokens[:, 1:], att[:, :-1]
    resp = flat(batch["response_mask"])
    mask = resp[:, 1:].astype(jnp.float32)
    logits = nnx.merge(graphdef, policy_params)(inputs, in_mask)
    ref_logits = hidden = None
    if online:
      ref_model = nnx.merge(graphdef, frozen["reference"])
      if want_hidden:
        ref_logits, hidden = ref_model(inputs, in_mask, return_hidden_states=True)
        hidden = jax.lax.stop_gradient(hidden)
      else:
        ref_logits = ref_model(inputs, in_mask)
    ts = stats.token_stats(logits, targets, mask, ref_logits, kl_ref_policy=klr,
                           kl_policy_ref=klp, vocab_chunk=chunk)
    extra = {}
    if cached:
      extra["ref_logps"] = jnp.where(mask > 0, flat(batch["ref_logps"])[:, 1:], 0.0)
    if "prev_logps" in fields:
      prev_logits = jax.lax.stop_gradient(nnx.merge(graphdef, frozen["previous"])(inputs, in_mask))
      extra["prev_logps"] = stats.token_logprobs(prev_logits, targets, mask, vocab_chunk=chunk)
    if "token_weights" in fields and "plus" in frozen:
      extra["token_weights"] = contrastive_weights(frozen, inputs, in_mask, targets, mask)
    elif "token_weights" in fields:
      extra["token_weights"] = flat(batch["token_weights"])[:, 1:]
    if want_hidden:
      extra["ref_hidden"] = hidden
    if "prior_logps" in fields:
      extra["prior_logps"] = jax.lax.stop_gradient(
          prior_model.token_logps(prior_params, tokens, att, resp))
    ref_logps = extra.pop("ref_logps", None)
    seq = stats.SequenceStats.from_token_stats(ts, mask, **extra)
    if cached:
      seq = dataclasses.replace(seq, ref_logps=ref_logps)
    pairs = jax.tree.map(lambda x: x.reshape((-1, 2) + x.shape[1:]), seq)
    chosen = jax.tree.map(lambda x: x[:, 0], pairs)
    rejected = jax.tree.map(lambda x: x[:, 1], pairs)
    return chosen, rejected

  return stats_fn


def make_pair_loss(env: Env, prior: priors.Prior, loss_config: losses.LossConfig, *,
                   reference: Optional[str] = None,
                   prior_model: Optional[learned_prior.ResponseModel] = None) -> Callable:
  """``loss(policy, prior_params, frozen, batch, rng, train) -> (loss, (metrics, logits))``
  (see :func:`make_pair_stats` for ``frozen`` and ``prior_model``)."""
  stats_fn = make_pair_stats(env, prior.required_fields(), prior_model=prior_model,
                             reference=reference)

  def loss_fn(policy_params, prior_params, frozen, batch, rng, train):
    chosen, rejected = stats_fn(policy_params, prior_params, frozen, batch)
    out = losses.mi_dpo_loss(chosen, rejected, prior, loss_config, prior_params=prior_params,
                             rng=rng, train=train)
    return out.loss, (out.metrics, out.logits)

  return loss_fn


@dataclasses.dataclass
class PreferenceSteps:
  """The jitted steps: each donates only the state it updates."""
  policy: Callable
  prior: Optional[Callable]
  joint: Optional[Callable]
  evaluate: Callable


def make_preference_steps(env: Env, prior, loss_config, policy_tx, prior_tx, shard, *,
                          prior_model=None) -> PreferenceSteps:
  loss_fn = make_pair_loss(env, prior, loss_config, prior_model=prior_model)

  def policy_step(policy, policy_opt, prior_params, frozen, batch, rng):
    (_, (metrics, _)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        policy, prior_params, frozen, batch, rng, True)
    updates, policy_opt = policy_tx.update(grads, policy_opt, policy)
    metrics = dict(metrics, **{"grad_norm/policy": optax.tree.norm(grads)})
    return optax.apply_updates(policy, updates), policy_opt, metrics

  def prior_step(prior_params, prior_opt, policy, frozen, batch, rng):
    (_, (metrics, _)), grads = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)(
        policy, prior_params, frozen, batch, rng, True)
    updates, prior_opt = prior_tx.update(grads, prior_opt, prior_params)
    metrics = dict(metrics, **{"grad_norm/prior": optax.tree.norm(grads)})
    return prior.project(optax.apply_updates(prior_params, updates)), prior_opt, metrics

  def joint_step(policy, policy_opt, prior_params, prior_opt, frozen, batch, rng):
    (_, (metrics, _)), (g_pol, g_pri) = jax.value_and_grad(loss_fn, argnums=(0, 1),
                                                           has_aux=True)(
        policy, prior_params, frozen, batch, rng, True)
    up, policy_opt = policy_tx.update(g_pol, policy_opt, policy)
    up_p, prior_opt = prior_tx.update(g_pri, prior_opt, prior_params)
    metrics = dict(metrics, **{"grad_norm/policy": optax.tree.norm(g_pol),
                               "grad_norm/prior": optax.tree.norm(g_pri)})
    return (optax.apply_updates(policy, up), policy_opt,
            prior.project(optax.apply_updates(prior_params, up_p)), prior_opt, metrics)

  def eval_step(policy, prior_params, frozen, batch):
    _, (metrics, logits) = loss_fn(policy, prior_params, frozen, batch, None, False)
    return metrics, logits

  s = shard
  steps = PreferenceSteps(
      policy=jax.jit(policy_step, donate_argnums=(0, 1),
                     out_shardings=(s["policy"], s["policy_opt"], None)),
      prior=None, joint=None, evaluate=jax.jit(eval_step))
  if prior.param_update == "loss":
    steps.prior = jax.jit(prior_step, donate_argnums=(0, 1),
                          out_shardings=(s["prior"], s["prior_opt"], None))
    steps.joint = jax.jit(joint_step, donate_argnums=(0, 1, 2, 3),
                          out_shardings=(s["policy"], s["policy_opt"], s["prior"],
                                         s["prior_opt"], None))
  return steps


def pair_fields(prior: priors.Prior, config, *, reference: Optional[str] = None,
                contrastive: bool = False) -> tuple[str, ...]:
  """The batch arrays a step reads (token weights come from the data, unless
  TIS-DPO's contrastive models compute them in the step)."""
  fields = ["tokens", "attention_mask", "response_mask"]
  if "token_weights" in prior.required_fields() and not contrastive:
    fields.append("token_weights")
  if (reference or config.train.reference) == "cached" and prior.uses_reference:
    fields.append("ref_logps")
  return tuple(fields)


class ReferenceCache:
  """Reference token log-probs of every pair, computed once before training.

  Keyed by the pair's index in its split; each row's array is aligned with its
  tokens (``logps[t] = log p_ref(tokens[t] | tokens[:t])``, 0 at ``t = 0``) and
  holds the row's real tokens only, so any later padding length fits.
  """

  def __init__(self, env: Env, it, ref_params):
    graphdef = env.graphdef
    chunk = env.config.train.vocab_chunk

    @jax.jit
    def row_logps(params, tokens, att):
      logits = nnx.merge(graphdef, params)(tokens[:, :-1], att[:, :-1])
      lp = stats.token_logprobs(logits, tokens[:, 1:], att[:, 1:].astype(jnp.float32),
                                vocab_chunk=chunk)
      return jnp.pad(lp, ((0, 0), (1, 0)))

    # Every process runs the same number of (collective) steps.
    chunks = it.num_chunks()
    if env.process_count > 1:
      chunks = int(np.max(multihost_utils.process_allgather(np.array(chunks))))
    self._rows: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for c in range(chunks):
      local = it.chunks(c)
      b = len(local["pair_index"])
      g = env.global_batch(_pair_arrays(local, ("tokens", "attention_mask")))
      flat = lambda x: x.reshape((-1,) + x.shape[2:])
      lp = np.asarray(_local_rows(row_logps(ref_params, flat(g["tokens"]),
                                            flat(g["attention_mask"]))))
      lengths = local["attention_mask"].sum(axis=1)
      # Global rows are pair-major [p0 chosen, p0 rejected, p1 chosen, ...].
      for j, pair in enumerate(local["pair_index"]):
        self._rows[int(pair)] = (lp[2 * j, :lengths[j]].copy(),
                                 lp[2 * j + 1, :lengths[b + j]].copy())

  def __len__(self) -> int:
    return len(self._rows)

  def add_to(self, local: dict) -> dict:
    """The local batch with a ``ref_logps`` ``[2B, T]`` array, laid out like ``tokens``."""
    tokens = local["tokens"]
    b = tokens.shape[0] // 2
    out = np.zeros(tokens.shape, np.float32)
    for j, pair in enumerate(local["pair_index"]):
      for side in (0, 1):
        row = self._rows[int(pair)][side]
        out[side * b + j, :len(row)] = row
    return dict(local, ref_logps=out)


def _local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in order."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  seen, rows = set(), []
  for s in shards:
    key = (s.index[0].start, s.index[0].stop)
    if key not in seen:
      seen.add(key)
      rows.append(np.asarray(s.data))
  return np.concatenate(rows)


def init_prior_params(env: Env, prior: priors.Prior, ref_params, example_local) -> PyTree:
  """The prior's own parameters (replicated), from the shapes of one batch."""
  if not prior.has_params:
    return None
  mc = env.model_config
  b = example_local["tokens"].shape[0] // 2
  t = example_local["tokens"].shape[1] - 1
  example = stats.SequenceStats(
      logps=jnp.zeros((b, t)), mask=jnp.zeros((b, t)),
      ref_hidden=jax.ShapeDtypeStruct((b, t, mc.num_layers, mc.hidden_size), jnp.float32))
  key = jax.random.fold_in(jax.random.key(env.config.seed), 1)
  params = prior.init_params(key, example)
  return jax.device_put(params, sharding.replicated(env.mesh))


# ---------------------------------------------------------------------------
# Priors that are models ('mi', 'ema'): their network, their updates, and the
# per-round diagnostics of every learned prior.
# ---------------------------------------------------------------------------

# The fixed priors whose held-out MI-DPO loss is logged beside a learned
# prior's (the paper's inequality, measured): those that need no model or
# data beyond the reference, at their default hyperparameters.
FIXED_PRIORS = ("dpo", "rdpo", "hdpo", "simpo", "tdpo")


def prior_network_config(env: Env, prior) -> model_config_lib.ModelConfig:
  """The model configuration of the 'mi' prior's ``zeta_phi``: the named
  ``prior.network`` with the policy's vocabulary and dtypes."""
  mc = env.model_config
  try:
    base = model_config_lib.get_config(prior.network)
  except ValueError as e:
    raise config_lib.ConfigError(f"config.prior.network: {e}") from None
  return base.replace(vocab_size=mc.vocab_size, bos_token_id=mc.bos_token_id,
                      eos_token_id=mc.eos_token_id, pad_token_id=mc.pad_token_id,
                      dtype=mc.dtype, param_dtype=mc.param_dtype, remat=mc.remat)


def make_prior_model(env: Env, prior) -> Optional[learned_prior.ResponseModel]:
  """The network that scores responses for a prior that is a model, else None."""
  if prior.param_update not in ("mle", "ema"):
    return None
  if prior.param_update == "ema":
    graphdef = env.graphdef
  else:
    pc = prior_network_config(env, prior)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: _new_model(pc, env.mesh, 0)))
  tok = env.tokenizer
  start = tok.bos_id if tok.bos_id is not None else tok.eos_id
  return learned_prior.ResponseModel(graphdef, bool(prior.conditional), bos_id=int(start),
                                     pad_id=int(tok.pad_id),
                                     vocab_chunk=env.config.train.vocab_chunk)


def init_model_prior_params(env: Env, prior, ref_params) -> PyTree:
  """'mi': a fresh ``zeta_phi`` (sharded like a model); 'ema': the reference's weights."""
  if prior.param_update == "ema":
    return jax.tree.map(jnp.copy, ref_params)
  seed = int(jax.random.randint(jax.random.fold_in(jax.random.key(env.config.seed), 5), (), 0,
                                2**30))
  model = sharding.create_sharded_model(prior_network_config(env, prior), env.mesh, seed=seed)
  return nnx.to_pure_dict(nnx.state(model))


def _mle_tx(t) -> optax.GradientTransformation:
  """The 'mi' prior's optimiser: Adam at a constant rate (it tracks a moving target)."""
  chain = [optax.clip_by_global_norm(t.grad_clip)] if t.grad_clip else []
  chain.append(optax.adamw(t.prior_learning_rate, weight_decay=t.prior_weight_decay))
  return optax.chain(*chain)


def prior_prompts(env: Env, round_index: int) -> list[str]:
  """Round ``r``'s held-out prompts for the 'mi' prior's samples: fresh each
  round, from the synthetic task's 'prior' split (disjoint from the training
  and test prompts). The first round, which fits ``zeta_phi`` from scratch,
  has ``prior_warmup_samples`` of them; the others ``prior_samples``."""
  t = env.config.train
  if round_index == 0:
    start, n = 0, t.prior_warmup_samples
  else:
    start, n = t.prior_warmup_samples + (round_index - 1) * t.prior_samples, t.prior_samples
  return synthetic.prompts(env.config.data.synthetic.seed, "prior", n, start=start)


class PriorRounds:
  """The learned prior's side of the alternation, and its per-round diagnostics.

  ``fit`` (the 'mi' prior) samples responses from the current policy on fresh
  held-out prompts and takes maximum-likelihood steps of ``zeta_phi`` on them,
  logging the prior's NLL on those fresh samples and the Monte-Carlo estimate
  of ``E_x KL(pi(.|x) || zeta) = E[log pi(y|x) - log zeta(y)]`` before the
  steps (an unbiased estimate for the prior the policy just trained with) and
  after them (on the samples it fit). ``diagnose`` (every learned prior)
  evaluates, on a fixed set of held-out pairs, the MI-DPO loss of the current
  policy under the learned prior and under each fixed prior
  (``FIXED_PRIORS``), and the collapse alarm: the learned prior's
  ``log zeta(y_w) - log zeta(y_l)`` against the reference's.
  """

  def __init__(self, env: Env, prior, prior_model, loss_config, prior_tx, shard,
               round_index: int):
    config = env.config
    t = config.train
    self.env, self.prior, self.model, self.round_index = env, prior, prior_model, round_index
    self.base_key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), 6),
                                       round_index)
    self.mle_step = None
    if prior.param_update == "mle":
      self.mle_step = learned_prior.make_mle_step(
          functools.partial(learned_prior.nll, prior_model), prior_tx,
          param_shardings=shard["prior"], opt_shardings=shard["prior_opt"])
      self.seq_logps = jax.jit(prior_model.sequence_logps)
    fixed = {n: priors.make_prior(n) for n in FIXED_PRIORS}
    fields = set(prior.required_fields())
    for p in fixed.values():
      fields |= set(p.required_fields())
    stats_fn = make_pair_stats(env, fields, reference="online", prior_model=prior_model)

    def heldout(policy, prior_params, frozen, batch):
      chosen, rejected = stats_fn(policy, prior_params, frozen, batch)
      out = {}
      learned = losses.mi_dpo_loss(chosen, rejected, prior, loss_config,
                                   prior_params=prior_params)
      for name, o in [(prior.name, learned)] + [
          (n, losses.mi_dpo_loss(chosen, rejected, p, loss_config)) for n, p in fixed.items()]:
        out[f"heldout/loss/{name}"] = o.loss
        out[f"heldout/accuracy/{name}"] = jnp.mean((o.logits > 0).astype(jnp.float32))
        out[f"heldout/log_zeta_gap/{name}"] = o.metrics["prior/log_zeta_gap"]
      return out

    self.heldout = jax.jit(heldout)
    self.heldout_batches = []
    self.collapse_margin = t.collapse_margin
    if config.data.source == "files" and not list(config.data.files.test_files):
      logging.warning("no test files (config.data.files.test_files): the learned prior's "
                      "held-out diagnostics are skipped")
      return
    data_config = _data_config(env)
    data_config.shuffle = False
    it = make_batches(env, data_config, "test", mode="pairs")
    per_step = config.data.batch_size * env.process_count
    n = min(it.num_epoch_batches(), max(1, -(-t.prior_eval_pairs // per_step)))
    if env.process_count > 1:
      n = int(np.min(multihost_utils.process_allgather(np.array(n))))
    fields_in = ("tokens", "attention_mask", "response_mask")
    self.heldout_batches = [env.global_batch(_pair_arrays(local, fields_in))
                            for local in it.first_batches(n)]

  # -- the 'mi' prior's maximum-likelihood round ---------------------------

  def _rows(self, samples: eval_lib.Samples) -> dict[str, np.ndarray]:
    prompts, responses = eval_lib.sample_ids(self.env, samples)
    width = max(self.env.config.data.max_length,
                max(len(p) + len(r) for p, r in zip(prompts, responses)))
    return learned_prior.response_rows(prompts, responses, _round_up(width, 8),
                                       self.env.tokenizer.pad_id)

  def _global(self, rows: dict, index: np.ndarray) -> dict[str, jax.Array]:
    """Global rows ``index`` (every process holds all rows) -> a sharded batch."""
    env = self.env
    per = len(index) // env.process_count
    mine = index[env.process_index * per:(env.process_index + 1) * per]
    return env.global_batch({k: v[mine] for k, v in rows.items()})

  def _log_zeta(self, params, rows) -> np.ndarray:
    bsz = self.env.config.train.prior_batch_size
    n = len(rows["tokens"])
    out = []
    for start in range(0, n, bsz):
      index = np.arange(start, start + bsz) % n  # the last chunk wraps around
      out.append(eval_lib._gather(self.seq_logps(params, self._global(rows, index))))
    return np.concatenate(out)[:n]

  def fit(self, state: dict, round_in_stage: int, step_index: int) -> dict:
    """One maximum-likelihood round of ``zeta_phi`` on fresh policy samples."""
    env, t = self.env, self.env.config.train
    t0 = time.perf_counter()
    key = jax.random.fold_in(self.base_key, round_in_stage)
    samples = eval_lib.sample(env, state["policy"], prior_prompts(env, round_in_stage),
                              jax.random.fold_in(key, 0), temperature=1.0)
    rows = self._rows(samples)
    n_tokens = rows["response_mask"].sum(axis=1)
    before = self._log_zeta(state["prior"], rows)
    steps = t.prior_warmup_steps if round_in_stage == 0 else t.prior_steps_per_round
    rng = np.random.default_rng([int(env.config.seed), self.round_index, round_in_stage])
    n, bsz = len(samples.prompts), t.prior_batch_size
    order = np.concatenate([rng.permutation(n) for _ in range(-(-steps * bsz // n) + 1)])
    params, opt = state["prior"], state["prior_opt"]
    for j in range(steps):
      params, opt, _ = self.mle_step(params, opt, self._global(rows, order[j * bsz:(j + 1) * bsz]))
    after = self._log_zeta(params, rows)
    kl_before = samples.logps - before
    kl_after = samples.logps - after
    m = {"nll_per_token": float(-before.sum() / n_tokens.sum()),
         "nll_per_token_fit": float(-after.sum() / n_tokens.sum()),
         **eval_lib._summary("nll_per_sequence", -before),
         **eval_lib._summary("kl_policy_prior", kl_before),
         **eval_lib._summary("kl_policy_prior_fit", kl_after),
         "mle_steps": steps, "samples": n,
         "sample_length": float(samples.lengths.mean()),
         "sample_finished_fraction": float(samples.finished.mean()),
         "seconds": time.perf_counter() - t0}
    env.writer.write("prior/mle", step_index, m)
    logging.info("prior round %d (step %d): %d samples, %d MLE steps in %.1f s; NLL/token "
                 "%.3f -> %.3f; E_x KL(pi||zeta) %.2f +- %.2f -> %.2f", round_in_stage,
                 step_index, n, steps, m["seconds"], m["nll_per_token"],
                 m["nll_per_token_fit"], m["kl_policy_prior"], m["kl_policy_prior_se"],
                 m["kl_policy_prior_fit"])
    return dict(state, prior=params, prior_opt=opt)

  # -- every learned prior: held-out losses and the collapse alarm ----------

  def diagnose(self, state: dict, frozen: dict, step_index: int) -> dict:
    if not self.heldout_batches:
      return {}
    sums: dict[str, float] = {}
    for batch in self.heldout_batches:
      for k, v in jax.device_get(self.heldout(state["policy"], state["prior"], frozen,
                                              batch)).items():
        sums[k] = sums.get(k, 0.0) + float(v)
    m = {k: v / len(self.heldout_batches) for k, v in sums.items()}
    name = self.prior.name
    gap = m[f"heldout/log_zeta_gap/{name}"] - m["heldout/log_zeta_gap/dpo"]
    alarm = learned_prior.collapse_alarm(m[f"heldout/log_zeta_gap/{name}"],
                                         m["heldout/log_zeta_gap/dpo"], self.collapse_margin)
    m["collapse/gap_vs_reference"] = gap
    m["collapse/alarm"] = float(alarm)
    self.env.writer.write("prior/diagnostics", step_index, m)
    fixed = "  ".join(f"{n} {m[f'heldout/loss/{n}']:.4f}" for n in FIXED_PRIORS)
    logging.info("held-out MI-DPO loss at step %d: %s %.4f | fixed priors: %s", step_index,
                 name, m[f"heldout/loss/{name}"], fixed)
    if alarm:
      logging.warning(
          "collapse alarm at step %d: the learned prior's log zeta(y_w) - log zeta(y_l) on "
          "held-out pairs is %.2f nats below the reference's (margin %.2f): prior mass is "
          "moving to the rejected responses.", step_index, -gap, self.collapse_margin)
    return m


def sample_pairs(env: Env, params, name: str, round_index: int) -> str:
  """Two responses per training prompt from a model -> a samples file.

  The synthetic builder labels each pair by Bradley-Terry on the true reward
  (the DPO paper's protocol; DICE's rounds with a known reward). Written once
  per workdir and round, by process 0.
  """
  config = env.config
  path = os.path.join(env.workdir, "pairs", f"{name}_samples.jsonl")
  if os.path.exists(path):
    return path
  prompts = synthetic.prompts(config.data.synthetic.seed, "train", config.num_pair_prompts)
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), 2), round_index)
  logging.info("sampling 2 x %d responses from the %s for preference pairs", len(prompts), name)
  a = eval_lib.sample(env, params, prompts, jax.random.fold_in(key, 0))
  b = eval_lib.sample(env, params, prompts, jax.random.fold_in(key, 1))
  return _write_samples(env, path, prompts, [[x, y] for x, y in zip(a.responses, b.responses)],
                        {"model": name})


def _write_samples(env: Env, path: str, prompts, responses, extra: dict) -> str:
  """Process 0 writes a samples file atomically; every process waits for it."""
  if env.process_index == 0:
    tmp = path + ".tmp"
    tfds_builders.write_samples_file(tmp, prompts, responses, extra=extra)
    os.replace(tmp, path)
  multihost_utils.sync_global_devices(f"samples {os.path.basename(path)}")
  return path


def select_pairs(scores: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
  """DICE's length-regularised choice among K samples per prompt.

  ``chosen = argmax_k (score - a |y|)``, ``rejected = argmin_k`` of the same,
  with ``a >= 0`` picked from a grid so that the mean lengths of the chosen and
  the rejected responses differ least (the smallest such ``a`` on ties).
  Returns ``(chosen index [N], rejected index [N], a)``.
  """
  scores = np.asarray(scores, np.float64)
  lengths = np.asarray(lengths, np.float64)
  rows = np.arange(len(scores))
  best = None
  for a in np.concatenate([[0.0], np.geomspace(1e-3, 10.0, 81)]):
    reg = scores - a * lengths
    hi, lo = reg.argmax(axis=1), reg.argmin(axis=1)
    gap = abs(lengths[rows, hi].mean() - lengths[rows, lo].mean())
    if best is None or gap < best[0] - 1e-12:
      best = (gap, hi, lo, float(a))
  return best[1], best[2], best[3]


def sample_dice_pairs(env: Env, sampler, older, name: str, round_index: int) -> str:
  """DICE round ``r >= 1``: K responses per prompt from the previous policy,
  scored by the implicit reward ``log pi_{r-1}(y) - log pi_{r-2}(y)`` (or the
  known reward, ``dice.labels='reward'``), the best and worst after DICE's
  length regularisation paired, and offline pairs of round 0 mixed in
  (``dice.offline_ratio``). Written as ``[chosen, rejected]`` rows."""
  config = env.config
  d = config.dice
  path = os.path.join(env.workdir, "pairs", f"dice_round{round_index}_samples.jsonl")
  if os.path.exists(path):
    return path
  prompts = synthetic.prompts(config.data.synthetic.seed, "train", config.num_pair_prompts)
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), 4), round_index)
  logging.info("DICE round %d: sampling %d x %d responses from %s", round_index,
               d.samples_per_prompt, len(prompts), name)
  samples = [eval_lib.sample(env, sampler, prompts, jax.random.fold_in(key, k))
             for k in range(d.samples_per_prompt)]
  texts = [[env.tokenizer.decode(s.responses[i]) for s in samples] for i in range(len(prompts))]
  lengths = np.stack([s.lengths for s in samples], axis=1)
  if d.labels == "implicit":
    scores = np.stack([s.logps - eval_lib.sequence_logps(env, older, s) for s in samples],
                      axis=1)
  else:
    scores = np.array([[synthetic.reward(p, y) for y in ys] for p, ys in zip(prompts, texts)])
  hi, lo, a = select_pairs(scores, lengths)
  keep = [i for i in range(len(prompts)) if texts[i][hi[i]] != texts[i][lo[i]]]
  rows_p = [prompts[i] for i in keep]
  rows_r = [[texts[i][hi[i]], texts[i][lo[i]]] for i in keep]
  true_w = np.array([synthetic.reward(p, r[0]) for p, r in zip(rows_p, rows_r)])
  true_l = np.array([synthetic.reward(p, r[1]) for p, r in zip(rows_p, rows_r)])
  n_new = len(rows_p)
  n_off = 0
  if d.offline_ratio > 0:
    n_off = int(round(n_new * d.offline_ratio / (1.0 - d.offline_ratio)))
    offline = _offline_pairs(env, n_off)
    n_off = len(offline)
    rows_p += [p for p, _ in offline]
    rows_r += [r for _, r in offline]
  stats_row = {"length_coef": a, "pairs_new": n_new, "pairs_offline": n_off,
               "pairs_identical_dropped": len(prompts) - n_new,
               "true_reward_chosen": float(true_w.mean()) if n_new else float("nan"),
               "true_reward_rejected": float(true_l.mean()) if n_new else float("nan"),
               "label_accuracy_vs_true_reward": float(np.mean(true_w > true_l)) if n_new
               else float("nan"),
               "length_chosen": float(np.mean(lengths[np.arange(len(hi)), hi])),
               "length_rejected": float(np.mean(lengths[np.arange(len(lo)), lo]))}
  env.writer.write(f"dice/round{round_index}", 0, stats_row)
  logging.info("DICE round %d pairs: %s", round_index, stats_row)
  return _write_samples(env, path, rows_p, rows_r, {"model": name, "labels": d.labels})


def _offline_pairs(env: Env, n: int) -> list[tuple[str, list[str]]]:
  """The first ``n`` labelled pairs of round 0's training data (DICE's replay)."""
  config = env.config
  overrides = {}
  if config.pairs_from == "reference":
    overrides["samples_path"] = os.path.join(env.workdir, "pairs", "reference_samples.jsonl")
  source = pipeline.builder_from_config(_data_config(env, **overrides), build=False)
  data = source.as_data_source(split="train")
  text = lambda x: x.decode() if isinstance(x, bytes) else str(x)
  out = []
  for i in range(min(n, len(data))):
    ex = data[i]
    out.append((text(ex["prompt"]), [text(ex["chosen"]), text(ex["rejected"])]))
  return out


def run_preference(env: Env, ref_params) -> tuple[PyTree, PyTree, dict]:
  """All rounds of preference training.

  Returns the final policy, its prior's parameters and the frozen models of
  the last round (what its prior reads).
  """
  config = env.config
  prior = config_lib.make_prior(config)
  policy, prior_params = ref_params, None
  previous = None
  contrastive = {}
  if prior.name == "tis_dpo" and config.tis.weights == "contrastive":
    contrastive = train_contrastive_models(env, ref_params)
  older = ref_params  # the policy before `previous` (DICE's implicit reward)
  for r in range(config.rounds):
    frozen = dict(frozen_models(prior, ref_params, previous), **contrastive)
    policy, prior_params = run_preference_round(env, prior, frozen, policy, previous, r,
                                                older=older)
    # DICE: the policy of this round is the next round's prior (and sampler).
    if previous is not None:
      older = previous
    previous = policy
  return policy, prior_params, frozen


def frozen_models(prior, ref_params, previous) -> dict:
  frozen = {"reference": ref_params}
  if "prev_logps" in prior.required_fields():
    frozen["previous"] = ref_params if previous is None else previous
  return frozen


def run_preference_round(env: Env, prior, frozen, init_policy, previous, round_index: int, *,
                         older=None, stage: Optional[str] = None,
                         directory: Optional[str] = None, reverse: bool = False,
                         loss_config: Optional[losses.LossConfig] = None
                         ) -> tuple[PyTree, PyTree]:
  """One round of preference training of ``init_policy`` under ``prior``.

  ``reverse`` swaps chosen and rejected (TIS-DPO's contrastive model
  ``pi_minus``); ``stage`` and ``directory`` name its logs and checkpoints.
  """
  config = env.config
  ref_params = frozen["reference"]
  t = config.train
  loss_config = loss_config or config_lib.make_loss_config(config)
  # The sampler of this round's pairs: the reference, or (DICE) the previous
  # round's policy.
  sampler, sampler_name = ((ref_params, "reference") if previous is None else
                           (previous, f"policy_round{round_index - 1}"))
  synthetic_overrides = {}
  if round_index > 0:
    synthetic_overrides["samples_path"] = sample_dice_pairs(
        env, previous, older, sampler_name, round_index)
    synthetic_overrides["labels"] = "given"
  elif config.pairs_from == "reference":
    synthetic_overrides["samples_path"] = sample_pairs(env, sampler, sampler_name, round_index)
  data_config = _data_config(env, **synthetic_overrides)
  it = make_batches(env, data_config, "train", mode="pairs")
  fields = pair_fields(prior, config, contrastive="plus" in frozen)
  cache = None
  if "ref_logps" in fields:
    t0 = time.perf_counter()
    cache = ReferenceCache(env, it, ref_params)
    logging.info("cached the reference log-probs of %d pairs in %.1f s", len(cache),
                 time.perf_counter() - t0)

  policy = jax.tree.map(jnp.copy, init_policy)
  policy_tx = _adamw(t.learning_rate, t.warmup_steps, t.steps, t.weight_decay, t.grad_clip)
  update = prior.param_update
  prior_tx = (_mle_tx(t) if update == "mle" else
              _adamw(t.prior_learning_rate, t.warmup_steps, t.steps, t.prior_weight_decay,
                     t.grad_clip))
  policy_opt = _init_opt(policy_tx, policy, env.mesh)
  example = it.first_batches(1)[0]
  prior_model = make_prior_model(env, prior)
  if prior_model is not None:
    prior_params = init_model_prior_params(env, prior, ref_params)
  else:
    prior_params = init_prior_params(env, prior, ref_params, example)
  prior_opt = (_init_opt(prior_tx, prior_params, env.mesh)
               if update in ("loss", "mle") else None)
  shard = {"policy": shardings_of(policy), "policy_opt": shardings_of(policy_opt),
           "prior": shardings_of(prior_params) if prior_params is not None else None,
           "prior_opt": shardings_of(prior_opt) if prior_opt is not None else None}
  steps = make_preference_steps(env, prior, loss_config, policy_tx, prior_tx, shard,
                                prior_model=prior_model)
  base_key = jax.random.fold_in(jax.random.key(config.seed), 100 + round_index)
  k_pol, k_pri = t.policy_steps_per_round, t.prior_steps_per_round
  diag_every = t.diagnostics_every
  rounds = None
  if update is not None and (update == "mle" or diag_every):
    rounds = PriorRounds(env, prior, prior_model, loss_config, prior_tx, shard, round_index)
  ema = learned_prior.ema_update(prior.decay) if update == "ema" else None

  def step(state, local, step_index):
    if reverse:
      local = _reverse_pairs(local)
    if cache is not None:
      local = cache.add_to(local)
    batch = env.global_batch(_pair_arrays(local, fields))
    rng = jax.random.fold_in(base_key, step_index)
    if update == "mle" and step_index % k_pol == 0:
      state = rounds.fit(state, step_index // k_pol, step_index)
    if rounds is not None and diag_every and step_index % diag_every == 0:
      rounds.diagnose(state, frozen, step_index)
    if update in (None, "mle", "ema"):
      p, o, m = steps.policy(state["policy"], state["policy_opt"], state["prior"], frozen,
                             batch, rng)
      state = dict(state, policy=p, policy_opt=o)
      if ema is not None:
        state["prior"] = ema(state["prior"], p)
      return state, m
    if t.prior_update == "joint":
      p, o, q, qo, m = steps.joint(state["policy"], state["policy_opt"], state["prior"],
                                   state["prior_opt"], frozen, batch, rng)
      return dict(state, policy=p, policy_opt=o, prior=q, prior_opt=qo), m
    if step_index % (k_pol + k_pri) < k_pol:
      p, o, m = steps.policy(state["policy"], state["policy_opt"], state["prior"], frozen,
                             batch, rng)
      return dict(state, policy=p, policy_opt=o), m
    q, qo, m = steps.prior(state["prior"], state["prior_opt"], state["policy"], frozen, batch,
                           rng)
    return dict(state, prior=q, prior_opt=qo), m

  # The frozen models are never updated and never checkpointed: the reference
  # is the SFT checkpoint, the previous policy the last round's checkpoint.
  state = {"policy": policy, "policy_opt": policy_opt, "prior": prior_params,
           "prior_opt": prior_opt}
  if stage is None:
    stage = "preference" if config.rounds == 1 else f"preference/round{round_index}"
  spec = LoopSpec(stage, directory or preference_dir(env, round_index), t.steps, it, _tokens,
                  step)
  state = run_loop(env, spec, state)
  if rounds is not None and diag_every:
    rounds.diagnose(state, frozen, t.steps)
  return state["policy"], state["prior"]


def _reverse_pairs(local: dict) -> dict:
  """Chosen and rejected swapped: ``[chosen; rejected]`` rows -> ``[rejected; chosen]``."""
  out = dict(local)
  for k, v in local.items():
    v = np.asarray(v)
    if v.ndim >= 1 and v.shape[0] == 2 * len(local["pair_index"]):
      b = v.shape[0] // 2
      out[k] = np.concatenate([v[b:], v[:b]])
  return out


def train_contrastive_models(env: Env, ref_params) -> dict:
  """TIS-DPO's two contrastive models, each DPO-trained from the reference:
  ``plus`` on the pairs, ``minus`` on the reversed pairs (or loaded from
  ``config.tis.plus_checkpoint`` / ``minus_checkpoint``)."""
  config = env.config
  dpo = priors.make_prior("dpo")
  loss_config = losses.LossConfig(alpha=config.loss.alpha)
  models = {}
  for name, reverse in (("plus", False), ("minus", True)):
    given = config.tis[f"{name}_checkpoint"]
    if given:
      models[name] = restore_params(env, given, item="policy")
      continue
    models[name], _ = run_preference_round(
        env, dpo, {"reference": ref_params}, ref_params, None, 0, stage=f"tis/{name}",
        directory=os.path.join(env.workdir, "tis", name), reverse=reverse,
        loss_config=loss_config)
  return models


def baseline_dir(env: Env, name: str) -> str:
  return os.path.join(env.workdir, "baselines", name)


def run_baselines(env: Env, ref_params) -> dict[str, PyTree]:
  """The policies of ``config.baselines``: each prior (at its default
  hyperparameters) trained from the reference on the run's pairs, with the
  same steps, optimiser, data order and seed as the run's own policy."""
  out = {}
  for name in env.config.baselines:
    out[name], _ = run_preference_round(
        env, priors.make_prior(name), {"reference": ref_params}, ref_params, None, 0,
        stage=f"baseline/{name}", directory=baseline_dir(env, name))
  return out


def preference_dir(env: Env, round_index: Optional[int] = None) -> str:
  """``<workdir>/checkpoints`` (one round) or ``<workdir>/checkpoints/round<r>``."""
  if round_index is None:
    round_index = env.config.rounds - 1
  base = os.path.join(env.workdir, "checkpoints")
  return base if env.config.rounds == 1 else os.path.join(base, f"round{round_index}")


def restore_preference(env: Env, ref_params) -> tuple[PyTree, PyTree]:
  """The policy (and prior) of the latest preference checkpoint of this workdir."""
  ckpt = ckpt_lib.Checkpointer(preference_dir(env))
  step = ckpt.latest_step()
  if step is None:
    raise FileNotFoundError(f"no preference checkpoint in {preference_dir(env)}; run the "
                            "'preference' stage first")
  prior = config_lib.make_prior(env.config)
  target = {"policy": ckpt_lib.abstract_like(ref_params)}
  if prior.param_update == "mle":
    target["prior"] = abstract_params(env, prior_network_config(env, prior))
  elif prior.param_update == "ema":
    target["prior"] = ckpt_lib.abstract_like(ref_params)
  elif prior.param_update == "loss":
    example = {"tokens": np.zeros((2, 2), np.int32)}  # the shapes do not depend on it
    target["prior"] = ckpt_lib.abstract_like(init_prior_params(env, prior, ref_params, example))
  trees, _ = ckpt.restore(step, target)
  ckpt.close()
  return trees["policy"], trees.get("prior")


# ---------------------------------------------------------------------------
# The pipeline.
# ---------------------------------------------------------------------------


def train_and_evaluate(config, workdir: str) -> dict:
  """Runs ``config.stages``; returns the evaluation results (also in ``eval.json``)."""
  os.makedirs(workdir, exist_ok=True)
  env = make_env(config, workdir)
  if env.process_index == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=1, sort_keys=True))
    env.writer.write_hparams(_flatten(config.to_dict()))
  logging.info("mesh %s over %d devices (%d processes); model %s, %.2fM parameters",
               dict(env.mesh.shape), jax.device_count(), jax.process_count(),
               config.model.hf_path or config.model.name, env.model_config.num_params() / 1e6)
  stages = tuple(config.stages)
  results = {}
  try:
    reference = run_sft(env)
    policy, prior_params, frozen = reference, None, {"reference": reference}
    baselines = {}
    if "preference" in stages:
      policy, prior_params, frozen = run_preference(env, reference)
      baselines = run_baselines(env, reference)
    elif "eval" in stages and os.path.isdir(preference_dir(env)):
      policy, prior_params = restore_preference(env, reference)
      baselines = {name: restore_params(env, baseline_dir(env, name), item="policy")
                   for name in config.baselines}
    if "preference" in stages and config.model.hf_path:
      export_hf(env, policy)
    if "eval" in stages:
      results = eval_lib.run_eval(env, policy, frozen, prior_params, baselines)
  finally:
    env.writer.close()
  return results


def export_hf(env: Env, policy) -> str:
  """The final policy in Hugging Face format (config.json + safetensors) under
  ``<workdir>/hf_export``, loadable by transformers or vLLM; with the source
  checkpoint's tokenizer files copied beside it."""
  import shutil
  path = os.path.join(env.workdir, "hf_export")
  files = hf_checkpoint.save_hf_checkpoint(env.model(policy), path,
                                           dtype=env.config.model.param_dtype)
  if env.process_index == 0:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "chat_template.jinja", "generation_config.json"):
      src = os.path.join(env.config.model.hf_path, name)
      if os.path.exists(src):
        shutil.copy(src, os.path.join(path, name))
  logging.info("exported the policy in Hugging Face format to %s (%d files)", path, len(files))
  return path


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out
