"""The synthetic known-reward task: determinism, the reward, the annotator, model samples."""

import json
import math

import numpy as np
import pytest

from midpo.data import report as report_lib
from midpo.data import samples_file
from midpo.data import synthetic
from midpo.data import tfds_builders

SMALL = dict(num_sft=40, num_train=60, num_test=20)


def _examples(builder, split):
  src = builder.as_data_source(split=split)
  exs = [tfds_builders.decode_example(src[i]) for i in range(len(src))]
  return sorted(exs, key=lambda e: e["index"])


def _same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    if isinstance(a[k], np.ndarray):
      np.testing.assert_array_equal(a[k], b[k])
    elif isinstance(a[k], float) and math.isnan(a[k]):
      assert math.isnan(b[k])
    else:
      assert a[k] == b[k], k


def test_same_seed_same_examples_different_seed_differs(tmp_path):
  b1 = tfds_builders.synthetic_builder(str(tmp_path / "a"), seed=7, **SMALL)
  b2 = tfds_builders.synthetic_builder(str(tmp_path / "b"), seed=7, **SMALL)
  b3 = tfds_builders.synthetic_builder(str(tmp_path / "c"), seed=8, **SMALL)
  assert b1.builder_config.name == b2.builder_config.name != b3.builder_config.name
  for split, n in (("sft", 40), ("train", 60), ("test", 20)):
    e1, e2, e3 = (_examples(b, split) for b in (b1, b2, b3))
    assert len(e1) == len(e2) == len(e3) == n
    for x, y in zip(e1, e2):
      _same(x, y)
    texts1 = [(e["prompt"], e["chosen"], e["rejected"]) for e in e1]
    texts3 = [(e["prompt"], e["chosen"], e["rejected"]) for e in e3]
    # Different seeds: (nearly) every example differs, not just a few.
    assert sum(a != b for a, b in zip(texts1, texts3)) >= 0.9 * n
  # Splits are different draws, too.
  assert {e["prompt"] for e in _examples(b1, "train")} != {
    e["prompt"] for e in _examples(b1, "test")
  }


def test_reward_decomposes_and_examples_carry_it(tmp_path):
  b = tfds_builders.synthetic_builder(str(tmp_path), seed=1, **SMALL)
  # The prompts a sampler would use are the split's prompts, by generation index.
  assert [e["prompt"] for e in _examples(b, "train")] == synthetic.prompts(1, "train", 60)
  for e in _examples(b, "train"):
    for side in ("chosen", "rejected"):
      tr = e[f"{side}_token_rewards"]
      assert len(tr) == len(e[side].split())
      assert e[f"reward_{side}"] == pytest.approx(float(tr.sum()), abs=1e-6)
      assert e[f"reward_{side}"] == pytest.approx(synthetic.reward(e["prompt"], e[side]))
    assert e["chosen"] != e["rejected"]
  sft = _examples(b, "sft")
  assert all(e["rejected"] == "" and math.isnan(e["reward_rejected"]) for e in sft)
  # Best-of-4 demonstrations beat single base samples on average.
  base = [synthetic.reward(e["prompt"], e["rejected"]) for e in _examples(b, "train")]
  assert np.mean([e["reward_chosen"] for e in sft]) > np.mean(base) + 1.0


def test_reward_rules():
  p = "tell me about the pasta ."
  np.testing.assert_array_equal(
    synthetic.token_rewards(p, "the pasta is very good . the pasta is not bad ."),
    [0, 0.5, 0, 0, 2, 0, 0, 0, 0, 0, 1, 0],
  )
  np.testing.assert_array_equal(
    synthetic.token_rewards(p, "it is not very great and awful . i hate the phone ."),
    [0, 0, 0, 0, -4, 0, -2, 0, 0, -2, 0, -0.5, 0],
  )
  # Defined on anything a model might write; no topic in the prompt, no topic terms.
  assert synthetic.reward("hello", "zzz good <unk> pasta") == 1.0


def test_tokenizer_protocol():
  tok = synthetic.SyntheticTokenizer()
  assert len({tok.pad_id, tok.bos_id, tok.eos_id}) == 3
  text = "tell me about the pasta . the sauce is very good ."
  ids = tok.encode(text)
  assert len(ids) == len(text.split()) and max(ids) < tok.vocab_size
  assert tok.decode(ids) == text
  assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id]) == text
  assert tok.encode("qwerty") == [tok.unk_id]
  chat = tok.apply_chat_template(
    [{"role": "user", "content": "describe the cake ."}], add_generation_prompt=True
  )
  assert chat == "<user> describe the cake . <assistant>"
  assert tok.unk_id not in tok.encode(chat)
  # Every word the generator can produce is in the vocabulary.
  for i in range(200):
    rng = synthetic.example_rng(0, "train", i)
    prompt = synthetic.sample_prompt(rng)
    assert tok.unk_id not in tok.encode(prompt + " " + synthetic.sample_response(prompt, rng))


def _bt_z(exs, temperature, length_bias, noise):
  """z statistic of 'the higher-reward response was chosen' against its BT probability."""
  rc = np.array([e["reward_chosen"] for e in exs], np.float64)
  rr = np.array([e["reward_rejected"] for e in exs], np.float64)
  lc = np.array([len(e["chosen"].split()) for e in exs])
  lr = np.array([len(e["rejected"].split()) for e in exs])
  keep = rc != rr  # the order of a tie carries no information; the filter ignores labels
  hi_c = rc > rr
  r_hi, r_lo = np.where(hi_c, rc, rr)[keep], np.where(hi_c, rr, rc)[keep]
  l_hi, l_lo = np.where(hi_c, lc, lr)[keep], np.where(hi_c, lr, lc)[keep]
  # Written out independently of synthetic.preference_probability.
  q = 1 / (1 + np.exp(-((r_hi - r_lo) + length_bias * (l_hi - l_lo)) / temperature))
  p = (1 - noise) * q + noise * (1 - q)
  x = hi_c[keep].astype(np.float64)
  return (x.sum() - p.sum()) / math.sqrt((p * (1 - p)).sum()), keep.sum()


@pytest.mark.parametrize("temperature,noise,length_bias", [(2.0, 0.1, 0.0), (1.0, 0.0, 0.3)])
def test_preference_rate_matches_bradley_terry(tmp_path, temperature, noise, length_bias):
  kw = dict(
    seed=3,
    num_sft=1,
    num_train=3000,
    num_test=1,
    temperature=temperature,
    label_noise=noise,
    length_bias=length_bias,
  )
  b = tfds_builders.synthetic_builder(str(tmp_path), **kw)
  exs = _examples(b, "train")
  z, n = _bt_z(exs, temperature, length_bias, noise)
  assert n > 2000
  assert abs(z) < 4.0, f"empirical preference rate is {z:.1f} sd from Bradley-Terry"
  # The test has power: the labels are far from a wrong annotator model.
  z_wrong, _ = _bt_z(exs, temperature * 3, 0.0, 0.0)
  assert abs(z_wrong) > 6.0
  for e in exs:  # the stored probability is the annotator's for the choice it made
    p = synthetic.preference_probability(
      e["reward_chosen"],
      e["reward_rejected"],
      len(e["chosen"].split()),
      len(e["rejected"].split()),
      temperature,
      length_bias,
      noise,
    )
    assert e["label_probability"] == pytest.approx(p, rel=1e-5)


def test_pairs_from_model_samples(tmp_path):
  tok = synthetic.SyntheticTokenizer()
  path = str(tmp_path / "samples.jsonl")
  prompts = ["tell me about the pasta .", "review the phone ."]
  responses = [
    ["the pasta is good .", "the pasta is awful .", "i love the sauce ."],
    ["the phone is great .", "the phone is great .", "", "i hate the screen ."],
  ]
  samples_file.write_samples_file(path, prompts, responses, extra={"step": 100})
  # The same rows again as token ids, the way a sampler writes them.
  with open(path, "a") as f:
    ids_prompt = [tok.bos_id] + tok.encode(prompts[0])
    ids_resp = [tok.encode(r) + [tok.eos_id, tok.pad_id, tok.pad_id] for r in responses[0]]
    f.write(json.dumps({"prompt_ids": ids_prompt, "response_ids": ids_resp}) + "\n")
    f.write("{not json\n")
    f.write(json.dumps({"prompt": "describe the cake ."}) + "\n")
  b = tfds_builders.synthetic_builder(str(tmp_path / "d"), seed=0, samples_path=path)
  exs = _examples(b, "train")
  # line 1: pair (0,1) kept, response 2 unpaired; line 2: (0,1) identical, (2,3) has an empty
  # one; line 3 as line 1; line 4 undecodable; line 5 prompt only.
  assert len(exs) == 2
  for e in exs:
    assert e["prompt"] == prompts[0]
    assert {e["chosen"], e["rejected"]} == set(responses[0][:2])
    assert e["reward_chosen"] == synthetic.reward(e["prompt"], e["chosen"])
  rep = tfds_builders.build_report(b, "train")
  assert rep["rows_read"] == 6 and rep["rows_kept"] == 2
  assert rep["bad_rows"] == {
    report_lib.IDENTICAL_RESPONSES: 1,
    report_lib.EMPTY_RESPONSE: 1,
    report_lib.UNDECODABLE_LINE: 1,
    report_lib.PROMPT_ONLY: 1,
  }
  assert rep["notes"] == {"unpaired_responses": 2}
  # 'all' pairing: 3 pairs from each 3-response line, and 4 + 2 candidate pairs on line 2.
  b_all = tfds_builders.synthetic_builder(
    str(tmp_path / "e"), seed=0, samples_path=path, pairing="all"
  )
  rep = tfds_builders.build_report(b_all, "train")
  assert rep["rows_kept"] == 3 + 2 + 3
  assert rep["bad_rows"][report_lib.EMPTY_RESPONSE] == 3


def test_pairs_with_given_labels_keep_the_callers_order(tmp_path):
  path = str(tmp_path / "given.jsonl")
  prompts = ["tell me about the pasta .", "review the phone .", "describe the cake ."]
  # The caller (DICE's implicit reward) decided: first chosen, second rejected, even
  # where the true reward disagrees (second row).
  responses = [
    ["the pasta is good .", "the pasta is awful ."],
    ["the phone is awful .", "the phone is great ."],
    ["the cake is good .", "the cake is fine .", "it is dull ."],
  ]
  samples_file.write_samples_file(path, prompts, responses)
  b = tfds_builders.synthetic_builder(
    str(tmp_path / "d"), seed=0, samples_path=path, labels="given"
  )
  exs = _examples(b, "train")
  assert [(e["chosen"], e["rejected"]) for e in exs] == [tuple(r) for r in responses[:2]]
  assert all(math.isnan(e["label_probability"]) for e in exs)
  assert exs[1]["reward_chosen"] < exs[1]["reward_rejected"]
  rep = tfds_builders.build_report(b, "train")
  assert rep["rows_read"] == 3 and rep["rows_kept"] == 2
  assert rep["bad_rows"] == {report_lib.MISSING_FIELD: 1}  # three responses: not a pair
  with pytest.raises(ValueError, match="labels must be one of"):
    tfds_builders.synthetic_config(labels="oracle")


def test_default_sized_config_is_accepted(tmp_path):
  # A hash-named config with default fields must not clash with the registered one.
  cfg = tfds_builders.synthetic_config()
  b = tfds_builders.SyntheticPreferences(
    config=cfg, data_dir=str(tmp_path), file_format=tfds_builders.FILE_FORMAT
  )
  assert b.builder_config.name == cfg.name != "default"
  assert not b.is_prepared()


def test_responses_follow_the_prompt_domain():
  # Something for a model to learn from the prompt: most nouns are of the topic's domain.
  same = total = 0
  for i in range(300):
    rng = synthetic.example_rng(0, "train", i)
    prompt = synthetic.sample_prompt(rng)
    dom = synthetic.prompt_domain(prompt)
    nouns = [
      w for w in synthetic.sample_response(prompt, rng).split() if w in synthetic.NOUN_DOMAIN
    ]
    same += sum(synthetic.NOUN_DOMAIN[w] == dom for w in nouns)
    total += len(nouns)
  assert 0.85 < same / total < 0.95


# -- the second task: sentiment that depends on the prompt's domain ----------------------------

SENTIMENT = (list(synthetic.POSITIVE_ADJ) + list(synthetic.NEGATIVE_ADJ) +
             list(synthetic.POSITIVE_VERB) + list(synthetic.NEGATIVE_VERB))
TOPIC_OF = {d: v["topics"][0] for d, v in synthetic.DOMAINS.items()}


def _sentiment_response(word):
  return f"it is {word} ." if word in synthetic.VALENCE else f"i {word} it ."


def test_each_domain_flips_half_of_each_lexicon_and_signs_average_to_zero():
  for lexicon in (synthetic.POSITIVE_ADJ, synthetic.NEGATIVE_ADJ, synthetic.POSITIVE_VERB,
                  synthetic.NEGATIVE_VERB):
    for d in synthetic.DOMAINS:
      flipped = [w for w in lexicon if synthetic.DOMAIN_SIGN[d][w] < 0]
      assert len(flipped) == len(lexicon) // 2, (d, flipped)
  for w in SENTIMENT:
    assert sum(synthetic.DOMAIN_SIGN[d][w] for d in synthetic.DOMAINS) == 0.0, w
  # Two domains that pair up as opposites: food and film.
  assert all(synthetic.DOMAIN_SIGN["food"][w] == -synthetic.DOMAIN_SIGN["film"][w]
             for w in SENTIMENT)


@pytest.mark.parametrize("s", [0.0, 0.3, 1.0])
def test_prompt_specificity_scales_each_sentiment_word_by_its_domain_sign(s):
  for d, topic in TOPIC_OF.items():
    prompt = f"tell me about the {topic} ."
    for w in SENTIMENT:
      base = synthetic.reward(prompt, _sentiment_response(w))
      got = synthetic.reward(prompt, _sentiment_response(w), prompt_specificity=s)
      assert got == pytest.approx(base * ((1 - s) + s * synthetic.DOMAIN_SIGN[d][w])), (d, w)
    # Modifiers act on the domain's valence: "not very w" negates twice the word's score.
    assert synthetic.reward(prompt, "it is not very great .", s) == pytest.approx(
        -2 * synthetic.reward(prompt, "it is great .", s))
  # Topic bonus and off-domain penalty do not depend on the knob.
  assert synthetic.reward("tell me about the pasta .", "the pasta has the plot .", 1.0) == 0.0


def test_at_full_specificity_a_response_that_ignores_the_prompt_gains_nothing():
  # The same sentiment response under every domain's prompt: mean reward 0 at s = 1,
  # its own valence at s = 0.
  for w in SENTIMENT:
    r = [synthetic.reward(f"tell me about the {t} .", _sentiment_response(w), 1.0)
         for t in TOPIC_OF.values()]
    assert np.mean(r) == 0.0 and max(r) > 0.0, w


def test_the_second_task_is_its_own_dataset_and_labels_by_its_reward(tmp_path):
  base = tfds_builders.synthetic_config(seed=0, num_sft=8, num_train=64, num_test=8)
  same = tfds_builders.synthetic_config(seed=0, num_sft=8, num_train=64, num_test=8,
                                        prompt_specificity=0.0)
  other = tfds_builders.synthetic_config(seed=0, num_sft=8, num_train=64, num_test=8,
                                         prompt_specificity=1.0)
  assert base.name == same.name != other.name
  with pytest.raises(ValueError, match="prompt_specificity must be in"):
    tfds_builders.synthetic_config(seed=0, prompt_specificity=1.5)
  builder = tfds_builders.synthetic_builder(str(tmp_path), seed=0, num_sft=8, num_train=64,
                                            num_test=8, prompt_specificity=1.0)
  assert builder.builder_config.name == other.name
  exs = _examples(builder, "train")
  assert len(exs) == 64
  for ex in exs:
    for side in ("chosen", "rejected"):
      assert ex[f"reward_{side}"] == pytest.approx(
          synthetic.reward(ex["prompt"], ex[side], 1.0), abs=1e-5)
  # The annotator follows the task's reward: the chosen one is better more often than not.
  assert np.mean([e["reward_chosen"] > e["reward_rejected"] for e in exs]) > 0.6
