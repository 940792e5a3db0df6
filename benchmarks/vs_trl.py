"""midpo's DPO step against TRL 1.16's ``DPOTrainer``, same checkpoint, rows and batch shape.

The script makes a Llama-shaped Hugging Face checkpoint (random weights) and a word-level
tokenizer locally, writes preference rows whose prompts and responses have exact token counts,
then runs each framework in its own process, alternating (TRL, midpo, TRL, midpo, ...) so both
see the same machine state. Each worker times ``--steps`` optimiser steps after ``--warmup``
steps (compilation, allocator warm-up) and reports the median step time, real tokens per second
(prompt + response tokens of both rows of every pair, padding not counted) and its peak RSS
(``ru_maxrss``: the whole process, framework and data included). Both use an online reference
(one more forward per step), float32 and AdamW.

    python benchmarks/vs_trl.py                      # the CPU shape below, 2 repeats
    python benchmarks/vs_trl.py --repeats 3 --steps 8
    python benchmarks/vs_trl.py --midpo_variant train.fused_lm_head=True   # one more worker

Each ``--midpo_variant`` (comma-separated ``key=value`` config overrides) runs as one more midpo
worker in the same alternation, reported beside the default one.

CPU shape (issue #13): hidden 256, 4 layers, 4 heads / 2 KV heads, MLP 1024, vocabulary 8192,
tied embeddings; 8 pairs of 64 prompt + 192 response tokens. The midpo side is its own
preference step (``midpo.training.pairs.make_preference_steps``, DPO prior) on batches from its
data pipeline (TRL-style tokenisation of the same rows). FLOPs: ``6N`` (policy forward and
backward) + ``2N`` (reference forward) per real token, ``N`` the non-embedding parameters plus
the LM head, as ``ModelConfig.flops_per_token`` counts them; the roofline line gives the
machine's measured float32 matmul throughput and each step's achieved fraction of it.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = dict(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
             max_position_embeddings=512)


def make_assets(root: str, pairs: int, prompt_len: int, response_len: int, seed: int = 0):
  """A checkpoint directory (model + word-level tokenizer) and a JSONL of rows."""
  import numpy as np
  import tokenizers
  import torch
  import transformers
  from tokenizers import models, pre_tokenizers

  ckpt = os.path.join(root, "ckpt")
  os.makedirs(ckpt, exist_ok=True)
  specials = ["<pad>", "<s>", "</s>", "<unk>"]
  vocab = {t: i for i, t in enumerate(specials)}
  vocab.update({f"w{i}": i for i in range(len(specials), SHAPE["vocab_size"])})
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.save(os.path.join(ckpt, "tokenizer.json"))
  with open(os.path.join(ckpt, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>",
               "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, f)
  torch.manual_seed(seed)
  config = transformers.LlamaConfig(**SHAPE, bos_token_id=1, eos_token_id=2, pad_token_id=0)
  transformers.LlamaForCausalLM(config).save_pretrained(ckpt, safe_serialization=True)
  rng = np.random.default_rng(seed)
  words = lambda n: " ".join(f"w{i}" for i in rng.integers(4, SHAPE["vocab_size"], n))
  rows = [{"prompt": words(prompt_len), "chosen": " " + words(response_len - 1),
           "rejected": " " + words(response_len - 1)} for _ in range(pairs * 4)]
  data = os.path.join(root, "pairs.jsonl")
  with open(data, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return ckpt, data


def _report(times, tokens, extra=None):
  return dict(seconds=statistics.median(times), min_seconds=min(times), tokens=tokens,
              peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              **(extra or {}))


def run_trl(ckpt, data, pairs, warmup, steps):
  """TRL 1.16 DPOTrainer (sigmoid loss, beta 0.1, online reference, float32, AdamW)."""
  import datasets
  import torch
  import transformers
  import trl

  torch.manual_seed(0)
  tok = transformers.AutoTokenizer.from_pretrained(ckpt)
  policy = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
  reference = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
  rows = datasets.load_dataset("json", data_files=data, split="train")
  times = []

  class Timer(transformers.TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
      self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
      times.append(time.perf_counter() - self.t0)

  with tempfile.TemporaryDirectory() as out:
    args = trl.DPOConfig(output_dir=out, per_device_train_batch_size=pairs, beta=0.1,
                         learning_rate=1e-4, max_steps=warmup + steps, logging_steps=10**6,
                         save_strategy="no", report_to=[], use_cpu=True, bf16=False,
                         max_length=1024, dataloader_num_workers=0, seed=0)
    trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=args,
                             train_dataset=rows, processing_class=tok,
                             callbacks=[Timer()])
    batch = next(iter(trainer.get_train_dataloader()))
    tokens = int(batch["attention_mask"].sum())
    trainer.train()
  return _report(times[warmup:], tokens, {"torch": torch.__version__, "trl": trl.__version__,
                                          "threads": torch.get_num_threads()})


def _overrides(spec: str) -> dict:
  """``'a.b=1,c=True'`` -> ``{'a.b': 1, 'c': True}`` (values as Python literals, else text)."""
  import ast
  out = {}
  for item in filter(None, spec.split(",")):
    key, _, value = item.partition("=")
    try:
      out[key.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      out[key.strip()] = value.strip()
  return out


def run_midpo(ckpt, data, pairs, warmup, steps, workdir, max_length, overrides=None):
  """midpo's preference step (DPO prior, alpha 0.1, online reference, float32, AdamW), with
  ``overrides`` of its config."""
  sys.path.insert(0, ROOT)
  import jax
  import numpy as np

  from midpo import algorithms  # noqa: F401
  from midpo.training import config as config_lib
  from midpo.training import env as env_lib
  from midpo.training import optim
  from midpo.training import pairs as pairs_lib

  import importlib
  config = importlib.import_module("configs.dpo").get_config()
  for key, value in {
      "model.hf_path": ckpt, "tokenizer": ckpt, "stages": ("preference",),
      "data.source": "files", "data.files.train_files": data, "pairs_from": "dataset",
      # Rows padded to exactly prompt + response tokens (bucket_window 0: max_length), as
      # TRL pads to the longest row; every row here has that length.
      "data.batch_size": pairs, "data.max_length": max_length, "data.bucket_window": 0,
      "data.num_buckets": 0, "data.shuffle": False, "eval.mutual_information": "none",
      **(overrides or {})}.items():
    *path, leaf = key.split(".")
    node = config
    for p in path:
      node = node[p]
    node[leaf] = value
  env = env_lib.make_env(config, workdir)
  prior = config_lib.make_prior(config)
  loss_config = config_lib.make_loss_config(config)
  ref = env_lib.load_hf_params(env)
  it = env.batches(env.data_config(), "train", mode="pairs")
  fields = pairs_lib.pair_fields(env, prior)
  tx = optim.adamw(1e-4, 0, 1000, 0.0, 1.0)
  policy = jax.tree.map(lambda x: x.copy(), ref)
  opt = optim.init_opt(tx, policy, env.mesh)
  shard = {"policy": env_lib.shardings_of(policy), "policy_opt": env_lib.shardings_of(opt),
           "prior": None, "prior_opt": None}
  step = pairs_lib.make_preference_steps(env, prior, loss_config, tx, None, shard).policy
  local = next(iter(it.first_batches(1)))
  batch = env.global_batch(pairs_lib.select(local, fields))
  tokens = int(local["attention_mask"].sum())
  assert local["tokens"].shape[-1] == max_length, local["tokens"].shape  # no padding
  frozen, rng, times = {"reference": ref}, jax.random.key(0), []
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    policy, opt, m = step(policy, opt, None, frozen, batch, rng)
    jax.block_until_ready((policy, m))
    times.append(time.perf_counter() - t0)
  flops = env.model_config.flops_per_token(int(np.asarray(local["tokens"]).shape[-1]))
  return _report(times[warmup:], tokens, {"jax": jax.__version__,
                                          "flops_per_token_train": flops})


def matmul_gflops(n: int = 1024, repeats: int = 20) -> float:
  """The machine's float32 dense matmul throughput (numpy, n x n, best of ``repeats``)."""
  import numpy as np
  a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    a @ a
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best / 1e9


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--pairs", type=int, default=8)
  parser.add_argument("--prompt_len", type=int, default=64)
  parser.add_argument("--response_len", type=int, default=192)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--steps", type=int, default=6)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--midpo_variant", action="append", default=[],
                      help="comma-separated key=value config overrides: one more midpo worker")
  parser.add_argument("--worker", choices=("trl", "midpo"), help=argparse.SUPPRESS)
  parser.add_argument("--overrides", default="", help=argparse.SUPPRESS)
  parser.add_argument("--root", help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args.worker:
    ckpt, data = os.path.join(args.root, "ckpt"), os.path.join(args.root, "pairs.jsonl")
    if args.worker == "trl":
      out = run_trl(ckpt, data, args.pairs, args.warmup, args.steps)
    else:
      out = run_midpo(ckpt, data, args.pairs, args.warmup, args.steps,
                      tempfile.mkdtemp(prefix="vs_trl_midpo_"),
                      args.prompt_len + args.response_len, _overrides(args.overrides))
    print("RESULT " + json.dumps(out), flush=True)
    return

  root = tempfile.mkdtemp(prefix="vs_trl_")
  make_assets(root, args.pairs, args.prompt_len, args.response_len)
  workers = [("trl", "trl", ""), ("midpo", "midpo", "")] + [
      (f"midpo[{v}]", "midpo", v) for v in args.midpo_variant]
  runs = {label: [] for label, _, _ in workers}
  for r in range(args.repeats):
    for name, worker, overrides in workers:
      cmd = [sys.executable, os.path.abspath(__file__), "--worker", worker, "--root", root,
             "--overrides", overrides,
             "--pairs", str(args.pairs), "--warmup", str(args.warmup), "--steps",
             str(args.steps), "--prompt_len", str(args.prompt_len), "--response_len",
             str(args.response_len)]
      proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"))
      line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
      if proc.returncode or line is None:
        sys.exit(f"{name} worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
      res = json.loads(line[len("RESULT "):])
      runs[name].append(res)
      print(json.dumps({"framework": name, "repeat": r, **res}), flush=True)
  peak = matmul_gflops()
  med = {k: statistics.median(x["seconds"] for x in v) for k, v in runs.items()}
  rss = {k: max(x["peak_rss_mib"] for x in v) for k, v in runs.items()}
  tokens = runs["midpo"][0]["tokens"]
  assert tokens == runs["trl"][0]["tokens"], (tokens, runs["trl"][0]["tokens"])
  flops = runs["midpo"][0]["flops_per_token_train"] * 4 / 3  # 6N + 2N reference per token
  print(f"# {platform.machine()} CPU, {os.cpu_count()} cores; {args.pairs} pairs of "
        f"{args.prompt_len} + {args.response_len} tokens ({tokens} real tokens a step); "
        f"median of {args.steps} steps x {args.repeats} alternating runs")
  for k in runs:
    print(f"{k:6s} {med[k]:7.3f} s/step  {tokens / med[k]:8.0f} tokens/s  peak RSS "
          f"{rss[k]:7.0f} MiB  {flops * tokens / med[k] / 1e9:6.1f} GFLOP/s "
          f"({100 * flops * tokens / med[k] / 1e9 / peak:4.1f}% of measured matmul peak)")
  for k in (k for k in runs if k != "trl"):
    print(f"{k} / TRL: tokens/s {med['trl'] / med[k]:.2f}x, peak RSS {rss[k] / rss['trl']:.2f}x")
  print(f"matmul peak {peak:.0f} GFLOP/s (numpy float32)")


if __name__ == "__main__":
  main()
