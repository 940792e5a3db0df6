"""The SFT stage: the reference (and initial policy) by maximum likelihood, on the synthetic
task's 'sft' split or, for users' files, the prompts and chosen responses of 'train'."""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from midpo.core import fused_head, stats
from midpo.training import env as env_lib
from midpo.training import loop, optim

PyTree = Any
SFT_FIELDS = ("tokens", "attention_mask", "response_mask")


def sft_loss(graphdef, params: PyTree, batch: dict, *, fused_lm_head: bool = False,
             vocab_chunk: int | None = stats.DEFAULT_VOCAB_CHUNK) -> tuple[jax.Array, dict]:
  """Token-mean NLL (nats per token) of the response tokens of ``[B, T]`` rows (through
  ``midpo.core.fused_head`` with ``fused_lm_head``)."""
  tokens, att = batch["tokens"], batch["attention_mask"]
  mask = batch["response_mask"][:, 1:].astype(jnp.float32)
  model = nnx.merge(graphdef, params)
  if fused_lm_head:
    w, head = model.lm_head_weights()
    lp = fused_head.token_stats_from_hidden(
        model.hidden_states(tokens[:, :-1], att[:, :-1]), w, head, tokens[:, 1:], mask,
        vocab_chunk=vocab_chunk).logps
  else:
    lp = stats.token_logprobs(model(tokens[:, :-1], att[:, :-1]), tokens[:, 1:], mask,
                              vocab_chunk=vocab_chunk)
  n = jnp.maximum(jnp.sum(mask), 1.0)
  loss = -jnp.sum(lp) / n
  return loss, {"loss": loss, "tokens": jnp.sum(mask)}


def run_sft(env: env_lib.Env) -> PyTree:
  """The reference's parameters: ``config.sft.checkpoint``'s, the HF
  checkpoint's, or trained here on the SFT split (``<workdir>/sft``)."""
  config = env.config
  if config.sft.checkpoint:
    logging.info("the reference is config.sft.checkpoint's: %s%s", config.sft.checkpoint,
                 " (sft stage skipped)" if "sft" in config.stages else "")
    return env_lib.restore_params(env, config.sft.checkpoint)
  if config.model.hf_path:
    if "sft" in config.stages:
      logging.info("sft stage skipped: the reference is the checkpoint config.model.hf_path")
    return env_lib.load_hf_params(env)
  # Users' files: SFT on the prompts and chosen responses of the training pairs (the DPO
  # paper's SFT on preferred completions); the synthetic task has its own 'sft' split.
  split = "sft" if config.data.source == "synthetic" else "train"
  it = env.batches(env.data_config(), split, mode="sft")
  params = env_lib.init_params(env, config.seed)
  tx = optim.adamw(config.sft.learning_rate, config.sft.warmup_steps, config.sft.steps,
                   config.sft.weight_decay, 1.0)
  opt = optim.init_opt(tx, params, env.mesh)
  graphdef = env.graphdef

  def update(params, opt, batch):
    loss_fn = functools.partial(sft_loss, graphdef, fused_lm_head=config.train.fused_lm_head,
                                vocab_chunk=config.train.vocab_chunk)
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
    updates, opt = tx.update(grads, opt, params)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return optax.apply_updates(params, updates), opt, metrics

  jitted = jax.jit(update, donate_argnums=(0, 1),
                   out_shardings=(env_lib.shardings_of(params), env_lib.shardings_of(opt), None))

  def step(state, local, step_index):
    del step_index
    batch = env.global_batch({k: np.asarray(local[k]) for k in SFT_FIELDS})
    p, o, m = jitted(state["params"], state["opt"], batch)
    return {"params": p, "opt": o}, m

  spec = loop.LoopSpec("sft", os.path.join(env.workdir, "sft"), config.sft.steps, it,
                       loop.count_tokens, step)
  state = loop.run_loop(env, spec, {"params": params, "opt": opt})
  return state["params"]
