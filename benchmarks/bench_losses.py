"""Times the jitted loss-and-gradient of every prior, link and loss option
against plain DPO.

From the same inputs: policy logits ``[2B, T, V]`` of the concatenated
``[chosen; rejected]`` batch, the reference's per-token log-probs (cached, as
the trainer can cache them), and, for the priors that need the reference's
full distribution per token (TDPO, TIS-DPO token-level, SparsePO), the
reference logits. Each step computes the per-token statistics the prior needs
(``midpo.core.stats``, chunked over the vocabulary), the MI-DPO loss, and its
gradient with respect to the policy logits. The links (TRL's loss types) and
the loss options (mixtures, f-divergences, WPO's weights, LD-DPO) are timed
over DPO's prior, as ``dpo+<link>``.

Timings are interleaved round-robin over the priors, and each reported figure
is the median over rounds, so slow drift of the machine affects every prior
alike. The ratio to DPO is what matters; absolute times depend on the machine.

    python benchmarks/bench_losses.py                 # CPU-sized defaults
    python benchmarks/bench_losses.py --pairs 16 --seq 512 --vocab 32768
"""

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from midpo import algorithms
from midpo.core import losses, stats

CASES = [
    ("dpo", {}, {}),
    ("dice", {}, {}),
    ("hdpo", dict(eta=0.9), {}),
    ("rdpo", dict(length_coef=0.1), {}),
    ("simpo", dict(gamma=0.5), dict(alpha=2.0)),
    ("tis_dpo", {}, {}),
    ("tis_dpo", dict(token_level=True), {}),
    ("tdpo", dict(version=1), {}),
    ("tdpo", dict(version=2), {}),
    ("sparsepo", dict(mask_source="given"), {}),
    ("cpo", {}, dict(nll_weight=1.0)),
    ("alphapo", dict(reward_alpha=0.25, gamma=0.5), dict(alpha=2.0)),
    ("orpo", {}, dict(alpha=1.0, loss_weights=(0.1,), nll_weight=1.0)),
] + [("dpo", {}, dict(link=link, label_smoothing=1e-3 if link == "exo_pair" else 0.0))
     for link in losses.LINKS if link != "sigmoid"] + [
    ("dpo", {}, dict(link="sigmoid,bco_pair,sft", loss_weights=(0.8, 0.2, 1.0))),
    ("dpo", {}, dict(f_divergence_type="forward_kl")),
    ("dpo", {}, dict(f_divergence_type="js_divergence")),
    ("dpo", {}, dict(f_divergence_type="alpha_divergence")),
    ("dpo", {}, dict(use_weighting=True)),
    ("dpo", {}, dict(ld_alpha=0.5)),
]


def case_name(name, hp, cfg=None):
  """``prior[hp=v]``, and ``+link[option=v]`` for a link or option other than
  the default sigmoid."""
  out = name + "".join(f"[{k}={v}]" for k, v in hp.items())
  cfg = {k: v for k, v in (cfg or {}).items()
         if k not in ("alpha", "nll_weight", "label_smoothing", "loss_weights")}
  link = cfg.pop("link", None)
  if link or cfg:
    out += "+" + (link or "sigmoid") + "".join(f"[{k}={v}]" for k, v in cfg.items())
  return out


def make_step(prior, config, vocab_chunk):
  fields = tuple(prior.required_fields()) + config.required_fields()
  klr = "kl_ref_policy" in fields
  klp = "kl_policy_ref" in fields
  online_ref = klr or klp

  def loss_fn(logits, batch):
    ts = stats.token_stats(logits, batch["targets"], batch["mask"],
                           batch["ref_logits"] if online_ref else None,
                           kl_ref_policy=klr, kl_policy_ref=klp,
                           log_sum_sq_probs="log_sum_sq_probs" in fields, vocab_chunk=vocab_chunk)
    n = logits.shape[0] // 2

    def side(sl):
      get = lambda x: None if x is None else x[sl]
      return stats.SequenceStats(
          logps=ts.logps[sl], mask=batch["mask"][sl],
          ref_logps=get(ts.ref_logps) if online_ref else batch["ref_logps"][sl],
          kl_ref_policy=get(ts.kl_ref_policy), kl_policy_ref=get(ts.kl_policy_ref),
          prev_logps=batch["ref_logps"][sl] if "prev_logps" in fields else None,
          token_weights=batch["weights"][sl] if "token_weights" in fields else None,
          mask_reward=batch["weights"][sl] if "mask_reward" in fields else None,
          mask_kl=batch["weights"][sl] if "mask_kl" in fields else None,
          log_sum_sq_probs=get(ts.log_sum_sq_probs))

    return losses.mi_dpo_loss(side(slice(0, n)), side(slice(n, 2 * n)), prior, config).loss

  return jax.jit(jax.value_and_grad(loss_fn))


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--pairs", type=int, default=8)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--vocab", type=int, default=8192)
  parser.add_argument("--vocab_chunk", type=int, default=4096)
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--iters", type=int, default=5, help="steps timed per round")
  parser.add_argument("--json", default=None, help="also write the results here")
  args = parser.parse_args()

  k = jax.random.split(jax.random.PRNGKey(0), 5)
  rows, t, v = 2 * args.pairs, args.seq, args.vocab
  logits = jax.random.normal(k[0], (rows, t, v))
  lengths = jax.random.randint(k[1], (rows,), t // 4, t + 1)
  mask = (jnp.arange(t)[None] < lengths[:, None]).astype(jnp.float32)
  batch = {
      "targets": jax.random.randint(k[2], (rows, t), 0, v),
      "mask": mask,
      "ref_logits": jax.random.normal(k[3], (rows, t, v)),
      "ref_logps": -5.0 * mask,
      "weights": jax.random.uniform(k[4], (rows, t), minval=0.5, maxval=1.5) * mask,
  }

  steps, levels = {}, {}
  for name, hp, cfg in CASES:
    prior = algorithms.make_prior(name, **hp)
    step = make_step(prior, losses.LossConfig(**cfg), args.vocab_chunk)
    jax.block_until_ready(step(logits, batch))  # compile
    key = case_name(name, hp, cfg)
    steps[key] = step
    # Token-level priors (and WPO) make a pass of their own over the vocabulary.
    token_level = ({"kl_ref_policy", "kl_policy_ref", "log_sum_sq_probs"}
                   & set(prior.required_fields() + losses.LossConfig(**cfg).required_fields()))
    levels[key] = "token" if token_level else "sequence"

  times = {key: [] for key in steps}
  for _ in range(args.rounds):
    for key, step in steps.items():
      start = time.perf_counter()
      for _ in range(args.iters):
        out = step(logits, batch)
      jax.block_until_ready(out)
      times[key].append((time.perf_counter() - start) / args.iters)

  median = {key: statistics.median(ts) for key, ts in times.items()}
  base = median["dpo"]
  device = jax.devices()[0]
  print(f"# {platform.machine()} {device.platform} ({device.device_kind}), "
        f"{jax.device_count()} device(s), jax {jax.__version__}")
  print(f"# pairs={args.pairs} seq={t} vocab={v} vocab_chunk={args.vocab_chunk} "
        f"rounds={args.rounds} iters={args.iters}")
  print(f"{'prior(+link)':46s} {'ms/step':>9s} {'x DPO':>7s}  level")
  for key, m in median.items():
    print(f"{key:46s} {1e3 * m:9.2f} {m / base:7.3f}  {levels[key]}")
  worst = max(median[k] / base for k in median if levels[k] == "sequence")
  print(f"# slowest sequence-level case: {worst:.3f}x DPO")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"args": vars(args), "ms_per_step": {k: 1e3 * m for k, m in median.items()},
                 "ratio_to_dpo": {k: m / base for k, m in median.items()}, "level": levels}, f, indent=1)


if __name__ == "__main__":
  main()
