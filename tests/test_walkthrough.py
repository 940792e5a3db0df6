"""``midpo/algorithms/README.md``, followed as written: its prior file, its
command and its parity case (in fresh processes, so the new prior does not
join this process's registry)."""

import json
import os
import pathlib
import shlex
import subprocess
import sys
import textwrap

from tests import train_utils as tu

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGE = ROOT / "midpo" / "algorithms" / "README.md"


def block(tag: str) -> str:
  lines = PAGE.read_text().splitlines()
  start = lines.index(f"<!-- walkthrough:{tag} -->") + 2  # past the opening fence
  end = next(i for i in range(start, len(lines)) if lines[i].startswith("```"))
  return "\n".join(lines[start:end]) + "\n"


def test_the_walkthrough_prior_trains_from_the_command_line_as_written(tmp_path):
  (tmp_path / "my_prior.py").write_text(block("prior"))
  args = shlex.split(block("run").replace("\\\n", " "))
  assert args[:3] == ["python", "-m", "midpo.main"]
  workdir = tmp_path / "workdirs" / "length_margin"
  extra = tu.cli_args({**tu.TINY_OVERRIDES, "stages": ("sft", "preference"), "train.steps": 3,
                       "log_every": 1})
  proc = subprocess.run([sys.executable, *args[1:], *extra], cwd=tmp_path, text=True,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600,
                        env=dict(os.environ, PYTHONPATH=str(ROOT)))
  assert proc.returncode == 0, proc.stdout[-3000:]
  saved = json.load(open(workdir / "config.json"))
  assert saved["prior"] == {**saved["prior"], "name": "length_margin", "margin": 0.05}
  assert len(tu.read_metrics(str(workdir), "preference")) == 3


def test_the_walkthrough_parity_case_holds(tmp_path):
  """The README's prior against the README's independent statement: value and
  gradient w.r.t. the policy logits, float64, with the parity suite's batch."""
  (tmp_path / "my_prior.py").write_text(block("prior"))
  (tmp_path / "my_reference.py").write_text(block("parity"))
  script = textwrap.dedent("""
      import jax, numpy as np
      import my_prior, my_reference
      from midpo import algorithms
      from midpo.core import losses
      from tests import reference_algorithms as ref, test_losses_parity as parity

      def reference(b):
        lp = {s: ref.gather(ref.log_softmax(b[f"pol_{s}"]), b[f"tgt_{s}"], b[f"m_{s}"])
              for s in "wl"}
        lr = {s: ref.gather(ref.log_softmax(b[f"ref_{s}"]), b[f"tgt_{s}"], b[f"m_{s}"])
              for s in "wl"}
        return my_reference.length_margin_loss(lp["w"], lr["w"], b["m_w"], lp["l"], lr["l"],
                                               b["m_l"], 0.1, 0.05)

      with jax.enable_x64(True):
        b = parity.make_batch()
        prior = algorithms.make_prior("length_margin", margin=0.05)
        got, grads = parity.midpo_loss(b, prior, losses.LossConfig(alpha=0.1))
        want = reference(b)
        fd = ref.finite_difference_grad(reference, b)
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
      for k in ("pol_w", "pol_l"):
        assert np.abs(fd[k]).max() > 1e-4
        np.testing.assert_allclose(grads[k], fd[k], rtol=1e-6, atol=1e-6 * np.abs(fd[k]).max())
      print("parity ok", float(np.abs(got - want).max()))
  """)
  proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, text=True,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600,
                        env=dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}"))
  assert proc.returncode == 0 and "parity ok" in proc.stdout, proc.stdout[-3000:]
