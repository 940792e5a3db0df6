"""TFDS builders: the synthetic known-reward task and users' preference files.

Both are built with ``file_format='array_record'`` and read with ``as_data_source`` (no TensorFlow).
Each build records its bad-row counts (``report.py``) in the dataset's ``metadata.json`` under
``"<split>/build"``; :func:`build_report` reads them back.

``midpo_synthetic`` (:class:`SyntheticPreferences`), configured by :func:`synthetic_config`
(``config.data.synthetic``):

    seed (int, 0)            every example is a function of (seed, split, index)
    num_sft (int)            size of split 'sft': (prompt, best-of-``sft_best_of`` demonstration)
    num_train, num_test      sizes of the preference splits 'train' and 'test'
    temperature (1.0)        Bradley-Terry temperature of the annotator
    label_noise (0.0)        probability that the annotator's choice is flipped, in [0, 0.5]
    length_bias (0.0)        annotator's extra utility per response token (reward units)
    prompt_specificity (0.0) how much a sentiment word's score depends on the prompt's domain
                             (synthetic.py: 0 the 'sentiment' task, 1 the 'domain lexicon' one)
    sft_best_of (4)          demonstrations are the best of this many base responses under r*
    samples_path ('')        a model-samples file (format below); when set the builder makes one
                             split, 'train', of pairs of the model's own responses labelled by the
                             annotator above, and ignores num_*
    pairing ('disjoint')     samples mode: 'disjoint' pairs responses (0,1), (2,3), ... of each
                             prompt (an odd last one is counted as the note 'unpaired_responses');
                             'all' uses every unordered pair
    labels ('annotator')     samples mode: 'annotator' labels each pair with the annotator above;
                             'given' takes each row's responses as [chosen, rejected] as they are
                             (labelled by the caller, e.g. DICE's implicit reward); exactly two
                             responses per row
    bad_rows ('skip'), max_reported (5)   see report.py

Examples: ``prompt``, ``chosen``, ``rejected`` (text; ``rejected`` is empty on 'sft'), ``kind``
('text'), ``source``, ``index`` (position in generation order), ``reward_chosen``,
``reward_rejected`` (r*; NaN for the missing rejected of 'sft'), ``chosen_token_rewards``,
``rejected_token_rewards`` (r_t per response word = per token of ``SyntheticTokenizer``), and
``label_probability`` (the annotator's probability of the choice it made).

The model-samples file (JSONL, one prompt a line; ``midpo.data.samples_file``)::

    {"prompt": "tell me about the pasta .", "responses": ["the pasta is good .", ...]}
    {"prompt_ids": [5, 17, ...], "response_ids": [[9, 40, ..., 2], ...]}

Either text or ``SyntheticTokenizer`` ids (ids: a leading ``<bos>`` is dropped, a response ends at
its first ``<eos>``, ``<pad>`` is dropped). Other keys (e.g. ``"model"``, ``"step"``) are ignored.
A bad line counts as one bad row; otherwise each candidate pair is one row (so an empty response
or two identical responses drop that pair, counted).

``midpo_preference_files`` (:class:`PreferenceFiles`), configured by :func:`files_config`
(``config.data.files``): ``format`` (see ``formats.py``), ``train_files``, ``test_files`` (lists
of .jsonl/.json/.parquet paths), ``bad_rows``, ``max_reported``. Examples: ``prompt``, ``chosen``,
``rejected``, ``kind`` ('text' or 'messages': JSON message lists), ``score_chosen``,
``score_rejected`` (NaN when absent), ``source`` ('file:line'), ``index``.

Config names are derived from a hash of every field (and of the files' contents), so two
different configurations never share a directory under ``data_dir``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
from typing import Any, Iterable, Sequence

import numpy as np
import tensorflow_datasets as tfds

from midpo import files
from midpo.data import formats
from midpo.data import sources
from midpo.data import report as report_lib
from midpo.data import synthetic
from midpo.data.report import BadRow
from midpo.data.samples_file import parse_samples_row

FILE_FORMAT = "array_record"
PAIRINGS = ("disjoint", "all")
LABELS = ("annotator", "given")


def _hash(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def file_sha256(path: str) -> str:
  """The SHA-256 of a file's bytes, hex."""
  h = hashlib.sha256()
  with files.open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _text_feature():
  return tfds.features.Text()


def _float_seq():
  return tfds.features.Tensor(shape=(None,), dtype=np.float32)


# ----------------------------------------------------------------------------------------------
# The synthetic task.


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
  """``midpo_synthetic``'s configuration (see the module docstring)."""
  seed: int = 0
  num_sft: int = 20000
  num_train: int = 20000
  num_test: int = 2000
  temperature: float = 1.0
  label_noise: float = 0.0
  length_bias: float = 0.0
  prompt_specificity: float = 0.0
  sft_best_of: int = 4
  samples_path: str = ""
  samples_sha256: str = ""
  pairing: str = "disjoint"
  labels: str = "annotator"
  bad_rows: str = "skip"
  max_reported: int = 5


_SYNTHETIC_FIELDS = tuple(
  f.name
  for f in dataclasses.fields(SyntheticConfig)
  if f.name not in {f2.name for f2 in dataclasses.fields(tfds.core.BuilderConfig)}
)


def synthetic_config(**kwargs) -> SyntheticConfig:
  """A SyntheticConfig named after a hash of its fields (and of the samples file's bytes)."""
  unknown = set(kwargs) - set(_SYNTHETIC_FIELDS)
  if unknown:
    raise ValueError(
      f"unknown config.data.synthetic fields {sorted(unknown)}; known: {_SYNTHETIC_FIELDS}"
    )
  cfg = SyntheticConfig(name="tmp", **kwargs)
  if cfg.pairing not in PAIRINGS:
    raise ValueError(f"config.data.synthetic.pairing must be one of {PAIRINGS}")
  if cfg.labels not in LABELS:
    raise ValueError(f"config.data.synthetic.labels must be one of {LABELS}")
  if cfg.bad_rows not in report_lib.POLICIES:
    raise ValueError(f"config.data.bad_rows must be one of {report_lib.POLICIES}")
  synthetic.preference_probability(
    0.0, 0.0, 0, 0, cfg.temperature, cfg.length_bias, cfg.label_noise
  )  # validates
  if cfg.sft_best_of < 1:
    raise ValueError("config.data.synthetic.sft_best_of must be >= 1")
  if not 0.0 <= cfg.prompt_specificity <= 1.0:
    raise ValueError("config.data.synthetic.prompt_specificity must be in [0, 1]; got "
                     f"{cfg.prompt_specificity}")
  if cfg.samples_path:
    cfg.samples_path = files.abspath(cfg.samples_path)
    cfg.samples_sha256 = file_sha256(cfg.samples_path)
  fields = {k: getattr(cfg, k) for k in _SYNTHETIC_FIELDS}
  # Where the samples file lives does not change the data; its bytes do.
  fields["samples_path"] = bool(cfg.samples_path)
  fields.pop("bad_rows")
  fields.pop("max_reported")
  if not fields["prompt_specificity"]:  # the first task's datasets keep their names
    fields.pop("prompt_specificity")
  cfg.name = f"s{cfg.seed}_{_hash(fields)[:12]}"
  return cfg


class SyntheticPreferences(tfds.core.GeneratorBasedBuilder):
  """The known-reward synthetic preference task (see synthetic.py)."""

  name = "midpo_synthetic"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}
  # Configs made by synthetic_config() are hash-named and never collide with this one.
  BUILDER_CONFIGS = [SyntheticConfig(name="default")]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description="Synthetic preference task with a known, token-decomposable reward.",
      features=tfds.features.FeaturesDict(
        {
          "prompt": _text_feature(),
          "chosen": _text_feature(),
          "rejected": _text_feature(),
          "kind": _text_feature(),
          "source": _text_feature(),
          "index": np.int64,
          "reward_chosen": np.float32,
          "reward_rejected": np.float32,
          "chosen_token_rewards": _float_seq(),
          "rejected_token_rewards": _float_seq(),
          "label_probability": np.float32,
        }
      ),
      metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.builder_config
    if cfg.samples_path:
      return {"train": self._generate_examples(split="samples")}
    sizes = {"sft": cfg.num_sft, "train": cfg.num_train, "test": cfg.num_test}
    return {s: self._generate_examples(split=s) for s, n in sizes.items() if n > 0}

  def _generate_examples(self, split: str):
    cfg = self.builder_config
    rep = report_lib.BadRowReport(cfg.bad_rows, cfg.max_reported)
    if split == "samples":
      yield from self._from_samples(rep)
      self.info.metadata["train/build"] = rep.to_dict()
      return
    n = {"sft": cfg.num_sft, "train": cfg.num_train, "test": cfg.num_test}[split]
    for i in range(n):
      if split == "sft":
        prompt, demo = synthetic.sft_example(cfg.seed, i, cfg.sft_best_of,
                                             cfg.prompt_specificity)
        rc = synthetic.token_rewards(prompt, demo, cfg.prompt_specificity)
        ex = {
          "prompt": prompt,
          "chosen": demo,
          "rejected": "",
          "reward_chosen": float(rc.sum(dtype=np.float64)),
          "reward_rejected": math.nan,
          "chosen_token_rewards": rc,
          "rejected_token_rewards": np.zeros((0,), np.float32),
          "label_probability": math.nan,
        }
      else:
        rng, prompt, a, b = synthetic.candidate_pair(cfg.seed, split, i)
        ex = synthetic.label_pair(
          rng, prompt, a, b, cfg.temperature, cfg.length_bias, cfg.label_noise,
          cfg.prompt_specificity
        )
      ex.update(kind="text", source=f"{split}:{i}", index=i)
      rep.kept()
      yield i, ex
    self.info.metadata[f"{split}/build"] = rep.to_dict()

  def _from_samples(self, rep: report_lib.BadRowReport):
    cfg = self.builder_config
    tok = synthetic.SyntheticTokenizer()
    name = os.path.basename(cfg.samples_path)
    index = 0
    for line, row in sources.read_rows(cfg.samples_path, rep):
      try:
        if isinstance(row, BadRow):
          raise row
        prompt, responses = parse_samples_row(row, tok)
      except BadRow as bad:
        rep.bad(bad.reason, name, line, bad.detail)
        continue
      if cfg.labels == "given":
        if len(responses) != 2:
          rep.bad(
            report_lib.MISSING_FIELD,
            name,
            line,
            f"labels='given' needs [chosen, rejected]; got {len(responses)}",
          )
          continue
        pairs = [(0, 1)]
      elif cfg.pairing == "disjoint":
        pairs = [(j, j + 1) for j in range(0, len(responses) - 1, 2)]
        if len(responses) % 2:
          rep.note("unpaired_responses")
      else:
        pairs = list(itertools.combinations(range(len(responses)), 2))
      for j, k in pairs:
        a, b = responses[j], responses[k]
        if not a.strip() or not b.strip():
          rep.bad(report_lib.EMPTY_RESPONSE, name, line, f"responses {j},{k}")
          continue
        if a == b:
          rep.bad(report_lib.IDENTICAL_RESPONSES, name, line, f"responses {j},{k}")
          continue
        if cfg.labels == "given":
          ex = synthetic.given_pair(prompt, a, b, cfg.prompt_specificity)
        else:
          rng = np.random.default_rng([cfg.seed, synthetic.SPLIT_CODES["samples"], line, j, k])
          ex = synthetic.label_pair(
            rng, prompt, a, b, cfg.temperature, cfg.length_bias, cfg.label_noise,
            cfg.prompt_specificity
          )
        ex.update(kind="text", source=f"{name}:{line}:{j},{k}", index=index)
        rep.kept()
        yield f"{line}:{j}:{k}", ex
        index += 1


class EmptySplitError(report_lib.DataError):
  """No row of a split was kept; carries the split's build report (``report``)."""

  def __init__(self, split: str, report: dict):
    super().__init__(f"{split!r}: no row of {report['rows_read']} was kept")
    self.split, self.report = split, report


# ----------------------------------------------------------------------------------------------
# Users' files.


@dataclasses.dataclass(eq=False)
class FilesConfig(tfds.core.BuilderConfig):
  """``midpo_preference_files``'s configuration (see the module docstring)."""
  format: str = "trl_standard"
  train_files: tuple[str, ...] = ()
  test_files: tuple[str, ...] = ()
  fingerprint: str = ""
  bad_rows: str = "skip"
  max_reported: int = 5


def files_config(
  format: str,
  train_files: Iterable[str],
  test_files: Iterable[str] = (),
  bad_rows: str = "skip",
  max_reported: int = 5,
) -> FilesConfig:
  """A FilesConfig named after the format and a hash of the files' contents."""
  if format not in formats.FORMATS:
    raise ValueError(f"config.data.files.format must be one of {formats.FORMATS}, got {format!r}")
  if bad_rows not in report_lib.POLICIES:
    raise ValueError(f"config.data.bad_rows must be one of {report_lib.POLICIES}")
  train = tuple(files.abspath(p) for p in train_files)
  test = tuple(files.abspath(p) for p in test_files)
  if not train:
    raise ValueError("config.data.files.train_files is empty")
  for p in train + test:
    sources.file_type(p)
    if not files.isfile(p):
      raise FileNotFoundError(p)
  fp = _hash(
    {
      "format": format,
      "train": [(os.path.basename(p), file_sha256(p)) for p in train],
      "test": [(os.path.basename(p), file_sha256(p)) for p in test],
      # 'fatal' must see every row again: a dataset built under 'skip' is not reused.
      "bad_rows": bad_rows,
    }
  )
  return FilesConfig(
    name=f"{format}_{fp[:12]}",
    format=format,
    train_files=train,
    test_files=test,
    fingerprint=fp,
    bad_rows=bad_rows,
    max_reported=max_reported,
  )


class PreferenceFiles(tfds.core.GeneratorBasedBuilder):
  """Preference pairs from users' local files (see formats.py)."""

  name = "midpo_preference_files"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}
  BUILDER_CONFIGS = [FilesConfig(name="default")]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description="Preference pairs read from local JSONL/JSON/Parquet files.",
      features=tfds.features.FeaturesDict(
        {**{k: _text_feature() for k in ("prompt", "chosen", "rejected", "kind", "source")},
         "index": np.int64, "score_chosen": np.float32, "score_rejected": np.float32}
      ),
      metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.builder_config
    if not cfg.train_files:
      raise ValueError("build PreferenceFiles with files_config(...), not the default config")
    splits = {"train": cfg.train_files, "test": cfg.test_files}
    return {s: self._generate_examples(split=s, paths=p) for s, p in splits.items() if p}

  def _generate_examples(self, split: str, paths: Sequence[str]):
    cfg = self.builder_config
    rep = report_lib.BadRowReport(cfg.bad_rows, cfg.max_reported)
    i = -1
    for i, (name, line, pair) in enumerate(formats.iter_pairs(cfg.format, list(paths), rep)):
      yield i, {**dataclasses.asdict(pair), "source": f"{name}:{line}", "index": i}
    if i < 0:
      raise EmptySplitError(split, rep.to_dict())  # before TFDS's "No examples were yielded"
    self.info.metadata[f"{split}/build"] = rep.to_dict()


# ----------------------------------------------------------------------------------------------
# Building and reading.


def prepare(builder: tfds.core.DatasetBuilder) -> tfds.core.DatasetBuilder:
  """Builds the dataset if it is not there yet (array_record, no TensorFlow)."""
  builder.download_and_prepare()
  return builder


def synthetic_builder(data_dir: str, **kwargs) -> SyntheticPreferences:
  """The synthetic task's builder under ``data_dir`` (``kwargs``: ``SyntheticConfig``
  fields), built if it is not yet."""
  return prepare(
    SyntheticPreferences(
      config=synthetic_config(**kwargs), data_dir=data_dir, file_format=FILE_FORMAT
    )
  )


def files_builder(
  data_dir: str,
  format: str,
  train_files: Iterable[str],
  test_files: Iterable[str] = (),
  bad_rows: str = "skip",
  max_reported: int = 5,
) -> PreferenceFiles:
  """The users'-files builder under ``data_dir`` (arguments: ``FilesConfig``
  fields), built if it is not yet."""
  cfg = files_config(format, train_files, test_files, bad_rows, max_reported)
  return prepare(PreferenceFiles(config=cfg, data_dir=data_dir, file_format=FILE_FORMAT))


def build_report(builder: tfds.core.DatasetBuilder, split: str) -> dict:
  """The build stage's bad-row counts for ``split`` (see report.py)."""
  key = f"{split}/build"
  if key not in builder.info.metadata:
    raise KeyError(f"{builder.name}/{builder.builder_config.name} has no report for {split!r}")
  return dict(builder.info.metadata[key])


def decode_example(ex: dict) -> dict:
  """TFDS gives text as bytes: decode to str, keep arrays and scalars as they are."""
  return {k: (v.decode("utf-8") if isinstance(v, bytes) else v) for k, v in ex.items()}
