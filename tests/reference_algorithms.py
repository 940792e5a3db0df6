"""Independent float64 numpy statements of each original algorithm's loss.

Written from the authors' published formulas (see ``../shared/docs/mi_dpo.md``
and the code cited there), with no midpo code: every quantity is recomputed
here from logits. Each function takes a batch dict of numpy arrays and returns
the per-pair loss ``[B]``.

Batch keys: ``pol_w``, ``pol_l`` (policy logits ``[B, T, V]``), ``ref_w``,
``ref_l`` (reference logits), ``tgt_w``, ``tgt_l`` (targets), ``m_w``, ``m_l``
(masks), and, where an algorithm needs them, ``prev_w``/``prev_l`` (previous
round's logits, DICE), ``zeta_w``/``zeta_l`` (a prior model's logits: 'mi',
'ema'), ``wt_w``/``wt_l`` (token weights, TIS-DPO),
``mur_w``/``mur_l``/``muk_w``/``muk_l`` (SparsePO masks). ``sg_pol_w`` and
``sg_pol_l`` are copies of the policy logits that stand for ``detach()``: a
finite-difference gradient perturbs ``pol_*`` and holds ``sg_pol_*`` fixed.
"""

import numpy as np


def log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def gather(logp, tgt, mask):
  safe = np.where(mask > 0, tgt, 0)
  return np.take_along_axis(logp, safe[..., None], -1)[..., 0] * mask


def log_sigmoid(z):
  return -np.logaddexp(0.0, -z)


def seq_logps(logits, tgt, mask):
  return gather(log_softmax(logits), tgt, mask).sum(-1)


def dpo(b, beta, label_smoothing=0.0):
  """DPO; conservative DPO with label smoothing."""
  pi = seq_logps(b["pol_w"], b["tgt_w"], b["m_w"]) - seq_logps(b["pol_l"], b["tgt_l"], b["m_l"])
  ref = seq_logps(b["ref_w"], b["tgt_w"], b["m_w"]) - seq_logps(b["ref_l"], b["tgt_l"], b["m_l"])
  logits = pi - ref
  return (-(1 - label_smoothing) * log_sigmoid(beta * logits)
          - label_smoothing * log_sigmoid(-beta * logits))


def robust_dpo(b, beta, eps):
  """Robust DPO, as TRL's ``robust`` loss."""
  logits = ((seq_logps(b["pol_w"], b["tgt_w"], b["m_w"]) - seq_logps(b["ref_w"], b["tgt_w"], b["m_w"]))
            - (seq_logps(b["pol_l"], b["tgt_l"], b["m_l"]) - seq_logps(b["ref_l"], b["tgt_l"], b["m_l"])))
  return (-(1 - eps) * log_sigmoid(beta * logits) + eps * log_sigmoid(-beta * logits)) / (1 - 2 * eps)


def hinge(b, beta):
  logits = ((seq_logps(b["pol_w"], b["tgt_w"], b["m_w"]) - seq_logps(b["ref_w"], b["tgt_w"], b["m_w"]))
            - (seq_logps(b["pol_l"], b["tgt_l"], b["m_l"]) - seq_logps(b["ref_l"], b["tgt_l"], b["m_l"])))
  return np.maximum(0.0, 1 - beta * logits)


def ipo(b, beta):
  """IPO, on per-token-averaged log-ratios (TRL's normalisation)."""
  cw = (seq_logps(b["pol_w"], b["tgt_w"], b["m_w"]) - seq_logps(b["ref_w"], b["tgt_w"], b["m_w"])) / b["m_w"].sum(-1)
  cl = (seq_logps(b["pol_l"], b["tgt_l"], b["m_l"]) - seq_logps(b["ref_l"], b["tgt_l"], b["m_l"])) / b["m_l"].sum(-1)
  return (cw - cl - 1 / (2 * beta)) ** 2


def rpo(b, beta, rpo_alpha):
  """DPO plus the chosen tokens' NLL averaged over all chosen tokens of the batch."""
  lp = gather(log_softmax(b["pol_w"]), b["tgt_w"], b["m_w"])
  nll = -lp.sum() / b["m_w"].sum()
  return dpo(b, beta) + rpo_alpha * nll


def dice(b, beta):
  """DICE: DPO with the previous round's policy as the reference."""
  logits = ((seq_logps(b["pol_w"], b["tgt_w"], b["m_w"]) - seq_logps(b["prev_w"], b["tgt_w"], b["m_w"]))
            - (seq_logps(b["pol_l"], b["tgt_l"], b["m_l"]) - seq_logps(b["prev_l"], b["tgt_l"], b["m_l"])))
  return -log_sigmoid(beta * logits)


def model_prior(b, beta):
  """The paper's MI-DPO with a prior that is a language model zeta_phi (its
  logits ``zeta_*``): log pi(y|x) - log zeta_phi(y) in place of DPO's ratio."""
  logits = ((seq_logps(b["pol_w"], b["tgt_w"], b["m_w"]) - seq_logps(b["zeta_w"], b["tgt_w"], b["m_w"]))
            - (seq_logps(b["pol_l"], b["tgt_l"], b["m_l"]) - seq_logps(b["zeta_l"], b["tgt_l"], b["m_l"])))
  return -log_sigmoid(beta * logits)


def hdpo(b, beta, eta):
  """H-DPO: the policy log-likelihood scaled by eta inside DPO's ratio."""
  hw = eta * seq_logps(b["pol_w"], b["tgt_w"], b["m_w"]) - seq_logps(b["ref_w"], b["tgt_w"], b["m_w"])
  hl = eta * seq_logps(b["pol_l"], b["tgt_l"], b["m_l"]) - seq_logps(b["ref_l"], b["tgt_l"], b["m_l"])
  return -log_sigmoid(beta * (hw - hl))


def rdpo(b, beta, alpha):
  """R-DPO: beta * log-ratio margin + alpha (|y_w| - |y_l|)."""
  ratio_w = seq_logps(b["pol_w"], b["tgt_w"], b["m_w"]) - seq_logps(b["ref_w"], b["tgt_w"], b["m_w"])
  ratio_l = seq_logps(b["pol_l"], b["tgt_l"], b["m_l"]) - seq_logps(b["ref_l"], b["tgt_l"], b["m_l"])
  return -log_sigmoid(beta * ratio_w - beta * ratio_l + (alpha * b["m_w"].sum(-1) - alpha * b["m_l"].sum(-1)))


def simpo(b, beta, gamma_beta_ratio, label_smoothing=0.0, sft_weight=0.0):
  """princeton-nlp/SimPO ``simpo_loss`` with its ``sft_weight`` term."""
  avg_w = seq_logps(b["pol_w"], b["tgt_w"], b["m_w"]) / b["m_w"].sum(-1)
  avg_l = seq_logps(b["pol_l"], b["tgt_l"], b["m_l"]) / b["m_l"].sum(-1)
  logits = (avg_w - avg_l) - gamma_beta_ratio
  losses = (-log_sigmoid(beta * logits) * (1 - label_smoothing)
            - log_sigmoid(-beta * logits) * label_smoothing)
  return losses + sft_weight * (-avg_w)


def _tdpo_side(pol, ref, tgt, m):
  lp_all = log_softmax(pol)
  lr_all = log_softmax(ref)
  kl = (np.exp(lr_all) * (lr_all - lp_all)).sum(-1)  # ref -> policy, per position
  margin = (gather(lp_all, tgt, m) - gather(lr_all, tgt, m)).sum(-1)
  return margin, (kl * m).sum(-1)


def tdpo(b, beta, alpha=0.5, tdpo2=True):
  """TDPO, the authors' ``trainers.py::tdpo_loss`` (TDPO1 and TDPO2)."""
  mw, kw = _tdpo_side(b["pol_w"], b["ref_w"], b["tgt_w"], b["m_w"])
  ml, kl = _tdpo_side(b["pol_l"], b["ref_l"], b["tgt_l"], b["m_l"])
  if tdpo2:
    _, kw_detached = _tdpo_side(b["sg_pol_w"], b["ref_w"], b["tgt_w"], b["m_w"])
    logits = (mw - ml) - alpha * (kl - kw_detached)
  else:
    logits = (mw - ml) - (kl - kw)
  return -log_sigmoid(beta * logits)


def _tis_side(pol, ref, tgt, m, w):
  lp_all = log_softmax(pol)
  lr_all = log_softmax(ref)
  kl = (np.exp(lp_all) * (lp_all - lr_all)).sum(-1)  # policy -> ref, per position
  margin = ((gather(lp_all, tgt, m) - gather(lr_all, tgt, m)) * w * m).sum(-1)
  return margin, (kl * w * m).sum(-1)


def tisdpo(b, beta, alpha=0.5, token_level=False):
  """TIS-DPO, the authors' ``trainers.py::tisdpo_loss`` on weighted token margins."""
  mw, kw = _tis_side(b["pol_w"], b["ref_w"], b["tgt_w"], b["m_w"], b["wt_w"])
  ml, kl = _tis_side(b["pol_l"], b["ref_l"], b["tgt_l"], b["m_l"], b["wt_l"])
  logits = mw - ml
  if token_level:
    logits = logits - alpha * (kw - kl)
  return -log_sigmoid(beta * logits)


def sparsepo(b, beta, l1_u=0.0, l1_d=0.0):
  """SparsePO, huawei-noah/HEBO ``SparseTrainer.get_batch_loss_metrics``.

  Note the released code's ``token_kl`` is ``sum_v p_ref (log p - log p_ref)``,
  i.e. minus ``KL(ref||policy)``, and the loss is ``-log s(beta (u - d))``.
  """
  def side(pol, ref, tgt, m, mur, muk):
    lp_all = log_softmax(pol)
    lr_all = log_softmax(ref)
    reward = (gather(lp_all, tgt, m) - gather(lr_all, tgt, m)) * mur
    token_kl = (np.exp(lr_all) * (lp_all - lr_all)).sum(-1) * muk
    return (reward * m).sum(-1), (token_kl * m).sum(-1)

  rw, kw = side(b["pol_w"], b["ref_w"], b["tgt_w"], b["m_w"], b["mur_w"], b["muk_w"])
  rl, kl = side(b["pol_l"], b["ref_l"], b["tgt_l"], b["m_l"], b["mur_l"], b["muk_l"])
  losses = -log_sigmoid(beta * ((rw - rl) - (kw - kl)))
  l1 = lambda mu, m: np.abs(mu * m).sum(-1)
  losses = losses + l1_u * (l1(b["mur_w"], b["m_w"]) + l1(b["mur_l"], b["m_l"]))
  losses = losses + l1_d * (l1(b["muk_w"], b["m_w"]) + l1(b["muk_l"], b["m_l"]))
  return losses


def sparsepo_mask_head(hidden_BxTxLxD, ln_scale, ln_bias, w, b, mix, eps=1e-5):
  """``SimpleMaskAllLayers`` in eval mode: shared LayerNorm, per-layer
  Linear(D,1)+ReLU, bias-free Linear(L,1) mixer, ReLU."""
  h = np.asarray(hidden_BxTxLxD, np.float64)
  mu = h.mean(-1, keepdims=True)
  var = ((h - mu) ** 2).mean(-1, keepdims=True)
  h = (h - mu) / np.sqrt(var + eps) * ln_scale + ln_bias
  per_layer = np.maximum(0.0, (h * w).sum(-1) + b)  # [B, T, L]
  return np.maximum(0.0, per_layer @ mix)


def finite_difference_grad(fn, b, keys=("pol_w", "pol_l"), h=1e-5):
  """Central differences of ``mean(fn(b))`` w.r.t. ``b[key]`` for each key."""
  grads = {}
  for key in keys:
    x = b[key]
    g = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
      idx = it.multi_index
      orig = x[idx]
      x[idx] = orig + h
      up = fn(b).mean()
      x[idx] = orig - h
      down = fn(b).mean()
      x[idx] = orig
      g[idx] = (up - down) / (2 * h)
    grads[key] = g
  return grads


# TRL 1.16's other pair loss types (DPOTrainer), written from their papers'
# equations; ``lr_w``/``lr_l`` are the policy/reference log-ratios of each side.
def _logratios(b):
  lr_w = seq_logps(b["pol_w"], b["tgt_w"], b["m_w"]) - seq_logps(b["ref_w"], b["tgt_w"], b["m_w"])
  lr_l = seq_logps(b["pol_l"], b["tgt_l"], b["m_l"]) - seq_logps(b["ref_l"], b["tgt_l"], b["m_l"])
  return lr_w, lr_l


def _sigmoid(x):
  return np.exp(log_sigmoid(x))


def exo_pair(b, beta, eps):
  """EXO-pref (arXiv 2402.00856, eq. 16): KL from the model's two-way
  distribution softmax(beta * log-ratios) to (1 - eps, eps)."""
  lr_w, lr_l = _logratios(b)
  q = np.stack([_sigmoid(beta * (lr_w - lr_l)), _sigmoid(beta * (lr_l - lr_w))])
  p = np.array([1 - eps, eps])[:, None]
  return (q * (np.log(q) - np.log(p))).sum(0)


def nca_pair(b, beta):
  """NCA (arXiv 2402.05369), pairwise: the chosen reward pushed up, both
  rewards' 'noise' terms down, each with weight 1/2."""
  lr_w, lr_l = _logratios(b)
  return (-log_sigmoid(beta * lr_w) - 0.5 * log_sigmoid(-beta * lr_w)
          - 0.5 * log_sigmoid(-beta * lr_l))


def bco_pair(b, beta):
  """BCO's pairwise form: chosen classified positive, rejected negative."""
  lr_w, lr_l = _logratios(b)
  return -log_sigmoid(beta * lr_w) - log_sigmoid(-beta * lr_l)


def sppo_hard(b, beta):
  """SPPO (arXiv 2405.00675, eq. 4.7) with P(win) = 1 for the chosen, 0 for the
  rejected: each log-ratio regressed to +-1/(2 beta)."""
  lr_w, lr_l = _logratios(b)
  return (lr_w - 1 / (2 * beta)) ** 2 + (lr_l + 1 / (2 * beta)) ** 2


def apo_zero(b, beta):
  """APO-zero (arXiv 2408.06266, eq. 7)."""
  lr_w, lr_l = _logratios(b)
  return (1 - _sigmoid(beta * lr_w)) + _sigmoid(beta * lr_l)


def apo_down(b, beta):
  """APO-down (arXiv 2408.06266, eq. 8)."""
  lr_w, lr_l = _logratios(b)
  return _sigmoid(beta * lr_w) + (1 - _sigmoid(beta * (lr_w - lr_l)))


def discopop(b, beta, tau):
  """DiscoPOP's log-ratio modulated loss (arXiv 2406.08414, eq. 5)."""
  lr_w, lr_l = _logratios(b)
  rho = beta * (lr_w - lr_l)
  mix = _sigmoid(rho / tau)
  return (1 - mix) * -log_sigmoid(rho) + mix * np.exp(-rho)


def sigmoid_norm(b, beta):
  """The sigmoid loss on per-token-averaged log-ratios."""
  lr_w, lr_l = _logratios(b)
  return -log_sigmoid(beta * (lr_w / b["m_w"].sum(-1) - lr_l / b["m_l"].sum(-1)))


def _seq(b, who, side, weights=None):
  """Sequence log-prob of side ``w``/``l`` under ``who`` (pol, ref, sg_pol),
  with optional per-token weights."""
  lp = gather(log_softmax(b[f"{who}_{side}"]), b[f"tgt_{side}"], b[f"m_{side}"])
  return (lp if weights is None else lp * weights).sum(-1)


def _smoothed(z, eps):
  return -(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)


def aot(b, beta, eps=0.0):
  """AOT paired (arXiv 2406.05882): the policy's and the reference's
  chosen-minus-rejected log-ratios each sorted over the batch, then the
  sigmoid loss on the difference of the order statistics."""
  pi = np.sort(_seq(b, "pol", "w") - _seq(b, "pol", "l"))
  rf = np.sort(_seq(b, "ref", "w") - _seq(b, "ref", "l"))
  return _smoothed(beta * (pi - rf), eps)


def aot_unpaired(b, beta, eps=0.0):
  """AOT unpaired: the chosen and the rejected log-ratios sorted apart."""
  lr_w, lr_l = _logratios(b)
  return _smoothed(beta * (np.sort(lr_w) - np.sort(lr_l)), eps)


def sft(b):
  """The chosen tokens' NLL averaged over all of the batch's chosen tokens,
  the same on every pair."""
  return np.full(len(b["m_w"]), -_seq(b, "pol", "w").sum() / b["m_w"].sum())


def mpo(b, beta, weights=(0.8, 0.2, 1.0)):
  """MPO (arXiv 2411.10442): w1 * sigmoid + w2 * BCO-pair + w3 * SFT."""
  return weights[0] * dpo(b, beta) + weights[1] * bco_pair(b, beta) + weights[2] * sft(b)


def f_dpo(b, beta, kind, a=0.5):
  """f-DPO (arXiv 2309.16240): f'(u) of each side's policy/reference ratio
  u in place of log u inside DPO's sigmoid."""
  u_w, u_l = (np.exp(x) for x in _logratios(b))
  f = {"forward_kl": lambda u: 1 - 1 / u,
       "js_divergence": lambda u: np.log(2 * u / (1 + u)),
       "alpha_divergence": lambda u: (u ** (a - 1) - 1) / (a - 1)}[kind]
  return -log_sigmoid(beta * (f(u_w) - f(u_l)))


def wpo_weight(b, side):
  """WPO (arXiv 2406.11827, eq. 2, TRL's form): exp of the mean over the
  response of log p(y_t) - log sum_v p(v)^2, on the detached policy."""
  lp_all = log_softmax(b[f"sg_pol_{side}"])
  m = b[f"m_{side}"]
  aligned = gather(lp_all, b[f"tgt_{side}"], m) - np.log(np.exp(2 * lp_all).sum(-1)) * m
  return np.exp(aligned.sum(-1) / m.sum(-1))


def wpo(b, beta):
  """DPO with each pair weighted by w(y_w) w(y_l)."""
  return dpo(b, beta) * wpo_weight(b, "w") * wpo_weight(b, "l")


def ld_weights(b, ld_alpha):
  """LD-DPO (arXiv 2409.06411): weight 1 on the first min(|y_w|, |y_l|)
  response tokens, ld_alpha on the rest."""
  out = []
  for side in ("w", "l"):
    w = np.zeros_like(b[f"m_{side}"])
    for i in range(len(w)):
      shared = int(min(b["m_w"][i].sum(), b["m_l"][i].sum()))
      real = np.flatnonzero(b[f"m_{side}"][i] > 0)  # response positions, in order
      w[i, real[:shared]] = 1.0
      w[i, real[shared:]] = ld_alpha
    out.append(w)
  return out


def ld_dpo(b, beta, ld_alpha):
  """DPO on length-desensitised log-probs of policy and reference."""
  w_w, w_l = ld_weights(b, ld_alpha)
  lr_w = _seq(b, "pol", "w", w_w) - _seq(b, "ref", "w", w_w)
  lr_l = _seq(b, "pol", "l", w_l) - _seq(b, "ref", "l", w_l)
  return -log_sigmoid(beta * (lr_w - lr_l))


def ipo_over_tdpo(b, beta, alpha=0.5):
  """IPO's squared loss on TDPO2's per-token-averaged scores: the score of
  each side is its log-ratio plus its (chosen: detached) weighted KL."""
  mw, kw = _tdpo_side(b["pol_w"], b["ref_w"], b["tgt_w"], b["m_w"])
  ml, kl = _tdpo_side(b["pol_l"], b["ref_l"], b["tgt_l"], b["m_l"])
  _, kw_sg = _tdpo_side(b["sg_pol_w"], b["ref_w"], b["tgt_w"], b["m_w"])
  s_w = (mw + alpha * kw_sg) / b["m_w"].sum(-1)
  s_l = (ml + alpha * kl) / b["m_l"].sum(-1)
  return (s_w - s_l - 1 / (2 * beta)) ** 2


def discopop_over_model_prior(b, beta, tau):
  """DiscoPOP's loss with a language-model prior zeta_phi in place of the reference."""
  rho = beta * ((_seq(b, "pol", "w") - _seq(b, "zeta", "w"))
                - (_seq(b, "pol", "l") - _seq(b, "zeta", "l")))
  mix = _sigmoid(rho / tau)
  return (1 - mix) * -log_sigmoid(rho) + mix * np.exp(-rho)


def _alphapo_reward(logp, a):
  """AlphaPO (arXiv 2501.03884): r = (1 - p^(-a)) / a, p = exp(logp)."""
  return logp if a == 0 else (1 - np.exp(logp) ** (-a)) / a


def _chosen_token_nll(b):
  lp = gather(log_softmax(b["pol_w"]), b["tgt_w"], b["m_w"])
  return -lp.sum() / b["m_w"].sum()


def cpo(b, beta, cpo_alpha, a=0.0):
  """CPO (arXiv 2401.08417, eq. 3 plus the NLL term): the reference-free
  sigmoid loss on sequence log-probs (their AlphaPO rewards for a != 0) plus
  cpo_alpha times the chosen tokens' mean NLL over the batch."""
  r_w = _alphapo_reward(_seq(b, "pol", "w"), a)
  r_l = _alphapo_reward(_seq(b, "pol", "l"), a)
  return -log_sigmoid(beta * (r_w - r_l)) + cpo_alpha * _chosen_token_nll(b)


def alphapo(b, beta, gamma, a):
  """AlphaPO: SimPO's loss on AlphaPO rewards of the per-token-mean probability."""
  r_w = _alphapo_reward(_seq(b, "pol", "w") / b["m_w"].sum(-1), a)
  r_l = _alphapo_reward(_seq(b, "pol", "l") / b["m_l"].sum(-1), a)
  return -log_sigmoid(beta * (r_w - r_l) - gamma)


def orpo(b, lam):
  """ORPO (arXiv 2403.07691, eqs. 4 and 7 as TRL cites them): the chosen tokens' NLL plus
  lambda times -log sigmoid of the log odds ratio of the per-token-mean
  probabilities."""
  def odds(side):
    p = np.exp(_seq(b, "pol", side) / b[f"m_{side}"].sum(-1))
    return np.log(p / (1 - p))
  return _chosen_token_nll(b) - lam * log_sigmoid(odds("w") - odds("l"))
