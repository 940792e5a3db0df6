"""The stage runner: SFT, preference training under any prior, evaluation.

``train_and_evaluate(config, workdir)`` runs the stages ``config.stages`` names:

* ``sft``: trains the reference (and initial policy) on the SFT split by
  maximum likelihood of the responses (``midpo.training.sft``). Skipped when
  ``config.sft.checkpoint`` or ``config.model.hf_path`` gives the reference.
* ``preference``: MI-DPO training of the policy under ``config.prior``
  (``midpo.training.preference``, with the prior's algorithm from
  ``midpo.algorithms``), then the ``config.baselines``. The pairs come from
  the dataset or (``pairs_from='reference'``) are sampled from the reference
  and labelled by Bradley-Terry on the known reward.
* ``eval``: samples on held-out prompts (``midpo.evaluate``), writes
  ``eval.json``.

Every stage checkpoints with orbax under the workdir, resumes automatically
from its latest checkpoint, and saves before exiting on SIGTERM or SIGINT
(within about a second of work: long operations inside a stage check for it).
"""

from __future__ import annotations

import os

import jax
from absl import logging
from jax.experimental import multihost_utils

from midpo import algorithms  # noqa: F401  (registers every published algorithm)
from midpo import files, sampling
from midpo import evaluate as eval_lib
from midpo.data import report as data_report
from midpo.models import hub
from midpo.training import checkpoint as ckpt_lib
from midpo.training import config as config_lib
from midpo.training import env as env_lib
from midpo.training import export, loop, metrics_writer, preference, run_identity, sft


# Errors a user fixes (a config, a busy workdir, data that cannot make a run:
# too few rows, a bad row under 'fatal', a tokenizer that does not fit the
# data): ``midpo.main`` prints their one-line message, without a traceback,
# and exits with code 2.
USER_ERRORS = (config_lib.ConfigError, run_identity.WorkdirInUse, data_report.DataError,
               hub.HubError, files.MissingFilesystem)
# A run that stopped for a reason its message states in full (a divergence, no
# readable checkpoint): the same, with code 1.
RUN_ERRORS = (loop.Diverged, ckpt_lib.CheckpointError)


def run_pairs(env: env_lib.Env, reference) -> dict:
  """The run's pair source (overrides of ``config.data.synthetic``): the
  dataset's pairs, or two responses per training prompt sampled from the
  reference (written once per workdir, or ``config.pairs_file``)."""
  if env.config.pairs_from == "reference" and env.config.pairs_file:
    return {"samples_path": files.abspath(env.config.pairs_file)}
  if env.config.pairs_from == "reference":
    return {"samples_path": sampling.sample_pairs(env, reference, "reference", 0)}
  return {}


def _existing_pairs(env: env_lib.Env):
  """The run's pair source when it exists without sampling (None otherwise)."""
  if env.config.pairs_from != "reference":
    return {}
  path = env.config.pairs_file or os.path.join(env.workdir, "pairs", "reference_samples.jsonl")
  return {"samples_path": files.abspath(path)} if files.exists(path) else None


def train_and_evaluate(config, workdir: str) -> dict:
  """Runs ``config.stages``; returns the evaluation results (also in ``eval.json``).

  Raises:
    ConfigError: a config value is wrong, or the workdir was started with
      another config (``midpo.training.run_identity``); before anything is built.
    WorkdirInUse: another run holds the workdir (``run_identity.workdir_lock``).
    Preempted: SIGTERM (exit code 143) or SIGINT (130), after the stage in
      progress saved what resumes exactly.
    Diverged: the divergence guard stopped a stage (the message names the
      last good checkpoint).
  """
  config_lib.validate(config)  # a wrong config leaves no workdir behind
  files.makedirs(workdir)
  with run_identity.workdir_lock(workdir, hold=jax.process_index() == 0):
    return _run_stages(config, workdir)


def _run_stages(config, workdir: str) -> dict:
  """``train_and_evaluate``'s work, with the workdir held."""
  env = env_lib.make_env(config, workdir)
  changed = run_identity.check_restart(config, workdir)  # before any work
  if env.process_count > 1:  # every process has read the workdir's records before they change
    multihost_utils.sync_global_devices("midpo_read_run_records")
  if env.process_index == 0:
    run_identity.record_restart(workdir, changed)
    run_identity.record_resolution(  # before config.json: what the run began with
        workdir, env_lib.resolutions(env.model_config))
    files.write_text(os.path.join(workdir, "config.json"),
                              config.to_json_best_effort(indent=1, sort_keys=True))
    env.writer.write_hparams(metrics_writer.flatten(config.to_dict(), sep="."))
  logging.info("mesh %s over %d devices (%d processes); model %s, %.2fM parameters",
               dict(env.mesh.shape), jax.device_count(), jax.process_count(),
               config.model.hf_path or config.model.name, env.model_config.num_params() / 1e6)
  stages = tuple(config.stages)
  results = {}
  env.sigterm.install()  # SIGTERM and SIGINT, for the whole run
  doing = "the sft stage"  # what a stop signal interrupts, for its message
  try:
    reference = sft.run_sft(env)
    policy, prior_params, frozen = reference, None, {"reference": reference}
    baselines, pairs = {}, None
    if "preference" in stages:
      doing = "the preference pairs' sampling"
      pairs = run_pairs(env, reference)
      doing = "the preference stage"
      policy, prior_params, frozen = preference.run_preference(env, reference, pairs)
      baselines = preference.run_baselines(env, reference, pairs)
    elif "eval" in stages and files.isdir(preference.preference_dir(env)):
      policy, prior_params = preference.restore_preference(env, reference)
      baselines = preference.restore_baselines(env)
      pairs = _existing_pairs(env)
    if "preference" in stages and config.model.hf_path:
      export.export_hf(env, policy)
    if "eval" in stages:
      doing = "the eval stage"
      results = eval_lib.run_eval(env, policy, frozen, prior_params, baselines, pairs)
  except env_lib.StopRequested as e:
    # Outside a stage's step loop (the pairs' sampling, evaluation, a
    # stage's setup). What was saved before stays; that work is redone.
    logging.warning("%s received during %s (%s): stopped it; every stage already finished is "
                    "kept, and the same command redoes this one exactly.", e.signal_name,
                    doing, e.what)
    raise loop.Preempted(None, e.exit_code) from None
  finally:
    env.sigterm.uninstall()
    env.writer.close()
  return results
