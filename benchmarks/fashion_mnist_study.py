"""Baseline vs REPA vs Dispersive vs both on Fashion-MNIST, at equal steps and otherwise identical settings.

  python benchmarks/fashion_mnist_study.py --workdir=workdir/study [--steps=400 --eval_every=100 --eval_samples=512]

Trains configs/fashion_mnist.py:reg=<r> for each regulariser (the feature dataset must exist: `make run` or
--mode=precompute builds it), evaluates the EMA model's FD every --eval_every steps (in-training evaluation: class-
balanced samples vs the test split, with the project's own Fashion-MNIST classifier), then writes
<workdir>/study.png (FD against steps) and <workdir>/study.md (the table).
"""
import json
import pathlib
import sys

from absl import app, flags
from etils import epath

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # the repository root, for configs/
from configs import fashion_mnist  # noqa: E402
from repa_jax.train.loop import train

REGULARIZERS = ("none", "repa", "disperse", "both")
_WORKDIR = flags.DEFINE_string("workdir", "workdir/study", "Where each run and the results go.")
_STEPS = flags.DEFINE_integer("steps", 400, "Training steps of every run.")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 100, "Evaluate FD every this many steps.")
_EVAL_SAMPLES = flags.DEFINE_integer("eval_samples", 512, "Samples per evaluation.")


def read_evals(workdir: epath.Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / "eval.jsonl").read_text().splitlines()]


def plot(results: dict[str, list[dict]], path: epath.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for reg, evals in results.items():
    ax.plot([e["step"] for e in evals], [e["fid"] for e in evals], marker="o", label=reg)
  ax.set(xlabel="training step", ylabel="FD (classifier features, test split)", yscale="log",
         title="SiT on Fashion-MNIST: FD of EMA samples")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def table(results: dict[str, list[dict]]) -> str:
  steps = [e["step"] for e in next(iter(results.values()))]
  lines = ["| regulariser | " + " | ".join(f"FD @ {s}" for s in steps) + " | class acc. (last) | IS (last) |",
           "|---" * (len(steps) + 3) + "|"]
  for reg, evals in results.items():
    lines.append(f"| {reg} | " + " | ".join(f"{e['fid']:.2f}" for e in evals) +
                 f" | {evals[-1]['class_accuracy']:.3f} | {evals[-1]['inception_score']:.2f} |")
  return "\n".join(lines)


def main(argv):
  del argv
  root = epath.Path(_WORKDIR.value)
  results = {}
  for reg in REGULARIZERS:
    config = fashion_mnist.get_config(f"reg={reg}")
    config.train.steps = _STEPS.value
    config.evaluate.update(every_steps=_EVAL_EVERY.value, num_samples=_EVAL_SAMPLES.value)
    print(f"== {reg} ==", flush=True)
    train(config, str(root / reg))
    results[reg] = read_evals(root / reg)
  plot(results, root / "study.png")
  (root / "study.md").write_text(table(results) + "\n")
  print(table(results))


if __name__ == "__main__":
  app.run(main)
