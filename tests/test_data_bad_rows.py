"""Every kind of bad row is counted by reason in data_report.json; 'fatal' stops at the first."""

import json

import pytest

from midpo.data import pipeline
from midpo.data import report as report_lib
from midpo.data import tfds_builders


class ByteTokenizer:
  """Bytes as tokens; the chat template can be made inconsistent on purpose."""

  vocab_size, pad_id, bos_id, eos_id = 259, 0, 1, 2

  def __init__(self, consistent=True):
    self.consistent = consistent

  def encode(self, text, add_special_tokens=False):
    ids = [b + 3 for b in text.encode("utf-8")]
    return [self.bos_id] + ids if add_special_tokens else ids

  def decode(self, ids):
    return bytes(int(i) - 3 for i in ids if int(i) >= 3).decode("utf-8")

  def apply_chat_template(self, messages, add_generation_prompt=False):
    # An inconsistent template: a different header when an assistant reply is rendered.
    head = "[A]" if self.consistent else "[Assistant]"
    out = "".join(
      f"[{m['role'][0].upper()}]{m['content']}"
      if m["role"] != "assistant"
      else f"{head}{m['content']}"
      for m in messages
    )
    return out + ("[A]" if add_generation_prompt else "")


def _config(tmp_path, fmt, path, **kw):
  c = pipeline.default_config()
  c.update(dict(data_dir=str(tmp_path / "tfds"), source="files", batch_size=1, max_length=48))
  c.files.format = fmt
  c.files.train_files = [path]
  c.update(kw)
  return c


STANDARD_LINES = [
  b'{"prompt": "p1", "chosen": "good", "rejected": "bad"}',  # 1 ok
  b'{"prompt": "p2", "chosen": "a", ',  # 2 undecodable (JSON)
  b'{"prompt": "p3", "chosen": "\xff\xfe", "rejected": "b"}',  # 3 undecodable (UTF-8)
  b'{"prompt": "p4", "chosen": "a"}',  # 4 missing field
  b'{"prompt": "p5", "chosen": 3, "rejected": "b"}',  # 5 non-string field
  b'{"prompt": "p6", "chosen": "  ", "rejected": "b"}',  # 6 empty response
  b'{"prompt": "p7", "chosen": "same", "rejected": "same"}',  # 7 identical
  b'{"prompt": "p8"}',  # 8 prompt only
  b'{"prompt": "p9", "chosen": "' + b"x" * 60 + b'", "rejected": "b"}',  # 9 over length (tok.)
  b"",  # 10 blank: a note, not a row
  b'["p11", "a", "b"]',  # 11 undecodable (not an object)
  b'{"prompt": null, "chosen": "a", "rejected": "b"}',  # 12 missing field (null)
  b'{"prompt": "' + b"q" * 60 + b'", "chosen": "fine", "rejected": "worse"}',  # 13 ok, truncated
  b'{"prompt": "p14", "chosen": "c", "rejected": "r"}',  # 14 ok
]


def test_every_bad_row_counted_in_data_report(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_bytes(b"\n".join(STANDARD_LINES) + b"\n")
  c = _config(tmp_path, "trl_standard", str(path))
  it = pipeline.make_iterator(c, ByteTokenizer(), "train", str(tmp_path / "work"))
  rep = json.loads((tmp_path / "work" / "data_report.json").read_text())
  build, tok = rep["stages"]["train/build"], rep["stages"]["train/tokenize/pairs"]
  assert build["rows_read"] == 13 and build["rows_kept"] == 4
  assert build["bad_rows"] == {
    "undecodable_line": 3,
    "missing_field": 2,
    "non_string_field": 1,
    "empty_response": 1,
    "identical_responses": 1,
    "prompt_only": 1,
  }
  assert build["notes"] == {"blank_lines": 1}
  assert [(r["file"], r["line"], r["reason"]) for r in build["first_bad_rows"]] == [
    ("bad.jsonl", 2, "undecodable_line"),
    ("bad.jsonl", 3, "undecodable_line"),
    ("bad.jsonl", 4, "missing_field"),
    ("bad.jsonl", 5, "non_string_field"),
    ("bad.jsonl", 6, "empty_response"),
  ]
  assert tok["rows_read"] == 4 and tok["rows_kept"] == 3
  assert tok["bad_rows"] == {"over_length": 1}
  # Named by file and line as the file has them (not the position in the shuffled split).
  assert (tok["first_bad_rows"][0]["file"], tok["first_bad_rows"][0]["line"]) == ("bad.jsonl", 9)
  assert tok["notes"] == {"prompt_truncated": 1}
  assert rep["bad_rows_total"] == {
    "undecodable_line": 3,
    "missing_field": 2,
    "non_string_field": 1,
    "empty_response": 1,
    "identical_responses": 1,
    "prompt_only": 1,
    "over_length": 1,
  }
  # Nothing lost: 13 rows = 3 in batches + 10 counted.
  assert rep["batches"]["train/pairs"]["pairs"] == 3 and len(it.pairs) == 3
  # The truncated prompt kept its end (left truncation), the response is whole.
  k = next(j for j, p in enumerate(it.pairs.prompt) if len(p) > 20)
  tk = ByteTokenizer()
  assert tk.decode(it.pairs.prompt[k]) == "q" * (48 - 1 - len("worse") - 1)
  assert tk.decode(it.pairs.chosen[k][:-1]) == "fine"


def test_truncate_responses_switch(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_bytes(b"\n".join(STANDARD_LINES) + b"\n")
  c = _config(tmp_path, "trl_standard", str(path), truncate_responses=True, max_prompt_length=8)
  it = pipeline.make_iterator(c, ByteTokenizer(), "train", str(tmp_path / "work"))
  tok = json.loads((tmp_path / "work" / "data_report.json").read_text())["stages"][
    "train/tokenize/pairs"
  ]
  assert tok["rows_kept"] == 4 and tok["bad_rows"] == {}
  assert tok["notes"] == {"response_truncated": 1, "prompt_truncated": 1}
  k = [len(x) for x in it.pairs.chosen].index(max(len(x) for x in it.pairs.chosen))
  # BOS (from the tokenizer, as TRL) + "p9", never cut; the response cut to fit.
  assert list(it.pairs.prompt[k]) == [1] + ByteTokenizer().encode("p9")
  assert len(it.pairs.chosen[k]) == 48 - 1 - 2


def test_fatal_stops_at_first_bad_row(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_bytes(b"\n".join(STANDARD_LINES) + b"\n")
  c = _config(tmp_path, "trl_standard", str(path), bad_rows="fatal")
  with pytest.raises(report_lib.BadRowError, match=r"bad.jsonl:2: bad row \(undecodable_line\)"):
    pipeline.make_iterator(c, ByteTokenizer(), "train", str(tmp_path / "work"))


def _m(*pairs):
  return [{"role": r, "content": t} for r, t in pairs]


def test_message_format_bad_rows(tmp_path):
  ok = {
    "chosen": _m(("user", "q"), ("assistant", "a")),
    "rejected": _m(("user", "q"), ("assistant", "b")),
    "score_chosen": 5,
    "score_rejected": 1,
  }
  rows = [
    ok,
    {**ok, "score_chosen": "high"},  # non-numeric score
    {**ok, "rejected": _m(("user", "other q"), ("assistant", "b"))},  # prompts differ
    {**ok, "chosen": "just a string"},  # not a message list
    {**ok, "chosen": _m(("user", "q"), ("assistant", 7))},  # content not a string
    {**ok, "chosen": _m(("user", "q"), ("assistant", ""))},  # empty response
    {"prompt": "q"},  # prompt only
    {**ok, "rejected": ok["chosen"]},  # identical
  ]
  path = tmp_path / "uf.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  b = tfds_builders.files_builder(str(tmp_path / "tfds"), "ultrafeedback", [str(path)])
  rep = tfds_builders.build_report(b, "train")
  assert rep["rows_read"] == 8 and rep["rows_kept"] == 1
  assert rep["bad_rows"] == {
    "non_numeric_score": 1,
    "malformed_messages": 2,
    "non_string_field": 1,
    "empty_response": 1,
    "prompt_only": 1,
    "identical_responses": 1,
  }
  # A chat template whose prompt rendering is not a prefix of prompt+response ('separate').
  c = _config(tmp_path, "ultrafeedback", str(path), tokenization="separate")
  with pytest.raises(ValueError, match="fewer than one batch"):
    pipeline.make_iterator(c, ByteTokenizer(consistent=False), "train", str(tmp_path / "w"))
  c.batch_size = 1
  it = pipeline.make_iterator(c, ByteTokenizer(), "train", str(tmp_path / "w"))
  assert len(it.pairs) == 1


def test_template_mismatch_counted(tmp_path):
  rows = [
    {
      "prompt": _m(("user", "q")),
      "chosen": _m(("assistant", "a")),
      "rejected": _m(("assistant", "b")),
    }
  ] * 2
  path = tmp_path / "conv.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  c = _config(tmp_path, "trl_conversational", str(path), tokenization="separate")
  src_builder = pipeline.builder_from_config(c)
  source = src_builder.as_data_source(split="train")
  idx = pipeline.shard_indices(len(source), 0, 1)
  rep = report_lib.BadRowReport()
  pairs = pipeline.tokenize_split(source, idx, ByteTokenizer(consistent=False), c, "pairs", rep)
  assert len(pairs) == 0 and dict(rep.bad_rows) == {"template_mismatch": 2}
  # TRL's way: the completion starts where the token lists diverge; counted, nothing dropped.
  c.tokenization = "trl"
  rep = report_lib.BadRowReport()
  pairs = pipeline.tokenize_split(source, idx, ByteTokenizer(consistent=False), c, "pairs", rep)
  assert len(pairs) == 2 and not rep.bad_rows and rep.notes["prompt_not_a_token_prefix"] == 2
  tok = ByteTokenizer()
  assert tok.decode(pairs.chosen[0]) == "ssistant]a"  # '[A' is shared: '[A]' vs '[Assistant]'


def test_hh_bad_rows(tmp_path):
  rows = [
    {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"},
    {"chosen": "\n\nHuman: a (no reply)", "rejected": "\n\nHuman: a\n\nAssistant: c"},
    {"chosen": "\n\nHuman: x\n\nAssistant: b", "rejected": "\n\nHuman: y\n\nAssistant: c"},
    {"chosen": "\n\nHuman: a\n\nAssistant: b"},
    {"chosen": "\n\nHuman: a\n\nAssistant:", "rejected": "\n\nHuman: a\n\nAssistant: c"},
  ]
  path = tmp_path / "hh.json"
  path.write_text(json.dumps(rows))
  b = tfds_builders.files_builder(str(tmp_path / "tfds"), "hh_rlhf", [str(path)])
  rep = tfds_builders.build_report(b, "train")
  assert rep["rows_kept"] == 1
  assert rep["bad_rows"] == {"malformed_transcript": 2, "missing_field": 1, "empty_response": 1}
  assert [r["line"] for r in rep["first_bad_rows"]] == [2, 3, 4, 5]


def test_tokenizer_that_adds_bos_is_refused(tmp_path):
  class BosTokenizer(ByteTokenizer):
    def encode(self, text, add_special_tokens=False):
      return [self.bos_id] + super().encode(text)

  path = tmp_path / "ok.jsonl"
  path.write_bytes(STANDARD_LINES[0] + b"\n")
  c = _config(tmp_path, "trl_standard", str(path), tokenization="separate")
  with pytest.raises(ValueError, match="add_bos"):
    pipeline.make_iterator(c, BosTokenizer(), "train", None)
