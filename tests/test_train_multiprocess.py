"""Two processes (jax.distributed on 127.0.0.1, CPU collectives) train the same
model as one process with the same global batch, and get the same losses.

Both runs cut the data into 2 shards (``data.num_shards=2``): the two-process
run reads one shard per process (4 pairs each), the one-process run reads
both (8 pairs), so every step's global batch is the same (see
``midpo.data.batches``). The run is the default one, scaled down: the 'mi' prior
(its samples, maximum-likelihood rounds and diagnostics) and a DPO baseline.
"""

import json
import socket

import numpy as np

from tests import train_utils as tu


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path, shared):
  common = {"data.data_dir": shared["data_dir"], "sft.checkpoint": shared["sft"],
            "stages": ("preference", "eval"), "train.steps": 6, "train.warmup_steps": 0,
            "data.num_shards": 2, "checkpoint_every": 3, **tu.MI_TINY}
  rc, out1 = tu.run_main("configs/joint_prior.py", str(tmp_path / "one"), common)
  assert rc == 0, out1[-3000:]

  # Batch sizes count rows per process: 4 + 4 pairs = the one-process run's
  # 8, and 8 + 8 sampled prompts its 16.
  two_processes = {**common, "data.batch_size": 4, "eval.batch_size": 8}
  outs = _run_two_processes(tmp_path / "two", two_processes)
  assert "process 0 of 2" in outs[0] and "process 1 of 2" in outs[1]

  for stage, keys in (("preference", ("loss", "rewards/margins", "logps/chosen",
                                       "logps/rejected")),
                      ("baseline/dpo", ("loss", "rewards/margins")),
                      ("prior/mle", ("nll_per_token", "nll_per_token_fit", "kl_policy_prior")),
                      ("prior/diagnostics", ("heldout/loss/mi", "heldout/loss/tdpo"))):
    one = tu.read_metrics(str(tmp_path / "one"), stage)
    two = tu.read_metrics(str(tmp_path / "two"), stage)
    assert len(one) == len(two) == {"prior/mle": 3, "prior/diagnostics": 4}.get(stage, 6)
    for a, b in zip(one, two):
      for key in keys:
        np.testing.assert_allclose(b[key], a[key], rtol=2e-5, atol=1e-6,
                                   err_msg=f"{stage} {key} at step {a['step']}")
    assert one[-1][keys[0]] != one[0][keys[0]]
  # The same samples on the same prompts: the same evaluation table.
  t1 = json.load(open(tmp_path / "one" / "eval.json"))["table"]
  t2 = json.load(open(tmp_path / "two" / "eval.json"))["table"]
  assert [r["model"] for r in t1] == [r["model"] for r in t2] == ["reference", "dpo", "mi"]
  for a, b in zip(t1, t2):
    for key in ("reward", "kl", "length"):
      np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-5, err_msg=a["model"])
  _, p1 = tu.latest_params(tmp_path / "one" / "checkpoints")
  _, p2 = tu.latest_params(tmp_path / "two" / "checkpoints")
  import jax
  for x, y in zip(jax.tree.leaves(p1["policy"]), jax.tree.leaves(p2["policy"])):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-6)

  # Both processes resume from the checkpoint, each at its own data position
  # (every process's position is in the checkpoint): two more steps.
  outs = _run_two_processes(tmp_path / "two", {**two_processes, "train.steps": 8,
                                                  "stages": ("preference",)})
  assert all("preference: resumed from step 6" in out for out in outs), outs[1][-3000:]
  steps = [r["step"] for r in tu.read_metrics(str(tmp_path / "two"), "preference")]
  assert steps == list(range(1, 9))


def test_two_processes_padding_free_match_one_process_padded(tmp_path, shared):
  """train.padding_free with 2 processes: each packs its own pairs (its batch shard)
  into as many rows as the other; the losses are the padded one-process run's."""
  common = {"data.data_dir": shared["data_dir"], "sft.checkpoint": shared["sft"],
            "stages": ("preference",), "train.steps": 4, "train.warmup_steps": 0,
            "data.num_shards": 2, "baselines": ()}
  rc, out1 = tu.run_main("configs/dpo.py", str(tmp_path / "one"), common)
  assert rc == 0, out1[-3000:]
  _run_two_processes(tmp_path / "two", {**common, "data.batch_size": 4,
                                        "train.padding_free": True}, "configs/dpo.py")
  one = tu.read_metrics(str(tmp_path / "one"), "preference")
  two = tu.read_metrics(str(tmp_path / "two"), "preference")
  assert len(one) == len(two) == 4
  for a, b in zip(one, two):
    for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected"):
      np.testing.assert_allclose(b[key], a[key], rtol=2e-5, atol=1e-6,
                                 err_msg=f"{key} at step {a['step']}")
  assert one[-1]["loss"] != one[0]["loss"]


def _run_two_processes(workdir, overrides, config="configs/joint_prior.py") -> list[str]:
  """``python -m midpo.main`` as 2 processes of one jax.distributed run."""
  port = _free_port()
  procs = []
  for i in range(2):
    env = {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
           "JAX_PROCESS_ID": str(i), "JAX_PLATFORMS": "cpu"}
    procs.append(tu.run_main(config, str(workdir), overrides, env=env, wait=False))
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  return outs
