"""A synthetic preference task with a known reward: a small word-level language, its tokenizer,
the ground-truth reward ``r*(x, y)``, and a Bradley-Terry annotator.

The language. A prompt asks about a *topic* ("tell me about the pasta with the sauce ."); each
topic belongs to one of four *domains* (food, film, travel, tech) that has its own nouns and
neutral adjectives. A response is 1 to 4 sentences from a small stochastic grammar::

    S      -> DET NOUN is ADJP .  |  i SVERB DET NOUN .  |  DET NOUN VERB DET [DADJ] NOUN .
            |  it is ADJP and ADJP .
    ADJP   -> [not] [very] ADJ        ADJ -> sentiment adjective | the domain's neutral adjective
    NOUN   -> the prompt's topic | a noun of its domain | (rarely) a noun of another domain

so a model has to learn the grammar, the prompt-to-domain agreement, and (for preference
training) which words the reward likes.

The reward ``r*(x, y) = sum_t r_t(x, y_<=t)`` decomposes over response tokens (one word = one
token), so per-token oracle weights exist (TIS-DPO):

- a sentiment adjective at ``t`` scores its valence (+-1 or +-2), doubled after ``very``, negated
  after ``not`` (also in ``not very ADJ``);
- a sentiment verb (``love``, ``hate``, ...) scores its valence;
- the first mention of the prompt's topic noun scores ``+0.5``; each noun of another domain
  scores ``-0.5``;
- every other token scores 0.

``r*`` is defined on any word sequence (unknown words score 0), so it scores model samples too.

Two tasks share this language. With ``prompt_specificity = 0`` (the default, the 'sentiment'
task) a sentiment word scores the same whatever the prompt, so the reward hardly depends on the
prompt (only through the topic bonus and the off-domain penalty). With ``prompt_specificity = s``
in (0, 1] (the 'domain lexicon' task at ``s = 1``) each domain likes its own half of the sentiment
words: a word's score is multiplied by ``(1 - s) + s * sign``, its sign in the prompt's domain
(``midpo.data.lexicon.DOMAIN_SIGN``: the domains pair up as opposites), so a response that ignores
the prompt gains nothing from sentiment at ``s = 1``, and lowering the mutual information between
prompt and response must cost reward.
The base generator picks positive and negative words with equal probability, so the expected
reward does not grow with length: length only matters if the annotator is told to like it.

The annotator (``preference_probability``) prefers ``a`` over ``b`` with probability::

    q = sigmoid((r*(a) - r*(b) + length_bias * (|a| - |b|)) / temperature)
    P(a > b) = (1 - label_noise) * q + label_noise * (1 - q)

with ``|y|`` the number of response tokens (words).

Everything is a function of ``(seed, split, index)``; see :func:`example_rng`.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

# ----------------------------------------------------------------------------------------------
# Vocabulary (midpo.data.lexicon).

from midpo.data.lexicon import (DOMAIN_SIGN, DOMAINS, FUNCTION_WORDS, INSTRUCTIONS,  # noqa: F401
                                NEGATIVE_ADJ, NEGATIVE_VERB, NEUTRAL_VERBS, NOUN_DOMAIN,
                                OFF_DOMAIN_PENALTY, POSITIVE_ADJ, POSITIVE_VERB, ROLES, SPECIALS,
                                TOPIC_BONUS, TOPIC_DOMAIN, VALENCE, VERB_VALENCE, vocabulary)

# ----------------------------------------------------------------------------------------------
# Tokenizer.


class SyntheticTokenizer:
  """Word-level tokenizer of the synthetic language; implements the project's tokenizer protocol.

  ``encode`` splits on whitespace and maps each word to its id (unknown words to ``unk_id``); it
  adds no BOS/EOS (the pipeline does) unless ``add_special_tokens`` (then a BOS). ``decode`` joins words with single spaces and leaves out
  ``<pad>``, ``<bos>`` and ``<eos>``. The chat template renders each message as
  ``<role> content`` joined by spaces, and ``add_generation_prompt`` appends ``<assistant>``.
  """

  def __init__(self):
    self._words = vocabulary()
    self._ids = {w: i for i, w in enumerate(self._words)}

  @property
  def vocab_size(self) -> int:
    return len(self._words)

  @property
  def pad_id(self) -> int:
    return self._ids["<pad>"]

  @property
  def bos_id(self) -> int:
    return self._ids["<bos>"]

  @property
  def eos_id(self) -> int:
    return self._ids["<eos>"]

  @property
  def unk_id(self) -> int:
    return self._ids["<unk>"]

  def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
    unk = self.unk_id
    ids = [self._ids.get(w, unk) for w in text.split()]
    return [self.bos_id] + ids if add_special_tokens else ids

  def decode(self, ids: Sequence[int]) -> str:
    skip = (self.pad_id, self.bos_id, self.eos_id)
    out = []
    for i in ids:
      i = int(i)
      if not 0 <= i < len(self._words):
        raise ValueError(f"token id {i} outside the vocabulary [0, {len(self._words)})")
      if i not in skip:
        out.append(self._words[i])
    return " ".join(out)

  def id_to_word(self, i: int) -> str:
    return self._words[i]

  def apply_chat_template(self, messages, add_generation_prompt: bool = False) -> str:
    parts = []
    for m in messages:
      if m["role"] not in ROLES:
        raise ValueError(f"role {m['role']!r} not one of {ROLES}")
      parts.append(f"<{m['role']}> {m['content']}".rstrip())
    if add_generation_prompt:
      parts.append("<assistant>")
    return " ".join(parts)


# ----------------------------------------------------------------------------------------------
# Reward.


def _words(text_or_words) -> list[str]:
  return text_or_words.split() if isinstance(text_or_words, str) else list(text_or_words)


def prompt_domain(prompt) -> str | None:
  """The domain of the first topic noun in the prompt (None if it has none)."""
  for w in _words(prompt):
    if w in TOPIC_DOMAIN:
      return TOPIC_DOMAIN[w]
  return None


def prompt_topic(prompt) -> str | None:
  """The prompt's topic word (a key of ``TOPIC_DOMAIN``), or None."""
  for w in _words(prompt):
    if w in TOPIC_DOMAIN:
      return w
  return None


def token_rewards(prompt, response, prompt_specificity: float = 0.0) -> np.ndarray:
  """Per-token rewards ``r_t`` (float32, one per response word); ``r* = sum_t r_t``.

  ``prompt_specificity`` in [0, 1] makes sentiment depend on the prompt's
  domain: each sentiment word's score is multiplied by
  ``(1 - s) + s * DOMAIN_SIGN[domain][word]`` (``midpo.data.lexicon``), so at
  ``s = 1`` half of each lexicon changes sign in each domain.
  """
  p, y = _words(prompt), _words(response)
  topic = prompt_topic(p)
  domain = TOPIC_DOMAIN.get(topic) if topic else None
  s = float(prompt_specificity)
  signs = DOMAIN_SIGN.get(domain) if s and domain else None
  out = np.zeros(len(y), dtype=np.float32)
  topic_seen = False
  for t, w in enumerate(y):
    if w in VALENCE:
      v = VALENCE[w]
      prev = y[t - 1] if t >= 1 else None
      prev2 = y[t - 2] if t >= 2 else None
      if prev == "very":
        v *= 2.0
        if prev2 == "not":
          v = -v
      elif prev == "not":
        v = -v
      out[t] = v if signs is None else v * ((1.0 - s) + s * signs[w])
    elif w in VERB_VALENCE:
      v = VERB_VALENCE[w]
      out[t] = v if signs is None else v * ((1.0 - s) + s * signs[w])
    elif domain is not None and w in NOUN_DOMAIN:
      if w == topic and not topic_seen:
        out[t] = TOPIC_BONUS
        topic_seen = True
      elif NOUN_DOMAIN[w] != domain:
        out[t] = OFF_DOMAIN_PENALTY
  return out


def reward(prompt, response, prompt_specificity: float = 0.0) -> float:
  """The ground-truth reward ``r*(x, y)`` (see ``token_rewards``)."""
  return float(token_rewards(prompt, response, prompt_specificity).sum(dtype=np.float64))


def preference_probability(
  r_a, r_b, len_a, len_b, temperature=1.0, length_bias=0.0, label_noise=0.0
):
  """P(annotator prefers a over b); see the module docstring. Works on arrays."""
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  if not 0.0 <= label_noise <= 0.5:
    raise ValueError(f"label_noise must be in [0, 0.5], got {label_noise}")
  z = (
    np.asarray(r_a, np.float64)
    - np.asarray(r_b, np.float64)
    + length_bias * (np.asarray(len_a, np.float64) - np.asarray(len_b, np.float64))
  )
  q = 1.0 / (1.0 + np.exp(-z / temperature))
  return (1.0 - label_noise) * q + label_noise * (1.0 - q)


# ----------------------------------------------------------------------------------------------
# Generation.

# 'prior': held-out prompts whose policy samples train the 'mi' prior.
SPLIT_CODES = {"sft": 1, "train": 2, "test": 3, "samples": 4, "prior": 5}


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
  """The generator for one example: examples are independent of order and of each other."""
  return np.random.default_rng([int(seed), SPLIT_CODES[split], int(index)])


def _pick(rng: np.random.Generator, seq):
  return seq[int(rng.integers(len(seq)))]


def sample_prompt(rng: np.random.Generator) -> str:
  """A random prompt of the task: an instruction about a topic of a random domain."""
  domain = _pick(rng, tuple(DOMAINS))
  d = DOMAINS[domain]
  words = list(_pick(rng, INSTRUCTIONS))
  words += [_pick(rng, ("the", "this", "a")), _pick(rng, d["topics"])]
  if rng.random() < 0.3:
    words += ["with", "the", _pick(rng, d["nouns"])]
  words.append(".")
  return " ".join(words)


class _Generator:
  """The base response distribution for one prompt (``p_positive`` tilts sentiment)."""

  def __init__(self, prompt: str, rng: np.random.Generator, p_positive: float = 0.5):
    self.rng = rng
    self.topic = prompt_topic(prompt)
    self.domain = TOPIC_DOMAIN[self.topic]
    self.p_positive = p_positive
    self.others = tuple(n for n, dom in NOUN_DOMAIN.items() if dom != self.domain)

  def noun(self) -> str:
    u = self.rng.random()
    if u < 0.3:
      return self.topic
    if u < 0.9:
      return _pick(self.rng, DOMAINS[self.domain]["nouns"])
    return _pick(self.rng, self.others)

  def adjp(self) -> list[str]:
    rng = self.rng
    out = []
    if rng.random() < 0.15:
      out.append("not")
    if rng.random() < 0.25:
      out.append("very")
    if rng.random() < 0.6:
      table = POSITIVE_ADJ if rng.random() < self.p_positive else NEGATIVE_ADJ
      out.append(_pick(rng, tuple(table)))
    else:
      out.append(_pick(rng, DOMAINS[self.domain]["adjectives"]))
    return out

  def det(self) -> str:
    return _pick(self.rng, ("the", "this", "a"))

  def sentence(self) -> list[str]:
    rng = self.rng
    u = rng.random()
    if u < 0.35:
      return [self.det(), self.noun(), "is", *self.adjp(), "."]
    if u < 0.6:
      table = POSITIVE_VERB if rng.random() < self.p_positive else NEGATIVE_VERB
      return ["i", _pick(rng, tuple(table)), self.det(), self.noun(), "."]
    if u < 0.85:
      out = [self.det(), self.noun(), _pick(rng, NEUTRAL_VERBS), self.det()]
      if rng.random() < 0.5:
        out.append(_pick(rng, DOMAINS[self.domain]["adjectives"]))
      return out + [self.noun(), "."]
    return ["it", "is", *self.adjp(), "and", *self.adjp(), "."]

  def response(self) -> str:
    n = 1 + int(self.rng.binomial(3, 0.5))
    words = []
    for _ in range(n):
      words += self.sentence()
    return " ".join(words)


def sample_response(prompt: str, rng: np.random.Generator, p_positive: float = 0.5) -> str:
  """One response from the base generator (the "pretraining" distribution of the task)."""
  return _Generator(prompt, rng, p_positive).response()


def prompts(seed: int, split: str, n: int, start: int = 0) -> list[str]:
  """The prompts of examples ``start .. start+n-1`` (by ``index``) of ``split``, e.g. to sample
  responses to the 'train' prompts from a model and regenerate pairs from them."""
  return [sample_prompt(example_rng(seed, split, i)) for i in range(start, start + n)]


def sft_example(seed: int, index: int, best_of: int,
                prompt_specificity: float = 0.0) -> tuple[str, str]:
  """(prompt, demonstration): the best of ``best_of`` base responses under ``r*``."""
  rng = example_rng(seed, "sft", index)
  prompt = sample_prompt(rng)
  best, best_r = None, -math.inf
  for _ in range(best_of):
    y = sample_response(prompt, rng)
    r = reward(prompt, y, prompt_specificity)
    if r > best_r:
      best, best_r = y, r
  return prompt, best


def candidate_pair(seed: int, split: str, index: int) -> tuple[np.random.Generator, str, str, str]:
  """A prompt and two distinct base responses (in sampling order), plus the rng to label them."""
  rng = example_rng(seed, split, index)
  prompt = sample_prompt(rng)
  a = sample_response(prompt, rng)
  for _ in range(1000):
    b = sample_response(prompt, rng)
    if b != a:
      return rng, prompt, a, b
  raise RuntimeError(f"could not draw two distinct responses for {split}[{index}]")


def given_pair(prompt: str, chosen: str, rejected: str, prompt_specificity: float = 0.0) -> dict:
  """The fields of a preference example whose label was decided by the caller
  (``label_probability`` is NaN: no annotator was asked)."""
  rc = token_rewards(prompt, chosen, prompt_specificity)
  rr = token_rewards(prompt, rejected, prompt_specificity)
  return {
    "prompt": prompt,
    "chosen": chosen,
    "rejected": rejected,
    "reward_chosen": float(rc.sum(dtype=np.float64)),
    "reward_rejected": float(rr.sum(dtype=np.float64)),
    "chosen_token_rewards": rc,
    "rejected_token_rewards": rr,
    "label_probability": float("nan"),
  }


def label_pair(
  rng: np.random.Generator,
  prompt: str,
  a: str,
  b: str,
  temperature: float,
  length_bias: float,
  label_noise: float,
  prompt_specificity: float = 0.0,
) -> dict:
  """Labels ``(a, b)`` with the annotator; returns the fields of a preference example."""
  ra, rb = token_rewards(prompt, a, prompt_specificity), token_rewards(prompt, b,
                                                                       prompt_specificity)
  p_a = float(
    preference_probability(
      ra.sum(), rb.sum(), len(ra), len(rb), temperature, length_bias, label_noise
    )
  )
  a_wins = bool(rng.random() < p_a)
  (c, rc), (r, rr) = ((a, ra), (b, rb)) if a_wins else ((b, rb), (a, ra))
  return {
    "prompt": prompt,
    "chosen": c,
    "rejected": r,
    "reward_chosen": float(rc.sum(dtype=np.float64)),
    "reward_rejected": float(rr.sum(dtype=np.float64)),
    "chosen_token_rewards": rc,
    "rejected_token_rewards": rr,
    "label_probability": p_a if a_wins else 1.0 - p_a,
  }
