"""Tokenisation of a split's preference pairs (see ``midpo.data.pipeline`` for the
layout and the rules: ``'trl'``, prompt and prompt+completion tokenised whole as TRL 1.16's
``DPOTrainer`` does; ``'separate'``, encoded apart, for the synthetic task)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from typing import Protocol, Sequence

import numpy as np

from midpo.data import report as report_lib
from midpo.data import tfds_builders
from midpo.models.tokenizer import TokenizerError

MODES = ("pairs", "sft")
TOKENIZATIONS = ("auto", "trl", "separate")
TRANSFORMS = ("threshold_and_scale", "raw")


class Tokenizer(Protocol):
  """The project's tokenizer protocol (what the pipeline uses; ``midpo.models.tokenizer``)."""

  @property
  def vocab_size(self) -> int: ...
  @property
  def bos_id(self) -> int | None: ...
  @property
  def eos_id(self) -> int | None: ...
  @property
  def pad_id(self) -> int | None: ...
  def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]: ...
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


class UnknownTokens:
  """The unknown-token rate of a split's first ``ROWS`` rows; too high is a ``DataError``."""

  ROWS = 100

  def __init__(self, unk_id: int | None, max_fraction: float):
    self.unk_id, self.max_fraction = unk_id, max_fraction
    self.rows = self.tokens = self.unknown = 0
    self.checked = unk_id is None

  def count(self, *rows: list[int]) -> None:
    if not self.checked:
      self.rows += 1
      self.tokens += sum(len(r) for r in rows)
      self.unknown += sum(int(np.sum(np.asarray(r) == self.unk_id)) for r in rows)

  def check(self, done: bool) -> None:
    """Raises ``report.DataError`` (naming ``config.tokenizer``) once ``ROWS`` rows (or all,
    when ``done``) are counted and more than ``max_fraction`` of their tokens are unknown."""
    if self.checked or (self.rows < self.ROWS and not done):
      return
    self.checked = True
    if self.tokens and self.unknown / self.tokens > self.max_fraction:
      raise report_lib.DataError(
        f"config.tokenizer: {self.unknown / self.tokens:.0%} of the tokens of the first "
        f"{self.rows} rows are the unknown token (id {self.unk_id}), more than "
        f"config.data.max_unk_fraction={self.max_fraction}: this tokenizer does not fit the "
        "data (the 'synthetic' one knows only the synthetic task's words). Set "
        "--config.tokenizer to your model's tokenizer directory (with tokenizer.json) or "
        "'byte'.")


def resolve_tokenization(c) -> str:
  """``config.data.tokenization`` with ``'auto'`` resolved: ``'separate'`` for the synthetic
  task, ``'trl'`` for users' files."""
  if c.tokenization != "auto":
    return c.tokenization
  return "separate" if c.source == "synthetic" else "trl"


def _where(ex: dict, i: int) -> tuple[str, int]:
  """The file and line a row came from (as the file has them), or the split and position."""
  m = re.match(r"^(.*):(\d+)$", ex.get("source", ""))
  return (m.group(1), int(m.group(2))) if m else (ex.get("source", "?"), i + 1)


def _render_template(tok: Tokenizer, messages: list, generation: bool) -> str:
  try:
    return tok.apply_chat_template(messages, add_generation_prompt=generation)
  except TokenizerError:
    raise  # no template at all: the tokenizer's problem, not the row's
  except Exception as e:  # pylint: disable=broad-except
    raise report_lib.BadRow(report_lib.TEMPLATE_ERROR, f"{type(e).__name__}: {e}") from None


def _encode(tok: Tokenizer, text: str, special: bool) -> list[int]:
  try:
    return list(tok.encode(text, add_special_tokens=True) if special else tok.encode(text))
  except TypeError:
    raise  # a tokenizer without the protocol's signature: a bug, not a bad row
  except Exception as e:  # pylint: disable=broad-except
    raise report_lib.BadRow(report_lib.UNTOKENIZABLE, f"{type(e).__name__}: {e}") from None


def _common_prefix(a: list[int], b: list[int]) -> int:
  n = 0
  for x, y in zip(a, b):
    if x != y:
      break
    n += 1
  return n


def _split_trl(ex: dict, tok: Tokenizer, keys: tuple[str, ...], add_eos: bool,
               rep: report_lib.BadRowReport) -> tuple[list[int], list[list[int]]]:
  """TRL 1.16's ``DPOTrainer`` tokenisation of one row: prompt and prompt+completion tokenised
  whole, the completion starting where the two token lists diverge."""
  if ex["kind"] == "text":
    prompt_ids = _encode(tok, ex["prompt"], True)
    fulls = []
    for key in keys:
      ids = _encode(tok, ex["prompt"] + ex[key], True)
      # TRL appends the EOS text to text completions that do not end with it; the EOS is one
      # added token, so that is the EOS id after the ids (unless the post-processor appended
      # one itself: then TRL has two, midpo one).
      if add_eos and tok.eos_id is not None and (not ids or ids[-1] != tok.eos_id):
        ids = ids + [tok.eos_id]
      fulls.append(ids)
  else:
    prompt = json.loads(ex["prompt"])
    prompt_ids = _encode(tok, _render_template(tok, prompt, True), False)
    fulls = [_encode(tok, _render_template(tok, prompt + json.loads(ex[k]), False), False)
             for k in keys]
  n = min(_common_prefix(prompt_ids, ids) for ids in fulls)
  if n < len(prompt_ids):
    rep.note("prompt_not_a_token_prefix")
  return prompt_ids[:n], [ids[n:] for ids in fulls]


def _split_separate(ex: dict, tok: Tokenizer, keys: tuple[str, ...], c, where: str
                    ) -> tuple[list[int], list[list[int]]]:
  """Prompt and responses encoded separately (the synthetic task's word-level rows)."""
  if ex["kind"] == "text":
    texts = [ex["prompt"]] + [ex[k] for k in keys]
  else:
    prompt = json.loads(ex["prompt"])
    texts = [_render_template(tok, prompt, True)]
    for key in keys:
      full = _render_template(tok, prompt + json.loads(ex[key]), False)
      if not full.startswith(texts[0]):
        raise report_lib.BadRow(
          report_lib.TEMPLATE_MISMATCH, f"rendered prompt is not a prefix of prompt+{key}")
      texts.append(full[len(texts[0]):])
  p = _encode(tok, texts[0], False)
  if c.add_bos and tok.bos_id is not None and p[:1] == [tok.bos_id]:
    raise ValueError(
      f"{where}: the encoded prompt already starts with bos_id {tok.bos_id} (the "
      "chat template writes it?) and config.data.add_bos is on; set add_bos=False"
    )
  eos = [tok.eos_id] if c.add_eos and tok.eos_id is not None else []
  return p, [_encode(tok, t, False) + eos for t in texts[1:]]


def tokenize_split(
  source, indices: np.ndarray, tok: Tokenizer, c, mode: str, rep: report_lib.BadRowReport
) -> TokenizedPairs:
  """Tokenises ``source[i]`` for ``i`` in ``indices``; bad rows go to ``rep``.

  Raises:
    ValueError: ``mode`` unknown, or (``'separate'``) a prompt that already starts with BOS
      while ``add_bos`` is on.
    report.BadRowError: a bad row under ``bad_rows='fatal'`` (naming its file and line).
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  sft = mode == "sft"
  trl = resolve_tokenization(c) == "trl"
  use_bos = c.add_bos and not trl and tok.bos_id is not None
  prefix = np.array([tok.bos_id] if use_bos else [], np.int32)
  room = c.max_length - len(prefix)
  want_weights = c.token_weights == "oracle"
  keys = ("chosen",) if sft else ("chosen", "rejected")
  unk = UnknownTokens(getattr(tok, "unk_id", None), c.max_unk_fraction)
  prompts, chosens, rejecteds, kept, rewards, scores, wcs, wrs = [], [], [], [], [], [], [], []
  for i in indices:
    unk.check(done=False)
    ex = tfds_builders.decode_example(source[int(i)])
    where, line = _where(ex, int(i))
    try:
      if trl:
        p, cr = _split_trl(ex, tok, keys, c.add_eos, rep)
      else:
        p, cr = _split_separate(ex, tok, keys, c, where)
      if any(not ids for ids in cr):
        raise report_lib.BadRow(report_lib.EMPTY_RESPONSE, "a response has no tokens")
      if not sft and cr[0] == cr[1]:
        raise report_lib.BadRow(report_lib.IDENTICAL_RESPONSES, "same token ids")
      ws = None
      if want_weights:
        n_eos = 1 if c.add_eos else 0
        ws = [oracle_token_weights(ex[f"{k}_token_rewards"], k == "chosen",
                                   c.token_weight_transform) for k in keys]
        for ids, w in zip(cr, ws):
          if len(ids) - n_eos != len(w):
            raise ValueError(
              f"{where}: {len(w)} oracle token rewards for {len(ids) - n_eos} tokens; "
              "oracle weights need the synthetic task's word-level tokenizer"
            )
        neutral = oracle_token_weights(np.zeros(n_eos), True, c.token_weight_transform)
        ws = [np.concatenate([w, neutral]).astype(np.float32) for w in ws]
      if c.truncation_mode == "keep_start":
        p, cr, ws = _keep_start(p, cr, ws, room, rep)
      else:
        # A leading BOS of the prompt ('trl') is kept whatever the truncation.
        lead = p[:1] if trl and tok.bos_id is not None and p[:1] == [tok.bos_id] else []
        p, cr, ws = _truncate(p[len(lead):], cr, ws, room - len(lead), c, rep)
        p = lead + p
      unk.count(p, *cr)
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
  unk.check(done=True)
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


def _keep_start(p, cr, ws, room, rep):
  """TRL 1.16's ``truncation_mode='keep_start'``: a row whose prompt fills ``room`` is dropped
  (``over_length``, as TRL's dataset filter drops it); otherwise each prompt+completion keeps
  its first ``room`` tokens, the completions cut from the right (note ``response_truncated``)."""
  if len(p) >= room:
    raise report_lib.BadRow(report_lib.OVER_LENGTH, f"prompt of {len(p)} tokens >= {room}")
  keep = room - len(p)
  if max(len(ids) for ids in cr) > keep:
    cr = [ids[:keep] for ids in cr]
    if ws is not None:
      ws = [w[:keep] for w in ws]
    rep.note("response_truncated")
  return p, cr, ws


def _truncate(p, cr, ws, room, c, rep):
  """The truncation rules of ``pipeline.py`` (prompt from the left, responses only when
  ``truncate_responses``); raises ``BadRow('over_length')``."""
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
    if ws is not None:
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
  return p, cr, ws
