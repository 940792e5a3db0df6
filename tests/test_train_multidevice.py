"""The same training run on 1 device and on 8 (fake CPU) devices.

With a (data=4, fsdp=2) mesh the parameters and optimiser states are sharded
over ``fsdp`` and the batch over ``data`` x ``fsdp``; the losses must equal the
single-device run's for the same global batch, within float32 rounding. Both
runs restore the same SFT checkpoint (written on one device), so the restore
also reshards it onto the 8-device mesh.
"""


import numpy as np
import pytest

from tests import train_utils as tu


@pytest.fixture
def sft(shared):
  """The suite's shared SFT run (on one device) and its data."""
  return {"data.data_dir": shared["data_dir"], "sft.checkpoint": shared["sft"]}


def test_eight_devices_give_the_same_losses_as_one(tmp_path, sft):
  common = {**sft,
            "stages": ("preference",), "train.steps": 6, "train.warmup_steps": 0}
  rc, out1 = tu.run_main("configs/dpo.py", str(tmp_path / "one"), common)
  assert rc == 0, out1[-3000:]
  rc, out8 = tu.run_main(
      "configs/dpo.py", str(tmp_path / "eight"), {**common, "mesh.data": 4, "mesh.fsdp": 2},
      env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert rc == 0, out8[-3000:]
  assert "'data': 4, 'fsdp': 2, 'tensor': 1} over 8 devices" in out8
  one = tu.read_metrics(str(tmp_path / "one"), "preference")
  eight = tu.read_metrics(str(tmp_path / "eight"), "preference")
  assert len(one) == len(eight) == 6
  for a, b in zip(one, eight):
    for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected"):
      np.testing.assert_allclose(b[key], a[key], rtol=2e-5, atol=1e-6, err_msg=f"{key} {a['step']}")
  assert one[-1]["loss"] != one[0]["loss"]
  # train.padding_free on a (data=4) mesh: the packed rows are sharded with the batch and the
  # per-token statistics gathered back to the padded rows; the same losses again.
  rc, out4 = tu.run_main(
      "configs/dpo.py", str(tmp_path / "four_packed"),
      {**common, "mesh.data": 4, "train.padding_free": True},
      env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
  assert rc == 0, out4[-3000:]
  packed = tu.read_metrics(str(tmp_path / "four_packed"), "preference")
  assert len(packed) == 6
  for a, b in zip(one, packed):
    for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected"):
      np.testing.assert_allclose(b[key], a[key], rtol=2e-5, atol=1e-6, err_msg=f"{key} {a['step']}")
  # The final policies agree too (restored as numpy, whatever the mesh was).
  _, p1 = tu.latest_params(tmp_path / "one" / "checkpoints")
  _, p8 = tu.latest_params(tmp_path / "eight" / "checkpoints")
  import jax
  for x, y in zip(jax.tree.leaves(p1["policy"]), jax.tree.leaves(p8["policy"])):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-6)


def test_mi_prior_rounds_on_eight_devices_match_one(tmp_path, sft):
  """The 'mi' prior's rounds (sampling, maximum-likelihood steps of zeta_phi
  sharded over fsdp, held-out diagnostics) on a (data=4, fsdp=2) mesh."""
  common = {**sft, "stages": ("preference",), "train.steps": 4, "train.warmup_steps": 0,
            "baselines": (), **tu.MI_TINY}
  rc, out1 = tu.run_main("configs/joint_prior.py", str(tmp_path / "one"), common)
  assert rc == 0, out1[-3000:]
  rc, out8 = tu.run_main(
      "configs/joint_prior.py", str(tmp_path / "eight"),
      {**common, "mesh.data": 4, "mesh.fsdp": 2},
      env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert rc == 0, out8[-3000:]
  for stage, keys in (("preference", ("loss", "rewards/margins")),
                      ("prior/mle", ("nll_per_token", "nll_per_token_fit", "kl_policy_prior")),
                      ("prior/diagnostics", ("heldout/loss/mi", "heldout/loss/dpo"))):
    one = tu.read_metrics(str(tmp_path / "one"), stage)
    eight = tu.read_metrics(str(tmp_path / "eight"), stage)
    assert len(one) == len(eight) > 0, stage
    for a, b in zip(one, eight):
      for key in keys:
        np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-5,
                                   err_msg=f"{stage} {key} {a['step']}")
