"""Tokenisation of a split's preference pairs (see ``midpo.data.pipeline`` for the
layout and the rules: prompt and responses encoded separately, as TRL does)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Protocol, Sequence

import numpy as np

from midpo.data import report as report_lib
from midpo.data import tfds_builders

MODES = ("pairs", "sft")
TRANSFORMS = ("threshold_and_scale", "raw")


class Tokenizer(Protocol):
  """The project's tokenizer protocol (what the pipeline uses)."""

  @property
  def vocab_size(self) -> int: ...
  @property
  def bos_id(self) -> int: ...
  @property
  def eos_id(self) -> int: ...
  @property
  def pad_id(self) -> int: ...
  def encode(self, text: str) -> list[int]: ...
  def decode(self, ids: Sequence[int]) -> str: ...
  def apply_chat_template(self, messages, add_generation_prompt: bool = False) -> str: ...


def oracle_token_weights(token_rewards: np.ndarray, chosen: bool, transform: str) -> np.ndarray:
  """TIS-DPO weights from per-token rewards: raw = r_t (chosen) or -r_t (rejected)."""
  raw = np.asarray(token_rewards, np.float32) * (1.0 if chosen else -1.0)
  if transform == "raw":
    return raw
  if transform == "threshold_and_scale":
    return (0.7 + 0.6 * (np.clip(raw, -1.5, 1.5) + 1.5) / 3.0).astype(np.float32)
  raise ValueError(f"token_weight_transform must be one of {TRANSFORMS}, got {transform!r}")


@dataclasses.dataclass
class TokenizedPairs:
  """This process's pairs, tokenised: prefix ([bos]) + prompt + response ids per row."""

  prompt: list[np.ndarray]
  chosen: list[np.ndarray]
  rejected: list[np.ndarray]  # empty arrays in sft mode
  pair_index: np.ndarray  # int64 [N], position in the TFDS split
  reward: np.ndarray | None  # float32 [N, 2] (chosen, rejected) or None
  score: np.ndarray | None  # float32 [N, 2] or None
  chosen_weights: list[np.ndarray] | None
  rejected_weights: list[np.ndarray] | None
  prefix: np.ndarray  # [bos] or []

  def __len__(self) -> int:
    return len(self.prompt)

  def row_lengths(self) -> np.ndarray:
    """int64 [N, 2]: length of the chosen row and of the rejected row."""
    p = np.array([len(x) for x in self.prompt], np.int64) + len(self.prefix)
    c = np.array([len(x) for x in self.chosen], np.int64)
    r = np.array([len(x) for x in self.rejected], np.int64)
    return np.stack([p + c, p + r], axis=1) if len(p) else np.zeros((0, 2), np.int64)

  def fingerprint(self) -> str:
    h = hashlib.sha256()
    h.update(self.pair_index.tobytes())
    h.update(self.row_lengths().tobytes())
    return h.hexdigest()[:16]


def _render(ex: dict, tok: Tokenizer, sft: bool) -> tuple[str, str, str]:
  if ex["kind"] == "text":
    return ex["prompt"], ex["chosen"], ex["rejected"]
  prompt = json.loads(ex["prompt"])
  prompt_text = tok.apply_chat_template(prompt, add_generation_prompt=True)
  out = [prompt_text]
  for key in ("chosen", "rejected"):
    if not ex[key] or (sft and key == "rejected"):
      out.append("")
      continue
    full = tok.apply_chat_template(prompt + json.loads(ex[key]), add_generation_prompt=False)
    if not full.startswith(prompt_text):
      raise report_lib.BadRow(
        report_lib.TEMPLATE_MISMATCH, f"rendered prompt is not a prefix of prompt+{key}"
      )
    out.append(full[len(prompt_text) :])
  return tuple(out)


def tokenize_split(
  source, indices: np.ndarray, tok: Tokenizer, c, mode: str, rep: report_lib.BadRowReport
) -> TokenizedPairs:
  """Tokenises ``source[i]`` for ``i`` in ``indices``; bad rows go to ``rep``."""
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  sft = mode == "sft"
  prefix = np.array([tok.bos_id] if c.add_bos else [], np.int32)
  eos = [tok.eos_id] if c.add_eos else []
  room = c.max_length - len(prefix)
  want_weights = c.token_weights == "oracle"
  prompts, chosens, rejecteds, kept, rewards, scores, wcs, wrs = [], [], [], [], [], [], [], []
  for i in indices:
    ex = tfds_builders.decode_example(source[int(i)])
    where, line = ex.get("source", "?"), int(i) + 1
    try:
      prompt_text, c_text, r_text = _render(ex, tok, sft)
      p = list(tok.encode(prompt_text))
      if c.add_bos and p[:1] == [tok.bos_id]:
        raise ValueError(
          f"{where}: the encoded prompt already starts with bos_id {tok.bos_id} (the "
          "chat template writes it?) and config.data.add_bos is on; set add_bos=False"
        )
      cr = [list(tok.encode(c_text))]
      if not sft:
        cr.append(list(tok.encode(r_text)))
      if any(not ids for ids in cr):
        raise report_lib.BadRow(report_lib.EMPTY_RESPONSE, "a response has no tokens")
      if not sft and cr[0] == cr[1]:
        raise report_lib.BadRow(report_lib.IDENTICAL_RESPONSES, "same token ids")
      if want_weights:
        ws = [oracle_token_weights(ex["chosen_token_rewards"], True, c.token_weight_transform)]
        if not sft:
          ws.append(
            oracle_token_weights(ex["rejected_token_rewards"], False, c.token_weight_transform)
          )
        for ids, w in zip(cr, ws):
          if len(ids) != len(w):
            raise ValueError(
              f"{where}: {len(w)} oracle token rewards for {len(ids)} tokens; "
              "oracle weights need the synthetic task's word-level tokenizer"
            )
        neutral = oracle_token_weights(np.zeros(len(eos)), True, c.token_weight_transform)
        ws = [np.concatenate([w, neutral]).astype(np.float32) for w in ws]
      cr = [ids + eos for ids in cr]
      # Truncation.
      if c.max_prompt_length and len(p) > c.max_prompt_length:
        p = p[len(p) - c.max_prompt_length :]
        rep.note("prompt_truncated")
        truncated = True
      else:
        truncated = False
      longest = max(len(ids) for ids in cr)
      if longest > room:
        if not c.truncate_responses:
          raise report_lib.BadRow(report_lib.OVER_LENGTH, f"response of {longest} tokens > {room}")
        keep = room - min(len(p), c.max_prompt_length)
        cr = [ids[:keep] for ids in cr]
        if want_weights:
          ws = [w[:keep] for w in ws]
        rep.note("response_truncated")
        longest = keep
      budget = room - longest
      if len(p) > budget:
        p = p[len(p) - budget :] if budget > 0 else []
        if not truncated:
          rep.note("prompt_truncated")
        if not p:
          rep.note("prompt_emptied")
    except report_lib.BadRow as bad:
      rep.bad(bad.reason, where, line, bad.detail)
      continue
    rep.kept()
    prompts.append(np.asarray(p, np.int32))
    chosens.append(np.asarray(cr[0], np.int32))
    rejecteds.append(np.asarray(cr[1] if not sft else [], np.int32))
    kept.append(int(i))
    if "reward_chosen" in ex:
      rewards.append((ex["reward_chosen"], ex["reward_rejected"]))
    if "score_chosen" in ex:
      scores.append((ex["score_chosen"], ex["score_rejected"]))
    if want_weights:
      wcs.append(ws[0])
      wrs.append(ws[1] if not sft else np.zeros((0,), np.float32))
  n = len(kept)
  reward = np.asarray(rewards, np.float32).reshape(n, 2) if len(rewards) == n and n else None
  score = np.asarray(scores, np.float32).reshape(n, 2) if len(scores) == n and n else None
  cols = slice(0, 1) if sft else slice(0, 2)
  if score is not None and not np.isfinite(score[:, cols]).all():
    score = None  # only kept when every pair has scores
  return TokenizedPairs(
    prompts,
    chosens,
    rejecteds,
    np.asarray(kept, np.int64),
    reward,
    score,
    wcs if want_weights else None,
    wrs if want_weights else None,
    prefix,
  )
