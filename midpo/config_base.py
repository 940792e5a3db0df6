"""Shared base configuration: the known-reward task, a tiny model, a CPU-sized run.

Part of the library (so config files work from any directory); ``configs/default.py``
is this config as a file. It imports ``midpo.algorithms``, so every published
prior's hyperparameters and every algorithm's block are in it. Every algorithm config (``configs/<algorithm>.py``) starts from this one and
sets its prior and loss as its paper would, scaled down for a CPU. Override
anything on the command line, e.g.::

    python -m midpo.main --config=configs/dpo.py --workdir=workdirs/run \\
        --config.prior.name=simpo --config.prior.gamma=1.0 --config.train.steps=200

``get_config("full")`` switches to the full-size variant: a larger model, more
data and steps (for an accelerator).
"""

import dataclasses
import types
import typing

import ml_collections
from ml_collections import config_dict

from midpo import algorithms  # noqa: F401  (registers every published algorithm)
from midpo.core import priors
from midpo.data import pipeline
from midpo.training import config as config_lib


def _placeholder_type(cls, field: dataclasses.Field) -> type:
  """The type of a prior's hyperparameter (``Optional[X]`` -> ``X``)."""
  hint = typing.get_type_hints(cls)[field.name]
  args = [a for a in typing.get_args(hint) if a is not type(None)]
  if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
    hint = args[0]
  return typing.get_origin(hint) or hint


def prior_fields() -> dict[str, type]:
  """Every registered prior's hyperparameters and their types, by name.

  Raises:
    ValueError: two priors give the same hyperparameter different types.
  """
  out: dict[str, tuple[type, str]] = {}
  for name in priors.registered_priors():
    cls = priors.prior_class(name)
    for f in dataclasses.fields(cls):
      t = _placeholder_type(cls, f)
      if f.name in out and out[f.name][0] is not t:
        raise ValueError(f"prior {name!r} declares {f.name}: {t.__name__}, prior "
                         f"{out[f.name][1]!r} {out[f.name][0].__name__}")
      out.setdefault(f.name, (t, name))
  return {k: t for k, (t, _) in out.items()}


def prior_config(name: str = "dpo", **hyperparameters) -> ml_collections.ConfigDict:
  """``config.prior``: the union of every registered prior's hyperparameters.

  Each is a placeholder (``None``: the prior's own default); only the fields
  the chosen prior defines are passed to it, so ``--config.prior.name=simpo
  --config.prior.gamma=1.0`` works from any config, and so does a prior
  registered outside midpo before the config is built.
  """
  p = ml_collections.ConfigDict()
  p.name = name
  for key, t in prior_fields().items():
    setattr(p, key, config_dict.placeholder(t))
  for key, value in hyperparameters.items():
    setattr(p, key, value)
  return p


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """The base config (``arg="full"``: the full-size variant for an accelerator)."""
  full = arg == "full"
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Pipeline stages, in order: sft (train the reference on the SFT split),
  # preference (MI-DPO training), eval (samples on held-out prompts).
  c.stages = ("sft", "preference", "eval")

  # -- model and tokenizer --------------------------------------------------
  c.model = ml_collections.ConfigDict()
  c.model.name = "tiny"          # a built-in config (midpo.models.config), or ...
  c.model.hf_path = ""           # ... a Hugging Face checkpoint directory (or Hub id)
  c.model.dtype = "float32"      # compute dtype
  c.model.param_dtype = "float32"
  c.model.remat = "none"
  # 'auto': cuDNN's fused attention on a GPU with bf16/fp16 compute, XLA's masked
  # attention elsewhere; or 'xla', 'jax' (jax.nn.dot_product_attention), 'cudnn'.
  c.model.attention_impl = "auto"
  # Layers as one lax.scan (True) or unrolled (False); unset: unrolled on a CPU
  # (faster there, less memory), else the model's own (built-in tiny/micro
  # unrolled, checkpoints scanned); resolved.json keeps it. MaxText's name.
  c.model.scan_layers = ml_collections.config_dict.placeholder(bool)
  c.tokenizer = "synthetic"      # synthetic | byte | a directory with tokenizer.json

  # -- data -----------------------------------------------------------------
  c.data = pipeline.default_config()
  c.data.data_dir = ""           # empty: <workdir>/tfds
  c.data.batch_size = 32         # pairs (or SFT rows) per step, per process
  c.data.max_length = 96
  c.data.num_buckets = 4         # one compilation per bucket length
  # Blocks the data is cut into (0: one per process). Runs with the same
  # num_shards see the same global batches on any number of hosts.
  c.data.num_shards = 0
  c.data.synthetic.num_sft = 20000 if full else 6000
  c.data.synthetic.num_train = 20000 if full else 6000
  c.data.synthetic.num_test = 2000 if full else 512
  # Preference pairs: 'dataset' (the builder's generated pairs) or 'reference'
  # (two responses per training prompt sampled from the SFT reference and
  # labelled by Bradley-Terry on the true reward, as in the DPO paper).
  c.pairs_from = "reference"
  c.num_pair_prompts = 20000 if full else 4096
  # A samples file of pairs already sampled from this run's reference (another
  # run's <workdir>/pairs/reference_samples.jsonl, as the sweep shares them);
  # empty: sampled into <workdir>/pairs.
  c.pairs_file = ""

  # -- device mesh (axes of size -1 take the remaining devices) --------------
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})

  # -- SFT stage --------------------------------------------------------------
  c.sft = ml_collections.ConfigDict()
  c.sft.steps = 3000 if full else 600
  c.sft.learning_rate = 1e-3
  c.sft.warmup_steps = 50
  c.sft.weight_decay = 0.0
  c.sft.checkpoint = ""          # a midpo SFT checkpoint dir: skip the stage

  # -- preference stage -----------------------------------------------------
  c.train = ml_collections.ConfigDict()
  c.train.steps = 2000 if full else 300
  c.train.learning_rate = 1e-4
  c.train.warmup_steps = 20
  c.train.weight_decay = 0.0
  c.train.grad_clip = 1.0
  c.train.reference = "online"   # online | cached
  c.train.vocab_chunk = 4096
  # The LM head fused with the chunked log-softmax (midpo.core.fused_head): the SFT and
  # preference steps never materialise [B, T, V] logits, forward or backward.
  c.train.fused_lm_head = False
  # TRL's padding_free: the preference step's models read the pairs packed into rows of
  # data.max_length tokens (segment ids; midpo.data.packing), not padded to the batch's
  # longest row; each batch shard (device) packs its own pairs. Equal to the padded step
  # to float32 rounding.
  c.train.padding_free = False
  # Alternation of policy and prior updates (for priors with parameters):
  # 'joint' updates both on every batch (as SparsePO does), 'alternate' runs
  # policy_steps_per_round policy steps, then prior_steps_per_round prior steps.
  c.train.prior_update = "joint"
  c.train.policy_steps_per_round = 1
  c.train.prior_steps_per_round = 1
  c.train.prior_learning_rate = 1e-3
  c.train.prior_weight_decay = 0.0

  c.prior = prior_config("dpo")
  # Priors trained in the same command, on the same pairs, budget and seed,
  # for comparison (e.g. ('dpo',)): each a row of eval.json's table.
  c.baselines = ()
  # The link and the regularisers (midpo.core.losses.LossConfig; TRL's names):
  # link may list several comma-separated links, weighted by loss_weights
  # (empty: 1 each); ld_alpha None is off.
  c.loss = ml_collections.ConfigDict({
      "alpha": 0.1, "link": "sigmoid", "label_smoothing": 0.0, "nll_weight": 0.0,
      "nll_normalization": "token", "discopop_tau": 0.05, "loss_weights": (),
      "f_divergence_type": "reverse_kl", "f_alpha_divergence_coef": 0.5,
      "use_weighting": False, "ld_alpha": config_dict.placeholder(float)})

  # -- evaluation -------------------------------------------------------------
  c.eval = ml_collections.ConfigDict()
  c.eval.num_prompts = 2000 if full else 512
  c.eval.batch_size = 128
  c.eval.max_new_tokens = 64
  c.eval.temperature = 1.0
  c.eval.num_pairs = 2000 if full else 512   # held-out pairs for implicit-reward accuracy
  # Evaluate the policy (and baselines) every this many policy updates along
  # training as well as at the end (0: at the end only). Their preference
  # checkpoints at these steps are kept; eval/<model>/step_<n>.json each.
  c.eval.every = 0

  # -- checkpoints and logs -----------------------------------------------------
  c.checkpoint_every = 100
  c.max_checkpoints = 2
  c.log_every = 25

  # Algorithms' own keys, from their modules: blocks of their own
  # (config.dice, config.tis) and keys of the train block (the 'mi' prior's
  # rounds, the learned priors' diagnostics; the evaluation's
  # mutual-information estimate).
  for block, defaults in config_lib.config_blocks().items():
    if block in c:
      c[block].update(defaults())
    else:
      c[block] = defaults()
  return c

