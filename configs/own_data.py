"""DPO on your own preference files (and, optionally, your own Hugging Face checkpoint).

    python -m midpo.main --config=configs/own_data.py --workdir=workdirs/own_data \\
      --config.data.files.train_files=data/train.jsonl \\
      --config.data.files.test_files=data/test.jsonl

The file keys take a comma-separated list, a glob or a folder (a Hub snapshot, a
``datasets.save_to_disk`` directory; ``midpo/data/sources.py``); ``data.files.format`` is one of
``trl_standard`` (default), ``trl_conversational``, ``hh_rlhf``, ``ultrafeedback``
(``midpo/data/formats.py``). Rows are tokenised as TRL 1.16's ``DPOTrainer`` does.

Stages:

1. ``sft``: from scratch (a tiny model and the byte tokenizer), SFT on the prompts and chosen
   responses of the training file, as the DPO paper's SFT on preferred completions; skipped
   (said in the log) with ``--config.model.hf_path=<checkpoint dir>``, whose tokenizer is then
   used (``tokenizer='auto'``);
2. ``preference``: DPO (``--config.prior.name=...`` for any other prior) on the file's pairs;
3. ``eval``: on the test file's pairs, the implicit-reward accuracy and held-out loss; on its
   prompts, the KL to the reference and the length of samples. Without a true reward there is
   no reward or win rate: ``eval.json``'s ``not_measured`` says so.
"""

from midpo import config_base as default


def get_config(arg: str = ""):
  c = default.get_config(arg)
  c.prior = default.prior_config("dpo")
  c.loss.alpha = 0.1
  c.tokenizer = "auto"  # the checkpoint's (model.hf_path) when given, else 'byte'
  c.data.source = "files"
  c.data.files.format = "trl_standard"
  c.data.max_length = 512
  c.data.batch_size = 8
  c.pairs_from = "dataset"
  c.sft.steps = 200
  c.train.steps = 200
  c.eval.num_prompts = 64
  c.eval.num_pairs = 256
  c.eval.max_new_tokens = 128
  c.eval.mutual_information = "none"
  c.eval.reference_mutual_information = False
  return c
