"""Would Ray Tune pay for the study's lr search? Its overhead per trial against the study's own executor, and what
ASHA / median stopping would have saved on a finished study's lr-selection runs (their recorded histories).

    PYTHONPATH=TUNE_DEPS python bench/bench_tune.py [--trials 6] [--reports 10] [--work 0.5] [--runs RUNS] [--json out]

TUNE_DEPS: ray[tune]'s extra packages (pandas, pyarrow, tensorboardX), e.g. `pip install --target DIR ...`: the
project does not depend on them. Part 1 runs `--trials` jobs of `--work` seconds, each reporting `--reports` times,
through tune.Tuner (ASHA off) and through analysis.executor.RayExecutor, alternated, on one local Ray instance;
prints the wall seconds and the overhead per trial. Part 2 (with `--runs`, a study's runs directory) replays each
method's lr-selection runs, evaluation by evaluation, through ASHA's rule (grace period `--grace` evaluations,
reduction factor 3) and the median stopping rule, and prints the steps each would have saved of the steps trained,
and whether it would have stopped the lr the study chose.
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapters.io import write_json  # noqa: E402


def _work(seconds, reports, report=None):
    for i in range(reports):
        time.sleep(seconds / reports)
        if report:
            report({"val_loss": 1.0 / (i + 1)})
    return seconds


def _job(seconds, reports):
    return _work(seconds, reports)


def _tune_trial(config):
    from ray import tune
    _work(config["seconds"], config["reports"], tune.report)


def tune_wall(trials, reports, seconds, storage):
    from ray import tune
    start = time.perf_counter()
    tuner = tune.Tuner(tune.with_resources(_tune_trial, {"cpu": 1}),
                       param_space={"seconds": seconds, "reports": reports, "i": tune.grid_search(list(range(trials)))},
                       tune_config=tune.TuneConfig(metric="val_loss", mode="min"),
                       run_config=tune.RunConfig(storage_path=storage, verbose=0))
    tuner.fit()
    return time.perf_counter() - start


def executor_wall(trials, reports, seconds):
    from analysis.executor import RayExecutor
    pool = RayExecutor(cpus_per_run=1)
    start = time.perf_counter()
    pool.map(_job, [(seconds, reports)] * trials, progress=False)
    return time.perf_counter() - start


def _histories(runs):
    """{method: {lr: [(step, val_loss)]}} of the selection seed's lr-selection runs, and each method's chosen lr."""
    selection = json.loads((Path(runs) / "lr_selection.json").read_text())
    seed = selection.get("select_seed", selection["seeds"][0])  # older studies selected at their first seed
    out, chosen = {}, {}
    for m, sel in selection["methods"].items():
        chosen[m] = sel["lr"]
        for lr in sel["grid"]:
            stats = json.loads((Path(runs) / f"{m}-lr{lr:g}-s{seed}" / "training_stats.json").read_text())
            out.setdefault(m, {})[lr] = [(h["step"], h["val_loss"]) for h in stats["history"]]
    return out, chosen


def replay(histories, rule, grace):
    """Steps each run would have trained under `rule` ("asha" or "median"), evaluation by evaluation."""
    steps = {lr: h[-1][0] for lr, h in histories.items()}
    alive = set(histories)
    best = {lr: float("inf") for lr in histories}
    rung = grace
    for i in range(max(len(h) for h in histories.values())):
        for lr in alive:
            if i < len(histories[lr]):
                best[lr] = min(best[lr], histories[lr][i][1])
        running = [lr for lr in alive if i < len(histories[lr])]
        if i + 1 < grace or len(running) < 2:
            continue
        if rule == "median":
            for lr in running:
                others = sorted(best[o] for o in running if o != lr)
                if best[lr] > statistics.median(others):
                    alive.discard(lr)
                    steps[lr] = histories[lr][i][0]
        elif i + 1 == rung:  # ASHA, synchronous view of one bracket: keep the best third at each rung
            keep = max(1, len(running) // 3)
            for lr in sorted(running, key=best.get)[keep:]:
                alive.discard(lr)
                steps[lr] = histories[lr][i][0]
            rung *= 3
    return steps


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--reports", type=int, default=10)
    p.add_argument("--work", type=float, default=0.5, help="seconds of work per trial")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--runs", help="a finished study's runs directory (part 2)")
    p.add_argument("--grace", type=int, default=2, help="evaluations before ASHA / median stopping may stop a run")
    p.add_argument("--json")
    a = p.parse_args()
    import ray
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    times = {"tune": [], "executor": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for name in ("tune", "executor") if r % 2 == 0 else ("executor", "tune"):
                times[name].append(tune_wall(a.trials, a.reports, a.work, tmp) if name == "tune"
                                   else executor_wall(a.trials, a.reports, a.work))
    ray.shutdown()
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"| scheduler | wall s, {a.trials} trials × {a.work:g} s of work, {a.reports} reports each (median of "
          f"{a.rounds}) | overhead per trial s |")
    print("|---|---|---|")
    for name in ("executor", "tune"):
        print(f"| {name} | {med[name]:.1f} | {(med[name] - med['executor']) / a.trials:+.2f} |")
    result = dict(times=times, median=med, trials=a.trials, work=a.work, reports=a.reports)
    if a.runs:
        histories, chosen = _histories(a.runs)
        print("\n| rule | steps trained | steps saved | share | chosen lr stopped (methods) |\n|---|---|---|---|---|")
        result["replay"] = {}
        for rule in ("asha", "median"):
            trained = saved = 0
            stopped_chosen = []
            for m, h in histories.items():
                steps = replay(h, rule, a.grace)
                trained += sum(run[-1][0] for run in h.values())
                saved += sum(run[-1][0] - steps[lr] for lr, run in h.items())
                if steps[chosen[m]] < h[chosen[m]][-1][0]:
                    stopped_chosen.append(m)
            result["replay"][rule] = dict(trained=trained, saved=saved, stopped_chosen=stopped_chosen)
            print(f"| {rule} | {trained} | {saved} | {saved / trained:.0%} | {len(stopped_chosen)} "
                  f"({', '.join(stopped_chosen) or 'none'}) |")
    if a.json:
        write_json(a.json, result)


if __name__ == "__main__":
    sys.exit(main())
