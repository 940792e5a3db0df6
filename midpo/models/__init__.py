"""Llama-family models: config, NNX transformer, sharding, HF checkpoints,
tokenizers and sampling."""

from midpo.models.config import ModelConfig, RopeScaling, config_names, get_config
from midpo.models.transformer import KVCache, Transformer, create_model, positions_from_mask
