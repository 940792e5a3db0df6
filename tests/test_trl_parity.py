"""Parity with TRL 1.16 itself, for the losses TRL has.

DPO (``DPOTrainer._compute_loss``, loss types sigmoid, robust, hinge, ipo) is
run by TRL on a tiny random ``LlamaForCausalLM`` policy and reference; midpo
computes the same loss from the same models' logits. The loss values must
agree, and so must the gradients on every policy parameter: midpo's gradient
with respect to the logits is pushed back through the torch model with
``logits.backward`` and compared with TRL's ``loss.backward()``.

SimPO is TRL's ``CPOTrainer`` with ``loss_type="simpo"``, ``cpo_alpha=0``:
TRL's own ``get_batch_logps`` and ``cpo_loss`` against midpo's SimPO prior,
value and gradient with respect to the logits, with and without label
smoothing (CPO's conservative smoothing is the same link as cDPO's).

Note: in TRL 1.16 DPO's ``sigmoid`` ignores ``label_smoothing``; its
label-smoothed DPO is ``robust``, which is what we compare.
"""

import os
import tempfile
import warnings

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402

from midpo import algorithms
from midpo.core import losses, stats  # noqa: E402

V, B, T = 48, 3, 10


def _tokenizer():
  tok = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(V)}, unk_token="w0"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="w0",
                                              eos_token="w1", bos_token="w2", unk_token="w0")


def _model(seed):
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=64)
  return transformers.LlamaForCausalLM(cfg).float().eval()


def _batch():
  """``[chosen; rejected]`` rows: prompt, completion, right padding (ragged)."""
  g = torch.Generator().manual_seed(0)
  ids = torch.randint(3, V, (2 * B, T), generator=g)
  attention = torch.ones(2 * B, T, dtype=torch.long)
  completion = torch.zeros(2 * B, T, dtype=torch.long)
  for row, (start, end) in enumerate([(3, 9), (2, 10), (5, 7), (3, 6), (4, 10), (2, 8)]):
    completion[row, start:end] = 1
    attention[row, end:] = 0
  return {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}


def _midpo_dpo_loss(policy_logits, ref_logits, inputs, prior, config):
  """midpo's loss and its gradient w.r.t. the policy logits ``[2B, T, V]``."""
  targets = jnp.asarray(inputs["input_ids"].numpy()[:, 1:])
  mask = jnp.asarray(inputs["completion_mask"].numpy()[:, 1:], jnp.float32)
  ref = jnp.asarray(ref_logits[:, :-1])

  def loss_fn(logits):
    ts = stats.token_stats(logits[:, :-1], targets, mask, ref, vocab_chunk=16,
                           log_sum_sq_probs=config.use_weighting)
    sum_sq = lambda sl: None if ts.log_sum_sq_probs is None else ts.log_sum_sq_probs[sl]
    side = lambda sl: stats.SequenceStats(logps=ts.logps[sl], mask=mask[sl],
                                          ref_logps=ts.ref_logps[sl],
                                          log_sum_sq_probs=sum_sq(sl))
    out = losses.mi_dpo_loss(side(slice(0, B)), side(slice(B, 2 * B)), prior, config)
    return out.loss, out.metrics

  (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(jnp.asarray(policy_logits))
  return float(loss), metrics, np.asarray(grad)


@pytest.fixture(scope="module")
def dpo_setup():
  policy, reference = _model(0), _model(1)
  # Move the policy away from the reference so that the loss has a gradient.
  with torch.no_grad():
    for p in policy.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return policy, reference, _batch(), _tokenizer()


CASES = [
    ("sigmoid", dict(beta=0.1), dict(alpha=0.1)),
    ("robust", dict(beta=0.1, label_smoothing=0.2), dict(alpha=0.1, link="robust", label_smoothing=0.2)),
    ("hinge", dict(beta=0.1), dict(alpha=0.1, link="hinge")),
    ("ipo", dict(beta=0.1), dict(alpha=0.1, link="ipo")),
    ("sigmoid", dict(beta=2.0), dict(alpha=2.0)),
    ("exo_pair", dict(beta=0.1, label_smoothing=1e-3),
     dict(alpha=0.1, link="exo_pair", label_smoothing=1e-3)),
    ("nca_pair", dict(beta=0.1), dict(alpha=0.1, link="nca_pair")),
    ("bco_pair", dict(beta=0.1), dict(alpha=0.1, link="bco_pair")),
    ("sppo_hard", dict(beta=0.1), dict(alpha=0.1, link="sppo_hard")),
    ("apo_zero", dict(beta=0.1), dict(alpha=0.1, link="apo_zero")),
    ("apo_down", dict(beta=0.1), dict(alpha=0.1, link="apo_down")),
    ("discopop", dict(beta=0.1, discopop_tau=0.05),
     dict(alpha=0.1, link="discopop", discopop_tau=0.05)),
    ("sigmoid_norm", dict(beta=0.1), dict(alpha=0.1, link="sigmoid_norm")),
    ("aot", dict(beta=0.1), dict(alpha=0.1, link="aot")),
    ("aot", dict(beta=0.5, label_smoothing=0.1),
     dict(alpha=0.5, link="aot", label_smoothing=0.1)),
    ("aot_unpaired", dict(beta=0.5), dict(alpha=0.5, link="aot_unpaired")),
    ("sft", dict(beta=0.1), dict(alpha=0.1, link="sft")),
    # MPO's mixture, TRL's documented example.
    (("sigmoid", "bco_pair", "sft"), dict(beta=0.1, loss_weights=[0.8, 0.2, 1.0]),
     dict(alpha=0.1, link="sigmoid,bco_pair,sft", loss_weights=(0.8, 0.2, 1.0))),
    ("sigmoid", dict(beta=0.5, f_divergence_type="forward_kl"),
     dict(alpha=0.5, f_divergence_type="forward_kl")),
    ("sigmoid", dict(beta=0.5, f_divergence_type="js_divergence"),
     dict(alpha=0.5, f_divergence_type="js_divergence")),
    ("sigmoid", dict(beta=0.5, f_divergence_type="alpha_divergence"),
     dict(alpha=0.5, f_divergence_type="alpha_divergence")),
    ("ipo", dict(beta=0.5, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3),
     dict(alpha=0.5, link="ipo", f_divergence_type="alpha_divergence",
          f_alpha_divergence_coef=0.3)),
    ("hinge", dict(beta=0.5, f_divergence_type="js_divergence"),
     dict(alpha=0.5, link="hinge", f_divergence_type="js_divergence")),
    ("sigmoid", dict(beta=0.5, use_weighting=True), dict(alpha=0.5, use_weighting=True)),
    # (TRL 1.16 cannot weight its sft term: the in-place product on the
    # expanded scalar raises in torch. midpo's weighted sft is checked
    # against the float64 statement instead.)
    (("sigmoid", "bco_pair"), dict(beta=0.5, use_weighting=True, loss_weights=[1.0, 0.5]),
     dict(alpha=0.5, link="sigmoid,bco_pair", use_weighting=True, loss_weights=(1.0, 0.5))),
    ("sigmoid", dict(beta=0.5, ld_alpha=0.5), dict(alpha=0.5, ld_alpha=0.5)),
    ("ipo", dict(beta=0.5, ld_alpha=0.0), dict(alpha=0.5, link="ipo", ld_alpha=0.0)),
    ("sigmoid", dict(beta=0.5, ld_alpha=0.3, f_divergence_type="forward_kl"),
     dict(alpha=0.5, ld_alpha=0.3, f_divergence_type="forward_kl")),
]


def _case_id(case):
  loss_type, trl_kw, _ = case
  name = "+".join(loss_type) if isinstance(loss_type, tuple) else loss_type
  return "-".join([name] + [f"{k}{v}" for k, v in trl_kw.items() if k != "loss_weights"])


@pytest.mark.parametrize("loss_type,trl_kw,ours_kw", CASES, ids=[_case_id(c) for c in CASES])
def test_dpo_matches_trl_value_and_parameter_gradients(dpo_setup, loss_type, trl_kw, ours_kw):
  policy, reference, inputs, tokenizer = dpo_setup
  loss_types = list(loss_type) if isinstance(loss_type, tuple) else [loss_type]
  with tempfile.TemporaryDirectory() as out_dir, warnings.catch_warnings():
    warnings.simplefilter("ignore")
    args = trl.DPOConfig(output_dir=out_dir, loss_type=loss_types, report_to=[], use_cpu=True,
                         bf16=False, **trl_kw)
    dataset = Dataset.from_dict({"prompt": ["w3 w4"], "chosen": [" w5"], "rejected": [" w6"]})
    trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=args,
                             train_dataset=dataset, processing_class=tokenizer)
    policy.eval()
    policy.zero_grad()
    trl_loss = trainer._compute_loss(policy, inputs, False)
    trl_loss.backward()
    trl_grads = [p.grad.detach().clone() for p in policy.parameters()]
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}

  model_inputs = {k: inputs[k] for k in ("input_ids", "attention_mask")}
  policy.zero_grad()
  logits = policy(**model_inputs).logits
  with torch.no_grad():
    ref_logits = reference(**model_inputs).logits.numpy()
  ours, metrics, grad_logits = _midpo_dpo_loss(logits.detach().numpy(), ref_logits, inputs,
                                                algorithms.make_prior("dpo"),
                                                losses.LossConfig(**ours_kw))
  logits.backward(torch.from_numpy(grad_logits.copy()))
  our_grads = [p.grad.detach().clone() for p in policy.parameters()]

  np.testing.assert_allclose(ours, float(trl_loss.detach()), rtol=1e-5)
  assert abs(float(trl_loss.detach())) > 1e-3
  for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
              "logps/chosen", "logps/rejected"):
    np.testing.assert_allclose(float(metrics[key]), trl_metrics[key], rtol=1e-4, atol=1e-6,
                               err_msg=key)
  scale = max(float(g.abs().max()) for g in trl_grads)
  assert scale > 1e-6
  for g_ours, g_trl in zip(our_grads, trl_grads):
    np.testing.assert_allclose(g_ours.numpy(), g_trl.numpy(), rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
def test_simpo_matches_trl_cpo_simpo(label_smoothing):
  from trl.experimental.cpo import CPOConfig, CPOTrainer

  beta, gamma = 2.0, 0.5
  policy = _model(2)
  inputs = _batch()
  with tempfile.TemporaryDirectory() as out_dir, warnings.catch_warnings():
    warnings.simplefilter("ignore")
    args = CPOConfig(output_dir=out_dir, loss_type="simpo", cpo_alpha=0.0, simpo_gamma=gamma,
                     beta=beta, label_smoothing=label_smoothing, report_to=[], use_cpu=True,
                     bf16=False)
    dataset = Dataset.from_dict({"prompt": ["w3 w4"], "chosen": [" w5"], "rejected": [" w6"]})
    trainer = CPOTrainer(model=policy, args=args, train_dataset=dataset,
                         processing_class=_tokenizer())
  with torch.no_grad():
    logits_np = policy(input_ids=inputs["input_ids"],
                       attention_mask=inputs["attention_mask"]).logits.numpy()
  logits = torch.tensor(logits_np, requires_grad=True)
  labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
  avg = trainer.get_batch_logps(logits, labels, average_log_prob=True)
  trl_losses, _, _ = trainer.cpo_loss(avg[:B], avg[B:])
  trl_loss = trl_losses.mean()
  trl_loss.backward()

  targets = jnp.asarray(inputs["input_ids"].numpy()[:, 1:])
  mask = jnp.asarray(inputs["completion_mask"].numpy()[:, 1:], jnp.float32)

  def loss_fn(lg):
    lp = stats.token_logprobs(lg[:, :-1], targets, mask, vocab_chunk=16)
    side = lambda sl: stats.SequenceStats(logps=lp[sl], mask=mask[sl])  # no reference at all
    return losses.mi_dpo_loss(side(slice(0, B)), side(slice(B, 2 * B)),
                              algorithms.make_prior("simpo", gamma=gamma),
                              losses.LossConfig(alpha=beta, label_smoothing=label_smoothing)).loss

  ours, grad = jax.value_and_grad(loss_fn)(jnp.asarray(logits_np))
  np.testing.assert_allclose(float(ours), float(trl_loss.detach()), rtol=1e-5)
  want = logits.grad.numpy()
  np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
