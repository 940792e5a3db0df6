"""config.json <-> ModelConfig, for the published shapes the named configs copy."""

import pytest

from midpo.models import config_names, get_config
from midpo.models.hf_checkpoint import CheckpointError, config_from_hf, config_to_hf

# The fields of the published config.json files (legacy rope_theta/rope_scaling form).
LLAMA_3_2_1B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
    "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
    "max_position_embeddings": 131072, "mlp_bias": False, "num_attention_heads": 32,
    "num_hidden_layers": 16, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "use_cache": True, "vocab_size": 128256,
}
SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
    "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 576,
    "initializer_range": 0.041666666666666664, "intermediate_size": 1536,
    "max_position_embeddings": 8192, "num_attention_heads": 9, "num_hidden_layers": 30,
    "num_key_value_heads": 3, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "rope_theta": 100000, "tie_word_embeddings": True, "vocab_size": 49152,
}
QWEN2_5_STYLE = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
    "hidden_size": 896, "intermediate_size": 4864, "max_position_embeddings": 32768,
    "max_window_layers": 21, "num_attention_heads": 14, "num_hidden_layers": 24,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 32768, "tie_word_embeddings": True, "use_sliding_window": False,
    "vocab_size": 151936, "bos_token_id": 151643, "eos_token_id": 151643,
}
MISTRAL_STYLE = {
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_act": "silu",
    "hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 32768,
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096,
    "tie_word_embeddings": False, "vocab_size": 32000, "bos_token_id": 1, "eos_token_id": 2,
}


def test_named_configs_match_published_config_json():
  assert config_from_hf(LLAMA_3_2_1B).replace(initializer_range=0.02) == get_config("llama3.2-1b")
  assert config_from_hf(SMOLLM2_135M).replace(initializer_range=0.02) == get_config("smollm2-135m")


def test_family_specific_fields():
  qwen = config_from_hf(QWEN2_5_STYLE)
  assert qwen.qkv_bias and not qwen.o_bias and qwen.sliding_window is None
  assert qwen.head_dim == 64 and qwen.num_groups == 7 and qwen.tie_word_embeddings
  mistral = config_from_hf(MISTRAL_STYLE)
  assert mistral.sliding_window == 4096 and not mistral.qkv_bias and mistral.head_dim == 128
  with pytest.raises(CheckpointError, match="use_sliding_window=true"):
    config_from_hf(dict(QWEN2_5_STYLE, use_sliding_window=True))
  with pytest.raises(CheckpointError, match="hidden_act 'gelu'"):
    config_from_hf(dict(MISTRAL_STYLE, hidden_act="gelu"))
  with pytest.raises(CheckpointError, match="lacks the required key 'hidden_size'"):
    config_from_hf({k: v for k, v in MISTRAL_STYLE.items() if k != "hidden_size"})
  qwen3 = config_from_hf(dict(QWEN2_5_STYLE, model_type="qwen3", head_dim=128))
  assert qwen3.qk_norm == "head" and not qwen3.qkv_bias and qwen3.head_dim == 128
  with pytest.raises(CheckpointError, match="qwen3 with use_sliding_window"):
    config_from_hf(dict(QWEN2_5_STYLE, model_type="qwen3",
                        layer_types=["full_attention", "sliding_attention"]))
  olmo2 = config_from_hf(dict(MISTRAL_STYLE, model_type="olmo2", sliding_window=None))
  assert (olmo2.qk_norm, olmo2.pre_norms, olmo2.post_norms) == ("full", False, True)
  phi3 = config_from_hf(dict(MISTRAL_STYLE, model_type="phi3", sliding_window=2047))
  assert phi3.sliding_window == 2047 and not phi3.qkv_bias
  # Phi-3's 128k variants (long RoPE) and the families not supported are refused by name.
  with pytest.raises(CheckpointError, match="Unsupported RoPE type 'longrope'"):
    config_from_hf(dict(MISTRAL_STYLE, model_type="phi3", rope_scaling={
        "type": "longrope", "long_factor": [1.0], "short_factor": [1.0]}))
  gemma2 = config_from_hf(dict(MISTRAL_STYLE, model_type="gemma2", head_dim=256,
                                hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256,
                                attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                num_hidden_layers=4))
  assert gemma2.layer_types == ("sliding_attention", "full_attention") * 2
  assert gemma2.hidden_act == "gelu_tanh" and gemma2.pre_norms and gemma2.post_norms
  assert config_from_hf(config_to_hf(gemma2)) == gemma2
  for family in ("gemma", "gemma3", "phimoe"):
    with pytest.raises(CheckpointError, match=f"Unsupported model_type '{family}'"):
      config_from_hf(dict(MISTRAL_STYLE, model_type=family))


@pytest.mark.parametrize("hf", [
    LLAMA_3_2_1B, SMOLLM2_135M, QWEN2_5_STYLE, MISTRAL_STYLE,
    dict(QWEN2_5_STYLE, model_type="qwen3", attention_bias=True),
    dict(MISTRAL_STYLE, model_type="olmo2", sliding_window=None),
    dict(MISTRAL_STYLE, model_type="phi3", sliding_window=2047)])
def test_config_json_round_trip(hf):
  config = config_from_hf(hf)
  assert config_from_hf(config_to_hf(config)) == config


@pytest.mark.parametrize("name", config_names())
def test_named_configs_export(name):
  config = get_config(name)
  # Everything but how the layers run (not a config.json key) survives export.
  assert config_from_hf(config_to_hf(config), scan_layers=config.scan_layers) == config


def test_attention_auto_is_cudnn_only_on_a_gpu_where_it_applies():
  from midpo.models.config import resolve_attention_impl
  bf16 = get_config("tiny", dtype="bfloat16")
  f32 = get_config("tiny")
  assert resolve_attention_impl("auto", bf16, "gpu") == "cudnn"
  assert resolve_attention_impl("auto", f32, "gpu") == "xla"
  assert resolve_attention_impl("auto", bf16, "cpu") == "xla"
  assert resolve_attention_impl("auto", bf16, "tpu") == "xla"
  gemma = get_config("tiny", dtype="bfloat16", attn_logit_softcap=50.0)
  assert resolve_attention_impl("auto", gemma, "gpu") == "xla"
  assert resolve_attention_impl("jax", f32, "cpu") == "jax"
  with pytest.raises(ValueError, match="needs a GPU"):
    resolve_attention_impl("cudnn", bf16, "cpu")
  with pytest.raises(ValueError, match="bf16 or fp16"):
    resolve_attention_impl("cudnn", f32, "gpu")
  odd = get_config("tiny", dtype="bfloat16", head_dim=36)
  assert resolve_attention_impl("auto", odd, "gpu") == "xla"  # head_dim not a multiple of 8
  with pytest.raises(ValueError, match="supported"):
    resolve_attention_impl("flash", bf16, "gpu")
  with pytest.raises(ValueError, match="attn_logit_softcap"):
    get_config("tiny", attention_impl="jax", attn_logit_softcap=50.0)


def test_a_run_resolves_model_attention_impl_for_its_backend():
  """config.model.attention_impl='auto' (the default) is XLA's attention on this
  CPU, as before the option existed; 'cudnn' here is a config error."""
  from midpo.training import config as config_lib
  from midpo.training import env as env_lib
  from tests import train_utils as tu
  config = tu.tiny_config("dpo")
  assert config.model.attention_impl == "auto"
  tok = env_lib.make_tokenizer(config)
  assert env_lib.make_model_config(config, tok).attention_impl == "xla"
  config.model.attention_impl = "jax"
  assert env_lib.make_model_config(config, tok).attention_impl == "jax"
  config.model.attention_impl = "cudnn"
  with pytest.raises(config_lib.ConfigError, match="model.attention_impl.*needs a GPU"):
    env_lib.make_model_config(config, tok)


def test_a_restart_keeps_the_attention_impl_its_run_started_with(tmp_path, caplog):
  """'auto' in a workdir whose run started already means what it resolved to
  then (resolved.json), or 'xla' for a run whose config.json predates the key,
  so a restart on another backend computes as the run did; a recorded
  implementation that cannot run here is a warning; unreadable records a config error."""
  import json

  from midpo.training import config as config_lib
  from midpo.training import env as env_lib
  from midpo.training import run_identity
  from tests import train_utils as tu
  config = tu.tiny_config("dpo")
  tok = env_lib.make_tokenizer(config)
  new = str(tmp_path / "new")
  assert run_identity.recorded_resolution(new, "model.attention_impl") is None
  assert env_lib.make_model_config(config, tok, new).attention_impl == "xla"
  old = tmp_path / "old"  # a run from before the key existed
  old.mkdir()
  saved = run_identity.config_json(config)
  del saved["model"]["attention_impl"]
  (old / "config.json").write_text(json.dumps(saved))
  assert run_identity.recorded_resolution(str(old), "model.attention_impl") == "xla"
  (old / "config.json").write_text(json.dumps(run_identity.config_json(config)))
  assert run_identity.recorded_resolution(str(old), "model.attention_impl") is None
  run_identity.record_resolution(str(old), {"model.attention_impl": "jax"})
  assert env_lib.make_model_config(config, tok, str(old)).attention_impl == "jax"
  assert env_lib.make_model_config(config, tok).attention_impl == "xla"  # no workdir
  config.model.attention_impl = "xla"  # set explicitly: what the config says
  assert env_lib.make_model_config(config, tok, str(old)).attention_impl == "xla"
  config.model.attention_impl = "auto"
  # A GPU run's cuDNN, evaluated on this CPU: said, and resolved afresh.
  run_identity.record_resolution(str(old), {"model.attention_impl": "cudnn"})
  with caplog.at_level("WARNING"):
    assert env_lib.make_model_config(config, tok, str(old)).attention_impl == "xla"
  assert "began with 'auto' as 'cudnn', which cannot run on this cpu backend" in caplog.text
  (old / "resolved.json").write_text("{not json")
  with pytest.raises(config_lib.ConfigError, match="resolved.json is not readable JSON"):
    env_lib.make_model_config(config, tok, str(old))


def test_unset_scan_layers_unrolls_on_a_cpu_and_a_restart_keeps_what_its_run_began_with(tmp_path):
  """model.scan_layers unset: unrolled on a CPU, the model's own elsewhere; a started run
  keeps what resolved.json recorded, or the model's own where it recorded nothing (a run
  from before the resolution); set explicitly, it is what the config says."""
  import json

  from midpo.training import env as env_lib
  from midpo.training import run_identity
  from tests import train_utils as tu
  assert env_lib.resolve_scan_layers(True, "cpu") is False
  assert env_lib.resolve_scan_layers(True, "gpu") is True
  assert env_lib.resolve_scan_layers(True, "tpu") is True
  assert env_lib.resolve_scan_layers(False, "gpu") is False
  config = tu.tiny_config("dpo")
  config.model.name = "smollm2-135m"  # scanned, as checkpoints are
  config.tokenizer = "byte"
  tok = env_lib.make_tokenizer(config)
  assert get_config("smollm2-135m").scan_layers
  import jax
  assert env_lib.make_model_config(config, tok).scan_layers is (jax.default_backend() != "cpu")
  old = tmp_path / "old"  # a run that began before scan_layers was resolved
  old.mkdir()
  (old / "config.json").write_text(json.dumps(run_identity.config_json(config)))
  run_identity.record_resolution(str(old), {"model.attention_impl": "xla"})
  assert env_lib.resolve_scan_layers(True, "cpu", str(old)) is True
  assert env_lib.make_model_config(config, tok, str(old)).scan_layers is True
  run_identity.record_resolution(str(old), {"model.attention_impl": "xla",
                                            "model.scan_layers": False})
  assert env_lib.resolve_scan_layers(True, "gpu", str(old)) is False  # a CPU run's, on a GPU
  assert env_lib.resolutions(env_lib.make_model_config(config, tok, str(old))) == {
      "model.attention_impl": "xla", "model.scan_layers": False}
  config.model.scan_layers = True  # set explicitly: what the config says
  assert env_lib.make_model_config(config, tok, str(old)).scan_layers is True
