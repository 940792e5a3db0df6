"""Where a DPO step's time goes: its parts timed apart, on the shape of ``vs_trl.py``.

The step of ``benchmarks/vs_trl.py`` (a Llama-shaped model: hidden 256, 4 layers, 4 heads / 2 KV
heads, MLP 1024, vocabulary 8192, tied embeddings; 8 pairs of 256 tokens, online reference,
float32) is the policy's forward and backward plus the reference's forward. Each part is jitted
and timed alone (median of ``--steps`` after ``--warmup``):

- ``reference forward``: logits and label log-probs of the 2B rows, no gradient;
- ``policy forward+backward``: the gradient of the summed label log-probs (the LM head and the
  log-softmax over materialised ``[2B, T, V]`` logits, ``train.fused_lm_head=False``);
- the same through the fused LM head (``midpo.core.fused_head``, ``train.fused_lm_head=True``);
- ``trunk forward+backward``: the layers alone (the gradient of a linear function of the final
  hidden states, no LM head);
- ``head+log-softmax forward+backward``: the LM head and the log-softmax alone, on fixed hidden
  states, plain and fused.

Each line gives seconds, the model FLOPs of the part (``2`` per multiply-add, as
``ModelConfig.flops_per_token`` counts) and the fraction of the machine's measured float32 matmul
throughput (numpy, 1024^3) it reaches.

    python benchmarks/profile_step.py
    python benchmarks/profile_step.py --pairs 8 --seq 256 --steps 8
"""

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.vs_trl import matmul_gflops  # noqa: E402
from midpo.core import fused_head, stats  # noqa: E402
from midpo.models.config import ModelConfig  # noqa: E402
from midpo.models import attention as attention_lib  # noqa: E402
from midpo.models import transformer  # noqa: E402
from midpo.models.transformer import Transformer  # noqa: E402
from midpo.training import env as env_lib  # noqa: E402


def _time(fn, args, warmup, steps):
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--pairs", type=int, default=8)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--steps", type=int, default=6)
  parser.add_argument("--vocab_chunk", type=int, default=stats.DEFAULT_VOCAB_CHUNK)
  parser.add_argument("--only_layer", action="store_true",
                      help="time only the trunk and its layer's parts")
  args = parser.parse_args()

  config = ModelConfig(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_layers=4,
                       num_heads=4, num_kv_heads=2, head_dim=64, tie_word_embeddings=True,
                       # As a run resolves an unset model.scan_layers: unrolled on a CPU.
                       scan_layers=env_lib.resolve_scan_layers(True, jax.default_backend()))
  model = Transformer(config, rngs=nnx.Rngs(params=0))
  graphdef, params = nnx.split(model)
  rows, t = 2 * args.pairs, args.seq
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(4, config.vocab_size, (rows, t + 1)), jnp.int32)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  att = jnp.ones(inputs.shape, jnp.int32)
  mask = jnp.ones(inputs.shape, jnp.float32)
  chunk = args.vocab_chunk

  def logps_plain(p):
    return stats.token_logprobs(nnx.merge(graphdef, p)(inputs, att), targets, mask,
                                vocab_chunk=chunk)

  def logps_fused(p):
    m = nnx.merge(graphdef, p)
    w, head = m.lm_head_weights()
    return fused_head.token_stats_from_hidden(m.hidden_states(inputs, att), w, head, targets,
                                              mask, vocab_chunk=chunk).logps

  probe = jnp.asarray(rng.normal(size=(rows, t, config.hidden_size)), jnp.float32)

  def trunk(p):
    return jnp.sum(nnx.merge(graphdef, p).hidden_states(inputs, att) * probe)

  h = jnp.asarray(rng.normal(size=(rows, t, config.hidden_size)), jnp.float32)

  def head_plain(h, p):
    return jnp.sum(stats.token_logprobs(nnx.merge(graphdef, p).logits_from_hidden(h), targets,
                                        mask, vocab_chunk=chunk))

  def head_fused(h, p):
    w, head = nnx.merge(graphdef, p).lm_head_weights()
    return jnp.sum(fused_head.token_stats_from_hidden(h, w, head, targets, mask,
                                                      vocab_chunk=chunk).logps)

  if args.only_layer:
    parts = []
  else:
    parts = [
        ("reference forward", jax.jit(logps_plain), (params,), 1),
        ("policy forward+backward", jax.jit(jax.grad(lambda p: jnp.sum(logps_plain(p)))),
         (params,), 3),
        ("policy forward+backward, fused head",
         jax.jit(jax.grad(lambda p: jnp.sum(logps_fused(p)))), (params,), 3),
        ("trunk forward+backward", jax.jit(jax.grad(trunk)), (params,), 3),
        ("head+log-softmax fwd+bwd", jax.jit(jax.grad(head_plain, argnums=(0, 1))), (h, params),
         3),
        ("head+log-softmax fwd+bwd, fused", jax.jit(jax.grad(head_fused, argnums=(0, 1))),
         (h, params), 3),
    ]
  peak = matmul_gflops()
  tokens_n = rows * t
  head_flops = 2 * config.hidden_size * config.vocab_size  # one forward, per token
  full = config.flops_per_token(t, training=False)  # 2N + attention, per token
  print(f"# {platform.machine()} CPU, {os.cpu_count()} cores, jax {jax.__version__}; "
        f"{args.pairs} pairs x {t} tokens; vocab_chunk {chunk}; median of {args.steps}")
  for name, fn, fargs, mult in parts:
    sec = _time(fn, fargs, args.warmup, args.steps)
    per_token = (head_flops if "head+" in name else
                 full - head_flops if "trunk" in name else full) * mult
    gflops = per_token * tokens_n / sec / 1e9
    print(f"{name:38s} {sec:7.3f} s  {gflops:6.1f} GFLOP/s  ({100 * gflops / peak:4.1f}% of "
          f"{peak:.0f})")
  _print_layer_parts(config, graphdef, params, inputs, att, probe, args, peak)


def _layer_parts(config, rows, t, rng):
  """One decoder layer's parts, each a jitted forward+backward, with its model FLOPs (None for
  the elementwise part): the seven projections as ``[B*T, D]`` matmuls (``_dense``'s 2-D form),
  the same with q/k/v and gate/up each concatenated into one matmul, the attention core (scores,
  causal mask, float32 softmax, weighted sum; FLOPs of the full ``T x T`` it computes), and the
  elementwise rest (two RMSNorms, RoPE on q and k, SiLU(gate) * up, the residual adds)."""
  c = config
  n, d, f = rows * t, c.hidden_size, c.intermediate_size
  hq, hk, dh = c.num_heads, c.num_kv_heads, c.head_dim
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape) * 0.05, jnp.float32)
  w = {"q": normal(d, hq * dh), "k": normal(d, hk * dh), "v": normal(d, hk * dh),
       "o": normal(hq * dh, d), "gate": normal(d, f), "up": normal(d, f), "down": normal(f, d)}
  h, a, act = normal(n, d), normal(n, hq * dh), normal(n, f)

  def projections(w, h, a, act):
    outs = [h @ w["q"], h @ w["k"], h @ w["v"], a @ w["o"], h @ w["gate"], h @ w["up"],
            act @ w["down"]]
    return sum(jnp.sum(jnp.sin(o)) for o in outs)

  def projections_concatenated(w, h, a, act):
    qkv = h @ jnp.concatenate([w["q"], w["k"], w["v"]], axis=1)
    gate_up = h @ jnp.concatenate([w["gate"], w["up"]], axis=1)
    outs = [qkv, a @ w["o"], gate_up, act @ w["down"]]
    return sum(jnp.sum(jnp.sin(o)) for o in outs)

  q, k, v = normal(rows, t, hq, dh), normal(rows, t, hk, dh), normal(rows, t, hk, dh)
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (rows, t, t))

  def attention_core(q, k, v):
    return jnp.sum(jnp.sin(attention_lib.attention(c, q, k, v, mask)))

  cos, sin = attention_lib.rope_tables(
      c, jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (rows, t)))
  x, g, u = normal(rows, t, d), normal(rows, t, f), normal(rows, t, f)
  scale = jnp.ones((d,), jnp.float32)

  def elementwise(x, q, k, g, u):
    hn = transformer.rms_norm(x, scale, c.rms_norm_eps)
    qr, kr = attention_lib.apply_rope(q, cos, sin), attention_lib.apply_rope(k, cos, sin)
    x2 = x + hn
    hm = transformer.rms_norm(x2, scale, c.rms_norm_eps)
    return (jnp.sum(jnp.sin(x2 + hm)) + jnp.sum(jnp.sin(qr)) + jnp.sum(jnp.sin(kr))
            + jnp.sum(jnp.sin(jax.nn.silu(g) * u)))

  proj_flops = 6 * n * sum(int(np.prod(x.shape)) for x in w.values())
  attn_flops = 3 * 2 * 2 * rows * hq * t * t * dh
  return [
      ("  projections (7 matmuls)", jax.jit(jax.grad(projections, argnums=(0, 1, 2, 3))),
       (w, h, a, act), proj_flops),
      ("  projections, qkv and gate|up joined",
       jax.jit(jax.grad(projections_concatenated, argnums=(0, 1, 2, 3))), (w, h, a, act),
       proj_flops),
      ("  attention core (full T x T)", jax.jit(jax.grad(attention_core, argnums=(0, 1, 2))),
       (q, k, v), attn_flops),
      ("  norms, RoPE, SiLU, residuals", jax.jit(jax.grad(elementwise, argnums=(0, 1, 2, 3, 4))),
       (x, q, k, g, u), None),
  ]


def _print_layer_parts(config, graphdef, params, inputs, att, probe, args, peak):
  """The trunk (scanned and unrolled layers) against the sum of its layers' parts, each part's
  time multiplied by the number of layers."""
  rows, t = inputs.shape
  layers = config.num_layers
  print(f"# the trunk's layers ({layers}), forward+backward; parts timed for one layer, "
        f"times {layers}")
  for scan in (True, False):
    graph = nnx.split(Transformer(dataclasses.replace(config, scan_layers=scan),
                                  rngs=nnx.Rngs(params=0)))[0]

    def trunk(p, graph=graph):
      return jnp.sum(nnx.merge(graph, p).hidden_states(inputs, att) * probe)

    sec = _time(jax.jit(jax.grad(trunk)), (params,), args.warmup, args.steps)
    print(f"{'trunk, layers ' + ('scanned' if scan else 'unrolled'):38s} {sec:7.3f} s")
  total = 0.0
  for name, fn, fargs, flops in _layer_parts(config, rows, t, np.random.default_rng(1)):
    sec = layers * _time(fn, fargs, args.warmup, args.steps)
    if "joined" not in name:
      total += sec
    gflops = None if flops is None else layers * flops / sec / 1e9
    rate = "" if gflops is None else (
        f"  {gflops:6.1f} GFLOP/s  ({100 * gflops / peak:4.1f}% of {peak:.0f})")
    print(f"{name:38s} {sec:7.3f} s{rate}")
  print(f"{'  sum of the parts (joined excluded)':38s} {total:7.3f} s")


if __name__ == "__main__":
  main()
