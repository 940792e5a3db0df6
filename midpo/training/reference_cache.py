"""The reference's token log-probs of every pair, computed once before training (and those
of any other frozen model a prior reads as ``<name>_logps``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from midpo.core import stats
from midpo.training import env as env_lib
from midpo.training import pairs as pairs_lib


class ReferenceCache:
  """Reference token log-probs of every pair of a split, keyed by the pair's index.

  Each row's array is aligned with its tokens (``logps[t] = log p_ref(tokens[t]
  | tokens[:t])``, 0 at ``t = 0``) and holds the row's real tokens only, so
  any later padding length fits. ``add_to`` puts them into a host batch.
  """

  def __init__(self, env: env_lib.Env, it, ref_params):
    graphdef = env.graphdef
    chunk = env.config.train.vocab_chunk

    @jax.jit
    def row_logps(params, tokens, att):
      logits = nnx.merge(graphdef, params)(tokens[:, :-1], att[:, :-1])
      lp = stats.token_logprobs(logits, tokens[:, 1:], att[:, 1:].astype(jnp.float32),
                                vocab_chunk=chunk)
      return jnp.pad(lp, ((0, 0), (1, 0)))

    # Every process runs the same number of (collective) steps.
    chunks = env.max_over_processes(it.num_chunks())
    self._rows: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for c in range(chunks):
      local = it.chunks(c)
      g = env.global_batch(pairs_lib.select(local, ("tokens", "attention_mask")))
      lp = env_lib.local_rows(row_logps(ref_params, pairs_lib.to_rows(g["tokens"]),
                                        pairs_lib.to_rows(g["attention_mask"])))
      lp_Bx2xT = np.asarray(lp).reshape((-1, 2) + lp.shape[1:])
      lengths_Bx2 = local["attention_mask"].sum(axis=-1)
      for j, pair in enumerate(local["pair_index"]):
        self._rows[int(pair)] = tuple(lp_Bx2xT[j, side, :lengths_Bx2[j, side]].copy()
                                      for side in (0, 1))

  def __len__(self) -> int:
    return len(self._rows)

  def add_to(self, local: dict, field: str = "ref_logps") -> dict:
    """The host batch with a pair-major ``field`` ``[B, 2, T]`` (``ref_logps``, or the
    cached log-probs of another frozen model), laid out like ``tokens``."""
    out = np.zeros(local["tokens"].shape, np.float32)
    for j, pair in enumerate(local["pair_index"]):
      for side in (0, 1):
        row = self._rows[int(pair)][side]
        out[j, side, :len(row)] = row
    return dict(local, **{field: out})
