"""The Fashion-MNIST recipe sweep: which settings make SiT + REPA converge fastest on a 2-core CPU.

  python benchmarks/fashion_mnist_sweep.py --workdir=workdir/sweep [--rows=base,lr2e-3,...] [--samplers]

Each row trains configs/fashion_mnist.py:reg=repa with the row's overrides for its steps, then samples
--num_samples class-balanced EMA samples with ROW_SAMPLER (Euler 25, no guidance) and scores them with the project's CNN classifier
against the test split, beside the real-data floor (as many real train images). --samplers instead evaluates the
sampler settings of SAMPLERS on the model of --sampler_row (trained once). Rows are appended to
<workdir>/sweep.jsonl as they finish (a re-run skips finished rows) and the table goes to <workdir>/sweep.md.
The feature dataset and the classifier must exist (`make run` builds both).
"""
import json
import os
import pathlib
import sys
import time

import jax
import numpy as np
import scipy.stats
from absl import app, flags
from etils import epath

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # the repository root, for configs/
from configs import fashion_mnist  # noqa: E402
from repa_jax.evaluate.evaluate import evaluate_npz  # noqa: E402
from repa_jax.sample.generate import generate  # noqa: E402
from repa_jax.train.loop import train  # noqa: E402

# name -> overrides of configs/fashion_mnist.py:reg=repa (dotted field names). The sweep varied one setting at a time
# around BASE (batch 64, lr 2e-3; run with --steps=500); its best row, lr4e-3_batch32, became the shipped recipe.
BASE = {"train.batch_size": 64, "train.lr": 2e-3}
ROWS = {
    "base": {},
    "lr5e-4": {"train.lr": 5e-4},
    "lr1e-3": {"train.lr": 1e-3},
    "lr4e-3": {"train.lr": 4e-3},
    "lr8e-3": {"train.lr": 8e-3},
    "lr4e-3_batch32": {"train.lr": 4e-3, "train.batch_size": 32, "train.steps": 2.0},
    "batch32": {"train.batch_size": 32, "train.steps": 2.0},  # steps as a multiple of --steps: equal images seen
    "batch128": {"train.batch_size": 128, "train.steps": 0.5},
    "no_ema_warmup": {"train.ema_warmup": False},
    "uniform_t": {"flow.time_sampler": "uniform"},
    "width192": {"model.width": 192, "model.num_heads": 3},
    "repa_block3": {"align.block": 3},
    "repa_lambda1": {"align.weight": 1.0},
    "no_repa": {"align.encoders": ()},
}
# REPA vs no regulariser at the shipped recipe (batch 32, lr 4e-3), three seeds each (seed: init, data order, noise):
# `--rows=repa_seed0,...,none_seed2 --steps=300` trains 600 steps of batch 32 each (a third of the main job).
RECIPE = {"train.batch_size": 32, "train.lr": 4e-3, "train.steps": 2.0}
SEEDS = (0, 1, 2)
ROWS.update({f"{reg}_seed{seed}": {**RECIPE, "seed": seed, **({} if reg == "repa" else {"align.encoders": ()})}
             for reg in ("repa", "none") for seed in SEEDS})
# name -> sample.* overrides, evaluated on one trained model (--samplers).
SAMPLERS = {
    "euler25": {"sampler": "euler", "steps": 25},
    "euler50": {"sampler": "euler", "steps": 50},
    "heun25": {"sampler": "heun", "steps": 25},
    "sde50": {"sampler": "sde", "steps": 50},
    "euler50_cfg1.5": {"sampler": "euler", "steps": 50, "cfg_scale": 1.5},
    "euler25_cfg1.5": {"sampler": "euler", "steps": 25, "cfg_scale": 1.5},
    "euler25_cfg2": {"sampler": "euler", "steps": 25, "cfg_scale": 2.0},
    "euler25_cfg3": {"sampler": "euler", "steps": 25, "cfg_scale": 3.0},
    "euler25_cfg2_t<0.7": {"sampler": "euler", "steps": 25, "cfg_scale": 2.0, "guidance_high": 0.7},
    "euler25_cfg3_t<0.7": {"sampler": "euler", "steps": 25, "cfg_scale": 3.0, "guidance_high": 0.7},
    "sde50_cfg2_t<0.7": {"sampler": "sde", "steps": 50, "cfg_scale": 2.0, "guidance_high": 0.7},
}

ROW_SAMPLER = {**SAMPLERS["euler25"], "cfg_scale": 1.0}  # every training row is scored with this sampler

_WORKDIR = flags.DEFINE_string("workdir", "workdir/sweep", "Where each run and the results go.")
_ROWS = flags.DEFINE_list("rows", list(ROWS), f"Rows to run, of {list(ROWS)}.")
_STEPS = flags.DEFINE_integer("steps", None, "Training steps of a row with batch 64 (default: the recipe's).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1000, "Samples per evaluation.")
_SAMPLERS = flags.DEFINE_bool("samplers", False, "Evaluate SAMPLERS on the model of --sampler_row instead.")
_SAMPLER_ROW = flags.DEFINE_string("sampler_row", "lr4e-3_batch32", "The trained row --samplers evaluates.")


def row_config(overrides: dict, steps: int | None):
  """configs/fashion_mnist.py:reg=repa with BASE and `overrides`; a float train.steps multiplies --steps."""
  config = fashion_mnist.get_config("reg=repa")
  base_steps = steps or config.train.steps
  config.train.steps = base_steps
  for name, value in {**BASE, **overrides}.items():
    section, _, field = name.rpartition(".")
    (config[section] if section else config)[field] = round(base_steps * value) if name == "train.steps" else value
  config.train.update(checkpoint_every=config.train.steps, time_budget_s=0)  # every row its exact steps
  config.evaluate.every_steps = None
  config.sample.update(num_samples=_NUM_SAMPLES.value, **ROW_SAMPLER)
  return config


def evaluate_row(config, workdir: str) -> dict:
  """Samples of the newest checkpoint in `workdir` -> FD / class accuracy and their floor, with the wall time."""
  start = time.time()
  metrics = evaluate_npz(config, str(generate(config, workdir)))
  return {"fd": metrics["fid"], "floor_fd": metrics["floor"]["fid"], "class_accuracy": metrics["class_accuracy"],
          "floor_class_accuracy": metrics["floor"]["class_accuracy"], "precision": metrics["precision"],
          "recall": metrics["recall"], "sample_s": round(time.time() - start, 1)}


def done_rows(path: epath.Path) -> dict[str, dict]:
  return {r["row"]: r for r in map(json.loads, path.read_text().splitlines())} if path.exists() else {}


def table(rows: list[dict]) -> str:
  lines = ["| row | setting | steps x batch | train s | sampler | sample + score s | FD (floor) | FD / floor | "
           "class acc. (real test) | precision / recall | load avg |", "|---" * 11 + "|"]
  for r in rows:
    lines.append(f"| {r['row']} | {r['setting']} | {r['steps']} x {r['batch']} | {r['train_s']:.0f} | {r['sampler']} | "
                 f"{r['sample_s']:.0f} | {r['fd']:.2f} ({r['floor_fd']:.2f}) | {r['fd'] / r['floor_fd']:.1f} | "
                 f"{r['class_accuracy']:.3f} ({r['floor_class_accuracy']:.3f}) | {r['precision']:.2f} / "
                 f"{r['recall']:.2f} | {r['load_before']:.1f} -> {r['load_after']:.1f} |")
  return "\n".join(lines)


def seed_comparison(rows: dict[str, dict]) -> str:
  """Mean +- standard deviation over SEEDS of FD and class accuracy for the repa and none rows that finished, and
  Welch's t-test between them (two-sided)."""
  arms = {reg: [rows[f"{reg}_seed{s}"] for s in SEEDS if f"{reg}_seed{s}" in rows] for reg in ("repa", "none")}
  if not all(len(arm) == len(SEEDS) for arm in arms.values()):
    return ""
  lines = ["| arm | seeds | FD mean +- std | class acc. mean +- std |", "|---|---|---|---|"]
  for reg, arm in arms.items():
    fd, acc = np.array([r["fd"] for r in arm]), np.array([r["class_accuracy"] for r in arm])
    lines.append(f"| {reg} | {len(arm)} | {fd.mean():.2f} +- {fd.std(ddof=1):.2f} | {acc.mean():.3f} +- "
                 f"{acc.std(ddof=1):.3f} |")
  for metric in ("fd", "class_accuracy"):
    test = scipy.stats.ttest_ind([r[metric] for r in arms["repa"]], [r[metric] for r in arms["none"]],
                                 equal_var=False)
    lines.append(f"\nWelch's t-test, repa vs none, {metric}: t = {test.statistic:.2f}, p = {test.pvalue:.3f}")
  return "\n".join(lines)


def sampler_name(config) -> str:
  s = config.sample
  guidance = f" cfg {s.cfg_scale} on t in [{s.guidance_low}, {s.guidance_high}]" if s.cfg_scale != 1.0 else ""
  return f"{s.sampler} {s.steps}{guidance}"


def main(argv):
  del argv
  root = epath.Path(_WORKDIR.value)
  root.mkdir(parents=True, exist_ok=True)
  results = root / ("samplers.jsonl" if _SAMPLERS.value else "sweep.jsonl")
  finished = done_rows(results)
  if _SAMPLERS.value:
    jobs = [(f"{_SAMPLER_ROW.value}/{name}", ROWS[_SAMPLER_ROW.value], sample) for name, sample in SAMPLERS.items()]
  else:
    jobs = [(name, ROWS[name], {}) for name in _ROWS.value]
  for name, overrides, sample in jobs:
    if name in finished:
      continue
    config = row_config(overrides, _STEPS.value)
    config.sample.update(sample)
    workdir = str(root / name.split("/")[0])
    load_before = os.getloadavg()[0]
    print(f"== {name}: {overrides} {sample} (load {load_before:.2f})", flush=True)
    start = time.time()
    state = train(config, workdir)  # resumes, so --samplers reuses the trained row
    if int(state["step"]) != config.train.steps:
      raise SystemExit(f"{name}: training stopped at step {int(state['step'])} (preempted); re-run to resume")
    jax.clear_caches()
    row = {"row": name, "setting": ", ".join(f"{k}={v}" for k, v in {**overrides, **sample}.items()) or "base",
           "steps": config.train.steps, "batch": config.train.batch_size, "train_s": time.time() - start,
           "sampler": sampler_name(config), **evaluate_row(config, workdir), "load_before": load_before,
           "load_after": os.getloadavg()[0]}
    print(json.dumps(row), flush=True)
    with results.open("a") as file:
      file.write(json.dumps(row) + "\n")
    finished[name] = row
  report = table(list(finished.values())) + "\n\n" + seed_comparison(finished)
  (results.parent / results.name.replace(".jsonl", ".md")).write_text(report + "\n")
  print(report)


if __name__ == "__main__":
  app.run(main)
