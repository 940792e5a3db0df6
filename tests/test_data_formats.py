"""Users' files in each format (JSONL, JSON, Parquet) load to the expected prompts and responses."""

import json

import jinja2.sandbox
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from midpo.data import formats
from midpo.data import pipeline
from midpo.data import tfds_builders

CHATML = (
  "{% for message in messages %}"
  "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
  "{% endfor %}"
  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ChatByteTokenizer:
  """Bytes as tokens (ids 3..258) with a jinja2 chat template rendered as transformers does."""

  def __init__(self, template: str = CHATML):
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    self._template = env.from_string(template)

  vocab_size, pad_id, bos_id, eos_id = 259, 0, 1, 2

  def encode(self, text, add_special_tokens=False):
    ids = [b + 3 for b in text.encode("utf-8")]
    return [self.bos_id] + ids if add_special_tokens else ids

  def decode(self, ids):
    return bytes(int(i) - 3 for i in ids if int(i) >= 3).decode("utf-8")

  def apply_chat_template(self, messages, add_generation_prompt=False):
    return self._template.render(
      messages=messages,
      add_generation_prompt=add_generation_prompt,
      bos_token="<s>",
      eos_token="</s>",
    )


def _write(path, rows):
  path = str(path)
  if path.endswith(".jsonl"):
    with open(path, "w") as f:
      for r in rows:
        f.write(json.dumps(r) + "\n")
  elif path.endswith(".json"):
    with open(path, "w") as f:
      json.dump(rows, f)
  else:
    pq.write_table(pa.Table.from_pylist(rows), path)
  return path


def _load(tmp_path, fmt, rows, ext=".jsonl", **kw):
  path = _write(tmp_path / f"data{ext}", rows)
  b = tfds_builders.files_builder(str(tmp_path / "tfds"), fmt, [path], **kw)
  src = b.as_data_source(split="train")
  exs = sorted(
    (tfds_builders.decode_example(src[i]) for i in range(len(src))), key=lambda e: e["index"]
  )
  return b, exs


STANDARD = [
  {"prompt": "What is the capital of France?", "chosen": " Paris.", "rejected": " Lyon."},
  {"prompt": "", "chosen": "Hi there", "rejected": "Go away", "extra": 1},
  {"prompt": "Unicode: \u00e9t\u00e9 \u2603", "chosen": "ok \u2603", "rejected": "no"},
]


@pytest.mark.parametrize("ext", [".jsonl", ".json", ".parquet"])
def test_trl_standard_each_file_type(tmp_path, ext):
  rows = [{k: v for k, v in r.items() if k != "extra"} for r in STANDARD]
  b, exs = _load(tmp_path, "trl_standard", rows, ext)
  assert [(e["prompt"], e["chosen"], e["rejected"]) for e in exs] == [
    (r["prompt"], r["chosen"], r["rejected"]) for r in rows
  ]
  assert all(e["kind"] == "text" and np.isnan(e["score_chosen"]) for e in exs)
  assert [e["source"] for e in exs] == [f"data{ext}:{i}" for i in (1, 2, 3)]
  assert tfds_builders.build_report(b, "train")["rows_kept"] == 3


def test_hh_rlhf_shared_prefix(tmp_path):
  turn1 = "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant:"
  rows = [
    # The two answers share their first words: the prompt still ends at the Assistant marker.
    {"chosen": turn1 + " It is 6.", "rejected": turn1 + " It is 7, I think."},
    {
      "chosen": "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?",
      "rejected": "\n\nHuman: Hi\n\nAssistant: What?",
    },
  ]
  _, exs = _load(tmp_path, "hh_rlhf", rows)
  assert exs[0]["prompt"] == turn1
  assert (exs[0]["chosen"], exs[0]["rejected"]) == (" It is 6.", " It is 7, I think.")
  assert exs[1]["prompt"] == "\n\nHuman: Hi\n\nAssistant:"
  assert (exs[1]["chosen"], exs[1]["rejected"]) == (" Hello! How can I help?", " What?")


def test_hh_split_function():
  head = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:"
  p, c, r = formats.split_hh_transcripts(head + " d", head + " e")
  assert (p, c, r) == (head, " d", " e")


def _msgs(*pairs):
  return [{"role": role, "content": content} for role, content in pairs]


@pytest.mark.parametrize("tokenization", ["auto", "separate"])
def test_trl_conversational_rendered_through_chat_template(tmp_path, tokenization):
  rows = [
    {
      "prompt": _msgs(("system", "Be brief."), ("user", "Capital of France?")),
      "chosen": _msgs(("assistant", "Paris.")),
      "rejected": _msgs(("assistant", "Rome.")),
    },
    # Implicit prompt: whole conversations, the shared messages are the prompt.
    {
      "chosen": _msgs(("user", "Hi"), ("assistant", "Hello!")),
      "rejected": _msgs(("user", "Hi"), ("assistant", "Bye.")),
    },
  ]
  _, exs = _load(tmp_path, "trl_conversational", rows)
  assert all(e["kind"] == "messages" for e in exs)
  assert json.loads(exs[1]["prompt"]) == _msgs(("user", "Hi"))
  assert json.loads(exs[1]["chosen"]) == _msgs(("assistant", "Hello!"))

  c = pipeline.default_config()
  c.data_dir = str(tmp_path / "tfds")
  c.source = "files"
  c.files.format = "trl_conversational"
  c.files.train_files = [str(tmp_path / "data.jsonl")]
  c.batch_size = 2
  c.shuffle = False
  c.bucket_window = 0
  c.max_length = 160
  c.tokenization = tokenization
  tok = ChatByteTokenizer()
  it = pipeline.make_iterator(c, tok, "train", str(tmp_path / "work"))
  batch = next(it)
  assert batch["tokens"].shape == (2, 2, 160)  # pair-major
  rows_text = {}
  separate = tokenization == "separate"
  for row in range(4):  # row = side * 2 + pair
    at = (row % 2, row // 2)
    toks, resp = batch["tokens"][at], batch["response_mask"][at].astype(bool)
    real = batch["attention_mask"][at].astype(bool)
    # 'separate' adds BOS and EOS; TRL's way ('auto' on files) takes the template's tokens only.
    assert (toks[0] == tok.bos_id) == separate
    assert (toks[resp][-1] == tok.eos_id) == separate
    rows_text[row] = (tok.decode(toks[real & ~resp][int(separate):]),
                      tok.decode(toks[resp][:-1] if separate else toks[resp]))
  k = {int(p): j for j, p in enumerate(batch["pair_index"])}
  sys_prompt = (
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCapital of "
    "France?<|im_end|>\n<|im_start|>assistant\n"
  )
  assert rows_text[k[0]] == (sys_prompt, "Paris.<|im_end|>\n")
  assert rows_text[k[0] + 2] == (sys_prompt, "Rome.<|im_end|>\n")
  hi = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
  assert rows_text[k[1]] == (hi, "Hello!<|im_end|>\n")
  assert rows_text[k[1] + 2] == (hi, "Bye.<|im_end|>\n")


def test_ultrafeedback_binarized_keeps_scores(tmp_path):
  rows = [
    {
      "prompt": "Name a colour.",
      "prompt_id": "x1",
      "chosen": _msgs(("user", "Name a colour."), ("assistant", "Blue.")),
      "rejected": _msgs(("user", "Name a colour."), ("assistant", "Seven.")),
      "messages": _msgs(("user", "Name a colour."), ("assistant", "Blue.")),
      "score_chosen": 9.0,
      "score_rejected": 2.5,
    },
    {
      "prompt": "Say hi.",
      "chosen": _msgs(("user", "Say hi."), ("assistant", "Hi!")),
      "rejected": _msgs(("user", "Say hi."), ("assistant", "No.")),
      "score_chosen": 8.0,
      "score_rejected": 8.0,
    },
  ]
  b, exs = _load(tmp_path, "ultrafeedback", rows, ".parquet")
  assert json.loads(exs[0]["prompt"]) == _msgs(("user", "Name a colour."))
  assert json.loads(exs[0]["chosen"]) == _msgs(("assistant", "Blue."))
  assert json.loads(exs[0]["rejected"]) == _msgs(("assistant", "Seven."))
  assert (exs[0]["score_chosen"], exs[0]["score_rejected"]) == (9.0, 2.5)
  assert (exs[1]["score_chosen"], exs[1]["score_rejected"]) == (8.0, 8.0)

  c = pipeline.default_config()
  c.update(dict(data_dir=str(tmp_path / "tfds"), source="files", batch_size=2, shuffle=False))
  c.files.format = "ultrafeedback"
  c.files.train_files = [str(tmp_path / "data.parquet")]
  batch = next(pipeline.make_iterator(c, ChatByteTokenizer(), "train", None))
  order = list(batch["pair_index"])
  np.testing.assert_array_equal(
    batch["score"], [[[9.0, 8.0][i], [2.5, 8.0][i]] for i in order]
  )
