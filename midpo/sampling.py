"""Sampling from a model on prompts, and scoring responses under a model.

``sample(env, params, prompts, rng)`` draws one response per prompt (the KV
cache sampler of ``midpo.models.generate``, over the mesh);
``sequence_logps`` scores given responses by teacher forcing (compiled once
per model and shape); ``sample_pairs`` writes two responses per training
prompt to a samples file for the synthetic task to label (the DPO paper's
protocol).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from midpo import files
from midpo.core import stats
from midpo.data import samples_file, synthetic
from midpo.models.generate import generate as generate_fn
from midpo.training import env as env_lib

PyTree = Any


@dataclasses.dataclass
class Samples:
  """One response per prompt, from one model.

  Attributes:
    prompts: the prompts' text.
    responses: token ids, EOS excluded.
    lengths: ``[N]`` generated tokens, EOS included.
    logps: ``[N]`` ``log pi(y|x)`` (nats) under the sampling model.
    finished: ``[N]`` whether the response ended with EOS.
  """
  prompts: list[str]
  responses: list[list[int]]
  lengths: np.ndarray
  logps: np.ndarray
  finished: np.ndarray


def mean_se(x) -> tuple[float, float]:
  """Mean and standard error of ``x`` (NaN standard error for fewer than 2 values)."""
  x = np.asarray(x, np.float64)
  if x.size < 2:
    return float(x.mean()) if x.size else float("nan"), float("nan")
  return float(x.mean()), float(x.std(ddof=1) / np.sqrt(x.size))


def summary(name: str, values) -> dict:
  """``{name: mean, name_se: standard error}``."""
  m, se = mean_se(values)
  return {name: m, f"{name}_se": se}


def prompt_ids(env, prompt: str | Sequence[int]) -> list[int]:
  """A prompt's token ids as the data pipeline writes them (with BOS when ``add_bos``); a
  prompt given as ids (users' files, tokenised by the pipeline) is returned as it is."""
  if not isinstance(prompt, str):
    return [int(i) for i in prompt]
  tok = env.tokenizer
  ids = list(tok.encode(prompt))
  if env.config.data.add_bos and tok.bos_id is not None:
    ids = [tok.bos_id] + ids
  return ids


def sample_ids(env, samples: Samples) -> tuple[list[list[int]], list[list[int]]]:
  """``(prompt ids, response ids)`` of each sample; a finished response ends with EOS."""
  eos = env.tokenizer.eos_id
  return ([prompt_ids(env, p) for p in samples.prompts],
          [list(r) + ([eos] if done else []) for r, done in zip(samples.responses,
                                                                  samples.finished)])


def response_rows(prompt_ids_: list[list[int]], response_ids: list[list[int]], width: int,
                  pad_id: int) -> dict[str, np.ndarray]:
  """Preference-style rows ``[prompt response]`` (ids already with bos/eos),
  right-padded to ``width``: ``tokens``, ``attention_mask``, ``response_mask``,
  each ``[N, width]`` int32.

  Raises:
    ValueError: a row is longer than ``width``.
  """
  n = len(prompt_ids_)
  tokens = np.full((n, width), pad_id, np.int32)
  att = np.zeros((n, width), np.int32)
  resp = np.zeros((n, width), np.int32)
  for i, (p, r) in enumerate(zip(prompt_ids_, response_ids)):
    if len(p) + len(r) > width:
      raise ValueError(f"row {i}: {len(p)} prompt + {len(r)} response tokens exceed {width}")
    tokens[i, :len(p) + len(r)] = p + r
    att[i, :len(p) + len(r)] = 1
    resp[i, len(p):len(p) + len(r)] = 1
  return {"tokens": tokens, "attention_mask": att, "response_mask": resp}


def _encode_prompts(env, prompts: Sequence[str], width: int):
  tok = env.tokenizer
  rows = [prompt_ids(env, p)[-width:] for p in prompts]
  tokens = np.full((len(rows), width), tok.pad_id, np.int32)
  mask = np.zeros((len(rows), width), np.int32)
  for i, ids in enumerate(rows):
    tokens[i, :len(ids)] = ids
    mask[i, :len(ids)] = 1
  return tokens, mask


def _process_chunks(env, items: Sequence, what: str):
  """Global batches of ``eval.batch_size`` items per process, the last padded
  with copies of its first: yields ``(number of real items, this process's items)``.

  Raises:
    StopRequested: a stop signal arrived (checked before each batch; ``what``
      names the operation).
  """
  per_process = env.config.eval.batch_size
  global_size = per_process * env.process_count
  for start in range(0, len(items), global_size):
    env_lib.check_stop(env, f"{what} ({start} of {len(items)} done)")
    chunk = list(items[start:start + global_size])
    real = len(chunk)
    chunk += [chunk[0]] * (global_size - real)
    yield real, chunk[env.process_index * per_process:(env.process_index + 1) * per_process]


def sample(env, params: PyTree, prompts: Sequence[str | Sequence[int]], rng, *,
           temperature: float | None = None) -> Samples:
  """One response per prompt (text, or token ids with BOS as the pipeline gives them) from
  the policy architecture with ``params`` (at ``eval.temperature`` unless ``temperature`` is
  given; at most ``eval.max_new_tokens`` tokens)."""
  c = env.config.eval
  temperature = c.temperature if temperature is None else temperature
  model = nnx.merge(env.graphdef, params)
  width = max(len(env.tokenizer.encode(p)) + 1 if isinstance(p, str) else len(p)
              for p in prompts)
  responses, lengths, logps, finished = [], [], [], []
  for i, (real, mine) in enumerate(_process_chunks(env, prompts, "sampling")):
    tokens, mask = _encode_prompts(env, mine, width)
    g = env.global_batch({"tokens": tokens, "mask": mask})
    out = generate_fn(model, g["tokens"], g["mask"], rng=jax.random.fold_in(rng, i),
                      max_new_tokens=c.max_new_tokens, temperature=temperature,
                      eos_id=env.tokenizer.eos_id, pad_id=env.tokenizer.pad_id)
    toks, m, lp, done = (env_lib.gather(x) for x in (out.tokens, out.mask, out.logprobs,
                                                     out.done))
    for r in range(real):
      n = int(m[r].sum())
      ids = toks[r, :n].tolist()
      if done[r] and ids and ids[-1] == env.tokenizer.eos_id:
        ids = ids[:-1]
      responses.append(ids)
      lengths.append(n)
      logps.append(float((lp[r] * m[r]).sum()))
      finished.append(bool(done[r]))
  return Samples(list(prompts), responses, np.array(lengths), np.array(logps),
                 np.array(finished))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _row_logps(graphdef, params, tokens_BxT, attention_BxT, mask_BxT):
  logits = nnx.merge(graphdef, params)(tokens_BxT[:, :-1], attention_BxT[:, :-1])
  return jnp.sum(stats.token_logprobs(logits, tokens_BxT[:, 1:], mask_BxT[:, 1:]), axis=-1)


def sequence_logps(env, params: PyTree, samples: Samples) -> np.ndarray:
  """``[N]`` ``log pi(y|x)`` (nats) of the samples' responses under the
  policy architecture with ``params`` (teacher forcing; compiled once per
  model and row shape)."""
  tok = env.tokenizer
  rows = list(zip(*sample_ids(env, samples)))
  width = max(len(p) + len(r) for p, r in rows)
  out = []
  for real, mine in _process_chunks(env, rows, "scoring samples"):
    r = response_rows(*zip(*mine), width, tok.pad_id)
    g = env.global_batch({"t": r["tokens"], "a": r["attention_mask"],
                          "m": r["response_mask"].astype(np.float32)})
    out.append(env_lib.gather(_row_logps(env.graphdef, params, g["t"], g["a"], g["m"]))[:real])
  return np.concatenate(out)


def write_samples(env, path: str, prompts, responses, extra: dict) -> str:
  """Process 0 writes a samples file atomically; every process waits for it."""
  if env.process_index == 0:
    with files.atomic_path(path) as tmp:
      samples_file.write_samples_file(tmp, prompts, responses, extra=extra)
  multihost_utils.sync_global_devices(f"samples {os.path.basename(path)}")
  return path


def sample_pairs(env, params: PyTree, name: str, round_index: int) -> str:
  """Two responses per training prompt from a model -> a samples file.

  The synthetic builder labels each pair by Bradley-Terry on the true reward
  (the DPO paper's protocol). Written once per workdir and round, by process 0.
  """
  config = env.config
  path = os.path.join(env.workdir, "pairs", f"{name}_samples.jsonl")
  if files.exists(path):
    return path
  prompts = synthetic.prompts(config.data.synthetic.seed, "train", config.num_pair_prompts)
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), 2), round_index)
  logging.info("sampling 2 x %d responses from the %s for preference pairs", len(prompts), name)
  a = sample(env, params, prompts, jax.random.fold_in(key, 0))
  b = sample(env, params, prompts, jax.random.fold_in(key, 1))
  return write_samples(env, path, prompts, [[x, y] for x, y in zip(a.responses, b.responses)],
                       {"model": name})
