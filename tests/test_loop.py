"""The training loop's bookkeeping on a toy state: resume, SIGTERM, non-finite loss."""

import json
import os
import types

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from midpo.training import checkpoint as ckpt_lib
from midpo.training import env as env_lib
from midpo.training import loop, metrics_writer


class CountingIterator:
  """Yields batches {"x": [i]}; its state is the position."""

  def __init__(self):
    self.i = 0

  def __next__(self):
    self.i += 1
    return {"x": np.array([self.i], np.float32), "attention_mask": np.ones((1, 1))}

  def get_state(self):
    return {"i": self.i}

  def set_state(self, state):
    self.i = state["i"]


def _env(tmp_path):
  config = ml_collections.ConfigDict({"checkpoint_every": 5, "max_checkpoints": 3,
                                      "log_every": 1})
  return types.SimpleNamespace(
      config=config, writer=metrics_writer.MetricsWriter(str(tmp_path), enabled=True),
      sigterm=env_lib.SigtermFlag(), process_count=1, process_index=0)


def _spec(env, tmp_path, total, on_step=None, loss=None):
  def step(state, local, index):
    if on_step is not None:
      on_step(index)
    x = state["params"]["x"] + local["x"][0]
    value = x if loss is None else loss(index)
    return {"params": {"x": x}}, {"loss": value}

  return loop.LoopSpec("toy", str(tmp_path / "ckpt"), total, CountingIterator(),
                        loop.count_tokens, step)


def test_sigterm_right_after_a_periodic_checkpoint_exits_cleanly_and_resumes(tmp_path):
  env = _env(tmp_path)

  def flag(index):
    if index == 4:  # step 5 completes, the periodic checkpoint 5 is saved, then we stop
      env.sigterm.received = True

  with pytest.raises(loop.Preempted) as exc:
    loop.run_loop(env, _spec(env, tmp_path, 12, on_step=flag), {"params": {"x": jnp.zeros(())}})
  assert exc.value.step == 5 and exc.value.code == 143
  assert ckpt_lib.Checkpointer(str(tmp_path / "ckpt")).latest_step() == 5
  env.sigterm.received = False
  state = loop.run_loop(env, _spec(env, tmp_path, 12), {"params": {"x": jnp.zeros(())}})
  # Batches 1..12 were each consumed once: the data position was restored too.
  assert float(state["params"]["x"]) == sum(range(1, 13))


def test_sigterm_between_checkpoints_saves_at_the_current_step(tmp_path):
  env = _env(tmp_path)

  def flag(index):
    if index == 6:
      env.sigterm.received = True

  with pytest.raises(loop.Preempted) as exc:
    loop.run_loop(env, _spec(env, tmp_path, 12, on_step=flag), {"params": {"x": jnp.zeros(())}})
  assert exc.value.step == 7
  assert ckpt_lib.Checkpointer(str(tmp_path / "ckpt")).all_steps() == [5, 7]
  env.sigterm.received = False
  state = loop.run_loop(env, _spec(env, tmp_path, 12), {"params": {"x": jnp.zeros(())}})
  assert float(state["params"]["x"]) == sum(range(1, 13))


def test_non_finite_loss_stops_with_the_step_and_the_last_good_checkpoint(tmp_path):
  env = _env(tmp_path)
  loss = lambda index: jnp.float32(np.nan) if index == 7 else jnp.float32(1.0)
  with pytest.raises(FloatingPointError,
                     match=r"toy: non-finite loss \(nan\) at step 7; the last good checkpoint "
                           r"is step 5"):
    loop.run_loop(env, _spec(env, tmp_path, 12, loss=loss), {"params": {"x": jnp.zeros(())}})
  assert ckpt_lib.Checkpointer(str(tmp_path / "ckpt")).latest_step() == 5


def test_result_files_are_replaced_whole_or_not_at_all(tmp_path):
  path = str(tmp_path / "eval.json")
  metrics_writer.write_json(path, {"reward": 1.0})
  with pytest.raises(TypeError):
    metrics_writer.write_json(path, {"reward": object()})  # fails while serialising
  assert json.load(open(path)) == {"reward": 1.0}  # the previous file, intact
  assert os.listdir(tmp_path) == ["eval.json"]  # no temporary file left behind
  metrics_writer.write_json(path, {"b": 1, "a": float("nan")}, sort_keys=True)
  assert open(path).read() == '{\n "a": NaN,\n "b": 1\n}'
  with pytest.raises(OSError):  # the write itself fails: nothing is left half-written
    metrics_writer.write_text(str(tmp_path / "missing" / "x.json"), "{}")


def test_diverged_parameters_are_never_checkpointed(tmp_path):
  # Step 7's update makes the parameters NaN while every loss (computed before
  # its update) is finite: the checkpoint at step 10 is refused, and the one the
  # error names holds finite parameters.
  env = _env(tmp_path)

  def step(state, local, index):
    x = state["params"]["x"] + local["x"][0]
    if index == 6:
      x = x * jnp.float32(np.inf) * 0.0  # NaN
    return ({"params": {"x": x}, "steps": {"n": state["steps"]["n"] + 1}},
            {"loss": jnp.float32(1.0)})

  spec = loop.LoopSpec("toy", str(tmp_path / "ckpt"), 12, CountingIterator(),
                       loop.count_tokens, step)
  init = {"params": {"x": jnp.zeros(())}, "steps": {"n": jnp.zeros((), jnp.int32)}}
  with pytest.raises(FloatingPointError, match=r"toy: non-finite parameters after step 10; not "
                                               r"saved. The last good checkpoint is step 5"):
    loop.run_loop(env, spec, init)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"))
  assert ckpt.all_steps() == [5]
  state, _ = ckpt.restore(5, ckpt_lib.abstract_like(init))
  assert float(state["params"]["x"]) == sum(range(1, 6)) and int(state["steps"]["n"]) == 5
