"""The training loop's bookkeeping on a toy state: resume, SIGTERM, non-finite loss."""

import json
import os
import types

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from midpo import files
from midpo.training import checkpoint as ckpt_lib
from midpo.training import env as env_lib
from midpo.training import config as config_lib
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
                     match=r"toy: non-finite loss \(nan\) at step 8; the last good checkpoint "
                           r"is step 5"):
    loop.run_loop(env, _spec(env, tmp_path, 12, loss=loss), {"params": {"x": jnp.zeros(())}})
  assert ckpt_lib.Checkpointer(str(tmp_path / "ckpt")).latest_step() == 5


def test_result_files_are_replaced_whole_or_not_at_all(tmp_path):
  path = str(tmp_path / "eval.json")
  files.write_json(path, {"reward": 1.0})
  with pytest.raises(TypeError):
    files.write_json(path, {"reward": object()})  # fails while serialising
  assert json.load(open(path)) == {"reward": 1.0}  # the previous file, intact
  assert os.listdir(tmp_path) == ["eval.json"]  # no temporary file left behind
  files.write_json(path, {"b": 1, "a": float("nan")}, sort_keys=True)
  assert open(path).read() == '{\n "a": NaN,\n "b": 1\n}'
  with pytest.raises(OSError):  # the write itself fails: nothing is left half-written
    files.write_text(str(tmp_path / "missing" / "x.json"), "{}")


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
  with pytest.raises(FloatingPointError, match=r"toy: non-finite parameters \(not saved\) at step "
                                               r"10; the last good checkpoint is step 5"):
    loop.run_loop(env, spec, init)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"))
  assert ckpt.all_steps() == [5]
  state, _ = ckpt.restore(5, ckpt_lib.abstract_like(init))
  assert float(state["params"]["x"]) == sum(range(1, 6)) and int(state["steps"]["n"]) == 5


def _run(env, spec, init=None):
  return loop.run_loop(env, spec, init or {"params": {"x": jnp.zeros(())}})


@pytest.mark.parametrize("bad_loss, reason", [
    (1e6, r"loss 1e\+06 above divergence.max_loss=10000"),
    (np.inf, r"non-finite loss \(inf\)"),
])
def test_a_diverged_loss_deletes_the_checkpoint_it_came_from_and_names_the_good_one(
    tmp_path, bad_loss, reason):
  # Checkpoint 10 holds the parameters after step 9's update; step 10's loss,
  # computed on them, fails the guard: checkpoint 10 is deleted and 5 named.
  env = _env(tmp_path)
  loss = lambda index: jnp.float32(bad_loss if index == 10 else 1.0)
  with pytest.raises(loop.Diverged, match=rf"toy: {reason} at step 11; the last good "
                                          r"checkpoint is step 5 in "):
    _run(env, _spec(env, tmp_path, 12, loss=loss))
  assert ckpt_lib.Checkpointer(str(tmp_path / "ckpt")).all_steps() == [5]
  # Rerun (e.g. at a saner learning rate): it resumes from step 5 and finishes.
  state = _run(env, _spec(env, tmp_path, 12))
  assert float(state["params"]["x"]) == sum(range(1, 13))


def test_the_guard_stops_a_dead_model_and_a_loss_spike(tmp_path):
  guard = loop.DivergenceGuard(spike_factor=10.0, spike_window=4)
  assert guard.check({"loss": 1.0, "grad_norm/policy": 0.5}, [1.0] * 4) is None
  assert "grad_norm/policy is exactly 0" in guard.check({"loss": 1.0, "grad_norm/policy": 0.0},
                                                         [])
  assert "grad_norm is exactly 0" in guard.check({"loss": 1.0, "grad_norm": 0.0}, [])
  # The hinge link's loss is exactly 0, with no gradient, once every pair
  # clears its margin: not a dead model.
  assert guard.check({"loss": 0.0, "grad_norm/policy": 0.0}, []) is None
  assert guard.check({"loss": 11.0}, [1.0] * 3) is None  # the window is not full yet
  assert "above divergence.spike_factor=10 x the median 1" in guard.check({"loss": 11.0},
                                                                          [1.0, 1.0, 0.9, 5.0])
  off = loop.DivergenceGuard(max_loss=0.0, zero_grad_norm=False)
  assert off.check({"loss": 1e30, "grad_norm": 0.0}, []) is None
  # In the loop: a zero gradient norm at step 3 stops the stage (no checkpoint yet).
  env = _env(tmp_path)

  def step(state, local, index):
    return state, {"loss": jnp.float32(1.0), "grad_norm": jnp.float32(0.0 if index == 3 else 1.0)}

  spec = loop.LoopSpec("toy", str(tmp_path / "ckpt"), 12, CountingIterator(), loop.count_tokens,
                       step)
  with pytest.raises(loop.Diverged, match=r"grad_norm is exactly 0 .* at step 4; the last good "
                                          r"checkpoint is none"):
    _run(env, spec)


def test_a_stop_signal_inside_a_step_saves_the_state_before_it_and_resumes_exactly(tmp_path):
  # A long step (a learned prior's round) sees the signal before it changes
  # the state: the loop saves the state and data position before that step.
  env = _env(tmp_path)

  def during(index):
    if index == 7:
      env.sigterm.received, env.sigterm.signal_name = True, "SIGINT"
      env_lib.check_stop(env, "a long round")

  with pytest.raises(loop.Preempted) as exc:
    _run(env, _spec(env, tmp_path, 12, on_step=during))
  assert exc.value.step == 7 and exc.value.code == 130  # SIGINT: 128 + 2
  env.sigterm.received = False
  state = _run(env, _spec(env, tmp_path, 12))
  assert float(state["params"]["x"]) == sum(range(1, 13))  # batch 8 not skipped nor repeated


def test_a_resumed_run_logs_the_same_rows_as_an_uninterrupted_one(tmp_path):
  # log_every=4, preempted at step 6 (mid-window): the row of step 8 averages
  # steps 5-8 as in the uninterrupted run (the window is in the checkpoint).
  def rows(path):
    return [{k: v for k, v in r.items() if not k.startswith("perf/")}
            for r in tu_rows(path)]

  def tu_rows(path):
    return [json.loads(line) for line in open(path / "metrics.jsonl")]

  for name, stop_at in (("straight", None), ("resumed", 5)):
    env = _env(tmp_path / name)
    env.config.log_every = 4

    def flag(index, env=env, stop_at=stop_at):
      if index == stop_at:
        env.sigterm.received = True

    if stop_at is None:
      _run(env, _spec(env, tmp_path / name, 12))
      continue
    with pytest.raises(loop.Preempted):
      _run(env, _spec(env, tmp_path / name, 12, on_step=flag))
    env.sigterm.received = False
    _run(env, _spec(env, tmp_path / name, 12))
  assert rows(tmp_path / "straight") == rows(tmp_path / "resumed")
  assert [r["step"] for r in rows(tmp_path / "straight")] == [4, 8, 12]
  assert rows(tmp_path / "straight")[1]["loss"] == np.mean(np.cumsum(range(1, 9))[4:8])


def _damage(directory, step, how):
  step_dir = directory / str(step)
  if how == "empty meta":
    (step_dir / "meta" / "metadata").write_text("")
  else:  # truncate every array file
    for path in step_dir.rglob("*"):
      if path.is_file() and path.parent.name == "d":
        path.write_bytes(path.read_bytes()[:3])


@pytest.mark.parametrize("how", ["empty meta", "truncated arrays"])
def test_a_damaged_latest_checkpoint_is_set_aside_and_the_previous_one_resumed(
    tmp_path, how, caplog):
  env = _env(tmp_path)
  with pytest.raises(loop.Preempted):
    _run(env, _spec(env, tmp_path, 12, on_step=lambda i: setattr(env.sigterm, "received",
                                                                  i == 6)))
  directory = tmp_path / "ckpt"
  assert ckpt_lib.Checkpointer(str(directory)).all_steps() == [5, 7]
  _damage(directory, 7, how)
  env.sigterm.received = False
  with caplog.at_level("WARNING"):
    state = _run(env, _spec(env, tmp_path, 12))
  assert float(state["params"]["x"]) == sum(range(1, 13))
  warning = caplog.text
  assert "checkpoint step 7 is damaged" in warning and "Resuming from step 5" in warning
  assert "set aside as damaged.7." in warning
  if how == "empty meta":
    assert f"{directory / '7' / 'meta' / 'metadata'}: JSONDecodeError" in warning
  assert (directory / "damaged.7").is_dir()  # kept for inspection


def test_no_intact_checkpoint_is_an_error_naming_each_one(tmp_path):
  env = _env(tmp_path)
  with pytest.raises(loop.Preempted):
    _run(env, _spec(env, tmp_path, 12, on_step=lambda i: setattr(env.sigterm, "received",
                                                                  i == 6)))
  for step in (5, 7):
    _damage(tmp_path / "ckpt", step, "empty meta")
  env.sigterm.received = False
  with pytest.raises(ckpt_lib.CheckpointError, match=r"no intact checkpoint in .*ckpt: step 7: "
                                                     r".*JSONDecodeError.*; step 5: "):
    _run(env, _spec(env, tmp_path, 12))


def test_a_checkpoint_resumed_with_another_config_names_the_key(tmp_path):
  env = _env(tmp_path)
  env.config.seed = 1
  with pytest.raises(loop.Preempted):
    _run(env, _spec(env, tmp_path, 12, on_step=lambda i: setattr(env.sigterm, "received",
                                                                  i == 6)))
  env.sigterm.received = False
  env.config.seed = 2
  env.config.log_every = 3  # may change
  with pytest.raises(config_lib.ConfigError,
                     match=r"checkpoint .*ckpt/7 was saved by a run with another config; "
                           r"changed: seed: 1 -> 2\. "):
    _run(env, _spec(env, tmp_path, 12))


def test_a_failed_asynchronous_save_stops_the_loop_at_the_next_step(tmp_path, monkeypatch):
  env = _env(tmp_path)
  steps = []
  ckpt = {}
  real = ckpt_lib.Checkpointer.save

  def failing_save(self, step, trees, meta, force=False):
    ckpt["manager"] = self
    real(self, step, trees, meta, force=force)
    if step == 5:  # the save in the background fails after save() returned
      def boom():
        raise OSError(28, "No space left on device", str(tmp_path / "ckpt" / "5"))
      monkeypatch.setattr(self._manager, "is_saving_in_progress", lambda: False)
      monkeypatch.setattr(self._manager, "wait_until_finished", boom)

  monkeypatch.setattr(ckpt_lib.Checkpointer, "save", failing_save)
  with pytest.raises(OSError, match="No space left on device"):
    _run(env, _spec(env, tmp_path, 12, on_step=steps.append))
  assert steps[-1] <= 6  # at the first step after the failure, not at the next save (10)


def test_a_checkpoint_resumed_on_other_data_is_a_config_error(tmp_path):
  env = _env(tmp_path)
  with pytest.raises(loop.Preempted):
    _run(env, _spec(env, tmp_path, 12, on_step=lambda i: setattr(env.sigterm, "received",
                                                                  i == 6)))
  env.sigterm.received = False
  spec = _spec(env, tmp_path, 12)

  def refuse(state):
    raise ValueError("iterator state was saved for other data (fingerprint a != b)")

  spec.iterator.set_state = refuse
  with pytest.raises(config_lib.ConfigError, match=r"checkpoint .*ckpt/7 was saved with other "
                                                   r"data .*fingerprint a != b"):
    _run(env, spec)


def test_a_run_cannot_be_shortened_after_it_trained(tmp_path):
  env = _env(tmp_path)
  _run(env, _spec(env, tmp_path, 12))
  with pytest.raises(config_lib.ConfigError, match=r"toy: its latest checkpoint is at step 12 in "
                                                   r".*ckpt, past the 10 steps the config asks"):
    _run(env, _spec(env, tmp_path, 10))
  state = _run(env, _spec(env, tmp_path, 12))  # complete: restored, nothing run
  assert float(state["params"]["x"]) == sum(range(1, 13))
