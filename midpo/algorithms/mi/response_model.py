"""Priors that are language models: ``zeta_phi`` and its maximum-likelihood step.

The 'mi' prior (``midpo.algorithms.mi.prior.MutualInformation``) is a small language model over
responses. The prior that minimises the mutual-information term
``E_x KL(pi(.|x) || zeta)`` is the policy's marginal
``zeta*(y) = sum_x p(x) pi(y|x)`` (the paper's Lemma 1), so its update is
maximum likelihood of ``zeta_phi`` on responses sampled from the current
policy: the expected log-likelihood ``E_x E_{y~pi} log zeta_phi(y)`` equals
``-E_x KL(pi(.|x) || zeta_phi) - H(Y|X)``, and the entropy does not depend on
``phi``. ``midpo.algorithms.mi.rounds`` alternates: at the start of every round
it samples responses from the policy on fresh held-out prompts and takes
maximum-likelihood steps of ``zeta_phi`` on them (:func:`make_mle_step`); then
the policy takes steps on the MI-DPO loss with ``log zeta_phi`` frozen.

``ResponseModel.token_logps`` scores the response tokens of ordinary
preference rows ``[bos] prompt response [eos]``: the unconditional model reads
``[bos] response [eos]``, compacted to the left on the device (so the same
batches serve the policy and the prior), and its log-probs are put back at the
rows' positions, aligned with the policy's.

The 'ema' prior (``midpo.algorithms.ema``) scores with the same
``ResponseModel`` over the policy's own architecture.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from midpo.core import stats

PyTree = Any


def compact_responses(tokens, response_mask, bos_id: int, pad_id: int):
  """Rows ``[.. prompt response pad]`` -> ``[bos response pad]``, on the device.

  The response (``response_mask == 1``) must be one contiguous span, as the
  data pipeline writes it. Returns ``(tokens, attention_mask, target_mask,
  start)``: the compacted ``[B, T]`` tokens and attention, the ``[B, T-1]``
  mask of their response targets, and each row's first response position.
  """
  t = tokens.shape[1]
  m = response_mask.astype(bool)
  n = jnp.sum(m, axis=1)
  start = jnp.argmax(m, axis=1)
  pos = jnp.arange(t)[None, :]
  src = jnp.clip(start[:, None] + pos - 1, 0, t - 1)
  body = jnp.take_along_axis(tokens, src, axis=1)
  valid = (pos >= 1) & (pos <= n[:, None])
  out = jnp.where(pos == 0, bos_id, jnp.where(valid, body, pad_id)).astype(tokens.dtype)
  attention = (pos <= n[:, None]).astype(jnp.int32)
  return out, attention, valid[:, 1:].astype(jnp.float32), start


@dataclasses.dataclass(frozen=True)
class ResponseModel:
  """``zeta_phi``: a Transformer (``graphdef``) scoring the responses of preference rows.

  ``conditional=False`` (the 'mi' prior's default) reads ``[bos] response``
  only; ``conditional=True`` reads the whole row, as the policy does.
  """
  graphdef: Any
  conditional: bool
  bos_id: int
  pad_id: int
  vocab_chunk: int = 4096

  def token_logps(self, params, tokens, attention_mask, response_mask):
    """``[B, T]`` rows -> ``[B, T-1]`` ``log zeta_phi`` of each response token,
    aligned with the targets ``tokens[:, 1:]`` (0 elsewhere)."""
    mask = response_mask[:, 1:].astype(jnp.float32)
    model = nnx.merge(self.graphdef, params)
    if self.conditional:
      logits = model(tokens[:, :-1], attention_mask[:, :-1])
      return stats.token_logprobs(logits, tokens[:, 1:], mask, vocab_chunk=self.vocab_chunk)
    c_tokens, c_att, c_mask, start = compact_responses(tokens, response_mask, self.bos_id,
                                                       self.pad_id)
    logits = model(c_tokens[:, :-1], c_att[:, :-1])
    lp = stats.token_logprobs(logits, c_tokens[:, 1:], c_mask, vocab_chunk=self.vocab_chunk)
    # Row target i predicts tokens[i + 1]; the compacted target j predicts
    # response token j, at row position start + j: so j = i - start + 1.
    idx = jnp.clip(jnp.arange(mask.shape[1])[None, :] - start[:, None] + 1, 0,
                   mask.shape[1] - 1)
    return jnp.take_along_axis(lp, idx, axis=1) * mask

  def sequence_logps(self, params, batch) -> jax.Array:
    """``log zeta_phi(y)`` of each row's response, ``[B]``."""
    lp = self.token_logps(params, batch["tokens"], batch["attention_mask"],
                          batch["response_mask"])
    return jnp.sum(lp, axis=-1)

  def packed_token_logps(self, params, packed) -> jax.Array:
    """``[R, W-1]`` ``log zeta_phi`` of the scored tokens of packed rows
    (``midpo.data.packing.pack``: ``tokens``, ``segment_ids``, ``target_mask``
    ``[R, W]``/``[R, W-1]``), 0 elsewhere. The sequences are what the model
    reads: ``[bos] response`` for the unconditional prior, the whole row for the
    conditional one (the packer's caller builds them)."""
    model = nnx.merge(self.graphdef, params)
    t = packed["tokens"].shape[1] - 1
    seg = packed["segment_ids"][:, :t]
    logits = model(packed["tokens"][:, :t], segment_ids=seg)
    # [:, :t]: a multi-process global batch pads every [R, .] array to the width W.
    return stats.token_logprobs(logits, packed["tokens"][:, 1:], packed["target_mask"][:, :t],
                                vocab_chunk=self.vocab_chunk)

  def packed_sequence_logps(self, params, packed, num_sequences: int) -> jax.Array:
    """``[N]`` ``log zeta_phi(y)`` of each packed sequence (``num_sequences`` static)."""
    lp = self.packed_token_logps(params, packed)
    index = packed["sequence_index"][:, :lp.shape[1]]
    return jax.ops.segment_sum(lp.reshape(-1), index.reshape(-1),
                               num_segments=num_sequences + 1)[:num_sequences]


def nll(model: ResponseModel, params, batch) -> tuple[jax.Array, dict]:
  """Token-mean negative log-likelihood of the responses in ``batch``
  (rows weighted by ``batch['weights']`` when given: exact enumerations)."""
  lp = model.token_logps(params, batch["tokens"], batch["attention_mask"],
                         batch["response_mask"])
  mask = batch["response_mask"][:, 1:].astype(jnp.float32)
  w = batch.get("weights")
  w = jnp.ones(lp.shape[:1], jnp.float32) if w is None else w.astype(jnp.float32)
  seq = jnp.sum(lp, axis=-1)
  n_tokens = jnp.sum(w * jnp.sum(mask, axis=-1))
  loss = -jnp.sum(w * seq) / jnp.maximum(n_tokens, 1e-9)
  return loss, {"nll_per_token": loss,
                "nll_per_sequence": -jnp.sum(w * seq) / jnp.maximum(jnp.sum(w), 1e-9)}


def packed_nll(model: ResponseModel, params, packed) -> tuple[jax.Array, dict]:
  """:func:`nll` of packed rows (``midpo.data.packing.pack``): the token-mean
  negative log-likelihood of every scored token, equal to :func:`nll` of the
  same sequences unpacked up to float32 rounding."""
  lp = model.packed_token_logps(params, packed)
  n_tokens = jnp.maximum(jnp.sum(packed["target_mask"][:, :lp.shape[1]]), 1e-9)
  n_sequences = jnp.maximum(jnp.max(packed["segment_ids"], axis=1).sum(), 1)
  loss = -jnp.sum(lp) / n_tokens
  return loss, {"nll_per_token": loss, "nll_per_sequence": -jnp.sum(lp) / n_sequences}


def make_mle_step(loss_fn: Callable, tx: optax.GradientTransformation, *,
                  param_shardings=None, opt_shardings=None) -> Callable:
  """``step(params, opt, batch) -> (params, opt, metrics)``: one optax step of
  ``loss_fn(params, batch) -> (loss, metrics)``, jitted, donating the prior's
  parameters and optimiser state."""

  def step(params, opt, batch):
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
    updates, opt = tx.update(grads, opt, params)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
    return optax.apply_updates(params, updates), opt, metrics

  out = None if param_shardings is None else (param_shardings, opt_shardings, None)
  return jax.jit(step, donate_argnums=(0, 1), out_shardings=out)


__all__ = ["ResponseModel", "compact_responses", "make_mle_step", "nll", "packed_nll"]
