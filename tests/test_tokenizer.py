"""Tokenizers: the built-in byte tokenizer, and tokenizer.json checked against transformers."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jinja2
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from midpo.models import get_config
from midpo.models.tokenizer import (ByteTokenizer, HFTokenizer, Tokenizer, TokenizerError,
                                    check_fits, load_tokenizer)

SPECIALS = ["<|begin_of_text|>", "<|eot_id|>", "<|pad|>", "<|start_header_id|>",
            "<|end_header_id|>"]

# Llama-3 style, with the constructs templates in the wild use: raise_exception,
# loop controls, namespace, tojson, whitespace control and {% generation %}.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(turns=0) %}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}{% endif %}"
    "{% if message['role'] == 'system' and not loop.first %}{% continue %}{% endif %}"
    "{% set ns.turns = ns.turns + 1 %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim }}"
    "<|eot_id|>{% endgeneration %}"
    "{% else %}{{ message['content'] | trim }}<|eot_id|>{% endif %}\n"
    "{%- if message.get('meta') %}{{ message['meta'] | tojson }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")

CONVERSATIONS = [
    [{"role": "user", "content": "Hello there! Café ☕?"}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "  What is DPO?  "},
     {"role": "assistant", "content": "Preference optimisation.", "meta": {"q": "é\"x"}},
     {"role": "user", "content": "Thanks"}],
]
TEXTS = ["Hello there! Café ☕?", "  leading spaces and\nnewlines\t",
         "<|eot_id|> inside text", ""]


def _build_tokenizer_dir(path, *, vocab_size=300, template=LLAMA3_TEMPLATE, jinja_file=False):
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  corpus = ["hello there preference optimisation direct policy café"] * 50 + TEXTS
  tok.train_from_iterator(corpus, trainer)
  bos = tok.token_to_id("<|begin_of_text|>")
  tok.post_processor = processors.TemplateProcessing(
      single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
      special_tokens=[("<|begin_of_text|>", bos)])
  os.makedirs(path, exist_ok=True)
  tok.save(os.path.join(path, "tokenizer.json"))
  config = {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "bos_token": "<|begin_of_text|>",
      # A serialised AddedToken, as many checkpoints store it.
      "eos_token": {"content": "<|eot_id|>", "lstrip": False, "normalized": False,
                    "rstrip": False, "single_word": False, "__type": "AddedToken"},
      "pad_token": "<|pad|>",
  }
  if jinja_file:
    with open(os.path.join(path, "chat_template.jinja"), "w") as f:
      f.write(template)
  else:
    config["chat_template"] = template
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump(config, f)
  return path


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  return _build_tokenizer_dir(str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def hf_reference(tok_dir):
  import transformers
  return transformers.AutoTokenizer.from_pretrained(tok_dir)


def test_byte_tokenizer():
  tok = load_tokenizer("byte")
  assert isinstance(tok, Tokenizer) and isinstance(tok, ByteTokenizer)
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 256, 257, 258)
  text = "Héllo ☕ world\n"
  ids = tok.encode(text)
  assert ids == list(text.encode("utf-8")) and max(ids) < 256
  assert tok.encode(text, add_special_tokens=True) == [257] + ids
  assert tok.decode(ids + [tok.eos_id, tok.pad_id]) == text
  assert tok.decode([tok.bos_id] + ids, skip_special_tokens=False) == "<s>" + text
  with pytest.raises(TokenizerError, match="outside the byte tokenizer"):
    tok.decode([300])
  chat = tok.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=True)
  assert chat == "<|user|>\nHello there! Café ☕?\n<|assistant|>\n"
  check_fits(tok, get_config("tiny").vocab_size)


def test_encode_decode_match_transformers(tok_dir, hf_reference):
  tok = load_tokenizer(tok_dir)
  assert isinstance(tok, Tokenizer) and isinstance(tok, HFTokenizer)
  for text in TEXTS:
    assert tok.encode(text) == hf_reference.encode(text, add_special_tokens=False), text
    assert tok.encode(text, add_special_tokens=True) == hf_reference.encode(text), text
    ids = hf_reference.encode(text)
    assert tok.decode(ids) == hf_reference.decode(ids, skip_special_tokens=True)
    assert tok.decode(ids, skip_special_tokens=False) == hf_reference.decode(ids)
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (
      hf_reference.bos_token_id, hf_reference.eos_token_id, hf_reference.pad_token_id)
  assert tok.eos_id == 1 and tok.vocab_size == len(hf_reference)


@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_renders_as_transformers(tok_dir, hf_reference, conversation,
                                               add_generation_prompt):
  messages = CONVERSATIONS[conversation]
  tok = load_tokenizer(tok_dir)
  ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
  ref = hf_reference.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                         tokenize=False)
  assert ours == ref
  assert ours.startswith("<|begin_of_text|><|start_header_id|>")
  # Tokenised as transformers tokenises a rendered chat: no extra BOS.
  ref_ids = hf_reference.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                             tokenize=True, return_dict=True)["input_ids"]
  assert tok.encode(ours) == list(ref_ids)


def test_template_errors_and_sources(tmp_path, tok_dir):
  tok = load_tokenizer(tok_dir)
  with pytest.raises(jinja2.exceptions.TemplateError, match="Unknown role: tool"):
    tok.apply_chat_template([{"role": "tool", "content": "x"}])
  with pytest.raises(TypeError, match="list of dicts"):
    tok.apply_chat_template("hello")
  # chat_template.jinja is read as transformers reads it.
  jinja_dir = _build_tokenizer_dir(str(tmp_path / "j"), template="{{ messages[0]['content'] }}!",
                                   jinja_file=True)
  assert load_tokenizer(jinja_dir).apply_chat_template(CONVERSATIONS[0]) == "Hello there! Café ☕?!"
  # No template at all.
  bare = HFTokenizer(tokenizers.Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json")))
  with pytest.raises(TokenizerError, match="no chat_template"):
    bare.apply_chat_template(CONVERSATIONS[0])


def test_tokenizer_that_does_not_fit_the_model(tok_dir):
  # 300 ids against a model with 256 embeddings.
  with pytest.raises(TokenizerError, match=r"vocabulary \(300 ids\) does not fit .*vocab_size 256"):
    load_tokenizer(tok_dir, vocab_size=256)
  load_tokenizer(tok_dir, vocab_size=300)
  with pytest.raises(TokenizerError, match=r"\(259 ids\) does not fit"):
    load_tokenizer("byte", vocab_size=258)


def test_bad_tokenizer_dirs(tmp_path, tok_dir):
  with pytest.raises(TokenizerError, match="No tokenizer.json"):
    load_tokenizer(str(tmp_path))
  with pytest.raises(TokenizerError, match="expected 'byte' or a directory"):
    load_tokenizer("gpt2")
  with pytest.raises(TokenizerError, match=r"eos_token '<\|nope\|>' is not in the tokenizer's vocabulary"):
    HFTokenizer(tokenizers.Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json")),
                eos_token="<|nope|>")
