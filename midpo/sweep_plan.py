"""The plan of a sweep: its axes crossed into runs, each run's config and
workdir, checked before any work (``midpo.sweep`` runs the plan).

The axes, and how a run's config is made, are described in ``midpo.sweep``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any

import ml_collections

from midpo import config_base
from midpo.core import losses
from midpo.training import config as config_lib
from midpo.training import run_identity

# Config keys every run of a (task, seed) must share with its shared reference.
SHARED_KEYS = ("model", "tokenizer", "data", "sft", "seed", "pairs_from", "num_pair_prompts",
               "mesh", "eval")


class SweepError(ValueError):
  """A sweep config that cannot run (raised before any work)."""


def load_config_file(path: str, arg: str = "") -> ml_collections.ConfigDict:
  """``get_config(arg)`` of a config file (a path, not a module name)."""
  name = "midpo_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None or spec.loader is None or not os.path.isfile(path):
    raise SweepError(f"config file {path!r} does not exist")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def update_config(config: ml_collections.ConfigDict, overrides: Any, where: str) -> None:
  """Applies nested ``overrides`` to ``config``; an unknown key is an error."""
  for key, value in dict(overrides or {}).items():
    if key not in config:
      raise SweepError(f"{where}: unknown config key {key!r}")
    if isinstance(value, (dict, ml_collections.ConfigDict)) and isinstance(
        config[key], ml_collections.ConfigDict):
      update_config(config[key], value, f"{where}.{key}")
    else:
      config[key] = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value


def algorithms_by_link(sweep: ml_collections.ConfigDict) -> dict:
  """The algorithms axis crossed with the optional links axis: ``{label:
  algorithm}``, the link's loss overrides merged into the algorithm's."""
  algorithms = dict(sweep.algorithms.items())
  links = sweep.get("links")
  if not links:
    return algorithms
  if not isinstance(links, (dict, ml_collections.ConfigDict)):
    links = {name: {"link": name} for name in links}
  out = {}
  for label, algo in algorithms.items():
    for name, loss in dict(links).items():
      crossed = ml_collections.ConfigDict(algo.to_dict())
      overrides = crossed.get("overrides", {})
      overrides = overrides.to_dict() if hasattr(overrides, "to_dict") else dict(overrides)
      merged_loss = dict(overrides.get("loss", {}))
      merged_loss.update(loss.to_dict() if hasattr(loss, "to_dict") else dict(loss))
      overrides["loss"] = merged_loss
      crossed.overrides = overrides
      out[f"{label}+{name}"] = crossed
  return out


def fmt_alpha(alpha: float) -> str:
  """``alpha`` as a run's directory names it (``alpha_<a>``)."""
  return f"{alpha:g}"


class Plan:
  """The runs of a sweep config: their configs and workdirs.

  Raises:
    SweepError: an axis is empty, a file is missing, an override names an
      unknown key, or a run would not share its seed's reference and pairs.
  """

  def __init__(self, sweep: ml_collections.ConfigDict, sweep_file: str, workdir: str):
    self.sweep, self.workdir = sweep, os.path.abspath(workdir)
    self.configs_dir = os.path.dirname(os.path.dirname(os.path.abspath(sweep_file)))
    for axis in ("algorithms", "tasks", "seeds"):
      if not len(sweep[axis]):
        raise SweepError(f"sweep axis {axis!r} is empty")
    self.algorithms = algorithms_by_link(sweep)
    if sweep.compare_to not in self.algorithms:
      raise SweepError(f"compare_to {sweep.compare_to!r} is not one of the algorithms "
                       f"{list(self.algorithms)}")
    if float(sweep.compare_alpha) not in [float(a) for a in
                                          self.algorithms[sweep.compare_to].alphas]:
      raise SweepError(f"compare_alpha {sweep.compare_alpha} is not one of "
                       f"{sweep.compare_to}'s alphas")
    self.shared: dict[tuple[str, int], dict] = {}
    self.runs: list[dict] = []
    for task in sweep.tasks:
      for seed in sweep.seeds:
        root = os.path.join(self.workdir, "shared", task, f"seed_{seed}")
        base = self._config(config_base.get_config(), task, seed, {})
        base.stages = ("sft",)
        self.shared[(task, seed)] = {"workdir": root, "config": base}
        for label, algo in self.algorithms.items():
          names = [fmt_alpha(float(a)) for a in algo.alphas]
          if len(set(names)) != len(names):
            raise SweepError(f"algorithm {label!r} lists an alpha twice: {list(algo.alphas)}")
          for alpha in algo.alphas:
            self.runs.append(self._run(task, seed, label, algo, float(alpha), root, base))

  def _config(self, config, task, seed, algo_overrides) -> ml_collections.ConfigDict:
    update_config(config, {"baselines": ()}, "sweep")
    update_config(config, self.sweep.overrides, "sweep.overrides")
    update_config(config, self.sweep.tasks[task], f"sweep.tasks.{task}")
    update_config(config, algo_overrides, "sweep.algorithms")
    config.seed = int(seed)
    return config

  def _run(self, task, seed, label, algo, alpha, root, base) -> dict:
    path = os.path.join(self.configs_dir, algo.config)
    config = self._config(load_config_file(path), task, seed, algo.get("overrides", {}))
    config.loss.alpha = alpha
    try:
      losses.check_compatible(config_lib.make_loss_config(config), config_lib.make_prior(config))
    except ValueError as e:
      raise SweepError(f"algorithm {label!r}: {e}") from None
    for key in SHARED_KEYS:
      ours = config[key].to_dict() if hasattr(config[key], "to_dict") else config[key]
      theirs = base[key].to_dict() if hasattr(base[key], "to_dict") else base[key]
      if ours != theirs:
        raise SweepError(f"algorithm {label!r} sets {key!r} differently from the shared "
                         f"reference's config ({ours!r} != {theirs!r}): set it in the sweep's "
                         "overrides or the task's, for every run")
    if config.eval.every <= 0:
      raise SweepError(f"algorithm {label!r}: eval.every is {config.eval.every}; a sweep "
                       "evaluates along training (set it in the sweep's overrides)")
    config.stages = ("preference", "eval")
    config.eval.reference_mutual_information = False  # estimated once per seed, shared
    config.sft.checkpoint = os.path.join(root, "sft")
    if config.pairs_from == "reference":
      config.pairs_file = os.path.join(root, "pairs", "reference_samples.jsonl")
    config.data.data_dir = os.path.join(root, "tfds")
    workdir = os.path.join(self.workdir, "runs", task, label, f"alpha_{fmt_alpha(alpha)}",
                           f"seed_{seed}")
    return {"task": task, "algorithm": label, "alpha": alpha, "seed": int(seed),
            "workdir": workdir, "config": config}

  def axes(self) -> dict:
    """The sweep's axes as plain data (for ``sweep.json``)."""
    return {"tasks": {t: dict(o) for t, o in self.sweep.tasks.to_dict().items()},
            "seeds": [int(s) for s in self.sweep.seeds],
            "algorithms": {k: {"config": a.config, "alphas": [float(x) for x in a.alphas],
                               "prior": self.config_of(k).prior.name}
                           for k, a in self.algorithms.items()},
            "compare_to": self.sweep.compare_to, "compare_alpha": float(self.sweep.compare_alpha)}

  def config_of(self, label: str) -> ml_collections.ConfigDict:
    """The config of the first run of algorithm ``label``."""
    return next(r["config"] for r in self.runs if r["algorithm"] == label)


def check_same_config(config: ml_collections.ConfigDict, path: str, what: str) -> None:
  """Raises SweepError when ``path`` (a ``config.json`` written earlier) holds
  another config than ``config``: a resumed sweep whose config changed.

  Raises:
    SweepError: naming up to 5 differing keys and ``what`` was made with them.
  """
  if not os.path.exists(path):
    return
  with open(path) as f:
    diff = run_identity.differences(json.load(f), run_identity.config_json(config))
  # The divergence guard's thresholds change no result (and sweeps started
  # before the guard existed lack them).
  diff = [d for d in diff if not d[0].startswith("divergence.")]
  if diff:
    shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diff[:5])
    raise SweepError(f"{what} in {os.path.dirname(path)} was made with another config ({shown}"
                     f"{', ...' if len(diff) > 5 else ''}); resume with the same sweep config, "
                     "or use another --workdir")


__all__ = ["SHARED_KEYS", "Plan", "SweepError", "algorithms_by_link", "check_same_config",
           "fmt_alpha", "load_config_file", "update_config"]
