"""The final policy in Hugging Face format."""

from __future__ import annotations

import os
from typing import Any

from absl import logging

from midpo import files as midpo_files
from midpo.models import hf_checkpoint, hub
from midpo.training import env as env_lib

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")


def export_hf(env: env_lib.Env, policy: Any) -> str:
  """Writes the policy (config.json + safetensors) under ``<workdir>/hf_export``,
  loadable by transformers or vLLM, with the source checkpoint's tokenizer
  files copied beside it; returns the directory."""
  path = os.path.join(env.workdir, "hf_export")
  files = hf_checkpoint.save_hf_checkpoint(env.model(policy), path,
                                           dtype=env.config.model.param_dtype)
  if env.process_index == 0:
    for name in TOKENIZER_FILES:
      src = os.path.join(hub.local_dir(env.config.model.hf_path), name)
      if os.path.exists(src):
        midpo_files.copy(src, os.path.join(path, name))
  logging.info("exported the policy in Hugging Face format to %s (%d files)", path, len(files))
  return path
