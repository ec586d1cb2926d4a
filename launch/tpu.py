"""Train repa_jax on a Cloud TPU VM slice through gcloud: create, install, run, logs, watch, delete.

  python launch/tpu.py create  --name=NAME --zone=ZONE --accelerator=v5p-64 --spot
  python launch/tpu.py install --name=NAME --zone=ZONE
  python launch/tpu.py run     --name=NAME --zone=ZONE --workdir=gs://B/xl2 --data_dir=gs://B/data [--config.x=y ...]
  python launch/tpu.py logs    --name=NAME --zone=ZONE
  python launch/tpu.py watch   (the flags of create, install and run)  # re-creates a preempted slice, resumes
  python launch/tpu.py delete  --name=NAME --zone=ZONE

Every subcommand takes --dry_run: print the commands, one per line, and run nothing. Standard library only.
See launch/README.md.
"""
import argparse
import datetime
import pathlib
import re
import shlex
import subprocess
import sys
import tempfile
import time

# Runtime images for JAX per TPU generation (cloud.google.com/tpu/docs/runtimes).
RUNTIME_VERSIONS = {"v4": "tpu-ubuntu2204-base", "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}
DEFAULT_CONFIG = "configs/imagenet.py:model=XL/2,reg=repa,res=256"
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# On every worker, relative to the home directory: the code, its virtual environment, the logs.
REMOTE_DIR = "~/repa_jax"
REMOTE_VENV = "~/repa_jax_venv"
REMOTE_TARBALL = "repa_jax.tar.gz"
# Queued-resource states (`state.state`) after which the slice's VMs are gone and must be re-created.
LOST_STATES = ("SUSPENDED", "FAILED")
POLL_SECONDS_RANGE = (10, 3600)
# libtpu's flags for the run (LIBTPU_INIT_ARGS): collectives asynchronous and fused with the compute around them, so
# FSDP's all-gathers and reduce-scatters overlap the layers' matmuls (the set MaxText's TPU recipes export). Compiled
# with and without by benchmarks/tpu_compile.py --libtpu_args (launch/README.md).
ASYNC_COLLECTIVE_FLAGS = (
    "--xla_tpu_enable_data_parallel_all_reduce_opt=true --xla_tpu_data_parallel_opt_different_sized_ops=true "
    "--xla_tpu_enable_async_collective_fusion=true --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true "
    "--xla_tpu_enable_async_collective_fusion_multiple_steps=true --xla_tpu_overlap_compute_collective_tc=true "
    "--xla_enable_async_all_gather=true")


# ----------------------------------------------------------------------------------------------------------------------
# Command construction: pure functions of the parsed arguments.

def gcloud_tpu(args: argparse.Namespace, *words: str) -> list[str]:
  """`gcloud compute tpus <words> --zone=Z [--project=P]`."""
  command = ["gcloud", "compute", "tpus", *words, f"--zone={args.zone}"]
  return command + ([f"--project={args.project}"] if args.project else [])


def ssh_command(args: argparse.Namespace, worker: str, remote_command: str) -> list[str]:
  """gcloud ssh running `remote_command` (a shell string) on `worker` ('all' = every worker, in parallel)."""
  return gcloud_tpu(args, "tpu-vm", "ssh", args.name) + [f"--worker={worker}", f"--command={remote_command}"]


def runtime_version(args: argparse.Namespace) -> str:
  """--runtime_version, or the JAX runtime image of the accelerator's generation."""
  return args.runtime_version or RUNTIME_VERSIONS[args.accelerator.split("-")[0]]


def create_commands(args: argparse.Namespace) -> list[list[str]]:
  """A queued resource holding one node (the slice) of the same name."""
  command = gcloud_tpu(args, "queued-resources", "create", args.name) + [
      f"--node-id={args.name}", f"--accelerator-type={args.accelerator}",
      f"--runtime-version={runtime_version(args)}"]
  return [command + (["--spot"] if args.spot else [])]


def delete_commands(args: argparse.Namespace) -> list[list[str]]:
  """Deletes the queued resource and its node (--force: also when ACTIVE), without a prompt."""
  return [gcloud_tpu(args, "queued-resources", "delete", args.name) + ["--force", "--quiet"]]


def describe_command(args: argparse.Namespace) -> list[str]:
  """Prints the queued resource's state, e.g. ACTIVE or SUSPENDED."""
  return gcloud_tpu(args, "queued-resources", "describe", args.name) + ["--format=value(state.state)"]


def setup_script(args: argparse.Namespace) -> str:
  """Remote shell: a virtual environment of --python (apt-installed; jax 0.10 needs Python >= 3.11) with the code
  installed editable with its TPU and ImageNet extras (precompute and convert read the weights files)."""
  apt = "sudo apt-get -o DPkg::Lock::Timeout=600"
  python = shlex.quote(args.python)
  return (f"{apt} update -qq && {apt} install -y -qq {python} {shlex.quote(args.python + '-venv')} && "
          f"{python} -m venv {REMOTE_VENV} && {REMOTE_VENV}/bin/pip install -q --upgrade pip && "
          f"cd {REMOTE_DIR} && {REMOTE_VENV}/bin/pip install -q -e '.[tpu,imagenet]'")


def install_commands(args: argparse.Namespace) -> list[list[str]]:
  """Puts the code on every worker and installs it: --git_url is cloned there; otherwise the local repository's
  committed HEAD (`git archive`) is copied with scp."""
  if args.git_url:
    branch = f"--branch {shlex.quote(args.git_ref)} " if args.git_ref else ""
    fetch = f"rm -rf {REMOTE_DIR} && git clone --depth=1 {branch}{shlex.quote(args.git_url)} {REMOTE_DIR}"
    return [ssh_command(args, "all", f"{fetch} && {setup_script(args)}")]
  tarball = str(pathlib.Path(tempfile.gettempdir()) / f"repa_jax-{args.name}.tar.gz")
  unpack = f"rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR} && tar -xzf {REMOTE_TARBALL} -C {REMOTE_DIR}"
  return [["git", "-C", str(args.repo), "archive", "--format=tar.gz", f"--output={tarball}", "HEAD"],
          gcloud_tpu(args, "tpu-vm", "scp", tarball, f"{args.name}:{REMOTE_TARBALL}") + ["--worker=all"],
          ssh_command(args, "all", f"{unpack} && {setup_script(args)}")]


def training_command(args: argparse.Namespace) -> list[str]:
  """The repa_jax command every worker runs (--distributed: jax.distributed.initialize() finds the slice)."""
  return ["-m", "repa_jax.main", f"--mode={args.mode}", "--distributed", f"--config={args.config}",
          f"--workdir={args.workdir}", f"--config.data.directory={args.data_dir}", *args.overrides]


def log_file(mode: str) -> str:
  """The log of --mode on each worker."""
  return f"~/repa_jax_{mode}.log"


def run_commands(args: argparse.Namespace) -> list[list[str]]:
  """One ssh to all workers that starts the same training command on each, in the background under nohup, with
  LIBTPU_INIT_ARGS=--libtpu_args. The whole subshell's output goes to the log file: a background job holding ssh's
  stdout would keep ssh open until it ends."""
  job = f"{REMOTE_VENV}/bin/python {shlex.join(training_command(args))}"
  env = f"export LIBTPU_INIT_ARGS={shlex.quote(args.libtpu_args)} && " if args.libtpu_args else ""
  return [ssh_command(args, "all",
                      f"(cd {REMOTE_DIR} && {env}exec nohup {job}) > {log_file(args.mode)} 2>&1 < /dev/null &")]


def logs_commands(args: argparse.Namespace) -> list[list[str]]:
  """Follows the log of one worker (-F: keeps following when the file is re-created)."""
  return [ssh_command(args, str(args.worker), f"tail -n 200 -F {log_file(args.mode)}")]


def watch_action(state: str, job_started: bool) -> str:
  """What `watch` does next, from the queued resource's state ('' = it does not exist) and whether it has started
  the job on the current VMs: 'recreate' (delete + create), 'create', 'start' (install + run) or 'wait'."""
  if state in LOST_STATES:
    return "recreate"
  if not state:
    return "create"
  if state == "ACTIVE" and not job_started:
    return "start"
  return "wait"


def watch_commands(args: argparse.Namespace) -> list[list[str]]:
  """Everything `watch` may run: the state poll, then the recovery of a lost slice."""
  return [describe_command(args)] + delete_commands(args) + create_commands(args) + install_commands(args) + \
      run_commands(args)


COMMANDS = {"create": create_commands, "install": install_commands, "run": run_commands, "logs": logs_commands,
            "watch": watch_commands, "delete": delete_commands}


# ----------------------------------------------------------------------------------------------------------------------
# Arguments.

def build_parser() -> argparse.ArgumentParser:
  """The CLI: one subcommand per step; the flags they share come from small parent parsers."""
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--name", required=True, help="queued resource and TPU node name")
  common.add_argument("--zone", required=True, help="e.g. us-central2-b (v4), us-east5-a (v5p), us-east5-b (v6e)")
  common.add_argument("--project", help="Google Cloud project (default: gcloud's configured project)")
  common.add_argument("--dry_run", action="store_true", help="print the commands, one per line, and run nothing")

  slice_ = argparse.ArgumentParser(add_help=False)
  slice_.add_argument("--accelerator", required=True, help="accelerator type, e.g. v4-32, v5p-64, v6e-64")
  slice_.add_argument("--runtime_version", help=f"TPU software version (default by generation: {RUNTIME_VERSIONS})")
  slice_.add_argument("--spot", action="store_true", help="Spot capacity: cheaper, can be preempted at any time")

  source = argparse.ArgumentParser(add_help=False)
  source.add_argument("--repo", type=pathlib.Path, default=REPO_ROOT,
                      help="local repository whose committed HEAD is copied (uncommitted changes are not)")
  source.add_argument("--git_url", help="clone this URL on the workers instead of copying --repo")
  source.add_argument("--git_ref", help="branch or tag of --git_url (default: its default branch)")
  source.add_argument("--python", default="python3.11", help="worker interpreter for the venv (an apt package)")

  job = argparse.ArgumentParser(add_help=False)
  job.add_argument("--mode", choices=("train", "precompute"), default="train")
  job.add_argument("--config", default=DEFAULT_CONFIG, help="repa_jax config, relative to the repository")
  job.add_argument("--workdir", required=True, help="gs:// directory for checkpoints and TensorBoard logs")
  job.add_argument("--data_dir", required=True, help="gs:// feature dataset (config.data.directory)")
  job.add_argument("--libtpu_args", default=ASYNC_COLLECTIVE_FLAGS,
                   help="LIBTPU_INIT_ARGS of the job (default: the async-collective flags; '' for libtpu's defaults)")

  overrides = "Any --config.<field>=<value> is passed on to repa_jax, e.g. --config.mesh.shape='(-1,4)'."
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=f"run, watch: {overrides}",
                                   allow_abbrev=False)
  commands = parser.add_subparsers(dest="command", required=True)
  commands.add_parser("create", parents=[common, slice_], help="request the slice (a queued resource)")
  commands.add_parser("install", parents=[common, source], help="copy the code to every worker and pip install it")
  commands.add_parser("run", parents=[common, job], help="start the same training command on every worker",
                      epilog=overrides)
  logs = commands.add_parser("logs", parents=[common], help="follow a worker's log")
  logs.add_argument("--mode", choices=("train", "precompute"), default="train", help="whose log")
  logs.add_argument("--worker", type=int, default=0)
  watch_ = commands.add_parser("watch", parents=[common, slice_, source, job],
                               help="poll the slice; when it is preempted or failed: delete, create, install, run",
                               epilog=overrides)
  watch_.add_argument("--poll_seconds", type=int, default=60,
                      help=f"seconds between state polls, in {list(POLL_SECONDS_RANGE)}")
  commands.add_parser("delete", parents=[common], help="delete the queued resource and its VMs")
  return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
  """Parsed and checked arguments; errors (exit 2) name the flag to fix."""
  parser = build_parser()
  args, extra = parser.parse_known_args(argv)
  args.overrides = extra
  if extra and args.command not in ("run", "watch"):
    parser.error(f"unrecognized arguments: {' '.join(extra)}")
  for override in extra:
    if not re.fullmatch(r"--config\.[\w.]+=.*", override):
      parser.error(f"unrecognized argument {override!r}: only --config.<field>=<value> overrides are passed on")
  if "accelerator" in args:
    if not re.fullmatch(r"v\d+[a-z]*-\d+", args.accelerator):
      parser.error(f"--accelerator={args.accelerator!r}: expected <generation>-<size>, e.g. v5p-64")
    if not args.runtime_version and args.accelerator.split("-")[0] not in RUNTIME_VERSIONS:
      parser.error(f"--accelerator={args.accelerator}: pass --runtime_version (defaults exist for "
                   f"{sorted(RUNTIME_VERSIONS)})")
  if "workdir" in args:
    for flag in ("workdir", "data_dir"):
      if not getattr(args, flag).startswith("gs://"):
        parser.error(f"--{flag}={getattr(args, flag)!r} is not a gs:// path: every worker of a slice must read "
                     "and write the same directory, and a worker's disk is lost with the VM")
  if "poll_seconds" in args:
    low, high = POLL_SECONDS_RANGE
    if not low <= args.poll_seconds <= high:
      parser.error(f"--poll_seconds={args.poll_seconds}: use a value in [{low}, {high}]")
  return args


# ----------------------------------------------------------------------------------------------------------------------
# Execution.

def execute(commands: list[list[str]]) -> int:
  """Runs the commands in order, echoing each; stops at the first failure. Returns the last exit code."""
  for command in commands:
    print(f"+ {shlex.join(command)}", flush=True)
    code = subprocess.run(command, check=False).returncode
    if code:
      print(f"failed with exit code {code}: {shlex.join(command)}", file=sys.stderr, flush=True)
      return code
  return 0


def queued_resource_state(args: argparse.Namespace) -> str:
  """The queued resource's state, or '' when describe fails (it does not exist)."""
  result = subprocess.run(describe_command(args), capture_output=True, text=True, check=False)
  return result.stdout.strip() if result.returncode == 0 else ""


def watch(args: argparse.Namespace) -> int:
  """Polls until Ctrl-C. A slice that is ACTIVE when watch starts is taken to run the job already; one that becomes
  ACTIVE later gets install + run. Training resumes from the newest checkpoint in --workdir."""
  job_started = queued_resource_state(args) == "ACTIVE"
  try:
    while True:
      job_started = watch_step(args, job_started)
      time.sleep(args.poll_seconds)
  except KeyboardInterrupt:
    return 130


def watch_step(args: argparse.Namespace, job_started: bool) -> bool:
  """One poll of `watch` and the action it calls for. Returns whether the job is started on the current VMs."""
  state = queued_resource_state(args)
  action = watch_action(state, job_started)
  print(f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S} {args.name}: {state or 'NOT FOUND'} -> {action}", flush=True)
  if action == "recreate":
    execute(delete_commands(args) + create_commands(args))
    return False
  if action == "create":
    execute(create_commands(args))
    return False
  if action == "start":
    return execute(install_commands(args) + run_commands(args)) == 0
  return job_started


def main(argv: list[str]) -> int:
  """Runs (or with --dry_run prints) the subcommand's commands; returns the exit code."""
  args = parse_args(argv)
  if args.dry_run:
    print("\n".join(shlex.join(command) for command in COMMANDS[args.command](args)))
    return 0
  if args.command == "watch":
    return watch(args)
  return execute(COMMANDS[args.command](args))


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
