"""launch/tpu.py: the gcloud commands it builds, its argument checks and watch's decisions (no gcloud, no jax)."""
import importlib.util
import pathlib
import shlex
import subprocess
import sys

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parents[1] / "launch" / "tpu.py"
_spec = importlib.util.spec_from_file_location("tpu_launch", LAUNCH)
tpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tpu)

SLICE = ["--name=xl2", "--zone=us-east5-a"]
JOB = ["--workdir=gs://bucket/xl2", "--data_dir=gs://bucket/imagenet256"]


def remote_command(command: list[str]) -> str:
  """The --command=... of a gcloud ssh command."""
  (value,) = [word.removeprefix("--command=") for word in command if word.startswith("--command=")]
  return value


def test_create_is_a_queued_resource_with_spot_and_the_generation_runtime():
  (command,) = tpu.create_commands(tpu.parse_args(["create", *SLICE, "--accelerator=v5p-64", "--spot"]))
  assert command[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "xl2"]
  assert {"--node-id=xl2", "--zone=us-east5-a", "--accelerator-type=v5p-64", "--runtime-version=v2-alpha-tpuv5",
          "--spot"} <= set(command)
  (on_demand,) = tpu.create_commands(tpu.parse_args(["create", *SLICE, "--accelerator=v4-32"]))
  assert "--spot" not in on_demand and "--runtime-version=tpu-ubuntu2204-base" in on_demand
  (explicit,) = tpu.create_commands(tpu.parse_args(["create", *SLICE, "--accelerator=v6e-64",
                                                    "--runtime_version=v2-alpha-tpuv6e-custom"]))
  assert "--runtime-version=v2-alpha-tpuv6e-custom" in explicit


def test_run_starts_one_command_on_all_workers_in_the_background_with_overrides():
  args = tpu.parse_args(["run", *SLICE, *JOB, "--config.mesh.shape=(-1,4)", "--config.train.steps=10"])
  (command,) = tpu.run_commands(args)
  assert command[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "xl2"]
  assert "--worker=all" in command
  remote = remote_command(command)
  # The whole background subshell writes to the log, so ssh returns while training runs.
  assert remote.startswith(f"(cd ~/repa_jax && export LIBTPU_INIT_ARGS={shlex.quote(tpu.ASYNC_COLLECTIVE_FLAGS)} && "
                           "exec nohup ~/repa_jax_venv/bin/python -m repa_jax.main ")
  assert remote.endswith(") > ~/repa_jax_train.log 2>&1 < /dev/null &")
  job = shlex.split(remote[remote.index("-m repa_jax.main"):remote.rindex(")")])
  assert job == ["-m", "repa_jax.main", "--mode=train", "--distributed",
                 "--config=configs/imagenet.py:model=XL/2,reg=repa,res=256", "--workdir=gs://bucket/xl2",
                 "--config.data.directory=gs://bucket/imagenet256", "--config.mesh.shape=(-1,4)",
                 "--config.train.steps=10"]


def test_libtpu_args_can_be_replaced_or_left_to_libtpu():
  remote = remote_command(tpu.run_commands(tpu.parse_args(["run", *SLICE, *JOB, "--libtpu_args=--xla_a=1 --xla_b=2"]))[0])
  assert remote.startswith("(cd ~/repa_jax && export LIBTPU_INIT_ARGS='--xla_a=1 --xla_b=2' && exec nohup ")
  remote = remote_command(tpu.run_commands(tpu.parse_args(["run", *SLICE, *JOB, "--libtpu_args="]))[0])
  assert remote.startswith("(cd ~/repa_jax && exec nohup ~/repa_jax_venv/bin/python -m repa_jax.main ")


def test_precompute_mode_has_its_own_log():
  args = tpu.parse_args(["run", *SLICE, *JOB, "--mode=precompute"])
  remote = remote_command(tpu.run_commands(args)[0])
  assert "--mode=precompute" in remote and "> ~/repa_jax_precompute.log" in remote
  assert remote_command(tpu.logs_commands(tpu.parse_args(["logs", *SLICE, "--mode=precompute"]))[0]) == \
      "tail -n 200 -F ~/repa_jax_precompute.log"


@pytest.mark.parametrize("flag", ["workdir", "data_dir"])
def test_local_paths_are_refused_naming_the_flag(flag, capsys):
  argv = ["run", *SLICE, *[arg for arg in JOB if not arg.startswith(f"--{flag}=")], f"--{flag}=/tmp/local"]
  with pytest.raises(SystemExit) as exit_:
    tpu.parse_args(argv)
  assert exit_.value.code == 2
  assert f"--{flag}='/tmp/local' is not a gs:// path" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["run", *SLICE, *JOB, "--steps=5"], "only --config.<field>=<value> overrides"),
    (["delete", *SLICE, "--config.seed=1"], "unrecognized arguments: --config.seed=1"),
    (["create", *SLICE, "--accelerator=v5e-16"], "pass --runtime_version"),
    (["create", *SLICE, "--accelerator=tpu64"], "expected <generation>-<size>"),
    (["watch", *SLICE, *JOB, "--accelerator=v4-32", "--poll_seconds=1"], "--poll_seconds=1: use a value in"),
])
def test_bad_arguments_are_refused_with_the_fix(argv, message, capsys):
  with pytest.raises(SystemExit):
    tpu.parse_args(argv)
  assert message in capsys.readouterr().err


def test_install_copies_committed_head_to_every_worker_then_pip_installs():
  archive, scp, ssh = tpu.install_commands(tpu.parse_args(["install", *SLICE]))
  assert archive[:3] == ["git", "-C", str(tpu.REPO_ROOT)] and archive[-1] == "HEAD"
  tarball = archive[-2].removeprefix("--output=")
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and scp[5:7] == [tarball, "xl2:repa_jax.tar.gz"]
  assert "--worker=all" in scp and "--worker=all" in ssh
  remote = remote_command(ssh)
  assert remote.index("tar -xzf repa_jax.tar.gz -C ~/repa_jax") < remote.index("python3.11 -m venv ~/repa_jax_venv")
  assert remote.endswith("cd ~/repa_jax && ~/repa_jax_venv/bin/pip install -q -e '.[tpu,imagenet]'")


def test_install_from_git_url_clones_on_the_workers():
  (ssh,) = tpu.install_commands(tpu.parse_args(["install", *SLICE, "--git_url=https://example.com/repa_jax.git",
                                                "--git_ref=v1"]))
  assert "--worker=all" in ssh
  assert "git clone --depth=1 --branch v1 https://example.com/repa_jax.git ~/repa_jax && " in remote_command(ssh)


def test_delete_and_logs():
  (delete,) = tpu.delete_commands(tpu.parse_args(["delete", *SLICE, "--project=p"]))
  assert delete[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "xl2"]
  assert {"--project=p", "--force", "--quiet"} <= set(delete)
  (logs,) = tpu.logs_commands(tpu.parse_args(["logs", *SLICE, "--worker=3"]))
  assert "--worker=3" in logs and remote_command(logs) == "tail -n 200 -F ~/repa_jax_train.log"


@pytest.mark.parametrize("state, job_started, action", [
    ("SUSPENDED", True, "recreate"), ("FAILED", False, "recreate"), ("", True, "create"), ("", False, "create"),
    ("ACTIVE", False, "start"), ("ACTIVE", True, "wait"), ("WAITING_FOR_RESOURCES", False, "wait"),
    ("PROVISIONING", False, "wait"), ("SUSPENDING", True, "wait"), ("DELETING", False, "wait"),
])
def test_watch_action(state, job_started, action):
  assert tpu.watch_action(state, job_started) == action


def test_watch_step_recreates_a_suspended_slice_then_restarts_the_job(monkeypatch):
  args = tpu.parse_args(["watch", *SLICE, *JOB, "--accelerator=v6e-64", "--spot", "--git_url=https://e.com/r.git"])
  states, executed = iter(["SUSPENDED", "PROVISIONING", "ACTIVE", "ACTIVE"]), []
  monkeypatch.setattr(tpu, "queued_resource_state", lambda _: next(states))
  monkeypatch.setattr(tpu, "execute", lambda commands: executed.append(commands) or 0)
  started = [tpu.watch_step(args, job_started=True)]
  for _ in range(3):
    started.append(tpu.watch_step(args, started[-1]))
  assert started == [False, False, True, True]
  assert executed == [tpu.delete_commands(args) + tpu.create_commands(args),
                      tpu.install_commands(args) + tpu.run_commands(args)]
  assert "--spot" in executed[0][1]


def test_dry_run_subprocess_prints_the_commands_one_per_line():
  watch = subprocess.run([sys.executable, str(LAUNCH), "watch", "--dry_run", *SLICE, *JOB, "--accelerator=v4-32",
                          "--config.mesh.shape=(-1,4)"], capture_output=True, text=True, check=True)
  lines = watch.stdout.splitlines()
  assert [shlex.split(line)[:5] for line in lines] == [
      ["gcloud", "compute", "tpus", "queued-resources", "describe"],
      ["gcloud", "compute", "tpus", "queued-resources", "delete"],
      ["gcloud", "compute", "tpus", "queued-resources", "create"],
      ["git", "-C", str(tpu.REPO_ROOT), "archive", "--format=tar.gz"],
      ["gcloud", "compute", "tpus", "tpu-vm", "scp"],
      ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],
      ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]
  run = subprocess.run([sys.executable, str(LAUNCH), "run", "--dry_run", *SLICE, *JOB, "--config.mesh.shape=(-1,4)"],
                       capture_output=True, text=True, check=True)
  (line,) = run.stdout.splitlines()
  assert shlex.split(line) == tpu.run_commands(tpu.parse_args(["run", *SLICE, *JOB, "--config.mesh.shape=(-1,4)"]))[0]
  assert lines[-1] == line
