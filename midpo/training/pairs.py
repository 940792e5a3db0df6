"""Preference pairs in the step: their statistics, the loss, the jitted steps.

Batches of pairs are pair-major from the data pipeline to the loss
(``midpo.data.batches``): ``tokens``, ``attention_mask``, ``response_mask``
(and any per-token input) are ``[B, 2, T]``, ``[:, 0]`` chosen and ``[:, 1]``
rejected. Inside the step the ``2B`` rows are run as one batch (flattened
pair-major) and split back into the chosen and the rejected ``SequenceStats``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from midpo.core import fused_head, losses, priors, stats
from midpo.data import packing
from midpo.training import inputs as inputs_lib

PyTree = Any
ROW_FIELDS = ("tokens", "attention_mask", "response_mask")


def to_rows(x_Bx2xT: jax.Array) -> jax.Array:
  """Pair-major ``[B, 2, ...]`` -> rows ``[2B, ...]`` (chosen, rejected, chosen, ...)."""
  return x_Bx2xT.reshape((-1,) + x_Bx2xT.shape[2:])


def split_roles(rows: Any) -> tuple[Any, Any]:
  """A pytree of ``[2B, ...]`` rows -> its chosen and rejected ``[B, ...]`` halves."""
  pairs = jax.tree.map(lambda x: x.reshape((-1, 2) + x.shape[1:]), rows)
  return jax.tree.map(lambda x: x[:, 0], pairs), jax.tree.map(lambda x: x[:, 1], pairs)


def select(local: dict, fields) -> dict[str, np.ndarray]:
  """The named arrays of a host batch."""
  return {k: np.asarray(local[k]) for k in fields}


def swap_roles(local: dict) -> dict:
  """A pair-major host batch with chosen and rejected swapped (training on
  the reversed preferences)."""
  b = len(local["pair_index"])
  return {k: (np.asarray(v)[:, ::-1] if np.ndim(v) >= 2 and np.shape(v)[:2] == (b, 2) else v)
          for k, v in local.items()}


def make_pair_stats(env, fields, *, prior: Optional[priors.Prior] = None,
                    reference: Optional[str] = None) -> Callable:
  """``stats(policy, prior_params, frozen, batch) -> (chosen, rejected)``
  ``SequenceStats`` with ``fields`` (a prior's, or several priors' union).

  ``frozen`` holds the frozen models' parameters by name (``reference``, and
  whatever the providers read). The policy's and the reference's statistics
  come from one fused pass (the reference's forward is skipped when no field
  reads it, and replaced by the batch's ``ref_logps`` when ``reference`` is
  'cached'); every other field from its provider (``midpo.training.inputs``),
  built for ``prior``.
  """
  graphdef = env.graphdef
  fields = set(fields)
  reference = reference or env.config.train.reference
  uses_reference = bool(fields & set(priors.REFERENCE_FIELDS))
  online = reference == "online" and uses_reference
  cached = reference == "cached" and uses_reference
  klr = "kl_ref_policy" in fields
  klp = "kl_policy_ref" in fields
  sum_sq = "log_sum_sq_probs" in fields
  want_hidden = "ref_hidden" in fields
  chunk = env.config.train.vocab_chunk
  fused = bool(env.config.train.fused_lm_head)
  providers = inputs_lib.providers_for(env, prior, sorted(fields))
  shards = batch_shards(env)

  def model_token_stats(policy_params, frozen, inputs, in_mask, targets, mask, segment_ids):
    kw = dict(kl_ref_policy=klr, kl_policy_ref=klp, log_sum_sq_probs=sum_sq, vocab_chunk=chunk)
    if fused:
      return _fused_token_stats(graphdef, policy_params, frozen if online else None, inputs,
                                in_mask, targets, mask, want_hidden, kw, segment_ids)
    logits = nnx.merge(graphdef, policy_params)(inputs, in_mask, segment_ids=segment_ids)
    ref_logits = hidden = None
    if online:
      ref_model = nnx.merge(graphdef, frozen["reference"])
      if want_hidden:
        ref_logits, hidden = ref_model(inputs, in_mask, segment_ids=segment_ids,
                                       return_hidden_states=True)
        hidden = jax.lax.stop_gradient(hidden)
      else:
        ref_logits = ref_model(inputs, in_mask, segment_ids=segment_ids)
    return stats.token_stats(logits, targets, mask, ref_logits, **kw), hidden

  def stats_fn(policy_params, prior_params, frozen, batch):
    tokens, att = to_rows(batch["tokens"]), to_rows(batch["attention_mask"])
    inputs, targets, in_mask = tokens[:, :-1], tokens[:, 1:], att[:, :-1]
    resp = to_rows(batch["response_mask"])
    mask = resp[:, 1:].astype(jnp.float32)
    if "packed_tokens" in batch:  # train.padding_free: the models read packed rows
      p_tokens, seg = batch["packed_tokens"], batch["packed_segment_ids"][:, :-1]
      ts, hidden = model_token_stats(policy_params, frozen, p_tokens[:, :-1], seg > 0,
                                     p_tokens[:, 1:], batch["packed_target_mask"], seg)
      # [2B, T-1]. Several processes pad it to their longest T with zeros (as the rows):
      # every slot that is not scored reads the zero one past its group's end.
      end = p_tokens.shape[0] // shards * (p_tokens.shape[1] - 1)
      index = jnp.where(mask > 0, to_rows(batch["unpack_index"])[:, :inputs.shape[1]], end)
      ts = jax.tree.map(lambda x: packing.unpack(x, index, shards), ts)
      hidden = None if hidden is None else packing.unpack(hidden, index, shards)
    else:
      ts, hidden = model_token_stats(policy_params, frozen, inputs, in_mask, targets, mask, None)
    ref_logps = None
    if cached:
      ref_logps = jnp.where(mask > 0, to_rows(batch["ref_logps"])[:, 1:], 0.0)
    extra = {}
    if providers:
      ctx = inputs_lib.InputContext(
          graphdef=graphdef, vocab_chunk=chunk, frozen=frozen, prior_params=prior_params,
          batch=batch, rows={"tokens": tokens, "attention_mask": att, "response_mask": resp},
          inputs_BxT=inputs, targets_BxT=targets, input_mask_BxT=in_mask, mask_BxT=mask,
          role_B=inputs_lib.role_of_rows(batch["tokens"].shape[0]))
      extra = {name: p.compute(ctx) for name, p in providers.items()}
    if want_hidden:
      extra["ref_hidden"] = hidden
    seq = stats.SequenceStats.from_token_stats(ts, mask, **extra)
    if cached:
      seq = dataclasses.replace(seq, ref_logps=ref_logps)
    return split_roles(seq)

  return stats_fn


def _fused_token_stats(graphdef, policy_params, frozen, inputs, in_mask, targets, mask,
                       want_hidden, kw, segment_ids=None):
  """``make_pair_stats``' token statistics through the fused LM head (``frozen`` None: no
  online reference); returns them and the reference's layer outputs (``want_hidden``)."""
  policy = nnx.merge(graphdef, policy_params)
  h = policy.hidden_states(inputs, in_mask, segment_ids=segment_ids)
  w, head = policy.lm_head_weights()
  ref_h = ref_w = hidden = None
  if frozen is not None:
    ref_model = nnx.merge(graphdef, frozen["reference"])
    if want_hidden:
      ref_h, hidden = ref_model.hidden_states(inputs, in_mask, segment_ids=segment_ids,
                                              return_all_layers=True)
      hidden = jax.lax.stop_gradient(hidden)
    else:
      ref_h = ref_model.hidden_states(inputs, in_mask, segment_ids=segment_ids)
    ref_w, _ = ref_model.lm_head_weights()
  ts = fused_head.token_stats_from_hidden(h, w, head, targets, mask, ref_h, ref_w, **kw)
  return ts, hidden


def batch_shards(env) -> int:
  """The global batch's shards: the mesh's ``data x fsdp`` (every process's devices)."""
  return int(env.mesh.shape["data"] * env.mesh.shape["fsdp"])


def packed_rows(env, local: dict) -> dict[str, np.ndarray]:
  """``train.padding_free``: this process's pairs packed (``midpo.data.packing.pack_pairs``)
  into rows of ``data.max_length`` tokens, each batch shard's pairs into its own rows (so
  every device maps its own rows back), as many rows in every shard of every process (the
  most any needs), a multiple of ``ceil(2b / 8)`` for ``b`` pairs a shard (so at most 8
  row counts: few compilations).

  Raises:
    ValueError: a row that cannot be packed (``pack_pairs``), in this process or
      another, or this process's pairs are not whole batch shards.
  """
  num_pairs = len(local["tokens"])
  local_shards = batch_shards(env) // env.process_count
  if local_shards < 1 or batch_shards(env) % env.process_count or num_pairs % local_shards:
    raise ValueError(f"train.padding_free packs each batch shard on its own: the "
                     f"{batch_shards(env)} shards must divide over {env.process_count} "
                     f"processes and their {num_pairs} pairs each")
  pad_id = int(env.tokenizer.pad_id)
  try:
    packed = packing.pack_pairs(
        local["tokens"], local["attention_mask"], local["response_mask"],
        width=int(env.config.data.max_length), pad_id=pad_id,
        row_multiple=-(-2 * (num_pairs // local_shards) // 8), shards=local_shards)
    rows = len(packed["packed_tokens"]) // local_shards
  except ValueError as e:
    packed, rows = e, 0
  # Every process joins the collectives, a failed one too (else the others would wait).
  most = env.max_over_processes(rows)
  if env.min_over_processes(rows) == 0:
    raise (packed if isinstance(packed, ValueError) else
           ValueError("train.padding_free: another process could not pack its pairs (its "
                      "log says why)"))
  return packing.pad_pairs(packed, most, shards=local_shards, pad_id=pad_id)


def pair_fields(env, prior: priors.Prior, *, reference: Optional[str] = None) -> tuple[str, ...]:
  """The host batch arrays a step under ``prior`` reads: the rows, what its
  providers read, and ``ref_logps`` when the reference is cached."""
  fields = list(ROW_FIELDS)
  providers = inputs_lib.providers_for(env, prior, prior.required_fields())
  fields += [f for f in inputs_lib.batch_fields(providers) if f not in fields]
  if (reference or env.config.train.reference) == "cached" and prior.uses_reference:
    fields.append("ref_logps")
  return tuple(fields)


def make_pair_loss(env, prior: priors.Prior, loss_config: losses.LossConfig, *,
                   reference: Optional[str] = None) -> Callable:
  """``loss(policy, prior_params, frozen, batch, rng, train) -> (loss, (metrics, logits))``
  with the MI-DPO loss (``midpo.core.losses``) under ``prior``; ``logits`` is
  ``z = alpha (s_w - s_l)``, ``[B]``."""
  fields = tuple(prior.required_fields()) + loss_config.required_fields()
  stats_fn = make_pair_stats(env, fields, prior=prior, reference=reference)

  def loss_fn(policy_params, prior_params, frozen, batch, rng, train):
    chosen, rejected = stats_fn(policy_params, prior_params, frozen, batch)
    out = losses.mi_dpo_loss(chosen, rejected, prior, loss_config, prior_params=prior_params,
                             rng=rng, train=train)
    return out.loss, (out.metrics, out.logits)

  return loss_fn


@dataclasses.dataclass
class PreferenceSteps:
  """The jitted steps; each donates only the state it updates.

  Attributes:
    policy: ``(policy, policy_opt, prior_params, frozen, batch, rng) ->
      (policy, policy_opt, metrics)``.
    prior: ``(prior_params, prior_opt, policy, frozen, batch, rng) ->
      (prior_params, prior_opt, metrics)``, for priors trained on the loss.
    joint: both at once, ``(policy, policy_opt, prior_params, prior_opt,
      frozen, batch, rng) -> (..., metrics)``, for priors trained on the loss.
  """
  policy: Callable
  prior: Optional[Callable]
  joint: Optional[Callable]


def make_preference_steps(env, prior: priors.Prior, loss_config: losses.LossConfig,
                          policy_tx: optax.GradientTransformation,
                          prior_tx: Optional[optax.GradientTransformation], shard: dict, *,
                          prior_on_loss: bool = False) -> PreferenceSteps:
  """The jitted preference steps of ``prior``; ``shard`` holds the output
  shardings of ``policy``, ``policy_opt``, ``prior`` and ``prior_opt``.
  ``prior_on_loss`` also builds the prior's and the joint step (the prior's
  parameters trained on the loss with ``prior_tx``, projected by
  ``prior.project``)."""
  loss_fn = make_pair_loss(env, prior, loss_config)

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

  s = shard
  steps = PreferenceSteps(
      policy=jax.jit(policy_step, donate_argnums=(0, 1),
                     out_shardings=(s["policy"], s["policy_opt"], None)),
      prior=None, joint=None)
  if prior_on_loss:
    steps.prior = jax.jit(prior_step, donate_argnums=(0, 1),
                          out_shardings=(s["prior"], s["prior_opt"], None))
    steps.joint = jax.jit(joint_step, donate_argnums=(0, 1, 2, 3),
                          out_shardings=(s["policy"], s["policy_opt"], s["prior"],
                                         s["prior_opt"], None))
  return steps


class PairEvaluator:
  """The evaluation step: the MI-DPO loss and logits of a fixed policy on pair
  batches, ``evaluate(policy, prior_params, frozen, batch) -> (loss, logits_B)``,
  jitted once per instance (``env.compiled`` keeps one per run and prior)."""

  def __init__(self, env, prior: priors.Prior, loss_config: losses.LossConfig, *,
               reference: Optional[str] = None):
    loss_fn = make_pair_loss(env, prior, loss_config, reference=reference)

    def evaluate(policy, prior_params, frozen, batch):
      loss, (_, logits) = loss_fn(policy, prior_params, frozen, batch, None, False)
      return loss, logits

    self.fields = pair_fields(env, prior, reference=reference)
    self._fn = jax.jit(evaluate)

  def __call__(self, policy, prior_params, frozen, batch):
    return self._fn(policy, prior_params, frozen, batch)
