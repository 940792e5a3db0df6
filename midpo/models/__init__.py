"""Llama-family models: config, NNX transformer, sharding, HF checkpoints,
tokenizers and sampling.

    from midpo import models
    config = models.get_config("tiny")
    model = models.create_model(config)                      # one device
    mesh = models.make_mesh(data=2, fsdp=2, tensor=2)
    model = models.create_sharded_model(config, mesh)        # sharded by rules
    model = models.load_hf_checkpoint("/path/to/ckpt", mesh=mesh)
    logits = model(tokens, attention_mask)                   # [B, T, V] float32
    h = model.hidden_states(tokens, attention_mask)          # [B, T, D]
    logits = model.logits_from_hidden(h[:, :16])             # any slice of h
    out = models.generate(model, prompts, prompt_mask, rng=key, max_new_tokens=64)
    tok = models.load_tokenizer("byte")
"""

from midpo.models.config import ModelConfig, RopeScaling, config_names, get_config
from midpo.models.generate import SampleOutput, generate, sample_logits
from midpo.models.hf_checkpoint import load_hf_checkpoint, read_hf_config, save_hf_checkpoint
from midpo.models.hf_config import CheckpointError, config_from_hf, config_to_hf
from midpo.models.sharding import (DEFAULT_RULES, batch_sharding, logical_to_mesh, make_mesh,
                                   shard_model, state_shardings)
from midpo.models.tokenizer import (ByteTokenizer, HFTokenizer, Tokenizer, TokenizerError,
                                    check_fits, load_tokenizer)
from midpo.models.attention import positions_from_mask
from midpo.models.transformer import KVCache, Transformer, create_model, create_sharded_model
