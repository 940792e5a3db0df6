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
    python benchmarks/vs_trl.py --device gpu --shape llama3.2-1b --dtype bfloat16 \
        --prompt_len 128 --response_len 384 --steps 10 --repeats 1      # benchmarks/gpu_suite.sh

Each ``--midpo_variant`` (comma-separated ``key=value`` config overrides) runs as one more midpo
worker in the same alternation, reported beside the default one. ``--out FILE`` appends every
worker's result and the summary as JSON lines.

On a GPU (``--device gpu``) both use the GPU; memory is the peak device memory
(``torch.cuda.max_memory_allocated``; JAX's ``peak_bytes_in_use``) and the utilisation is
against ``--peak_tflops`` (default 989: the H100/H200 SXM dense bf16 datasheet figure).
``--dtype bfloat16``: TRL's ``bf16=True`` (autocast, float32 weights) against midpo's
``model.dtype=bfloat16`` (float32 parameters; attention through cuDNN on a GPU, ``auto``).

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
SHAPES = {
    "small": dict(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                  max_position_embeddings=512),
    # Llama-3.2-1B's config.json (random weights here).
    "llama3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                        head_dim=64, tie_word_embeddings=True, max_position_embeddings=131072,
                        rope_theta=500000.0, rms_norm_eps=1e-5,
                        rope_scaling={"rope_type": "llama3", "factor": 32.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192}),
}


def make_assets(root: str, shape: dict, pairs: int, prompt_len: int, response_len: int,
                seed: int = 0, vary_lengths: bool = False, num_rows: int = 0):
  """A checkpoint directory (model + word-level tokenizer) and a JSONL of ``num_rows`` rows
  (default ``4 * pairs``): prompts of ``prompt_len`` and responses of ``response_len`` tokens,
  or with ``vary_lengths`` uniform in ``[1, prompt_len]`` and ``[2, response_len]``."""
  import numpy as np
  import tokenizers
  import torch
  import transformers
  from tokenizers import models, pre_tokenizers

  ckpt = os.path.join(root, "ckpt")
  os.makedirs(ckpt, exist_ok=True)
  specials = ["<pad>", "<s>", "</s>", "<unk>"]
  vocab = {t: i for i, t in enumerate(specials)}
  vocab.update({f"w{i}": i for i in range(len(specials), shape["vocab_size"])})
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.save(os.path.join(ckpt, "tokenizer.json"))
  with open(os.path.join(ckpt, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>",
               "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, f)
  if not os.path.exists(os.path.join(ckpt, "model.safetensors.index.json")) and not \
      os.path.exists(os.path.join(ckpt, "model.safetensors")):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    # Saved beside, then moved in: a save cut short (a time limit) is never reused.
    partial = tempfile.mkdtemp(dir=root)
    transformers.LlamaForCausalLM(config).save_pretrained(partial, safe_serialization=True)
    for name in os.listdir(partial):
      os.replace(os.path.join(partial, name), os.path.join(ckpt, name))
    os.rmdir(partial)
  rng = np.random.default_rng(seed)
  words = lambda n: " ".join(f"w{i}" for i in rng.integers(4, shape["vocab_size"], n))
  n_prompt = lambda: int(rng.integers(1, prompt_len + 1)) if vary_lengths else prompt_len
  n_resp = lambda: (int(rng.integers(2, response_len + 1)) if vary_lengths else response_len) - 1
  rows = [{"prompt": words(n_prompt()), "chosen": " " + words(n_resp()),
           "rejected": " " + words(n_resp())} for _ in range(num_rows or pairs * 4)]
  data = os.path.join(root, "pairs.jsonl")
  with open(data, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return ckpt, data


def _report(times, tokens, extra=None):
  return dict(seconds=statistics.median(times), min_seconds=min(times), tokens=tokens,
              peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              **(extra or {}))


def run_trl(ckpt, data, pairs, warmup, steps, device="cpu", dtype="float32", max_length=1024):
  """TRL 1.16 DPOTrainer (sigmoid loss, beta 0.1, online reference, AdamW; float32, or bf16
  autocast over float32 weights)."""
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

  sync = torch.cuda.synchronize if device == "gpu" else (lambda: None)

  class Timer(transformers.TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
      sync()
      self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
      sync()  # the step's kernels, not only their launch
      times.append(time.perf_counter() - self.t0)

  with tempfile.TemporaryDirectory() as out:
    args = trl.DPOConfig(output_dir=out, per_device_train_batch_size=pairs, beta=0.1,
                         learning_rate=1e-4, max_steps=warmup + steps, logging_steps=10**6,
                         save_strategy="no", report_to=[], use_cpu=device == "cpu",
                         bf16=dtype == "bfloat16", max_length=max(1024, max_length),
                         dataloader_num_workers=0, seed=0)
    trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=args,
                             train_dataset=rows, processing_class=tok,
                             callbacks=[Timer()])
    batch = next(iter(trainer.get_train_dataloader()))
    tokens = int(batch["attention_mask"].sum())
    trainer.train()
  extra = {"torch": torch.__version__, "trl": trl.__version__,
           "threads": torch.get_num_threads()}
  if device == "gpu":
    extra["peak_device_mib"] = torch.cuda.max_memory_allocated() / 2**20
    extra["device_name"] = torch.cuda.get_device_name()
  return _report(times[warmup:], tokens, extra)


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
  ``overrides`` of its config. The step is the recipe's own (``midpo.training.recipes``), as the
  trainer runs it, so a prior with parameters (SparsePO) or token weights (TIS-DPO, from its two
  contrastive models, here copies of the reference) is timed with them."""
  sys.path.insert(0, ROOT)
  import jax
  import numpy as np

  from midpo import algorithms  # noqa: F401
  from midpo.training import config as config_lib
  from midpo.training import env as env_lib
  from midpo.training import inputs, optim, recipes
  from midpo.training import pairs as pairs_lib
  from midpo.training.reference_cache import ReferenceCache

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
  update = recipes.recipe_for(prior).make_update(prior)
  tx = optim.adamw(1e-4, 0, 1000, 0.0, 1.0)
  prior_tx = update.optimizer(env)
  policy = jax.tree.map(lambda x: x.copy(), ref)
  opt = optim.init_opt(tx, policy, env.mesh)
  prior_params = update.init_params(env, prior, ref, it)
  prior_opt = optim.init_opt(prior_tx, prior_params, env.mesh) if prior_tx else None
  shard = {"policy": env_lib.shardings_of(policy), "policy_opt": env_lib.shardings_of(opt),
           "prior": env_lib.shardings_of(prior_params) if prior_params is not None else None,
           "prior_opt": env_lib.shardings_of(prior_opt) if prior_opt is not None else None}
  frozen = {name: ref for name in ("reference", "previous", "plus", "minus")}
  steps_ = pairs_lib.make_preference_steps(env, prior, loss_config, tx, prior_tx, shard,
                                           prior_on_loss=update.on_loss)
  run = recipes.RoundRun(env, prior, loss_config, frozen, steps_, shard, prior_tx, 0,
                         warmup + steps)
  local = next(iter(it.first_batches(1)))
  # Frozen models' log-probs a prior reads cached (tis.cache_weights), computed once, untimed.
  for field in inputs.cacheable_fields(inputs.providers_for(env, prior,
                                                            prior.required_fields())):
    local = ReferenceCache(env, it, frozen[field[:-len("_logps")]]).add_to(local, field)
    fields += (field,)
  host = pairs_lib.select(local, fields)
  if config.train.padding_free:
    host.update(pairs_lib.packed_rows(env, local))
  batch = env.global_batch(host)
  tokens = int(local["attention_mask"].sum())
  assert local["tokens"].shape[-1] == max_length, local["tokens"].shape  # no padding
  state = {"policy": policy, "policy_opt": opt, "prior": prior_params, "prior_opt": prior_opt}
  rng, times = jax.random.key(0), []
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    state, m = update.step(run, state, batch, rng, i)
    jax.block_until_ready((state, m))
    times.append(time.perf_counter() - t0)
  flops = env.model_config.flops_per_token(int(np.asarray(local["tokens"]).shape[-1]))
  extra = {"jax": jax.__version__, "flops_per_token_train": flops,
           "backend": jax.default_backend(),
           "attention_impl": env.model_config.attention_impl}
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    extra["peak_device_mib"] = stats["peak_bytes_in_use"] / 2**20
  return _report(times[warmup:], tokens, extra)


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
  parser.add_argument("--shape", choices=tuple(SHAPES), default="small")
  parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--peak_tflops", type=float, default=None,
                      help="dense peak for the utilisation line (default: measured float32 "
                      "matmul on a CPU; 989 bf16 on a GPU)")
  parser.add_argument("--out", default="", help="append JSON lines to this file")
  parser.add_argument("--assets_dir", default="",
                      help="keep the checkpoint here and reuse it on the next call with the "
                      "same --shape (the rows are written anew each call)")
  parser.add_argument("--midpo_variant", action="append", default=[],
                      help="comma-separated key=value config overrides: one more midpo worker")
  parser.add_argument("--worker", choices=("trl", "midpo"), help=argparse.SUPPRESS)
  parser.add_argument("--overrides", default="", help=argparse.SUPPRESS)
  parser.add_argument("--root", help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args.worker:
    ckpt, data = os.path.join(args.root, "ckpt"), os.path.join(args.root, "pairs.jsonl")
    length = args.prompt_len + args.response_len
    if args.worker == "trl":
      out = run_trl(ckpt, data, args.pairs, args.warmup, args.steps, args.device, args.dtype,
                    length)
    else:
      overrides = {"model.dtype": args.dtype, **_overrides(args.overrides)}
      out = run_midpo(ckpt, data, args.pairs, args.warmup, args.steps,
                      tempfile.mkdtemp(prefix="vs_trl_midpo_"), length, overrides)
    print("RESULT " + json.dumps(out), flush=True)
    return

  if args.assets_dir:
    root = os.path.join(args.assets_dir, args.shape)
    os.makedirs(root, exist_ok=True)
  else:
    root = tempfile.mkdtemp(prefix="vs_trl_")
  make_assets(root, SHAPES[args.shape], args.pairs, args.prompt_len, args.response_len)
  # A CPU run keeps both frameworks off any GPU the machine has.
  worker_env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
  if args.device == "cpu":
    worker_env.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
  settings = dict(shape=args.shape, device=args.device, dtype=args.dtype, pairs=args.pairs,
                  prompt_len=args.prompt_len, response_len=args.response_len)
  workers = [("trl", "trl", ""), ("midpo", "midpo", "")] + [
      (f"midpo[{v}]", "midpo", v) for v in args.midpo_variant]
  runs = {label: [] for label, _, _ in workers}
  for r in range(args.repeats):
    for name, worker, overrides in workers:
      cmd = [sys.executable, os.path.abspath(__file__), "--worker", worker, "--root", root,
             "--overrides", overrides,
             "--pairs", str(args.pairs), "--warmup", str(args.warmup), "--steps",
             str(args.steps), "--prompt_len", str(args.prompt_len), "--response_len",
             str(args.response_len), "--device", args.device, "--dtype", args.dtype]
      proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=worker_env)
      line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
      if proc.returncode or line is None:
        sys.exit(f"{name} worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
      res = json.loads(line[len("RESULT "):])
      runs[name].append(res)
      _emit(args.out, {"framework": name, "repeat": r, **settings, **res})
  gpu = args.device == "gpu"
  peak = args.peak_tflops * 1e3 if args.peak_tflops else (989e3 if gpu else matmul_gflops())
  med = {k: statistics.median(x["seconds"] for x in v) for k, v in runs.items()}
  mem_key = "peak_device_mib" if gpu else "peak_rss_mib"
  rss = {k: max(x[mem_key] for x in v) for k, v in runs.items()}
  tokens = runs["midpo"][0]["tokens"]
  assert tokens == runs["trl"][0]["tokens"], (tokens, runs["trl"][0]["tokens"])
  flops = runs["midpo"][0]["flops_per_token_train"] * 4 / 3  # 6N + 2N reference per token
  where = (runs["trl"][0].get("device_name", "GPU") if gpu
           else f"{platform.machine()} CPU, {os.cpu_count()} cores")
  print(f"# {where}; {args.shape}, {args.dtype}; {args.pairs} pairs of "
        f"{args.prompt_len} + {args.response_len} tokens ({tokens} real tokens a step); "
        f"median of {args.steps} steps x {args.repeats} alternating runs")
  mem_name = "peak device memory" if gpu else "peak RSS"
  summary = {"summary": True, **settings, "peak_gflops": peak, "frameworks": {}}
  for k in runs:
    achieved = flops * tokens / med[k] / 1e9
    print(f"{k:6s} {med[k]:7.3f} s/step  {tokens / med[k]:8.0f} tokens/s  {mem_name} "
          f"{rss[k]:7.0f} MiB  {achieved:8.1f} GFLOP/s ({100 * achieved / peak:4.1f}% of peak)")
    summary["frameworks"][k] = dict(seconds=med[k], tokens_per_s=tokens / med[k],
                                    memory_mib=rss[k], utilisation=achieved / peak,
                                    speedup_vs_trl=med["trl"] / med[k],
                                    memory_vs_trl=rss[k] / rss["trl"])
  for k in (k for k in runs if k != "trl"):
    print(f"{k} / TRL: tokens/s {med['trl'] / med[k]:.2f}x, {mem_name} "
          f"{rss[k] / rss['trl']:.2f}x")
  print(f"peak {peak:.0f} GFLOP/s ({'--peak_tflops or the bf16 datasheet' if gpu else 'numpy float32 matmul, measured'})")
  if args.out:
    _emit(args.out, summary, echo=False)


def _emit(path: str, row: dict, echo: bool = True) -> None:
  """Prints ``row`` as a JSON line (and appends it to ``path``)."""
  line = json.dumps(row)
  if echo:
    print(line, flush=True)
  if path:
    with open(path, "a") as f:
      f.write(line + "\n")


if __name__ == "__main__":
  main()
