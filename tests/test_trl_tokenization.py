"""midpo's tokenisation of users' rows equals TRL 1.16's ``DPOTrainer`` preprocessing, token for
token, on text and conversational rows, for Llama-3-, ChatML- (Qwen) and Mistral-style
tokenizers built here (no download). TRL's own ``_prepare_dataset`` runs as the reference."""

import json
import os
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from midpo.data import pipeline, report, tfds_builders
from midpo.models.tokenizer import HFTokenizer

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ m['content'] + eos_token }}{% endif %}"
    "{% endfor %}")

STYLES = {
    # name: (specials, bos, eos, pad, unk, template, metaspace)
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>",
                "<|end_header_id|>"], "<|begin_of_text|>", "<|eot_id|>", None, None,
               LLAMA3_TEMPLATE, False),
    "chatml": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>",
               "<|endoftext|>", None, CHATML_TEMPLATE, False),
    "mistral": (["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>", None, "<unk>",
                MISTRAL_TEMPLATE, True),
}

CORPUS = ["The capital of France is Paris. Answer: yes or no? The answer is no, it is Lyon.",
          "Tell me a story about a cat who sat on the mat; the end. What, I think? About.",
          "Hello there! Café ☕ A cat. No."] * 30

TEXT_ROWS = [
    {"prompt": "Answer: ", "chosen": "yes", "rejected": "no"},  # merges across the boundary
    {"prompt": "The capital of France is", "chosen": " Paris.", "rejected": " Lyon."},
    {"prompt": "Tell me a story", "chosen": " about a cat.", "rejected": " the end"},
    {"prompt": "", "chosen": "Hello there!", "rejected": "Café ☕"},
]
CONV_ROWS = [
    {"prompt": [{"role": "user", "content": "What is the capital of France?"}],
     "chosen": [{"role": "assistant", "content": "Paris."}],
     "rejected": [{"role": "assistant", "content": "Lyon, I think."}]},
    {"prompt": [{"role": "user", "content": "Tell me a story"},
                {"role": "assistant", "content": "About what?"},
                {"role": "user", "content": "A cat."}],
     "chosen": [{"role": "assistant", "content": "The cat sat on the mat."}],
     "rejected": [{"role": "assistant", "content": "No."}]},
]


def _build(path, style):
  specials, bos, eos, pad, unk, template, metaspace = STYLES[style]
  tok = tokenizers.Tokenizer(models.BPE(unk_token=unk, byte_fallback=False))
  if metaspace:
    tok.normalizer = normalizers.Sequence([])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials)
  else:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS, trainer)
  if bos:
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
        special_tokens=[(bos, tok.token_to_id(bos))])
  os.makedirs(path, exist_ok=True)
  tok.save(os.path.join(path, "tokenizer.json"))
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template,
            "eos_token": eos}
  for key, value in (("bos_token", bos), ("pad_token", pad), ("unk_token", unk)):
    if value:
      config[key] = value
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump(config, f)
  return path


def _trl_reference(tok_dir, rows):
  """TRL 1.16's own preprocessing (``DPOTrainer._prepare_dataset``) of ``rows``."""
  hf = transformers.AutoTokenizer.from_pretrained(tok_dir)
  args = trl.DPOConfig(output_dir=os.path.join(tok_dir, "trl"), dataset_num_proc=None,
                       report_to=[], use_cpu=True, bf16=False)
  stub = types.SimpleNamespace(_tokenizer=hf)
  ds = trl.DPOTrainer._prepare_dataset(stub, datasets.Dataset.from_list(rows), hf, args, "train")
  return [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in ds]


def _trl_truncated(tok_dir, rows, max_length):
  """TRL 1.16's rows after its keep_start truncation: ``_prepare_dataset``'s filter, then
  ``DataCollatorForPreference``; ``{row: [(ids, completion mask) chosen, rejected]}``."""
  from trl.trainer.dpo_trainer import DataCollatorForPreference
  hf = transformers.AutoTokenizer.from_pretrained(tok_dir)
  args = trl.DPOConfig(output_dir=os.path.join(tok_dir, "trl"), dataset_num_proc=None,
                       report_to=[], use_cpu=True, bf16=False, max_length=max_length)
  stub = types.SimpleNamespace(_tokenizer=hf)
  rows = [dict(r, row=i) for i, r in enumerate(rows)]
  ds = trl.DPOTrainer._prepare_dataset(stub, datasets.Dataset.from_list(rows), hf, args, "train")
  collate = DataCollatorForPreference(pad_token_id=hf.pad_token_id or hf.eos_token_id,
                                      max_length=max_length, truncation_mode="keep_start")
  out = {}
  for ex in ds:
    b = collate([{k: ex[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}])
    seqs = []
    for side in range(2):
      n = int(b["attention_mask"][side].sum())
      seqs.append((b["input_ids"][side][:n].tolist(), b["completion_mask"][side][:n].tolist()))
    out[ex["row"]] = seqs
  return out


def _midpo(tmp_path, tok_dir, rows, fmt, **data):
  os.makedirs(tmp_path, exist_ok=True)
  path = tmp_path / f"{fmt}.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  c = pipeline.default_config()
  c.update(dict(data_dir=str(tmp_path / "tfds"), source="files", batch_size=1, max_length=256))
  c.files.format = fmt
  c.files.train_files = str(path)
  c.update(data)
  source = pipeline.builder_from_config(c).as_data_source(split="train")
  rep = report.BadRowReport()
  tok = HFTokenizer.from_dir(tok_dir)
  pairs = pipeline.tokenize_split(source, pipeline.shard_indices(len(source), 0, 1), tok, c,
                                  "pairs", rep)
  assert rep.rows_kept == len(rows) or data, rep.to_dict()
  out = [None] * len(rows)
  for k, i in enumerate(pairs.pair_index):
    line = int(tfds_builders.decode_example(source[int(i)])["source"].rsplit(":", 1)[1])
    out[line - 1] = ([*pairs.prefix, *pairs.prompt[k]], list(pairs.chosen[k]),
                     list(pairs.rejected[k]))
  return out


@pytest.mark.parametrize("style", sorted(STYLES))
@pytest.mark.parametrize("fmt", ["trl_standard", "trl_conversational"])
def test_token_for_token_as_trl(tmp_path, style, fmt):
  tok_dir = _build(str(tmp_path / style), style)
  rows = TEXT_ROWS if fmt == "trl_standard" else CONV_ROWS
  theirs = _trl_reference(tok_dir, rows)
  ours = _midpo(tmp_path, tok_dir, rows, fmt)
  for row, (a, b) in enumerate(zip(ours, theirs)):
    assert a == tuple(list(x) for x in b), (style, fmt, row, a, b)


@pytest.mark.parametrize("fmt", ["trl_standard", "trl_conversational"])
def test_keep_start_truncation_as_trl(tmp_path, fmt):
  """``truncation_mode='keep_start'`` and a short ``max_length``: the same rows dropped (prompt
  fills max_length) and the same truncated sequences and completion masks as TRL's."""
  tok_dir = _build(str(tmp_path / "llama3"), "llama3")
  rows = TEXT_ROWS if fmt == "trl_standard" else CONV_ROWS
  max_length = 9 if fmt == "trl_standard" else 30
  theirs = _trl_truncated(tok_dir, rows, max_length)
  ours = _midpo(tmp_path, tok_dir, rows, fmt, max_length=max_length,
                truncation_mode="keep_start")
  kept = {i for i, r in enumerate(ours) if r is not None}
  assert kept == set(theirs) and 0 < len(kept), (kept, set(theirs))
  assert len(kept) < len(rows) or fmt == "trl_standard"  # some row's prompt fills max_length
  for i in kept:
    p, c, r = ours[i]
    for completion, (ids, mask) in zip((c, r), theirs[i]):
      assert p + completion == ids and [0] * len(p) + [1] * len(completion) == mask, (i, fmt)


def test_what_trl_does_that_the_old_pipeline_did_not(tmp_path):
  """The issue's cases, by name: a space-ending prompt splits ':' | 'Ġyes'; a conversational
  completion ends with the template's end of turn, not a second EOS; a text completion that
  already ends with EOS gets no second one; a tokenizer without BOS or pad token works."""
  chatml = _build(str(tmp_path / "chatml"), "chatml")
  llama = _build(str(tmp_path / "llama3"), "llama3")
  tok = HFTokenizer.from_dir(llama)
  assert tok.pad_id == tok.eos_id  # Llama 3 ships no pad token: EOS pads, as in TRL
  rows = [{"prompt": "Answer: ", "chosen": "yes", "rejected": "no<|eot_id|>"}]
  (p, c, r), = _midpo(tmp_path / "a", llama, rows, "trl_standard")
  assert tok.decode(p, skip_special_tokens=False) == "<|begin_of_text|>Answer:"
  assert tok.decode(c, skip_special_tokens=False) == " yes<|eot_id|>"
  assert r.count(tok.eos_id) == 1
  (p, c, r), = _midpo(tmp_path / "b", chatml, CONV_ROWS[:1], "trl_conversational")
  chat = HFTokenizer.from_dir(chatml)
  assert chat.bos_id is None and p[0] != chat.eos_id
  assert chat.decode(c, skip_special_tokens=False) == "Paris.<|im_end|>\n"
