"""Benchmark LoRA against cLA on a causal LM (SmolLM2-135M, movie-dialog): training-step time and process memory.

    python bench/bench_causal_lm.py [--methods lora,cla,peft_lora] [--targets qv|all|both] [--rounds 3]
                                    [--steps 6] [--warmup 2] [--batch 8] [--max-length 64] [--threads 2]
                                    [--mixed-precision no|bf16] [--omp-wait-policy passive|active|unset]
                                    [--out /tmp/bench_lm/bench_causal_lm.json]

What `python -m adapters.train --model smollm2-135m --task movie-dialog` trains (LlamaForCausalLM, 30 layers,
hidden 576; lm_head tied to the embeddings and frozen under every adapter method), r = 16, α = 32, dropout 0,
adapting q_proj, v_proj ("qv": 60 layers) or every linear layer but lm_head ("all": 210 layers). Rows: our lora,
our cla, and PEFT's LoRA (peft.get_peft_model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0, target_modules=
<the same module names>)), the comparison the paper's claim (cLA: -10 % time, -15 % peak memory) is about.

Each configuration runs in its own fresh subprocess (peak RSS is per process), which imports the same modules
(peft too) for every row, loads the model (models.load_model(..., auto_class="AutoModelForCausalLM")), faults
its weights in (they are mmapped from the converted safetensors) and reads RSS ("after load"), applies the
method, then trains `warmup` untimed + `steps` timed steps on real movie-dialog batches (the first
batch × (warmup + steps) training examples, TASK_TYPES["causal-lm"].encode: padded to the batch's longest row,
at most max-length tokens; the same batches in the same order for every row). A step is what train.py's loop
does without clipping and schedule: forward, loss = Σ token NLL of the replies / Σ reply tokens (the task type's
score), backward, AdamW step (adapters.param_groups, lr 1e-3), zero_grad(set_to_none=True).

- step s: wall clock of one step, median over the timed steps; CPU s is the process CPU time of the same steps.
- peak RSS: the process's ru_maxrss at the end (what train.py records as peak_memory_bytes on CPU).
- above load: peak RSS − RSS after load: the memory training needs on top of the loaded model (activations,
  gradients, optimizer state, the adapters, allocator slack).
Rounds alternate the configurations (round-robin, reversed every other round) so load from other jobs hits all
alike; each number is the median over rounds, ratios are against our lora and PEFT's LoRA on the same targets.
`--mixed-precision bf16` runs forward and loss under torch.autocast("cpu", dtype=torch.bfloat16) (fp32 weights).

The subprocesses run with OMP_WAIT_POLICY=PASSIVE by default: on a shared 2-core machine, OpenMP's default
(threads spin at every barrier) made a 3 s step take 20-35 s of CPU-bound spinning whenever another job held a
core; `--omp-wait-policy unset` leaves the environment as it is.
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MODEL, TASK, RANK, ALPHA, LR = "smollm2-135m", "movie-dialog", 16, 32, 1e-3
TARGETS = {"qv": ["q_proj", "v_proj"], "all": ["all-linear"]}
METHODS = ("lora", "cla", "peft_lora")
MB = 2**20


def rss_now():
    """Current resident set size of this process, bytes (VmRSS)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def worker(a):
    """One configuration in this (fresh) process; returns its measurements."""
    import peft  # noqa: F401  (every row imports the same modules, so their RSS is alike)
    import torch

    import adapters
    from adapters import data, evaluate, models, tasks

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    kind = tasks.TASK_TYPES["causal-lm"]
    processor = models.load_processor(MODEL)
    rows = data.load_task(TASK, n_train=a.batch * (a.warmup + a.steps)).train
    batches = [kind.encode(processor, rows[i:i + a.batch], a.max_length) for i in range(0, len(rows), a.batch)]
    model = models.load_model(MODEL, seed=a.seed, auto_class=kind.auto_class)
    with torch.no_grad():
        for p in model.parameters():
            p.sum()  # fault the mmapped weights in: "after load" is the whole model resident
    after_load = rss_now()

    names = adapters.resolve_targets(model, TARGETS[a.targets], models.head_names(model))
    if a.method == "peft_lora":
        config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=names)
        model = peft.get_peft_model(model, config)
        groups = [p for p in model.parameters() if p.requires_grad]
    else:  # as train.py: a causal LM's own head (lm_head) does not train under an adapter method
        adapters.apply(model, a.method, rank=RANK, alpha=ALPHA, targets=names, seed=a.seed,
                       head=kind.trained_head(model, adapters.get_method(a.method)))
        groups = adapters.param_groups(model, LR)
    optimizer = torch.optim.AdamW(groups, lr=LR)
    model.train()

    def step(batch):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.mixed_precision == "bf16"):
            sums, units, _ = evaluate.batch_scores(model, batch, kind.score)
            loss = sums.sum() / units.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    times, cpu_times, losses = [], [], []
    for i, batch in enumerate(batches):
        start, cpu = time.perf_counter(), time.process_time()
        losses.append(step(batch))
        if i >= a.warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return dict(method=a.method, targets=a.targets, adapted_layers=len(names),
                trained=sum(p.numel() for p in model.parameters() if p.requires_grad),
                step_s=statistics.median(times), cpu_s=statistics.median(cpu_times), step_times_s=times,
                peak_rss=peak, rss_after_load=after_load, above_load=peak - after_load, losses=losses,
                batch_widths=[b["input_ids"].shape[1] for b in batches],
                reply_tokens=[int((b["labels"] != tasks.IGNORE).sum()) for b in batches],
                threads=torch.get_num_threads(), torch=torch.__version__,
                bf16_supported=torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def run_one(a, method, targets):
    """One configuration in a fresh subprocess; its result dict."""
    cmd = [sys.executable, __file__, "--worker", method, targets, *sys.argv[1:]]
    env = dict(os.environ)
    if a.omp_wait_policy != "unset":
        env["OMP_WAIT_POLICY"] = a.omp_wait_policy.upper()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if done.returncode:
        sys.exit(f"{method}/{targets} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(runs):
    """Per configuration: medians over rounds, and ratios against lora and peft_lora on the same targets."""
    rows = {}
    for key, rs in runs.items():
        first = rs[0]
        rows[key] = dict({k: first[k] for k in ("method", "targets", "adapted_layers", "trained")},
                         **{k: statistics.median(r[k] for r in rs)
                            for k in ("step_s", "cpu_s", "peak_rss", "rss_after_load", "above_load")},
                         rounds=rs)
    for row in rows.values():
        for ref in ("lora", "peft_lora"):
            base = rows.get(f"{ref}/{row['targets']}")
            for what, field in (("time", "step_s"), ("peak", "peak_rss"), ("above", "above_load")):
                row[f"{what}_vs_{ref}"] = row[field] / base[field] if base else None
    return rows


def table(rows):
    def ratio(x):
        return "" if x is None else f"{x:.2f}"
    lines = ["| method | targets | layers | trained | step s | CPU s | time ×lora | time ×PEFT | peak RSS MB "
             "| peak ×lora | peak ×PEFT | above load MB | above ×lora | above ×PEFT |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows.values():
        lines.append(f"| {r['method']} | {r['targets']} | {r['adapted_layers']} | {r['trained']:,} | {r['step_s']:.2f} "
                     f"| {r['cpu_s']:.2f} | {ratio(r['time_vs_lora'])} | {ratio(r['time_vs_peft_lora'])} "
                     f"| {r['peak_rss'] / MB:.0f} | {ratio(r['peak_vs_lora'])} | {ratio(r['peak_vs_peft_lora'])} "
                     f"| {r['above_load'] / MB:.0f} | {ratio(r['above_vs_lora'])} | {ratio(r['above_vs_peft_lora'])} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(METHODS), help="comma list of lora, cla, peft_lora")
    p.add_argument("--targets", default="both", choices=["qv", "all", "both"])
    p.add_argument("--rounds", type=int, default=3, help="alternated rounds; one subprocess per configuration each")
    p.add_argument("--steps", type=int, default=6, help="timed steps per subprocess")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every subprocess")
    p.add_argument("--mixed-precision", default="no", choices=["no", "bf16"])
    p.add_argument("--omp-wait-policy", default="passive", choices=["passive", "active", "unset"],
                   help="OMP_WAIT_POLICY of the subprocesses (default passive: no spinning on a shared machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="/tmp/bench_lm/bench_causal_lm.json")
    p.add_argument("--worker", nargs=2, metavar=("METHOD", "TARGETS"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        a.method, a.targets = a.worker
        print(json.dumps(worker(a)))
        return 0
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    if not methods or set(methods) - set(METHODS):
        p.error(f"--methods: choose from {', '.join(METHODS)}")
    if min(a.rounds, a.steps, a.batch, a.max_length, a.threads) < 1 or a.warmup < 0:
        p.error("--rounds, --steps, --batch, --max-length, --threads must be >= 1, --warmup >= 0")
    configs = [(m, t) for t in (["qv", "all"] if a.targets == "both" else [a.targets]) for m in methods]

    print(f"{MODEL} on {TASK}: batch {a.batch}, max length {a.max_length}, r={RANK}, alpha={ALPHA}, "
          f"{a.warmup}+{a.steps} steps per process, {a.rounds} rounds, {len(configs)} configurations, "
          f"torch.set_num_threads({a.threads}) per process, OMP_WAIT_POLICY {a.omp_wait_policy}, "
          f"mixed precision {a.mixed_precision}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", file=sys.stderr)
    start, runs, load = time.perf_counter(), {f"{m}/{t}": [] for m, t in configs}, []
    for r in range(a.rounds):
        for m, t in configs if r % 2 == 0 else configs[::-1]:
            t0 = time.perf_counter()
            res = run_one(a, m, t)
            runs[f"{m}/{t}"].append(res)
            load.append(os.getloadavg()[0])
            print(f"round {r} {m}/{t}: step {res['step_s']:.2f} s, peak RSS {res['peak_rss'] / MB:.0f} MB, "
                  f"above load {res['above_load'] / MB:.0f} MB ({time.perf_counter() - t0:.0f} s, "
                  f"load average {load[-1]:.1f})", file=sys.stderr)
    wall = time.perf_counter() - start
    rows = summarise(runs)
    w = next(iter(runs.values()))[0]
    print(table(rows))
    print(f"\nwall {wall:.0f} s; {w['threads']} torch threads per process, OMP_WAIT_POLICY {a.omp_wait_policy}; "
          f"mixed precision {a.mixed_precision}; batch widths {w['batch_widths']} tokens "
          f"(first {a.warmup} untimed); load average during the run {min(load):.1f}-{max(load):.1f}; "
          f"CPU bf16 (mkldnn) supported: {w['bf16_supported']}")
    settings = dict(model=MODEL, task=TASK, rank=RANK, alpha=ALPHA, lr=LR, batch=a.batch, max_length=a.max_length,
                    steps=a.steps, warmup=a.warmup, rounds=a.rounds, threads=a.threads, seed=a.seed,
                    mixed_precision=a.mixed_precision, omp_wait_policy=a.omp_wait_policy,
                    targets={t: TARGETS[t] for _, t in configs},
                    batch_widths=w["batch_widths"], reply_tokens=w["reply_tokens"])
    machine = dict(python=platform.python_version(), torch=w["torch"], cpus=os.cpu_count(), load_avg=load,
                   bf16_supported=w["bf16_supported"], wall_s=wall)
    from adapters.io import write_json
    write_json(a.out, dict(settings=settings, machine=machine, results=rows))
    print(f"wrote {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
