"""The synthetic task's words: domains, sentiment lexicons, function words,
and how prompt-specific each sentiment word's valence is (the
``prompt_specificity`` knob of ``midpo.data.synthetic``).

Changing any list changes the dataset: bump the builder VERSION.
"""

from __future__ import annotations


DOMAINS: dict[str, dict[str, tuple[str, ...]]] = {
  "food": {
    "topics": ("pasta", "soup", "pizza", "salad", "curry", "bread", "cake", "noodles"),
    "nouns": ("sauce", "chef", "menu", "kitchen", "dessert", "flavor", "waiter", "portion"),
    "adjectives": ("spicy", "sweet", "salty", "fresh", "warm", "crispy"),
  },
  "film": {
    "topics": ("movie", "film", "show", "drama", "comedy", "thriller", "series", "cartoon"),
    "nouns": ("plot", "actor", "ending", "scene", "script", "director", "soundtrack", "cast"),
    "adjectives": ("long", "short", "dark", "funny", "slow", "loud"),
  },
  "travel": {
    "topics": ("hotel", "beach", "city", "museum", "park", "village", "island", "lake"),
    "nouns": ("room", "view", "guide", "tour", "staff", "street", "trail", "market"),
    "adjectives": ("sunny", "quiet", "busy", "old", "large", "remote"),
  },
  "tech": {
    "topics": ("phone", "laptop", "camera", "tablet", "printer", "speaker", "router", "watch"),
    "nouns": ("battery", "screen", "case", "charger", "button", "app", "update", "keyboard"),
    "adjectives": ("fast", "light", "heavy", "thin", "cheap", "new"),
  },
}
POSITIVE_ADJ = {
  "good": 1.0,
  "nice": 1.0,
  "fine": 1.0,
  "pleasant": 1.0,
  "great": 2.0,
  "lovely": 2.0,
  "excellent": 2.0,
  "superb": 2.0,
}
NEGATIVE_ADJ = {
  "bad": -1.0,
  "poor": -1.0,
  "dull": -1.0,
  "weak": -1.0,
  "awful": -2.0,
  "terrible": -2.0,
  "horrible": -2.0,
  "useless": -2.0,
}
POSITIVE_VERB = {"love": 2.0, "like": 1.0, "enjoy": 1.0, "recommend": 2.0}
NEGATIVE_VERB = {"hate": -2.0, "dislike": -1.0, "regret": -1.0, "avoid": -2.0}
NEUTRAL_VERBS = ("has", "offers", "shows", "uses", "needs", "gets")
INSTRUCTIONS = (
  ("tell", "me", "about"),
  ("describe",),
  ("review",),
  ("what", "about"),
  ("talk", "about"),
  ("write", "about"),
)
FUNCTION_WORDS = ("the", "a", "this", "it", "is", "and", "i", "with", "not", "very", ".")
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
ROLES = ("system", "user", "assistant")

TOPIC_BONUS = 0.5
OFF_DOMAIN_PENALTY = -0.5

VALENCE = {**POSITIVE_ADJ, **NEGATIVE_ADJ}
VERB_VALENCE = {**POSITIVE_VERB, **NEGATIVE_VERB}
TOPIC_DOMAIN = {t: d for d, v in DOMAINS.items() for t in v["topics"]}
NOUN_DOMAIN = {n: d for d, v in DOMAINS.items() for n in v["topics"] + v["nouns"]}


def vocabulary() -> list[str]:
  """The fixed word list: specials, chat-role markers, then every word of the language."""
  words = set(FUNCTION_WORDS) | set(VALENCE) | set(VERB_VALENCE) | set(NEUTRAL_VERBS)
  words |= {w for ins in INSTRUCTIONS for w in ins}
  for d in DOMAINS.values():
    words |= set(d["topics"]) | set(d["nouns"]) | set(d["adjectives"])
  return list(SPECIALS) + [f"<{r}>" for r in ROLES] + sorted(words)



# The domain-specific lexicon: under domain ``d`` the valence of sentiment
# word ``w`` is multiplied by ``DOMAIN_SIGN[d][w]`` (+1 or -1) to the extent
# of ``prompt_specificity``. Each domain flips half of each lexicon (in the
# lexicon's order: food the odd positions, film the even ones, travel the
# second of each two, tech the first), so the domains pair up as opposites
# and every word's sign averages to 0 over the four: a response that ignores
# the prompt's domain gains nothing from sentiment words at specificity 1.
_FLIP = {"food": lambda j: j % 2 == 1, "film": lambda j: j % 2 == 0,
         "travel": lambda j: (j // 2) % 2 == 1, "tech": lambda j: (j // 2) % 2 == 0}
DOMAIN_SIGN: dict[str, dict[str, float]] = {
    d: {w: (-1.0 if flip(j) else 1.0)
        for lexicon in (POSITIVE_ADJ, NEGATIVE_ADJ, POSITIVE_VERB, NEGATIVE_VERB)
        for j, w in enumerate(lexicon)}
    for d, flip in _FLIP.items()}
