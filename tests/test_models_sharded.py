"""Eight fake CPU devices, mesh (data=2, fsdp=2, tensor=2).

pytest runs every test file in one process, where jax may already be
initialised with one device, so the checks run in a subprocess that sets
XLA_FLAGS before importing jax. This file is that subprocess's script too:
`python tests/test_models_sharded.py` runs the checks directly.
"""

import os
import subprocess
import sys


def test_sharded_forward_generate_and_load_on_8_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  assert "ALL SHARDED CHECKS PASSED" in proc.stdout


def _main():
  import tempfile

  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from jax.sharding import PartitionSpec as P

  from midpo.models import create_model, get_config, hf_checkpoint
  from midpo.models.transformer import create_sharded_model as create_model_sharded
  from midpo.models import sharding as sh
  from midpo.models.generate import generate

  assert jax.device_count() == 8, jax.devices()
  config = get_config("tiny", vocab_size=64, hidden_size=32, intermediate_size=64,
                      num_heads=4, num_kv_heads=2, head_dim=8)
  mesh = sh.make_mesh(data=2, fsdp=2, tensor=2)

  # Single-device reference.
  model = create_model(config, seed=5)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, config.vocab_size, (4, 12)), jnp.int32)
  mask = np.ones((4, 12), np.int32)
  mask[1, 8:] = 0
  mask[3, :5] = 0
  mask = jnp.asarray(mask)
  forward = nnx.jit(lambda m, t, a: m(t, a, return_hidden_states=True))
  ref_logits, ref_hidden = forward(model, tokens, mask)
  ref_gen = generate(model, tokens, mask, rng=jax.random.key(0), max_new_tokens=5,
                     temperature=0.0)

  # The same weights, moved onto the mesh by the rules.
  sharded = sh.shard_model(create_model(config, seed=5), mesh)
  expected = {
      "embed": P("tensor", "fsdp"),
      "q": P(None, "fsdp", "tensor", None),
      "k": P(None, "fsdp", "tensor", None),
      "o": P(None, "tensor", None, "fsdp"),
      "gate": P(None, "fsdp", "tensor"),
      "down": P(None, "tensor", "fsdp"),
      "attn_norm": P(None, None),
      "final_norm": P(None),
  }
  arrays = {"embed": sharded.embed[...], "final_norm": sharded.final_norm[...],
            **sharded.layers.arrays()}
  for name, spec in expected.items():
    s = arrays[name].sharding
    assert isinstance(s, jax.sharding.NamedSharding) and s.mesh.shape == mesh.shape, (name, s)
    assert s.spec == spec, (name, s.spec, spec)
  # Actually split: each device holds a quarter of q (fsdp x tensor).
  q = arrays["q"]
  shard_shapes = {tuple(x.data.shape) for x in q.addressable_shards}
  assert shard_shapes == {(2, 16, 2, 8)}, shard_shapes
  assert len(q.sharding.device_set) == 8
  for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(sharded))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  batch = sh.batch_sharding(mesh)
  assert batch.spec == P(("data", "fsdp"), None)
  s_tokens, s_mask = jax.device_put(tokens, batch), jax.device_put(mask, batch)
  logits, hidden = forward(sharded, s_tokens, s_mask)
  assert logits.sharding.spec[0] == ("data", "fsdp"), logits.sharding
  np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(hidden), np.asarray(ref_hidden), atol=1e-5, rtol=0)

  # Gradients of a loss on the mesh equal the single-device ones, and come
  # back sharded like the parameters (FSDP + tensor parallel).
  def loss_grads(m, t, a):
    graphdef, params = nnx.split(m)
    def loss(params):
      logp = jax.nn.log_softmax(nnx.merge(graphdef, params)(t, a)[:, :-1], -1)
      nll = -jnp.take_along_axis(logp, t[:, 1:, None], -1)[..., 0]
      return (nll * a[:, 1:]).sum() / a[:, 1:].sum()
    if m.activation_sharding is None:
      return jax.jit(jax.value_and_grad(loss))(params)
    # Gradients sharded like the parameters (reduce-scatter, not all-reduce).
    out = (sh.replicated(mesh), sh.state_shardings(params, mesh))
    return jax.jit(jax.value_and_grad(loss), out_shardings=out)(params)
  ref_loss, ref_grads = loss_grads(model, tokens, mask)
  s_loss, s_grads = loss_grads(sharded, s_tokens, s_mask)
  np.testing.assert_allclose(float(s_loss), float(ref_loss), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(ref_grads), jax.tree.leaves(s_grads)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6, rtol=1e-4)
  assert s_grads["layers"]["q"][...].sharding.spec == expected["q"]

  # Sampling on the mesh gives the single-device result.
  gen = generate(sharded, s_tokens, s_mask, rng=jax.random.key(0), max_new_tokens=5,
                 temperature=0.0)
  np.testing.assert_array_equal(np.asarray(gen.tokens), np.asarray(ref_gen.tokens))
  np.testing.assert_allclose(np.asarray(gen.logprobs), np.asarray(ref_gen.logprobs), atol=1e-5)

  # Created directly sharded (eval_shape, then a jitted init with
  # out_shardings): same shardings, same weights up to the last ulp (jitted
  # and eager random normals may round differently).
  created = create_model_sharded(config, mesh, seed=5)
  for name, spec in expected.items():
    arr = created.embed if name == "embed" else created.final_norm if name == "final_norm" else getattr(created.layers, name)
    assert arr[...].sharding.spec == spec, (name, arr[...].sharding.spec)
  for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(created))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-7, rtol=1e-5)
  with tempfile.TemporaryDirectory() as d:
    hf_checkpoint.save_hf_checkpoint(model, d, max_shard_bytes=10_000)
    loaded = hf_checkpoint.load_hf_checkpoint(d, mesh=mesh)
    assert loaded.layers.o[...].sharding.spec == expected["o"]
    np.testing.assert_allclose(np.asarray(forward(loaded, s_tokens, s_mask)[0]),
                               np.asarray(ref_logits), atol=1e-5, rtol=0)
    # Export gathers the shards back, bit for bit.
    again = hf_checkpoint.hf_tensors(loaded)
    for key, value in hf_checkpoint.hf_tensors(model).items():
      assert again[key].tobytes() == value.tobytes(), key

  # Rules that cannot shard a dimension fail with a message naming it.
  bad_rules = tuple((k, ("tensor", "data") if k == "kv_heads" else v)
                    for k, v in sh.DEFAULT_RULES)
  try:
    create_model_sharded(config, mesh, rules=bad_rules)
  except ValueError as e:
    assert "kv_heads" in str(e) and "not divisible" in str(e), e
  else:
    raise AssertionError("indivisible sharding was accepted")
  print("ALL SHARDED CHECKS PASSED")


if __name__ == "__main__":
  _main()
