"""Benchmark the adapter methods on MiniLM: training-step time, bytes saved for backward, peak memory.

    python bench/bench_adapters.py [--methods cla,lora,peft_lora] [--targets qv|all|both]
                                   [--rounds 10] [--steps 1] [--warmup 0] [--device cpu|cuda] [--json out.json]

Issue 2: the real offline model (all-MiniLM-L6-v2, 6 layers, hidden 384) in training mode (dropout on), batch
16 × seq 128 of movie-review text, r = 16, α = 32, adapting query/value ("qv") or every linear layer of the encoder
("all": q, k, v, attention output, intermediate, output = 36 layers; not the pooler or classifier). Per method:

- step time: forward + backward + AdamW step + zero_grad, the median over every timed step. All configurations
  are built and stepped twice (the memory pass), then timed round-robin (each round: every configuration runs
  `warmup` untimed steps, then `steps` timed ones). The default, one step per configuration per round, makes
  the interleaving as fine as it gets, so load from other jobs on a shared machine hits all of them alike.
- saved for backward: every tensor autograd packs during one forward (torch.autograd.graph.saved_tensors_hooks),
  each storage counted once; "activations" leaves out storages of parameters and buffers (frozen W0 that a
  matmul keeps for dx is not activation memory), "total" keeps them.
- peak memory: CPU: the model's resident state (parameters, buffers, optimizer state) plus the peak of bytes
  allocated during one step through torch's CPU allocator, read from the profiler's memory accounting
  (torch.profiler, profile_memory=True: the "Total Allocated" counter). That is the CPU analogue of
  torch.cuda.max_memory_allocated; it is not process RSS (allocator caching and Python objects are not in it).
  CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, over one step.

Reference rows: fft (every parameter), head (classifier only), peft_lora (peft.get_peft_model, LoraConfig r = 16,
lora_alpha = 32, lora_dropout = 0, the same target modules, modules_to_save = classifier), and floor: no adapter,
only the classifier trains, but the embeddings' output requires grad so backward runs through the whole frozen
encoder, which is the least time and saved memory any adapter of encoder layers can cost. Ratios are against
our lora and PEFT's LoRA on the same target set (rows without a target set: against the "all" baselines),
measured in the same run. Step time is wall clock; the CPU time of the process per step is recorded too. Chained
methods run their first link
(chain_length = 1 by default): every link costs the same per step, folded links only add a fixed extra path.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import adapters  # noqa: E402
from adapters import data, models  # noqa: E402
from adapters.errors import AdapterError, cli  # noqa: E402
from adapters.io import write_json  # noqa: E402

MODEL, TASK = "minilm", "movie-reviews"
BATCH, SEQ, RANK, ALPHA, LR = 16, 128, 16, 32, 1e-4
TARGETS = {"qv": ["query", "value"], "all": [r"bert\.encoder\..*"]}
REFERENCES = ["fft", "head", "floor", "peft_lora"]
NO_TARGETS = ("fft", "head", "floor")  # adapt no layer: one row, whatever the target set
CHAINED = {name for name, m in adapters.METHODS.items() if m.adapter is not None and m.adapter.chained}
# The targets for cLA with every encoder linear layer adapted, against PEFT LoRA and our lora.
TARGET_SAVED, TARGET_TIME = 0.75, 0.90
MB = 2**20


# -- inputs -------------------------------------------------------------------------------------------

def make_batches(n_batches, device):
    """n_batches of 16 real movie-review sentences, each padded/truncated to exactly 128 tokens."""
    tokenizer = models.load_tokenizer(MODEL)
    rows = data.load_task(TASK).train[:n_batches * BATCH]
    batches = []
    for i in range(0, len(rows), BATCH):
        texts, labels = zip(*rows[i:i + BATCH])
        enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=SEQ, return_tensors="pt")
        batches.append({"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device),
                        "labels": torch.tensor(labels, device=device)})
    return batches


# -- one configuration: a model with a method on it, and its optimizer --------------------------------

class Config:
    def __init__(self, method, targets, device, seed, chain_length):
        self.method, self.targets = method, targets
        model = models.load_model(MODEL, num_labels=2, seed=seed)
        names = TARGETS.get(targets)
        if method == "floor":
            adapters.apply(model, "head")
            # dx through every encoder layer, as under any adapter of them, with no weight gradient in it.
            model.bert.embeddings.register_forward_hook(lambda module, args, out: out.requires_grad_(True))
            self.n_adapted = 0
            groups = adapters.param_groups(model, LR)
        elif method == "peft_lora":
            import peft
            modules = adapters.resolve_targets(model, names, models.head_names(model))
            config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=modules,
                                     modules_to_save=["classifier"])
            model = peft.get_peft_model(model, config)
            self.n_adapted = len(modules)
            groups = [p for p in model.parameters() if p.requires_grad]
        else:
            k = chain_length if method in CHAINED else 1
            adapters.apply(model, method, rank=RANK, alpha=ALPHA, targets=names, chain_length=k, seed=seed)
            self.n_adapted = len(model.adapter_settings["targets"])
            groups = adapters.param_groups(model, LR)
        self.model = model.to(device).train()  # training mode: dropout on
        self.optimizer = torch.optim.AdamW(groups, lr=LR)
        self.trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.times, self.cpu_times = [], []

    @property
    def key(self):
        return f"{self.method}/{self.targets}"

    def step(self, batch):
        loss = self.model(**batch).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def resident_bytes(self):
        """Parameters, buffers and optimizer state that live between steps (each storage once)."""
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        tensors += [v for state in self.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
        return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed_step(cfg, batch, device):
    """(wall seconds, process CPU seconds) of one training step."""
    sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    cfg.step(batch)
    sync(device)
    return time.perf_counter() - start, time.process_time() - cpu


# -- memory -------------------------------------------------------------------------------------------

def saved_for_backward(cfg, batch):
    """(activation bytes, total bytes) autograd keeps for backward over one forward; then backward + step."""
    state = {t.untyped_storage().data_ptr() for t in list(cfg.model.parameters()) + list(cfg.model.buffers())}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = cfg.model(**batch).loss
    loss.backward()
    cfg.optimizer.step()
    cfg.optimizer.zero_grad(set_to_none=True)
    activations = sum(n for ptr, n in seen.items() if ptr not in state)
    return activations, sum(seen.values())


def cpu_step_peak(cfg, batch, top_ops):
    """Peak bytes allocated by torch on CPU during one step, above what was live before it; top ops by self time.

    The profiler's CPU allocator counter only counts blocks allocated while it runs, so its value before the
    first event is the baseline (blocks left from an earlier profiled step would otherwise shift it).
    """
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        cfg.step(batch)
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = [e["args"] for e in json.loads(trace.read_text())["traceEvents"]
                  if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    events.sort(key=lambda a: a["Ev Idx"])
    baseline = events[0]["Total Allocated"] - events[0]["Bytes"]
    peak = max(a["Total Allocated"] for a in events) - baseline
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top_ops]
    profile_rows = [dict(op=e.key, self_ms=e.self_cpu_time_total / 1e3, calls=e.count) for e in ops]
    return peak, profile_rows


def cuda_step_peak(cfg, batch):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    cfg.step(batch)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


# -- the run --------------------------------------------------------------------------------------------

def parse_methods(text):
    known = list(adapters.METHODS) + REFERENCES[2:]
    methods = known if text == "all" else [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in methods if m not in known]
    if bad or not methods:
        raise AdapterError(f"unknown method(s) {', '.join(bad) or text!r}; choose from: {', '.join(known)} or 'all'")
    return methods


def configurations(methods, target_sets):
    """(method, target set) pairs; fft, head and floor adapt no layers, so they run once (target set '-')."""
    pairs = [(m, "-") for m in methods if m in NO_TARGETS]
    pairs += [(m, t) for t in target_sets for m in methods if m not in NO_TARGETS]
    return pairs


def summarise(cfgs, device):
    rows = {}
    for c in cfgs:
        rows[c.key] = dict(method=c.method, targets=c.targets, adapted_layers=c.n_adapted, trained=c.trained,
                           median_ms=1e3 * statistics.median(c.times),
                           median_cpu_ms=1e3 * statistics.median(c.cpu_times),
                           iqr_ms=[1e3 * q for q in statistics.quantiles(c.times, n=4)[::2]] if len(c.times) > 1
                           else None,
                           saved_activation_bytes=c.saved[0], saved_total_bytes=c.saved[1],
                           resident_bytes=c.resident, peak_bytes=c.peak, step_times_s=c.times,
                           step_cpu_times_s=c.cpu_times,
                           profile=getattr(c, "profile", None))
    # Ratios against the two LoRA baselines on the same target set (no target set: the "all" ones if run).
    fallback = "all" if "lora/all" in rows or "peft_lora/all" in rows else "qv"
    for row in rows.values():
        t = row["targets"] if row["targets"] != "-" else fallback
        for ref in ("lora", "peft_lora"):
            base = rows.get(f"{ref}/{t}")
            for what, field in (("time", "median_ms"), ("saved", "saved_activation_bytes"), ("peak", "peak_bytes")):
                row[f"{what}_vs_{ref}"] = row[field] / base[field] if base and base[field] else None
    return rows


def table(rows, device):
    def ratio(x):
        return "" if x is None else f"{x:.2f}"
    peak = "peak MB (CUDA max allocated)" if device == "cuda" else "peak MB (resident + step)"
    lines = [f"| method | targets | layers | trained | step ms | CPU ms | saved act. MB | saved total MB | {peak} "
             "| time ×lora | time ×PEFT | saved ×lora | saved ×PEFT | peak ×lora | peak ×PEFT |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows.values():
        lines.append(f"| {r['method']} | {r['targets']} | {r['adapted_layers']} | {r['trained']:,} "
                     f"| {r['median_ms']:.0f} | {r['median_cpu_ms']:.0f} | {r['saved_activation_bytes'] / MB:.1f} "
                     f"| {r['saved_total_bytes'] / MB:.1f} | {r['peak_bytes'] / MB:.1f} "
                     f"| {ratio(r['time_vs_lora'])} | {ratio(r['time_vs_peft_lora'])} "
                     f"| {ratio(r['saved_vs_lora'])} | {ratio(r['saved_vs_peft_lora'])} "
                     f"| {ratio(r['peak_vs_lora'])} | {ratio(r['peak_vs_peft_lora'])} |")
    return "\n".join(lines)


def verdict(rows):
    """The issue's targets for cLA (all encoder linear layers) against PEFT LoRA and our lora.

    With the floor row, also the best ratio any adapter could reach: the frozen encoder's own cost over the baseline.
    """
    cla, floor = rows.get("cla/all"), rows.get("floor/-")
    out = []
    for ref in ("peft_lora", "lora"):
        if cla is None or cla[f"time_vs_{ref}"] is None:
            continue
        for what, limit in (("saved", TARGET_SAVED), ("time", TARGET_TIME)):
            value = cla[f"{what}_vs_{ref}"]
            best = floor[f"{what}_vs_{ref}"] if floor else None
            met = value <= limit
            out.append(dict(against=ref, what=what, ratio=value, target=limit, met=met, floor_ratio=best,
                            text=f"cla/all {what} ×{ref} = {value:.3f} (target ≤ {limit}): "
                                 + ("met" if met else f"MISSED by {value - limit:+.3f}")
                                 + (f"; floor (no adapter, backward through the frozen encoder) ×{ref} = {best:.3f}"
                                    if best is not None else "")))
    return out


@cli
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="all", help="comma-separated methods (adapters.METHODS and peft_lora) "
                                                   "or 'all' (default)")
    p.add_argument("--targets", default="both", choices=["qv", "all", "both"])
    p.add_argument("--rounds", type=int, default=10, help="round-robin rounds over the configurations")
    p.add_argument("--steps", type=int, default=1, help="timed steps per configuration per round")
    p.add_argument("--warmup", type=int, default=0, help="untimed steps before each configuration's timed steps "
                                                        "in every round (the memory pass already warms up)")
    p.add_argument("--chain-length", type=int, default=1, help="k for the chained methods (first link is timed)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--profile-ops", type=int, default=12, help="top ops by self CPU time kept per configuration "
                                                              "(CPU only; 0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here (atomically)")
    args = p.parse_args(argv)
    methods = parse_methods(args.methods)
    for name in ("rounds", "steps"):
        if getattr(args, name) < 1:
            raise AdapterError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0 or args.chain_length < 1 or args.profile_ops < 0:
        raise AdapterError("--warmup and --profile-ops must be >= 0, --chain-length >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise AdapterError("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    target_sets = ["qv", "all"] if args.targets == "both" else [args.targets]
    pairs = configurations(methods, target_sets)
    if not pairs:
        raise AdapterError("nothing to run: the methods given need a target set")

    torch.manual_seed(args.seed)
    batches = make_batches(8, args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
          f"{len(pairs)} configurations, load average {os.getloadavg()[0]:.1f}", file=sys.stderr)
    cfgs = [Config(m, t, args.device, args.seed, args.chain_length) for m, t in tqdm(pairs, desc="build")]

    # Memory first, untimed: saved bytes over the first step (which also creates the optimizer state), then
    # the peak over a second step, when everything that lives between steps exists.
    for c in tqdm(cfgs, desc="memory"):
        c.saved = saved_for_backward(c, batches[1])
        c.resident = c.resident_bytes()
        if args.device == "cuda":
            c.peak = cuda_step_peak(c, batches[2])
        else:
            transient, c.profile = cpu_step_peak(c, batches[2], args.profile_ops)
            c.peak = c.resident + transient

    # Time: round-robin, every configuration sees the same batch sequence.
    bar = tqdm(total=args.rounds * len(cfgs) * (args.warmup + args.steps), desc="time")
    i = 0
    for _ in range(args.rounds):
        for c in cfgs:
            for s in range(args.warmup + args.steps):
                wall, cpu = timed_step(c, batches[(i + s) % len(batches)], args.device)
                if s >= args.warmup:
                    c.times.append(wall)
                    c.cpu_times.append(cpu)
                bar.update()
        i += args.warmup + args.steps
    bar.close()

    rows = summarise(cfgs, args.device)
    checks = verdict(rows)
    print(table(rows, args.device))
    for c in checks:
        print(c["text"])
    machine = dict(python=platform.python_version(), torch=torch.__version__, threads=torch.get_num_threads(),
                   cpus=os.cpu_count(), load_avg_end=os.getloadavg(), device=args.device,
                   gpu=torch.cuda.get_device_name() if args.device == "cuda" else None)
    settings = dict(model=MODEL, task=TASK, batch=BATCH, seq=SEQ, rank=RANK, alpha=ALPHA, lr=LR, seed=args.seed,
                    rounds=args.rounds, steps=args.steps, warmup=args.warmup, chain_length=args.chain_length,
                    targets={t: TARGETS[t] for t in target_sets}, optimizer="AdamW", training_mode=True,
                    batch_label_counts=[int(b["labels"].sum()) for b in batches])
    if args.json:
        write_json(args.json, dict(settings=settings, machine=machine, results=rows, checks=checks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
