"""launch/tpu_vm.sh and launch/slurm.sh in dry-run mode: the commands they print are checked
word by word, and the remote / per-task commands are run through a real shell against fake
`python`, `scontrol` and virtualenvs, so quoting and the JAX environment are checked as a worker
would see them. Neither gcloud nor SLURM is needed: the scripts run with a PATH that holds only
bash and the few coreutils they use."""

import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TPU = REPO / "launch" / "tpu_vm.sh"
SLURM = REPO / "launch" / "slurm.sh"

TRICKY = "--config.data.prompt=it's a \"quoted\" $HOME; echo pwned & `id`"
JAX_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


@pytest.fixture
def minimal_path(tmp_path):
  """A PATH with bash and the coreutils the scripts use, and nothing else (no gcloud, srun)."""
  bindir = tmp_path / "minimal-bin"
  bindir.mkdir()
  for tool in ("bash", "sed", "head", "dirname", "cat"):
    found = shutil.which(tool)
    assert found, tool
    (bindir / tool).symlink_to(found)
  return str(bindir)


def _launch(script, args, path, env=None):
  full_env = {"PATH": path, "HOME": "/nonexistent", **(env or {})}
  return subprocess.run([str(script), *args], capture_output=True, text=True, env=full_env,
                        timeout=30, check=False)


def _commands(stdout):
  """The `+ ` lines of a dry run, each split into words as a shell would."""
  lines = stdout.splitlines()
  assert lines, "nothing printed"
  assert all(line.startswith(("+ ", "# ")) for line in lines), lines
  return [shlex.split(line[2:]) for line in lines if line.startswith("+ ")]


def _option(words, name):
  values = [w.split("=", 1)[1] for w in words if w.startswith(name + "=")]
  assert len(values) == 1, (name, words)
  return values[0]


def _fake_python(bindir):
  """A `python` that prints its arguments, cwd and the JAX variables as JSON."""
  bindir.mkdir(parents=True, exist_ok=True)
  code = ("import json, os, sys; json.dump({'argv': sys.argv[1:], 'cwd': os.getcwd(), "
          f"'env': {{k: os.environ.get(k) for k in {JAX_VARS!r}}}}}, sys.stdout)")
  script = bindir / "python"
  script.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -c {shlex.quote(code)} \"$@\"\n")
  script.chmod(0o755)


def _fake_venv(venv):
  """A virtualenv whose activate script puts the fake python first on PATH."""
  _fake_python(venv / "fake-bin")
  (venv / "bin").mkdir(parents=True)
  (venv / "bin" / "activate").write_text(f'PATH={shlex.quote(str(venv / "fake-bin"))}:"$PATH"\n')


# ---------------------------------------------------------------------------------------------
# Cloud TPU VM

TPU_ARGS = ["--name", "midpo-pod", "--zone", "us-central2-b", "--accelerator-type", "v4-32",
            "--version", "tpu-ubuntu2204-base", "--project", "my-project",
            "--config=configs/dpo.py", "--workdir", "gs://my-bucket/runs/dpo"]


def _jax_pin():
  for line in (REPO / "setup.py").read_text().splitlines():
    if line.strip().startswith('"jax=='):
      return line.strip().strip('",').split("==")[1]
  raise AssertionError("no jax pin in setup.py")


def test_tpu_creates_copies_installs_and_runs_on_all_workers(minimal_path):
  out = _launch(TPU, [*TPU_ARGS, "--dry-run", "--spot", "--config.prior.gamma=1.0"],
                minimal_path)
  assert out.returncode == 0, out.stderr
  cmds = _commands(out.stdout)
  tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
  assert [c[:5] for c in cmds] == [tpu + ["describe"], tpu + ["create"], tpu + ["ssh"],
                                   tpu + ["scp"], tpu + ["ssh"], tpu + ["ssh"]]
  describe, create, prepare, scp, install, launch = cmds
  for cmd in cmds:
    assert _option(cmd, "--zone") == "us-central2-b"
    assert _option(cmd, "--project") == "my-project"
  assert describe[5] == create[5] == "midpo-pod"
  assert _option(create, "--accelerator-type") == "v4-32"
  assert _option(create, "--version") == "tpu-ubuntu2204-base"
  assert "--spot" in create and "--preemptible" not in create

  for cmd in (prepare, scp, install, launch):
    assert _option(cmd, "--worker") == "all"
  assert prepare[5] == install[5] == launch[5] == "midpo-pod"
  assert "--recurse" in scp
  sources_and_dest = [w for w in scp[5:] if not w.startswith("--")]
  assert sources_and_dest[-1] == "midpo-pod:midpo"
  assert set(sources_and_dest[:-1]) >= {"setup.py", "README.md", "midpo", "configs"}
  assert ".venv" not in sources_and_dest and ".git" not in sources_and_dest
  for source in sources_and_dest[:-1]:
    assert (REPO / source).exists(), source

  install_cmd = _option(install, "--command")
  assert install_cmd.startswith("cd midpo && ")
  # A gs:// workdir: the gcs extra (gcsfs).
  assert "-m venv .venv && . .venv/bin/activate && pip install -e '.[gcs]' &&" in install_cmd
  assert "[test]" not in install_cmd
  assert shlex.split(install_cmd)[-3:] == ["pip", "install", f"jax[tpu]=={_jax_pin()}"]

  run_words = shlex.split(_option(launch, "--command"))
  assert run_words[:6] == ["cd", "midpo", "&&", ".", ".venv/bin/activate", "&&"]
  assert run_words[6:] == ["python", "-m", "midpo.main", "--config=configs/dpo.py",
                           "--workdir=gs://my-bucket/runs/dpo", "--config.prior.gamma=1.0"]



def test_tpu_installs_the_gcs_extra_only_for_a_gs_workdir(minimal_path):
  args = [a if a != "gs://my-bucket/runs/dpo" else "/mnt/shared/runs/dpo" for a in TPU_ARGS]
  out = _launch(TPU, [*args, "--dry-run"], minimal_path)
  assert out.returncode == 0, out.stderr
  install_cmd = _option(_commands(out.stdout)[-2], "--command")
  assert "pip install -e . &&" in install_cmd and "[gcs]" not in install_cmd

def test_tpu_overrides_with_spaces_and_quotes_reach_main_intact(minimal_path, tmp_path):
  out = _launch(TPU, [*TPU_ARGS, "--dry-run", "--config.prior.gamma=1.0", "--", TRICKY,
                      "--config.model.name=two words"], minimal_path)
  assert out.returncode == 0, out.stderr
  remote_command = _option(_commands(out.stdout)[-1], "--command")
  # Run the remote command as a worker's shell would, in a home with a fake install.
  home = tmp_path / "home"
  _fake_venv(home / "midpo" / ".venv")
  ran = subprocess.run(["bash", "-c", remote_command], cwd=home, capture_output=True, text=True,
                       env={"PATH": minimal_path, "HOME": str(home)}, timeout=30, check=True)
  seen = json.loads(ran.stdout)
  assert seen["argv"] == ["-m", "midpo.main", "--config=configs/dpo.py",
                          "--workdir=gs://my-bucket/runs/dpo", "--config.prior.gamma=1.0",
                          TRICKY, "--config.model.name=two words"]
  assert pathlib.Path(seen["cwd"]) == home / "midpo"


def test_tpu_environment_variables_dry_run_and_reuse_only(minimal_path):
  env = {"DRY_RUN": "1", "TPU_NAME": "v5e-slice", "TPU_ZONE": "us-west4-a"}
  out = _launch(TPU, ["--no-create", "--skip-copy", "--skip-install", "--config",
                      "configs/dpo.py:full", "--workdir=gs://b/w", "--background"],
                minimal_path, env)
  assert out.returncode == 0, out.stderr
  cmds = _commands(out.stdout)
  assert [c[4] for c in cmds] == ["describe", "ssh"]  # no create, copy or install
  assert cmds[0][5] == cmds[1][5] == "v5e-slice"
  assert _option(cmds[1], "--zone") == "us-west4-a"
  assert not any(w.startswith("--project") for c in cmds for w in c)
  remote = _option(cmds[1], "--command")
  assert remote.endswith("nohup python -m midpo.main --config=configs/dpo.py:full "
                         "--workdir=gs://b/w > midpo.log 2>&1 < /dev/null &")


@pytest.mark.parametrize("missing", ["--name", "--zone", "--accelerator-type", "--version",
                                     "--config", "--workdir"])
def test_tpu_missing_required_argument_is_named(minimal_path, missing):
  args = list(TPU_ARGS)
  i = next(i for i, a in enumerate(args) if a.split("=")[0] == missing)
  del args[i:i + (1 if "=" in args[i] else 2)]
  out = _launch(TPU, [*args, "--dry-run"], minimal_path)
  assert out.returncode != 0
  assert f"missing required argument {missing}" in out.stderr
  assert out.stdout == ""


def test_tpu_rejects_config_that_is_not_copied_and_unknown_arguments(minimal_path):
  args = [a if a != "--config=configs/dpo.py" else "--config=/elsewhere/my.py" for a in TPU_ARGS]
  out = _launch(TPU, [*args, "--dry-run"], minimal_path)
  assert out.returncode != 0 and "/elsewhere/my.py is not inside a copied path" in out.stderr
  out = _launch(TPU, [*TPU_ARGS, "--dry-run", "--bogus"], minimal_path)
  assert out.returncode != 0 and "unknown argument: --bogus" in out.stderr


# ---------------------------------------------------------------------------------------------
# SLURM

SLURM_ARGS = ["--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu", "--time",
              "24:00:00", "--config", "configs/dpo.py", "--workdir=/shared/runs/dpo"]
NODELIST = "gpu-[07-10]"


def _fake_scontrol(bindir, hosts):
  """`scontrol show hostnames gpu-[07-10]` prints the given hosts, one per line."""
  bindir.mkdir(parents=True, exist_ok=True)
  script = bindir / "scontrol"
  script.write_text(
      "#!/bin/sh\n"
      f'[ "$1 $2 $3" = {shlex.quote("show hostnames " + NODELIST)} ] || exit 1\n'
      + "".join(f"echo {h}\n" for h in hosts))
  script.chmod(0o755)


def _fake_srun(bindir):
  """An `srun` that runs its trailing `bash -c TASK` once, in the caller's environment."""
  bindir.mkdir(parents=True, exist_ok=True)
  script = bindir / "srun"
  script.write_text('#!/usr/bin/env bash\nargs=("$@")\nexec "${args[@]: -3}"\n')
  script.chmod(0o755)


def _run_task(task, tmp_path, minimal_path, procid, hosts=("gpu-07", "gpu-08", "gpu-09", "gpu-10"),
              shell="bash"):
  _fake_scontrol(tmp_path / "fake-slurm", hosts)
  _fake_srun(tmp_path / "fake-slurm")
  env = {"PATH": f"{tmp_path / 'fake-slurm'}:{minimal_path}", "SLURM_PROCID": str(procid),
         "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": NODELIST, "SLURM_JOB_ID": "123456"}
  return subprocess.run([shutil.which(shell), "-c", task], capture_output=True, text=True,
                        env=env, timeout=30, check=False)


@pytest.mark.parametrize("procid", [0, 3])
def test_slurm_sbatch_per_task_command_exports_jax_variables(minimal_path, tmp_path, procid):
  venv = tmp_path / "venv"
  _fake_venv(venv)
  out = _launch(SLURM, [*SLURM_ARGS, "--venv", str(venv), "--dry-run",
                        "--config.prior.gamma=1.0", "--", TRICKY], minimal_path)
  assert out.returncode == 0, out.stderr
  (sbatch,) = _commands(out.stdout)
  assert sbatch[0] == "sbatch"
  assert _option(sbatch, "--nodes") == "2"
  assert _option(sbatch, "--ntasks-per-node") == "1"
  assert _option(sbatch, "--gpus-per-node") == "8"
  assert _option(sbatch, "--partition") == "gpu"
  assert _option(sbatch, "--time") == "24:00:00"
  assert _option(sbatch, "--chdir") == str(REPO)
  srun = shlex.split(_option(sbatch, "--wrap"))
  assert srun[0] == "srun" and srun[-3:-1] == ["bash", "-c"]
  assert _option(srun, "--nodes") == _option(srun, "--ntasks") == "2"
  assert _option(srun, "--ntasks-per-node") == "1"
  task = srun[-1]
  assert "JAX_" not in " ".join(sbatch[:-1])  # computed per task, not in the batch script

  # The per-task command alone, and the whole --wrap script as sbatch's `sh` runs it (through
  # a fake srun that runs the task once): the same process sees the same values.
  for command, shell in ((task, "bash"), (_option(sbatch, "--wrap"), "sh")):
    ran = _run_task(command, tmp_path, minimal_path, procid, shell=shell)
    assert ran.returncode == 0, ran.stderr
    seen = json.loads(ran.stdout)
    assert seen["env"] == {"JAX_COORDINATOR_ADDRESS": f"gpu-07:{20000 + 123456 % 20000}",
                           "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": str(procid)}
    assert seen["argv"] == ["-m", "midpo.main", "--config=configs/dpo.py",
                            "--workdir=/shared/runs/dpo", "--config.prior.gamma=1.0", TRICKY]
    assert pathlib.Path(seen["cwd"]) == REPO


def test_slurm_srun_mode_with_fixed_port(minimal_path, tmp_path):
  venv = tmp_path / "venv"
  _fake_venv(venv)
  out = _launch(SLURM, ["--srun", "--nodes=4", "--port=29500", "--config=configs/dpo.py",
                        "--workdir", "runs/dpo", "--venv", str(venv)], minimal_path,
                {"DRY_RUN": "1"})
  assert out.returncode == 0, out.stderr
  (srun,) = _commands(out.stdout)
  assert srun[0] == "srun" and _option(srun, "--ntasks") == "4"
  assert not any(w.startswith("--gpus-per-node") for w in srun)
  seen = json.loads(_run_task(srun[-1], tmp_path, minimal_path, 2).stdout)
  assert seen["env"] == {"JAX_COORDINATOR_ADDRESS": "gpu-07:29500", "JAX_NUM_PROCESSES": "4",
                         "JAX_PROCESS_ID": "2"}
  assert seen["argv"][2:] == ["--config=configs/dpo.py", "--workdir=runs/dpo"]


def test_slurm_per_task_command_fails_clearly_without_a_host(minimal_path, tmp_path):
  out = _launch(SLURM, ["--srun", "--nodes=2", "--config=c.py", "--workdir=w", "--dry-run"],
                minimal_path)
  ran = _run_task(_commands(out.stdout)[0][-1], tmp_path, minimal_path, 0, hosts=())
  assert ran.returncode != 0
  assert "no host in SLURM_JOB_NODELIST=gpu-[07-10]" in ran.stderr
  assert ran.stdout == ""  # python was never started


@pytest.mark.parametrize("missing", ["--nodes", "--config", "--workdir"])
def test_slurm_missing_required_argument_is_named(minimal_path, missing):
  args = list(SLURM_ARGS)
  i = next(i for i, a in enumerate(args) if a.split("=")[0] == missing)
  del args[i:i + (1 if "=" in args[i] else 2)]
  out = _launch(SLURM, [*args, "--dry-run"], minimal_path)
  assert out.returncode != 0
  assert f"missing required argument {missing}" in out.stderr
  assert out.stdout == ""


@pytest.mark.parametrize("script", [TPU, SLURM], ids=["tpu_vm", "slurm"])
def test_help_and_executable(minimal_path, script):
  assert os.access(script, os.X_OK)
  out = _launch(script, ["--help"], minimal_path)
  assert out.returncode == 0 and out.stdout.startswith("Usage: launch/")
  assert "--dry-run" in out.stdout


# ---------------------------------------------------------------------------------------------
# benchmarks/gpu_suite.sh (its measurements need a GPU; what runs before them is checked here)

GPU_SUITE = REPO / "benchmarks" / "gpu_suite.sh"


def test_gpu_suite_stops_without_a_gpu(tmp_path):
  bindir = tmp_path / "bin"
  bindir.mkdir()
  for tool in ("bash", "dirname", "mkdir", "date", "tee"):
    (bindir / tool).symlink_to(shutil.which(tool))
  proc = subprocess.run(["bash", str(GPU_SUITE), str(tmp_path / "out")], capture_output=True,
                        text=True, env={"PATH": str(bindir)}, timeout=30, check=False)
  assert proc.returncode == 2, proc.stderr
  assert "no NVIDIA GPU here" in proc.stderr
  assert (tmp_path / "out" / "gpu_suite.jsonl").read_text() == ""


def test_gpu_suite_help_prints_its_header_and_runs_nothing(tmp_path):
  proc = subprocess.run(["bash", str(GPU_SUITE), "--help"], capture_output=True, text=True,
                        cwd=tmp_path, timeout=30, check=False)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith("The GPU measurements of issue #13")
  assert "bash benchmarks/gpu_suite.sh [OUT]" in proc.stdout and "set -euo" not in proc.stdout
  assert list(tmp_path.iterdir()) == []  # no output folder made


def test_gpu_suite_checks_packages_then_refuses_a_jax_without_a_gpu(tmp_path):
  """With a (fake) nvidia-smi it finds every package of this environment (none to install)
  and stops where jax sees no GPU, before any measurement."""
  bindir = tmp_path / "bin"
  bindir.mkdir()
  (bindir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: a fake card'\n")
  (bindir / "nvidia-smi").chmod(0o755)
  env = {"PATH": f"{bindir}:{os.path.dirname(sys.executable)}:/usr/bin:/bin",
         "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu", "HOME": str(tmp_path)}
  proc = subprocess.run(["bash", str(GPU_SUITE), str(tmp_path / "out")], capture_output=True,
                        text=True, env=env, timeout=120, check=False)
  out = proc.stdout + proc.stderr
  assert proc.returncode != 0, out
  assert "GPU 0: a fake card" in out
  assert "installing" not in out, out
  assert "AssertionError" in out and "vs_trl.py" not in out
