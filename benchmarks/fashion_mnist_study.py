"""The Fashion-MNIST study: none / REPA / Dispersive / both at the main job's recipe with a constant learning rate,
over seeds, FD against steps.

  pip install -e ".[study]"   # matplotlib, scipy
  python benchmarks/fashion_mnist_study.py --workdir=workdir/study --disperse_grid   # 1. tune λ, τ (one seed)
  python benchmarks/fashion_mnist_study.py --workdir=workdir/study                   # 2. the arms over --seeds
  python benchmarks/fashion_mnist_study.py --workdir=workdir/study --arms=none,repa  # or some arms first

Each run trains configs/fashion_mnist.py:reg=<arm> with --seeds' seed (init, data order, noise) for --steps (the
budget: 1400, the main job's when the study ran) and evaluates its EMA model every --eval_every steps (in-training evaluation:
--eval_samples class-balanced samples with EVAL_SAMPLER, scored by the project's CNN classifier against the test
split, beside the real-data floor of as many real train images); the --long_seed's run of each of --arms continues to
--long_factor x the budget (the learning rate is held constant after the warm-up, so its first budget is the budget's
run; the main job ends with a cooldown, which would tie every run to its own length); --extra_arms stop at the budget.
At the budget's checkpoint each run's aligned block is probed (repa_jax.evaluate.representation: linear probe, CKNNA
and mutual k-NN to the target encoder; not for REG). The Dispersive Loss is first tuned for this scale (--disperse_grid:
λ x τ of GRID on seed 0 for --grid_steps steps, scored once at the end); the arms 'disperse' and 'both' then use the
grid's best. Results: <workdir>/study.md (mean +- std per arm and step, Welch's t-tests of each arm against none,
steps to reach the FD that none reaches at the budget, wall time per step, the representation table, the long runs
with the steps each needs to reach the best arm's FD) and <workdir>/study.png. Runs resume and finished runs are kept
(<workdir>/<run>/result.json). The feature dataset and the classifier must exist (`make run` builds both).
"""
import json
import os
import pathlib
import sys
import time

import matplotlib
import numpy as np
import scipy.stats
from absl import app, flags
from etils import epath

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # the repository root, for configs/
from configs import fashion_mnist  # noqa: E402
from repa_jax.evaluate.evaluate import periodic_evaluator  # noqa: E402
from repa_jax.evaluate.representation import PROBE_TIMES, representation_metrics  # noqa: E402
from repa_jax.sample.generate import load_sit_ema  # noqa: E402
from repa_jax.specs import sharding  # noqa: E402
from repa_jax.train.loop import train  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ARMS = ("none", "repa", "disperse", "both")  # over --seeds; --extra_arms (other presets) over --extra_seeds
# The study's evaluations: Euler 25 with CFG 2.0 on every step (50 model rows per sample, 0.6x the main job's SDE).
EVAL_SAMPLER = {"sampler": "euler", "steps": 25, "cfg_scale": 2.0, "guidance_low": 0.0, "guidance_high": 1.0}
GRID = tuple((weight, temperature) for weight in (0.1, 0.25, 0.5) for temperature in (0.5, 1.0))
_WORKDIR = flags.DEFINE_string("workdir", "workdir/study", "Where each run and the results go.")
_STEPS = flags.DEFINE_integer("steps", 1400, "Training steps of every run (the budget; default: the main job's when the study ran).")
_GRID_STEPS = flags.DEFINE_integer("grid_steps", 700, "Training steps of each Dispersive grid run.")
_ARMS = flags.DEFINE_list("arms", list(ARMS), "The arms to run and report (of ARMS).")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of every arm.")
_LONG_SEED = flags.DEFINE_string("long_seed", "0", "The seed whose runs continue to --long_factor x --steps.")
_LONG_FACTOR = flags.DEFINE_integer("long_factor", 3, "How far the --long_seed runs continue, in budgets.")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 350, "Evaluate every this many steps.")
_EVAL_SAMPLES = flags.DEFINE_integer("eval_samples", 500, "Samples per evaluation.")
_GRID = flags.DEFINE_bool("disperse_grid", False, "Run the Dispersive Loss grid instead of the arms.")
_EXTRA_ARMS = flags.DEFINE_list("extra_arms", ["irepa"], "Further presets (repa_jax.config.REGULARIZERS).")
_EXTRA_SEEDS = flags.DEFINE_integer("extra_seeds", 1, "Seeds of each extra arm: the first this many of --seeds (more "
                                    "than one for a promising arm).")
_OPTIMIZER = flags.DEFINE_enum("optimizer", None, ["adamw", "muon"], "config.train.optimizer of every run (default: "
                               "the recipe's; the README's table was measured with adamw).")


def run_config(arm: str, seed: int, steps: int, eval_every: int, disperse: tuple[float, float] | None):
  """configs/fashion_mnist.py:reg=<arm> for `steps` with seed `seed`, evaluated every `eval_every` steps; `disperse`:
  (λ, τ) of the dispersive term."""
  config = fashion_mnist.get_config(f"reg={arm}")
  config.seed = seed
  # The budget's checkpoint, for the probe; a constant learning rate, so that a long run's first budget is the budget's.
  config.train.update(steps=steps, lr_schedule="constant", checkpoint_every=min(steps, _STEPS.value),
                      time_budget_s=0)
  if _OPTIMIZER.value:
    config.train.optimizer = _OPTIMIZER.value
  config.evaluate.update(every_steps=eval_every, num_samples=_EVAL_SAMPLES.value, batch_size=100, **EVAL_SAMPLER)
  if disperse and arm in ("disperse", "both"):
    config.disperse.update(weight=disperse[0], temperature=disperse[1])
  return config


def by_step(evals: list[dict]) -> list[dict]:
  """One evaluation per step, in step order (a resumed run re-evaluates the steps after its last checkpoint; the
  runs are deterministic, so the repeats are equal)."""
  return sorted({e["step"]: e for e in evals}.values(), key=lambda e: e["step"])


def run(name: str, config) -> dict:
  """Trains one run (or reads its result.json): its evaluations, training wall time without them, load averages."""
  workdir = epath.Path(_WORKDIR.value) / name
  if (workdir / "result.json").exists():
    result = json.loads((workdir / "result.json").read_text())
    return {**result, "evals": by_step(result["evals"])}
  evaluate, eval_seconds = periodic_evaluator(config), []

  def timed(params):
    start = time.time()
    out = evaluate(params)
    eval_seconds.append(time.time() - start)
    return out

  load_before, start = os.getloadavg()[0], time.time()
  print(f"== {name} (load {load_before:.2f})", flush=True)
  if int(train(config, str(workdir), timed)["step"]) != config.train.steps:
    raise SystemExit(f"{name}: training stopped early (preempted); re-run to resume")
  train_s = time.time() - start - sum(eval_seconds)
  evals = by_step([json.loads(line) for line in (workdir / "eval.jsonl").read_text().splitlines()])
  result = {"name": name, "evals": evals, "train_s": train_s, "s_per_step": train_s / config.train.steps,
            "load_before": load_before, "load_after": os.getloadavg()[0]}
  (workdir / "result.json").write_text(json.dumps(result))
  return result


def representation(name: str, config) -> dict | None:
  """The representation metrics (repa_jax.evaluate.representation) of a run's EMA model at the budget, cached in
  <run>/representation.json; None for REG (its input carries the encoder's noised class token, so a probe of its
  block would read the encoder)."""
  if config.reg.weight:
    return None
  path = epath.Path(_WORKDIR.value) / name / "representation.json"
  if not path.exists():
    params, _ = load_sit_ema(config, str(path.parent), sharding.config_mesh(config), step=_STEPS.value)
    path.write_text(json.dumps(representation_metrics(config, params)))
  return json.loads(path.read_text())


def grid() -> tuple[float, float]:
  """Runs GRID on seed 0 for --grid_steps steps; writes <workdir>/grid.md; returns the (λ, τ) of the lowest FD."""
  steps = _GRID_STEPS.value
  results = {(w, t): run(f"grid_w{w}_t{t}", run_config("disperse", 0, steps, steps, (w, t)))["evals"][-1]
             for w, t in GRID}
  lines = [f"Dispersive Loss (infonce_l2, block 1, groups of 16) on seed 0, {steps} steps of batch 32, "
           f"{_EVAL_SAMPLES.value} samples:\n", "| λ | τ | FD (floor) | class acc. |", "|---|---|---|---|"]
  lines += [f"| {w} | {t} | {e['fid']:.2f} ({e['floor_fid']:.2f}) | {e['class_accuracy']:.3f} |"
            for (w, t), e in results.items()]
  (epath.Path(_WORKDIR.value) / "grid.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))
  return min(results, key=lambda k: results[k]["fid"])


def steps_to(evals: list[dict], fd: float) -> int | None:
  """The first evaluated step whose FD is <= fd (None: not reached)."""
  return next((e["step"] for e in evals if e["fid"] <= fd), None)


def within(evals: list[dict], budget: int) -> list[dict]:
  """The evaluations at steps <= budget (a long run's part that equals a run of the budget)."""
  return [e for e in evals if e["step"] <= budget]


def welch(what: str, mine: np.ndarray, other: np.ndarray) -> str:
  """A sentence: the two means, Welch's two-sided t-test, significant at 5% or not."""
  test = scipy.stats.ttest_ind(mine, other, equal_var=False)
  verdict = "significant" if test.pvalue < 0.05 else "not significant"
  return (f"- {what}: {mine.mean():.3f} vs {other.mean():.3f}, Welch's t = {test.statistic:.2f}, "
          f"p = {test.pvalue:.3f}: {verdict} at 0.05.")


def representation_table(results: dict[str, list[dict]], budget: int) -> list[str]:
  """Per arm at the budget: the linear probe of the block's mean-pooled tokens and its CKNNA / mutual k-NN to the
  target encoder at each probe t, mean +- std over seeds; the floors; Welch's tests of each arm against none."""
  rep = {arm: [r["representation"] for r in runs] for arm, runs in results.items() if runs[0]["representation"]}
  first = rep["none"][0]
  columns = [f"{kind}_t{t}" for kind in ("probe", "cknna", "mutual_knn") for t in PROBE_TIMES]
  titles = {"probe": "probe", "cknna": "CKNNA", "mutual_knn": "mutual k-NN"}
  lines = ["", f"Representations at step {budget}: block {first['block']}'s mean-pooled tokens on noised test images "
           f"(null class), linear probe (ridge) fitted on train images; alignment to the {first['encoder']} "
           f"encoder's mean-pooled features (k = {first['knn']}). Floors: the same probe on the noised pixels " +
           ", ".join(f"{first[f'probe_pixels_t{t}']:.3f} (t = {t})" for t in PROBE_TIMES) +
           f"; on the encoder's clean features {first['probe_encoder']:.3f}.\n",
           "| arm | " + " | ".join(f"{titles[c.rsplit('_t', 1)[0]]} t={c.rsplit('_t', 1)[1]}" for c in columns) + " |",
           "|---" * (len(columns) + 1) + "|"]
  for arm, runs in rep.items():
    values = {c: np.array([r[c] for r in runs]) for c in columns}
    spread = lambda v: f" +- {v.std(ddof=1):.3f}" if len(v) > 1 else ""
    lines.append(f"| {arm} | " + " | ".join(f"{values[c].mean():.3f}{spread(values[c])}" for c in columns) + " |")
  lines.append("")
  middle = PROBE_TIMES[len(PROBE_TIMES) // 2]
  for arm in rep:
    if arm == "none" or len(rep[arm]) < 2:
      continue
    lines += [welch(f"{arm} vs none, {metric}", *(np.array([r[metric] for r in rep[a]]) for a in (arm, "none")))
              for metric in (f"probe_t{middle}", f"cknna_t{middle}")]
  return lines


def report(results: dict[str, list[dict]], disperse: tuple[float, float] | None, budget: int) -> str:
  """The study's tables: FD mean +- std per arm and step up to the budget, end-of-budget class accuracy, tests
  against none, steps to none's FD at the budget, wall time per step; then the --long_seed runs past the budget."""
  evals = {arm: [within(r["evals"], budget) for r in runs] for arm, runs in results.items()}
  steps = [e["step"] for e in evals["none"][0]]
  fd = {arm: np.array([[e["fid"] for e in run] for run in runs]) for arm, runs in evals.items()}
  acc = {arm: np.array([run[-1]["class_accuracy"] for run in runs]) for arm, runs in evals.items()}
  target = fd["none"][:, -1].mean()
  floor = evals["none"][0][-1]
  dispersive = f"; Dispersive λ = {disperse[0]}, τ = {disperse[1]} (the grid's best)" if disperse else ""
  lines = [f"Budget {budget} steps of batch 32, {_EVAL_SAMPLES.value} samples per evaluation (real-data floor: FD "
           f"{floor['floor_fid']:.2f}, classifier accuracy {floor['floor_class_accuracy']:.3f}){dispersive}.\n",
           "| arm | seeds | " + " | ".join(f"FD @ {s}" for s in steps) + " | class acc. @ end | steps to FD "
           f"{target:.1f} (none's end) | s / step | load avg |", "|---" * (len(steps) + 6) + "|"]
  for arm, runs in results.items():
    reach = [steps_to(run, target) for run in evals[arm]]
    spread = lambda values, digits=1: f" +- {values.std(ddof=1):.{digits}f}" if len(runs) > 1 else " (one seed)"
    lines.append(f"| {arm} | {len(runs)} | " + " | ".join(f"{m:.1f}{spread(column)}"
                                                         for m, column in zip(fd[arm].mean(0), fd[arm].T)) +
                 f" | {acc[arm].mean():.3f}{spread(acc[arm], 3)} | {reach} | "
                 f"{np.mean([r['s_per_step'] for r in runs]):.3f} | "
                 f"{min(r['load_before'] for r in runs):.1f}-{max(r['load_after'] for r in runs):.1f} |")
  lines.append("")
  # Every arm against none; the extra arms (other presets) also against repa, the method they modify.
  pairs = [(arm, "none") for arm in results if arm != "none"] + [(arm, "repa") for arm in results
                                                                  if arm not in ARMS and "repa" in results]
  for arm, other in pairs:
    if len(results[arm]) < 2:  # one seed: no test
      continue
    lines += [welch(f"{arm} vs {other}, {metric}", values[arm], values[other])
              for metric, values in (("FD at the end", {a: v[:, -1] for a, v in fd.items()}), ("class accuracy", acc))]
  lines += representation_table(results, budget)
  long = {arm: r["evals"] for arm, runs in results.items() for r in runs if r["evals"][-1]["step"] > budget}
  if long:
    best = min(fd, key=lambda arm: fd[arm][:, -1].mean())
    goal = fd[best][:, -1].mean()
    later = [e["step"] for e in next(iter(long.values())) if e["step"] > budget]
    lines += ["", f"Seed {_LONG_SEED.value} continued past the budget (one seed per arm; the learning rate is constant "
              "after the warm-up, so the first budget of these runs is the run above):\n",
              "| arm | " + " | ".join(f"FD @ {s}" for s in later) + " | class acc. @ end | steps to FD "
              f"{goal:.1f} ({best}'s mean at {budget}) |", "|---" * (len(later) + 3) + "|"]
    lines += [f"| {arm} | " + " | ".join(f"{e['fid']:.1f}" for e in run if e["step"] > budget) +
              f" | {run[-1]['class_accuracy']:.3f} | {steps_to(run, goal)} |" for arm, run in long.items()]
  return "\n".join(lines)


def plot(results: dict[str, list[dict]], path: epath.Path, budget: int) -> None:
  """FD against steps: mean +- std over the seeds up to the budget, the --long_seed run past it (dotted)."""
  fig, ax = plt.subplots(figsize=(6, 4))
  for arm, runs in results.items():
    evals = [within(r["evals"], budget) for r in runs]
    steps = [e["step"] for e in evals[0]]
    fd = np.array([[e["fid"] for e in run] for run in evals])
    several = len(runs) > 1
    line = ax.errorbar(steps, fd.mean(0), yerr=fd.std(0, ddof=1) if several else None, marker="o", capsize=3,
                       linestyle="-" if several else "--", label=arm if several else f"{arm} (one seed)")
    for r in runs:
      if r["evals"][-1]["step"] > budget:
        later = [e for e in r["evals"] if e["step"] >= budget]
        ax.plot([e["step"] for e in later], [e["fid"] for e in later], linestyle=":", marker=".",
                color=line.lines[0].get_color())
  ax.axvline(budget, color="grey", linewidth=0.5)
  ax.set(xlabel="training step (batch 32)", ylabel="FD (CNN features vs test split)", yscale="log",
         title="SiT-S/4 on Fashion-MNIST, mean +- std over seeds\n(dotted: one seed past the budget)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv):
  del argv
  root = epath.Path(_WORKDIR.value)
  root.mkdir(parents=True, exist_ok=True)
  if unknown := set(_ARMS.value) - set(ARMS):
    raise SystemExit(f"--arms: {sorted(unknown)} are not arms of the study {ARMS}; other presets go to --extra_arms")
  disperse = grid() if _GRID.value or {"disperse", "both"} & set(_ARMS.value) else None
  if _GRID.value:
    return
  seeds = {**{arm: _SEEDS.value for arm in _ARMS.value},
           **{arm: _SEEDS.value[:_EXTRA_SEEDS.value] for arm in _EXTRA_ARMS.value}}
  budget = _STEPS.value

  def steps(arm: str, seed: str) -> int:
    return budget * (_LONG_FACTOR.value if arm in _ARMS.value and seed == _LONG_SEED.value else 1)

  def run_and_probe(arm: str, seed: str) -> dict:
    name, config = f"{arm}_seed{seed}", run_config(arm, int(seed), steps(arm, seed), _EVAL_EVERY.value, disperse)
    return {**run(name, config), "representation": representation(name, config)}

  results = {arm: [run_and_probe(arm, seed) for seed in arm_seeds] for arm, arm_seeds in seeds.items()}
  if "none" not in results:
    print("runs done; the report compares every arm with 'none': run again with --arms=none,... to write it")
    return
  text = report(results, disperse, budget)
  (root / "study.md").write_text(text + "\n")
  plot(results, root / "study.png", budget)
  print(text)


if __name__ == "__main__":
  app.run(main)
