"""Tokenizers behind one small protocol.

    tok = load_tokenizer("byte")                       # built in, needs no files
    tok = load_tokenizer("/path/to/ckpt", vocab_size=model.config.vocab_size)
    ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))

`encode` adds no special tokens unless asked (`add_special_tokens=True`),
because rendered chat templates already carry the ones they need, exactly as
transformers' `apply_chat_template(..., tokenize=True)` does.

`HFTokenizer` reads any `tokenizer.json` through the `tokenizers` library, the
BOS/EOS/pad tokens and chat template from `tokenizer_config.json` (or
`chat_template.jinja`), and renders templates the way transformers does
(sandboxed jinja2, trim_blocks, lstrip_blocks, loop controls, `tojson`,
`raise_exception`, `strftime_now`, `{% generation %}` blocks).
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any, Iterable, Protocol, runtime_checkable

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers


@runtime_checkable
class Tokenizer(Protocol):
  """What the rest of midpo codes against."""

  @property
  def vocab_size(self) -> int: ...  # 1 + the largest id the tokenizer can emit.

  @property
  def bos_id(self) -> int | None: ...

  @property
  def eos_id(self) -> int | None: ...

  @property
  def pad_id(self) -> int | None: ...

  @property
  def unk_id(self) -> int | None: ...  # None: the tokenizer has no unknown token.

  def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]: ...

  def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str: ...

  def apply_chat_template(self, messages: list[dict[str, Any]],
                          add_generation_prompt: bool = False) -> str: ...


class TokenizerError(ValueError):
  """A tokenizer that cannot be loaded or does not fit the model."""


# ---------------------------------------------------------------------------
# Chat templates, rendered as transformers renders them
# ---------------------------------------------------------------------------


class _GenerationBlock(jinja2.ext.Extension):
  """`{% generation %}...{% endgeneration %}` (assistant-mask markers): renders the body."""

  tags = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

  def _render(self, caller):
    return caller()


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def compile_chat_template(template: str) -> jinja2.Template:
  """A tokenizer_config.json chat template, compiled in a sandbox as
  transformers renders it (its filters and globals)."""
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True,
      extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env.from_string(template)


def _check_messages(messages):
  if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
    raise TypeError(f"messages must be a list of dicts with 'role' and 'content', got {messages!r}.")


# ---------------------------------------------------------------------------
# Built-in byte-level tokenizer
# ---------------------------------------------------------------------------

# A plain-text chat format for models trained from scratch with byte tokens.
BYTE_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


class ByteTokenizer:
  """UTF-8 bytes are ids 0-255; pad 256, BOS 257, EOS 258; vocab_size 259."""

  PAD, BOS, EOS = 256, 257, 258

  def __init__(self):
    self._template = compile_chat_template(BYTE_CHAT_TEMPLATE)

  vocab_size = property(lambda self: 259)
  bos_id = property(lambda self: self.BOS)
  eos_id = property(lambda self: self.EOS)
  pad_id = property(lambda self: self.PAD)
  unk_id = property(lambda self: None)  # every text has bytes

  def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
    ids = list(text.encode("utf-8"))
    return [self.BOS] + ids if add_special_tokens else ids

  def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
    out = bytearray()
    for i in ids:
      i = int(i)
      if 0 <= i < 256:
        out.append(i)
      elif i in (self.PAD, self.BOS, self.EOS):
        if not skip_special_tokens:
          out.extend({self.PAD: b"<pad>", self.BOS: b"<s>", self.EOS: b"</s>"}[i])
      else:
        raise TokenizerError(f"Token id {i} is outside the byte tokenizer's vocabulary (0-258).")
    return out.decode("utf-8", errors="replace")

  def apply_chat_template(self, messages, add_generation_prompt: bool = False) -> str:
    _check_messages(messages)
    return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt)


# ---------------------------------------------------------------------------
# tokenizer.json through the `tokenizers` library
# ---------------------------------------------------------------------------


def _token_content(value) -> str | None:
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, dict) and "content" in value:  # A serialised AddedToken.
    return value["content"]
  raise TokenizerError(f"Cannot read special token {value!r}.")


class HFTokenizer:
  """A `tokenizers.Tokenizer` with special tokens and a chat template."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, *, bos_token: str | None = None,
               eos_token: str | None = None, pad_token: str | None = None,
               unk_token: str | None = None, chat_template: str | None = None):
    self._tok = tokenizer
    self._special = {k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token),
                                        ("unk_token", unk_token), ("pad_token", pad_token)) if v}
    self._ids = {}
    for key, token in self._special.items():
      token_id = tokenizer.token_to_id(token)
      if token_id is None:
        raise TokenizerError(f"{key} {token!r} is not in the tokenizer's vocabulary.")
      self._ids[key] = token_id
    self.chat_template = chat_template
    self._template = compile_chat_template(chat_template) if chat_template else None
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    self._vocab_size = max(vocab.values()) + 1 if vocab else 0

  @classmethod
  def from_dir(cls, path: str) -> "HFTokenizer":
    tok_path = os.path.join(path, "tokenizer.json")
    if not os.path.exists(tok_path):
      raise TokenizerError(
          f"No tokenizer.json in {path}; only fast (tokenizer.json) tokenizers are supported.")
    tokenizer = tokenizers.Tokenizer.from_file(tok_path)
    cfg: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # The latter wins.
      p = os.path.join(path, name)
      if os.path.exists(p):
        with open(p) as f:
          cfg.update({k: v for k, v in json.load(f).items() if v is not None})
    template = cfg.get("chat_template")
    if isinstance(template, list):  # Named templates: use 'default'.
      named = {t["name"]: t["template"] for t in template}
      if "default" not in named:
        raise TokenizerError(f"tokenizer_config.json has chat templates {sorted(named)}, no 'default'.")
      template = named["default"]
    jinja_path = os.path.join(path, "chat_template.jinja")
    if os.path.exists(jinja_path):
      with open(jinja_path) as f:
        template = f.read()
    return cls(tokenizer, bos_token=_token_content(cfg.get("bos_token")),
               eos_token=_token_content(cfg.get("eos_token")),
               pad_token=_token_content(cfg.get("pad_token")),
               unk_token=_token_content(cfg.get("unk_token")), chat_template=template)

  vocab_size = property(lambda self: self._vocab_size)
  bos_id = property(lambda self: self._ids.get("bos_token"))
  eos_id = property(lambda self: self._ids.get("eos_token"))
  # No pad token (Llama 3 ships none): the EOS, as TRL and transformers' collators fall back.
  pad_id = property(lambda self: self._ids.get("pad_token", self._ids.get("eos_token")))
  unk_id = property(lambda self: self._ids.get("unk_token"))

  def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
    return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

  def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, messages, add_generation_prompt: bool = False) -> str:
    if self._template is None:
      raise TokenizerError("This tokenizer has no chat_template (tokenizer_config.json).")
    _check_messages(messages)
    return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                 tools=None, documents=None, **self._special)


# ---------------------------------------------------------------------------


def check_fits(tokenizer: Tokenizer, vocab_size: int) -> None:
  """Raises TokenizerError if the tokenizer can emit ids >= the model's vocab."""
  if tokenizer.vocab_size > vocab_size:
    raise TokenizerError(
        f"Tokenizer vocabulary ({tokenizer.vocab_size} ids) does not fit the model's "
        f"vocab_size {vocab_size}: wrong tokenizer for this checkpoint?")
  for name in ("bos_id", "eos_id", "pad_id"):
    i = getattr(tokenizer, name)
    if i is not None and not 0 <= i < vocab_size:
      raise TokenizerError(f"Tokenizer {name}={i} is outside the model's vocab_size {vocab_size}.")


def load_tokenizer(spec: str, *, vocab_size: int | None = None) -> Tokenizer:
  """'byte' for the built-in tokenizer, or a directory with tokenizer.json.
  With `vocab_size`, checks that the tokenizer fits the model."""
  if spec == "byte":
    tok: Tokenizer = ByteTokenizer()
  elif os.path.isdir(spec):
    tok = HFTokenizer.from_dir(spec)
  else:
    raise TokenizerError(f"Tokenizer {spec!r}: expected 'byte' or a directory with tokenizer.json.")
  if vocab_size is not None:
    check_fits(tok, vocab_size)
  return tok
