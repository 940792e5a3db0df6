"""Preference data for midpo.

- ``synthetic``: a small word-level language with a known, token-decomposable reward ``r*``, its
  tokenizer (``SyntheticTokenizer``) and a Bradley-Terry annotator.
- ``formats``: users' files (JSONL, JSON, Parquet) in the TRL standard / conversational,
  HH-RLHF and UltraFeedback-binarized formats.
- ``tfds_builders``: TFDS builders ``midpo_synthetic`` and ``midpo_preference_files`` (built as
  array_record, read with ``as_data_source``; no TensorFlow).
- ``pipeline``: tokenisation, truncation, length buckets, sharding and the resumable
  ``PreferenceBatchIterator``; ``make_iterator(config.data, tokenizer, split, workdir, ...)``.
- ``report``: bad-row accounting and ``data_report.json``.

Modules are imported explicitly (``from midpo.data import pipeline``); this file imports nothing,
so that ``import midpo.data.synthetic`` does not pull in tensorflow-datasets.
"""
