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


def _trl_pair_batch(inputs):
  """TRL's CPO/ORPO batch (chosen_*, rejected_*) from ``_batch``'s rows."""
  labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
  out = {}
  for side, rows in (("chosen", slice(0, B)), ("rejected", slice(B, 2 * B))):
    out[f"{side}_input_ids"] = inputs["input_ids"][rows]
    out[f"{side}_attention_mask"] = inputs["attention_mask"][rows]
    out[f"{side}_labels"] = labels[rows]
  return out


def _midpo_reference_free_loss(policy, inputs, prior, config):
  """midpo's loss, metrics and logit, and the policy's parameter gradients."""
  model_inputs = {k: inputs[k] for k in ("input_ids", "attention_mask")}
  policy.zero_grad()
  logits = policy(**model_inputs).logits
  targets = jnp.asarray(inputs["input_ids"].numpy()[:, 1:])
  mask = jnp.asarray(inputs["completion_mask"].numpy()[:, 1:], jnp.float32)

  def loss_fn(lg):
    lp = stats.token_logprobs(lg[:, :-1], targets, mask, vocab_chunk=16)
    side = lambda sl: stats.SequenceStats(logps=lp[sl], mask=mask[sl])  # no reference at all
    out = losses.mi_dpo_loss(side(slice(0, B)), side(slice(B, 2 * B)), prior, config)
    return out.loss, (out.metrics, out.logits)

  (loss, (metrics, z)), grad = jax.value_and_grad(loss_fn, has_aux=True)(
      jnp.asarray(logits.detach().numpy()))
  logits.backward(torch.from_numpy(np.asarray(grad).copy()))
  grads = [p.grad.detach().clone() for p in policy.parameters()]
  return float(loss), metrics, np.asarray(z), grads


def _assert_same_gradients(ours, theirs):
  scale = max(float(g.abs().max()) for g in theirs)
  assert scale > 1e-6
  for g_ours, g_trl in zip(ours, theirs):
    np.testing.assert_allclose(g_ours.numpy(), g_trl.numpy(), rtol=1e-4, atol=1e-5 * scale)


# (id, CPOConfig kwargs, midpo prior and its hyperparameters, LossConfig kwargs)
CPO_CASES = [
    ("cpo", dict(loss_type="sigmoid", beta=0.1, cpo_alpha=1.0), ("cpo", {}),
     dict(alpha=0.1, nll_weight=1.0)),
    ("cpo_hinge", dict(loss_type="hinge", beta=0.1, cpo_alpha=0.5), ("cpo", {}),
     dict(alpha=0.1, link="hinge", nll_weight=0.5)),
    ("cpo_ipo", dict(loss_type="ipo", beta=0.5, cpo_alpha=1.0), ("cpo", {}),
     dict(alpha=0.5, link="ipo", nll_weight=1.0)),
    ("cpo_smoothed_alpha_reward", dict(loss_type="sigmoid", beta=0.1, cpo_alpha=1.0,
                                       label_smoothing=0.1, alpha=0.05),
     ("cpo", dict(reward_alpha=0.05)), dict(alpha=0.1, label_smoothing=0.1, nll_weight=1.0)),
    ("alphapo", dict(loss_type="alphapo", beta=2.0, simpo_gamma=0.5, alpha=0.25),
     ("alphapo", dict(reward_alpha=0.25, gamma=0.5)), dict(alpha=2.0)),
]


@pytest.mark.parametrize("case", CPO_CASES, ids=[c[0] for c in CPO_CASES])
def test_cpo_and_alphapo_match_trl_cpo_trainer(case):
  """TRL's ``CPOTrainer.get_batch_loss_metrics`` (its forward, NLL and
  ``cpo_loss``) against midpo's prior, link and NLL: loss, every parameter's
  gradient, and the logged metrics of the same names."""
  from trl.experimental.cpo import CPOConfig, CPOTrainer

  _, trl_kw, (prior_name, hp), ours_kw = case
  policy = _model(2)
  inputs = _batch()
  with tempfile.TemporaryDirectory() as out_dir, warnings.catch_warnings():
    warnings.simplefilter("ignore")
    args = CPOConfig(output_dir=out_dir, report_to=[], use_cpu=True, bf16=False, **trl_kw)
    dataset = Dataset.from_dict({"prompt": ["w3 w4"], "chosen": [" w5"], "rejected": [" w6"]})
    trainer = CPOTrainer(model=policy, args=args, train_dataset=dataset,
                         processing_class=_tokenizer())
  policy.eval()
  policy.zero_grad()
  trl_loss, trl_metrics = trainer.get_batch_loss_metrics(policy, _trl_pair_batch(inputs),
                                                         train_eval="train")
  trl_loss.backward()
  trl_grads = [p.grad.detach().clone() for p in policy.parameters()]

  ours, metrics, _, our_grads = _midpo_reference_free_loss(
      policy, inputs, algorithms.make_prior(prior_name, **hp), losses.LossConfig(**ours_kw))
  np.testing.assert_allclose(ours, float(trl_loss.detach()), rtol=1e-5)
  _assert_same_gradients(our_grads, trl_grads)
  if ours_kw.get("nll_weight"):
    np.testing.assert_allclose(float(metrics["nll"]), trl_metrics["nll_loss"], rtol=1e-5)
  if prior_name == "cpo" and ours_kw.get("link", "sigmoid") != "ipo":
    # TRL's rewards are beta times the (reshaped) log-probs: alpha * s here.
    # (With IPO or SimPO's margin, TRL logs per-token means or leaves the
    # margin out; midpo's alpha * s includes them.)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected"):
      np.testing.assert_allclose(float(metrics[key]), trl_metrics[key], rtol=1e-4, atol=1e-6,
                                 err_msg=key)


def test_orpo_matches_trl_orpo_trainer():
  """TRL's ``ORPOTrainer`` (its forward and ``odds_ratio_loss``) against
  midpo's ORPO prior with ``alpha=1`` and ``loss_weights=(lambda,)``: the
  odds-ratio term's value and every parameter's gradient, and TRL's logged log
  odds ratio and log odds term. The NLL differs by design: TRL (like the ORPO
  authors' code) takes it over the prompt's and the response's tokens, midpo
  over the response's (as CPO's, checked above against TRL's CPO NLL)."""
  from trl.experimental.orpo import ORPOConfig, ORPOTrainer

  lam = 0.1
  policy = _model(3)
  inputs = _batch()
  with tempfile.TemporaryDirectory() as out_dir, warnings.catch_warnings():
    warnings.simplefilter("ignore")
    args = ORPOConfig(output_dir=out_dir, beta=lam, report_to=[], use_cpu=True, bf16=False)
    dataset = Dataset.from_dict({"prompt": ["w3 w4"], "chosen": [" w5"], "rejected": [" w6"]})
    trainer = ORPOTrainer(model=policy, args=args, train_dataset=dataset,
                          processing_class=_tokenizer())
  policy.eval()
  policy.zero_grad()
  chosen, rejected = trainer.concatenated_forward(policy, _trl_pair_batch(inputs))[:2]
  or_losses, _, _, log_odds_chosen, log_odds_ratio = trainer.odds_ratio_loss(chosen, rejected)
  trl_term = -or_losses.mean()  # TRL's loss is nll - mean(lambda * log s(log odds ratio))
  trl_term.backward()
  trl_grads = [p.grad.detach().clone() for p in policy.parameters()]

  config = losses.LossConfig(alpha=1.0, loss_weights=(lam,))
  ours, _, z, our_grads = _midpo_reference_free_loss(
      policy, inputs, algorithms.make_prior("orpo"), config)
  np.testing.assert_allclose(ours, float(trl_term.detach()), rtol=1e-5)
  _assert_same_gradients(our_grads, trl_grads)
  np.testing.assert_allclose(z.mean(), float(log_odds_ratio.detach()), rtol=1e-5)
  np.testing.assert_allclose(np.mean(jax.nn.log_sigmoid(z)), float(log_odds_chosen.detach()),
                             rtol=1e-5)
