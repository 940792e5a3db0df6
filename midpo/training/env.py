"""The run's environment: mesh, tokenizer, model definition, batch placement.

``make_env(config, workdir)`` validates the config and builds an ``Env``: the
device mesh from ``config.mesh``, the tokenizer, the model configuration and
its NNX graph definition, the metrics writer and the SIGTERM flag. Every
later stage takes the ``Env``; parameters are plain pytrees merged with
``env.graphdef`` inside jitted functions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
from typing import Any, Optional

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from midpo import files
from midpo.data import batches as batches_lib
from midpo.data import pipeline, synthetic
from midpo.models import config as model_config_lib
from midpo.models import hf_checkpoint, hub, sharding
from midpo.models import tokenizer as tokenizer_lib
from midpo.models import transformer
from midpo.training import checkpoint as ckpt_lib
from midpo.training import config as config_lib
from midpo.training import metrics_writer
from midpo.training import run_identity

PyTree = Any


class SigtermFlag:
  """Set by SIGTERM (preemption) or SIGINT (Ctrl-C) while installed.

  Loops check it between steps, and long operations inside a stage (sampling,
  the learned prior's fits, evaluation) through ``check_stop``, so a run stops
  within about a second of work. A second SIGINT interrupts at once
  (``KeyboardInterrupt``). ``install`` nests: the handlers stay until the
  outermost ``uninstall``.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received = False
    self.signal_name = "SIGTERM"
    self._previous: dict = {}
    self._depth = 0

  @property
  def exit_code(self) -> int:
    """The shell's code for death by the signal received: 143 (SIGTERM), 130 (SIGINT)."""
    return 128 + int(getattr(signal, self.signal_name))

  def install(self) -> None:
    if self._depth == 0:
      self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
    self._depth += 1

  def _handle(self, signum, frame) -> None:
    del frame
    name = signal.Signals(signum).name
    if self.received and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: stop now, save nothing
    logging.warning("%s received: saving a checkpoint after the current step (or stopping "
                    "the operation in progress)%s.", name,
                    "; a second Ctrl-C stops without saving" if signum == signal.SIGINT else "")
    self.received, self.signal_name = True, name

  def uninstall(self) -> None:
    self._depth = max(self._depth - 1, 0)
    if self._depth == 0:
      for s, previous in self._previous.items():
        if previous is not None:
          signal.signal(s, previous)
      self._previous = {}


class StopRequested(Exception):
  """A stop signal seen inside a long operation (``check_stop``), before it
  finished; the stage that called it saves what resumes exactly, or nothing
  when it is redone whole on restart."""

  def __init__(self, what: str, signal_name: str, exit_code: int):
    super().__init__(f"{signal_name} during {what}")
    self.what, self.signal_name, self.exit_code = what, signal_name, exit_code


def stop_requested(env) -> bool:
  """Whether a stop signal was received (on any process: every process
  stops at the same point; with several processes this is a collective,
  so every process must call it at the same points)."""
  if env.process_count > 1:
    return bool(env.max_over_processes(int(env.sigterm.received)))
  return env.sigterm.received


def gather_json(env, obj: Any) -> list:
  """Every process's ``obj`` (JSON-able), in process order: a collective with
  several processes (each must call it at the same point); ``[obj]`` with one."""
  if env.process_count == 1:
    return [obj]
  data = np.frombuffer(json.dumps(obj, sort_keys=True).encode("utf-8"), np.uint8)
  width = env.max_over_processes(len(data))
  padded = np.zeros(width, np.uint8)
  padded[:len(data)] = data
  rows = np.asarray(multihost_utils.process_allgather(padded))
  lengths = np.asarray(multihost_utils.process_allgather(np.array(len(data))))
  return [json.loads(bytes(row[:n]).decode("utf-8")) for row, n in zip(rows, lengths)]


def check_stop(env, what: str) -> None:
  """Raises ``StopRequested`` naming ``what`` if a stop signal was received."""
  if stop_requested(env):
    raise StopRequested(what, env.sigterm.signal_name, env.sigterm.exit_code)


@dataclasses.dataclass
class Env:
  """What every stage of a run shares."""
  config: Any
  workdir: str
  mesh: jax.sharding.Mesh
  tokenizer: Any
  model_config: model_config_lib.ModelConfig
  graphdef: Any
  writer: metrics_writer.MetricsWriter
  sigterm: SigtermFlag
  # Compiled functions of this run by key (``compiled``), so that each is
  # built once per run whatever the number of calls.
  jit_cache: dict = dataclasses.field(default_factory=dict)

  def compiled(self, key, build):
    """``build()``'s result for ``key`` (a hashable description of what it
    computes), built on the first call only."""
    if key not in self.jit_cache:
      self.jit_cache[key] = build()
    return self.jit_cache[key]

  @property
  def process_index(self) -> int:
    return jax.process_index()

  @property
  def process_count(self) -> int:
    return jax.process_count()

  @property
  def batch_sharding(self) -> jax.sharding.NamedSharding:
    """The leading (batch) axis over ``data`` x ``fsdp``, the rest replicated."""
    return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(("data", "fsdp")))

  def global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows -> one global array per key, sharded over the batch.

    With several processes, arrays with a length axis (the last; every array
    of 2 or more axes but the per-response values ``reward`` and ``score``,
    and ``train.padding_free``'s ``packed_*`` rows, ``data.max_length`` wide
    in every process) are first padded to the longest of any process, so that
    shapes agree.
    """
    if self.process_count > 1:
      timed = {k for k, v in local.items()
               if np.ndim(v) >= 2 and k not in batches_lib.RESPONSE_VALUE_KEYS
               and not k.startswith("packed_")}
      if timed:
        t = self.max_over_processes(max(np.shape(local[k])[-1] for k in timed))
        local = {k: pad_last(np.asarray(v), t) if k in timed else v for k, v in local.items()}
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, v)
            for k, v in local.items()}

  def model(self, params: PyTree) -> nnx.Module:
    """The policy architecture with ``params``."""
    return nnx.merge(self.graphdef, params)

  def batches(self, data_config, split: str, mode: str) -> batches_lib.ShardedBatches:
    """This process's share of ``split`` (see ``midpo.data.batches``)."""
    return batches_lib.ShardedBatches(data_config, self.tokenizer, split, self.workdir,
                                      process_index=self.process_index,
                                      process_count=self.process_count, mode=mode,
                                      shared_data_dir=self.shared_data_dir)

  @property
  def shared_data_dir(self) -> bool:
    """Whether every process sees the same TFDS ``data_dir`` (so that process 0 builds the
    datasets for all): false for the per-process local cache a remote workdir gets."""
    return bool(self.config.data.data_dir) or not files.is_remote(self.workdir)

  def data_config(self, **synthetic_overrides):
    """``config.data`` with its defaults resolved and ``synthetic_overrides`` applied to
    its ``synthetic`` block. ``data_dir`` defaults to ``<workdir>/tfds``; for a remote
    workdir (``gs://``), where TFDS cannot write its ``array_record`` files, to a local
    cache per workdir and process, ``files.cache_dir('tfds', <hash of the workdir>,
    'process-<i>')``, which a restart of the run reuses."""
    c = self.config.data.copy_and_resolve_references()
    if not c.data_dir and files.is_remote(self.workdir):
      # Per workdir too: two runs on one host never build into the same directory at once.
      run = hashlib.sha256(self.workdir.rstrip("/").encode()).hexdigest()[:12]
      c.data_dir = files.cache_dir("tfds", run, f"process-{self.process_index}")
    elif not c.data_dir:
      c.data_dir = os.path.join(self.workdir, "tfds")
    for k, v in synthetic_overrides.items():
      setattr(c.synthetic, k, v)
    return c

  def max_over_processes(self, n: int) -> int:
    """The largest ``n`` of any process (``n`` itself with one process)."""
    if self.process_count > 1:
      return int(np.max(multihost_utils.process_allgather(np.array(n))))
    return n

  def min_over_processes(self, n: int) -> int:
    """The smallest ``n`` of any process (``n`` itself with one process)."""
    if self.process_count > 1:
      return int(np.min(multihost_utils.process_allgather(np.array(n))))
    return n


def pad_last(x: np.ndarray, t: int) -> np.ndarray:
  """Right-pads the last axis of ``x`` with zeros to length ``t``."""
  pad = [(0, 0)] * (x.ndim - 1) + [(0, t - x.shape[-1])]
  return np.pad(x, pad) if x.shape[-1] < t else x


def gather(x: jax.Array) -> np.ndarray:
  """A global array on every process's host, whole (the rows of every process)."""
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in order."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  seen, rows = set(), []
  for s in shards:
    key = (s.index[0].start, s.index[0].stop)
    if key not in seen:
      seen.add(key)
      rows.append(np.asarray(s.data))
  return np.concatenate(rows)


def make_tokenizer(config):
  """``config.tokenizer``: 'synthetic', 'byte', a directory with tokenizer.json (or a Hub
  id or a ``gs://`` directory, ``midpo.models.hub``), or 'auto' (the checkpoint's,
  ``config.model.hf_path``, when set; else 'byte')."""
  if config.tokenizer == "synthetic":
    return synthetic.SyntheticTokenizer()
  if config.tokenizer == "auto":
    return tokenizer_lib.load_tokenizer(hub.local_dir(config.model.hf_path)
                                        if config.model.hf_path else "byte")
  if hub.is_hub_id(config.tokenizer) or files.is_remote(config.tokenizer):
    return tokenizer_lib.load_tokenizer(hub.local_dir(config.tokenizer, "tokenizer"))
  return tokenizer_lib.load_tokenizer(config.tokenizer)


def make_model_config(config, tok, workdir: Optional[str] = None
                      ) -> model_config_lib.ModelConfig:
  """The policy's model configuration: a local HF checkpoint's, or the named
  built-in one with the tokenizer's vocabulary (rounded up to a multiple of 8);
  ``model.attention_impl`` resolved for this backend, except that 'auto' in a
  ``workdir`` whose run started already keeps what it resolved to then
  (``run_identity.recorded_resolution``), so a restart computes as the run did
  (where that implementation cannot run, as a GPU run's cuDNN evaluated on a
  CPU, a warning says so and 'auto' resolves afresh).

  Raises:
    ConfigError: an unknown model name or attention implementation, or the
      workdir's records are not readable.
  """
  overrides = dict(dtype=config.model.dtype, param_dtype=config.model.param_dtype,
                   remat=config.model.remat)
  if config.model.scan_layers is not None:
    overrides["scan_layers"] = bool(config.model.scan_layers)
  if config.model.hf_path:
    mc = hf_checkpoint.read_hf_config(hub.local_dir(config.model.hf_path), **overrides)
  else:
    try:
      base = model_config_lib.get_config(config.model.name)
    except ValueError as e:
      raise config_lib.ConfigError(f"config.model.name: {e}") from None
    mc = base.replace(vocab_size=pipeline.round_up(tok.vocab_size, 8), bos_token_id=tok.bos_id,
                      eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, **overrides)
  tokenizer_lib.check_fits(tok, mc.vocab_size)
  requested, backend = config.model.attention_impl, jax.default_backend()
  if config.model.scan_layers is None:
    mc = mc.replace(scan_layers=resolve_scan_layers(mc.scan_layers, backend, workdir))
  kept = (run_identity.recorded_resolution(workdir, "model.attention_impl")
          if requested == "auto" and workdir is not None else None)
  try:
    impl = model_config_lib.resolve_attention_impl(requested, mc, backend)
  except ValueError as e:
    raise config_lib.ConfigError(f"config.model.attention_impl: {e}") from None
  if kept and kept != impl:
    try:
      model_config_lib.resolve_attention_impl(kept, mc, backend)
      logging.info("model.attention_impl='auto' keeps %r, what it resolved to when the run in "
                   "%s began", kept, workdir)
      impl = kept
    except ValueError:
      logging.warning("model.attention_impl: the run in %s began with 'auto' as %r, which "
                      "cannot run on this %s backend; %r here, so what this process computes "
                      "differs from a resume where the run began (in the last digits)",
                      workdir, kept, backend, impl)
  return mc.replace(attention_impl=impl)


def resolve_scan_layers(model_default: bool, backend: str,
                        workdir: Optional[str] = None) -> bool:
  """``model.scan_layers`` unset: layers unrolled on a CPU backend, else the model's
  own (``model_default``: checkpoints scanned, built-in tiny/micro unrolled); in a
  ``workdir`` whose run started already, what it resolved to then
  (``run_identity.recorded_resolution``; the model's own for a run that began before
  this was recorded).

  Unrolled, XLA:CPU runs vs_trl.py's 4-layer step 1.09x to 1.10x faster than as
  one ``lax.scan``, with about 11% less peak RSS, equal to float32 rounding
  (``tests/test_models_core.py``); BENCHMARKS.md.
  """
  fresh = model_default and backend != "cpu"
  kept = (run_identity.recorded_resolution(workdir, "model.scan_layers")
          if workdir is not None else None)
  if kept is None:
    return fresh
  if kept != run_identity.MODEL_DEFAULT:
    return bool(kept)
  if model_default != fresh:
    logging.info("model.scan_layers unset: the run in %s began before layouts were recorded, "
                 "so it keeps the model's own (scanned)", workdir)
  return model_default


def resolutions(mc: model_config_lib.ModelConfig) -> dict:
  """What a run's unset or 'auto' model options resolved to (``resolved.json``)."""
  return {"model.attention_impl": mc.attention_impl, "model.scan_layers": mc.scan_layers}


def make_env(config, workdir: str) -> Env:
  """Validates ``config`` and builds the run's ``Env`` (raises ``ConfigError``)."""
  config_lib.validate(config)
  shape = config_lib.mesh_shape(config, jax.device_count())
  mesh = sharding.make_mesh(**shape)
  tok = make_tokenizer(config)
  mc = make_model_config(config, tok, workdir)
  graphdef = model_graphdef(mc, mesh)
  writer = metrics_writer.MetricsWriter(workdir, enabled=jax.process_index() == 0)
  return Env(config, workdir, mesh, tok, mc, graphdef, writer, SigtermFlag())


def _abstract_model(mc, mesh) -> transformer.Transformer:
  def make():
    model = transformer.Transformer(mc, rngs=nnx.Rngs(params=0))
    model.activation_sharding = (mesh, tuple(sharding.DEFAULT_RULES))
    return model
  return nnx.eval_shape(make)


def model_graphdef(mc: model_config_lib.ModelConfig, mesh: jax.sharding.Mesh):
  """The NNX graph definition of a Transformer with ``mc`` on ``mesh`` (no array is created)."""
  return nnx.graphdef(_abstract_model(mc, mesh))


def init_params(env: Env, seed: int, model_config=None) -> PyTree:
  """Randomly initialised parameters (of the policy's model, or of
  ``model_config``), created directly sharded."""
  model = transformer.create_sharded_model(model_config or env.model_config, env.mesh,
                                           seed=seed)
  return nnx.to_pure_dict(nnx.state(model))


def abstract_params(env: Env, model_config=None) -> PyTree:
  """``ShapeDtypeStruct`` targets, with their shardings, of the model's parameters
  (or of another model configuration's; no array is created: for restoring
  checkpoints)."""
  state = nnx.state(_abstract_model(model_config or env.model_config, env.mesh))
  shardings = nnx.to_pure_dict(sharding.state_shardings(state, env.mesh))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      nnx.to_pure_dict(state), shardings)


def load_hf_params(env: Env) -> PyTree:
  """The parameters of the local Hugging Face checkpoint ``config.model.hf_path``."""
  c = env.config.model
  model = hf_checkpoint.load_hf_checkpoint(hub.local_dir(c.hf_path), mesh=env.mesh,
                                           dtype=c.dtype,
                                           param_dtype=c.param_dtype, remat=c.remat)
  return nnx.to_pure_dict(nnx.state(model))


def restore_params(env: Env, directory: str, item: str = "params",
                   target: Optional[PyTree] = None) -> PyTree:
  """Parameters ``item`` of the latest checkpoint in a midpo stage directory
  (the policy's shapes unless ``target`` is given).

  Raises:
    FileNotFoundError: the directory holds no checkpoint.
  """
  ckpt = ckpt_lib.Checkpointer(directory)
  step = ckpt.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {directory}")
  trees, _ = ckpt.restore(step, {item: abstract_params(env) if target is None else target})
  ckpt.close()
  return trees[item]


def shardings_of(tree: PyTree) -> PyTree:
  """The sharding of every array of ``tree``."""
  return jax.tree.map(lambda x: x.sharding, tree)


def replicated(env: Env, tree: PyTree) -> PyTree:
  """``tree`` placed whole on every device of the mesh."""
  return jax.device_put(tree, sharding.replicated(env.mesh))
