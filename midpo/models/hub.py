"""Where a checkpoint named by ``config.model.hf_path`` lives on this machine.

A local directory is used as it is. A remote one (``gs://bucket/model``; see ``midpo.files``)
is copied once per process into the local cache (``files.cache_dir('checkpoints')``: the files
a checkpoint needs, in a folder named after the path and the files' fingerprints, so a
checkpoint rewritten in place is copied again), since the weights are memory-mapped and the
tokenizer read from local files. Anything else that has the shape of a Hugging Face Hub id
(``org/name``, optionally ``org/name@revision``) is fetched with ``huggingface_hub``'s
ordinary ``snapshot_download`` (its cache, its ``HF_HOME`` / ``HF_HUB_CACHE``, its token), only
the files a checkpoint needs. Offline mode (``HF_HUB_OFFLINE=1``) is honoured: the cached
snapshot is used, and without one the error says how to get it.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
import tempfile

from absl import logging

from midpo import files

# What a causal-LM checkpoint directory needs (config, weights, tokenizer, template); not the
# copies some repositories add (consolidated.safetensors, original/).
CHECKPOINT_FILES = ("config.json", "generation_config.json", "model*.safetensors",
                    "model.safetensors.index.json", "tokenizer*", "special_tokens_map.json",
                    "chat_template.jinja")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[\w./-]+)?$")

_resolved: dict[str, str] = {}


class HubError(ValueError):
  """A checkpoint that is neither a local directory nor a reachable Hub id."""


def is_hub_id(path: str) -> bool:
  """Whether ``path`` is not a local directory but has the shape of a Hub id."""
  return not os.path.isdir(path) and bool(_HUB_ID.match(path))


def local_dir(path: str, key: str = "model.hf_path") -> str:
  """The local directory of checkpoint ``path`` (a local directory; a remote one copied, or a
  Hub id downloaded, once per process).

  Raises:
    HubError: ``path`` is none of them (a remote directory that does not exist or holds no
      checkpoint file); or it is a Hub id that cannot be fetched (offline without
      a cached snapshot, no network, no access), the message naming ``config.<key>`` and the
      fix.
  """
  if path in _resolved:
    return _resolved[path]
  if files.is_remote(path):
    _resolved[path] = _copy_remote(path, key)
    return _resolved[path]
  if os.path.isdir(path):
    return path
  if not _HUB_ID.match(path):
    raise HubError(f"config.{key}: {path!r} is not a directory nor a Hub id (org/name)")
  repo_id, _, revision = path.partition("@")
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  from huggingface_hub import errors  # pylint: disable=g-import-not-at-top

  try:
    local = huggingface_hub.snapshot_download(repo_id, revision=revision or None,
                                              allow_patterns=list(CHECKPOINT_FILES))
  except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled) as e:
    raise HubError(
        f"config.{key}: {path!r} is not a local directory, and no snapshot of it is "
        f"cached while the Hub cannot be reached (no network, or offline mode: "
        f"HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '')!r}); download it where there "
        f"is a network (`hf download {repo_id}`) and pass the directory ({type(e).__name__})"
    ) from None
  except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError,
          errors.GatedRepoError) as e:
    raise HubError(f"config.{key}: {path!r}: {type(e).__name__}: {e}") from None
  _resolved[path] = local
  return local


def _copy_remote(path: str, key: str) -> str:
  """A local copy of the checkpoint files (``CHECKPOINT_FILES``) of remote directory ``path``,
  in a cache folder named after the path and every file's fingerprint (generation or
  checksum): a checkpoint rewritten in place gets a new copy, never a stale one."""
  if not files.isdir(path):
    raise HubError(f"config.{key}: {path!r}: no such directory")
  root = path.rstrip("/")
  names = [n for n in files.listdir(root) if any(fnmatch.fnmatch(n, p) for p in CHECKPOINT_FILES)
           and files.isfile(f"{root}/{n}")]
  if not names:
    raise HubError(f"config.{key}: {path!r} holds no checkpoint file "
                   f"({', '.join(CHECKPOINT_FILES)})")
  prints = {n: files.fingerprint(f"{root}/{n}") for n in names}
  digest = hashlib.sha256(json.dumps([root, sorted(prints.items())]).encode()).hexdigest()
  local = os.path.join(files.cache_dir("checkpoints"), digest[:16])
  if os.path.isdir(local):
    logging.info("config.%s: %s is unchanged since its copy in %s", key, path, local)
    return local
  tmp = tempfile.mkdtemp(prefix=f".{digest[:16]}.", dir=os.path.dirname(local))
  try:
    for name in names:
      files.copy(f"{root}/{name}", os.path.join(tmp, name))
    os.rename(tmp, local)  # whole or not at all; a concurrent copy of the same one may win
  except OSError:
    shutil.rmtree(tmp, ignore_errors=True)
    if not os.path.isdir(local):
      raise
  logging.info("config.%s: %s copied to %s (%d files)", key, path, local, len(names))
  return local
