"""The README's own-data and own-checkpoint commands, run as printed (plus overrides that make
them small) on small hand-made files and a tiny checkpoint; and the stage and data errors a new
user meets, each raised before any work."""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from midpo.training import config as config_lib
from tests import test_readme
from tests import train_utils as tu

SMALL = {"sft.steps": 4, "train.steps": 4, "data.batch_size": 2, "data.max_length": 96,
         "eval.num_prompts": 4, "eval.num_pairs": 4, "eval.batch_size": 4,
         "eval.max_new_tokens": 6, "checkpoint_every": 50, "log_every": 2}
WORDS = "the cat sat on a mat and then it ran far away from home to see the sea".split()


def _rows(n, seed):
  import random
  rng = random.Random(seed)
  out = []
  for i in range(n):
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))) + "?"
    out.append({"prompt": prompt, "chosen": " yes, " + " ".join(rng.sample(WORDS, 3)),
                "rejected": " no " + " ".join(rng.sample(WORDS, 2)) + f" {i}"})
  return out


def _write_data(root):
  os.makedirs(root / "data", exist_ok=True)
  for name, n, seed in (("train", 24, 0), ("test", 8, 1)):
    (root / "data" / f"{name}.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in _rows(n, seed)))


def _run_readme_block(tag, cwd, extra, *flags):
  command = test_readme._block(tag).replace("\\\n", " ")
  args = shlex.split(command)
  assert args[:3] == ["python", "-m", "midpo.main"], args
  args = [sys.executable, *args[1:]]
  args = [a.replace("--config=configs/", f"--config={tu.ROOT}/configs/") for a in args]
  args += tu.cli_args(extra) + list(flags)
  proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600,
                        env=dict(os.environ, PYTHONPATH=str(tu.ROOT)))
  return proc.returncode, proc.stdout + proc.stderr, args


def _workdir(args):
  return next(a.split("=", 1)[1] for a in args if a.startswith("--workdir="))


def _check_eval(workdir):
  results = json.load(open(os.path.join(workdir, "eval.json")))
  assert set(results["not_measured"]) == {"reward", "win_rate", "mutual_information"}
  acc = results["implicit_reward_accuracy"]
  assert 0 <= acc["value"] <= 1 and acc["num_pairs"] > 0
  policy = results["policy"]
  assert "reward" not in policy and "kl" in policy and policy["length"] > 0
  report = json.load(open(os.path.join(workdir, "data_report.json")))
  assert report["stages"]["train/build"]["rows_kept"] == 24
  return results


def test_readme_own_data_command(tmp_path):
  _write_data(tmp_path)
  rc, out, args = _run_readme_block("readme:own-data", tmp_path, SMALL)
  assert rc == 0, out[-4000:]
  workdir = tmp_path / _workdir(args)
  _check_eval(workdir)
  assert re.search(r"data train/sft: read 24 rows, kept 24; skipped 0", out), out[-4000:]
  assert os.path.isdir(workdir / "sft")  # SFT on the chosen responses ran
  samples = [json.loads(l) for l in open(workdir / "eval_samples.jsonl")]
  assert samples and samples[0]["prompt"].endswith("?")  # the test file's prompts, decoded


def test_readme_own_checkpoint_command(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from tests import test_trl_tokenization as ttt
  ckpt = tmp_path / "checkpoints" / "my-model"
  ttt._build(str(ckpt), "llama3")
  from midpo.models.tokenizer import HFTokenizer
  tok = HFTokenizer.from_dir(str(ckpt))
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(
      vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
      bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
  transformers.LlamaForCausalLM(cfg).save_pretrained(ckpt, safe_serialization=True)
  _write_data(tmp_path)
  rc, out, args = _run_readme_block("readme:own-checkpoint", tmp_path, SMALL)
  assert rc == 0, out[-4000:]
  assert "sft stage skipped: the reference is the checkpoint config.model.hf_path" in out
  workdir = tmp_path / _workdir(args)
  _check_eval(workdir)
  assert (workdir / "hf_export" / "config.json").exists()
  assert not os.path.isdir(workdir / "sft")
  # The checkpoint evaluated alone in a fresh workdir (the dataset is built there first).
  rc, out, _ = _run_readme_block("readme:own-checkpoint", tmp_path,
                                 {**SMALL, "stages": ("eval",)}, "--workdir=eval_only")
  assert rc == 0, out[-4000:]


def _own(**overrides):
  import importlib
  return tu.apply_overrides(importlib.import_module("configs.own_data").get_config(), overrides)


def test_stage_and_data_problems_are_config_errors(tmp_path):
  _write_data(tmp_path)
  train, test = str(tmp_path / "data" / "train.jsonl"), str(tmp_path / "data" / "test.jsonl")
  with pytest.raises(config_lib.ConfigError, match=r"config.data.files.train_files: names no"):
    config_lib.validate(_own(), num_devices=1, process_count=1)
  with pytest.raises(config_lib.ConfigError, match=r"config.data.files.test_files: the 'eval'"):
    config_lib.validate(_own(**{"data.files.train_files": train}), num_devices=1,
                        process_count=1)
  with pytest.raises(config_lib.ConfigError, match=r"test_files: is set but nothing"):
    config_lib.validate(_own(**{"data.files.train_files": train, "data.files.test_files": test,
                                "stages": ("sft", "preference")}), num_devices=1,
                        process_count=1)
  with pytest.raises(config_lib.ConfigError, match=r"config.eval.mutual_information"):
    config_lib.validate(_own(**{"data.files.train_files": train, "data.files.test_files": test,
                                "eval.mutual_information": "final"}), num_devices=1,
                        process_count=1)
  config_lib.validate(_own(**{"data.files.train_files": f"{train},{test}",
                              "data.files.test_files": test}), num_devices=1, process_count=1)


def test_too_few_rows_and_an_unfit_tokenizer_are_one_line_errors(tmp_path):
  """Every row over max_length: the report is written first, the error names the reason; the
  synthetic tokenizer on free text: refused, naming config.tokenizer."""
  _write_data(tmp_path)
  train = str(tmp_path / "data" / "train.jsonl")
  base = {"data.files.train_files": train, "stages": ("sft",), "data.batch_size": 2}
  rc, out = tu.run_main(str(tu.ROOT / "configs" / "own_data.py"), str(tmp_path / "a"),
                        {**base, "data.max_length": 8}, env={"PYTHONPATH": str(tu.ROOT)})
  last = out.strip().splitlines()[-1]
  assert rc == 2 and "Traceback" not in out, out[-3000:]
  assert re.match(r"midpo: error: 'train': 0 rows left, fewer than one batch .*24 over_length; "
                  r"raise config.data.max_length, or set config.data.truncation_mode=keep_start",
                  last), last
  report = json.load(open(tmp_path / "a" / "data_report.json"))
  assert report["stages"]["train/tokenize/sft"]["bad_rows"] == {"over_length": 24}
  rc, out = tu.run_main(str(tu.ROOT / "configs" / "own_data.py"), str(tmp_path / "b"),
                        {**base, "tokenizer": "synthetic"}, env={"PYTHONPATH": str(tu.ROOT)})
  last = out.strip().splitlines()[-1]
  assert rc == 2 and re.match(r"midpo: error: config.tokenizer: \d+% of the tokens", last), last
  report = json.load(open(tmp_path / "b" / "data_report.json"))  # what was read, this run's
  assert report["stages"]["train/tokenize/sft"]["rows_read"] > 0
  # The wrong format (TRL standard rows read as conversational): every row dropped at build,
  # the reason and the key to check named, the report written.
  rc, out = tu.run_main(str(tu.ROOT / "configs" / "own_data.py"), str(tmp_path / "c"),
                        {**base, "data.files.format": "trl_conversational"},
                        env={"PYTHONPATH": str(tu.ROOT)})
  last = out.strip().splitlines()[-1]
  assert rc == 2 and re.match(
      r"midpo: error: 'train': no row of 24 was kept; skipped 24 rows, most for: 24 "
      r"malformed_messages; check config.data.files.format \(now 'trl_conversational'", last), last
  report = json.load(open(tmp_path / "c" / "data_report.json"))
  assert report["bad_rows_total"] == {"malformed_messages": 24}
