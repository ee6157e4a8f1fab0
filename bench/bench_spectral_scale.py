"""Benchmark analysis.spectral at 8B scale: the full-SVD path against the certified low-rank path, per matrix type.

    python bench/bench_spectral_scale.py [--layers 1] [--types q,k,v,o,gate,up,down] [--full-types q,k]
                                         [--rank 16] [--k 10] [--threads 2] [--work /tmp/bench_spectral_scale]
                                         [--smollm2 | --no-smollm2] [--json PATH]

Synthetic checkpoint with Llama-3-8B's true matrix shapes (q_proj 4096×4096, k_proj / v_proj 1024×4096, o_proj
4096×4096, gate_proj / up_proj 14336×4096, down_proj 4096×14336), `--layers` of its 32 layers built (default 1;
every layer has the same shapes and the same kind of spectrum, so a layer's per-matrix times are each layer's,
and projections multiply them by 32). W0 = G1 diag(s) G2ᵀ with Gaussian G1, G2 scaled to near-orthonormal
columns and s_i = i^(−1/2) (a power-law decay, as the heavy-tailed spectra of trained LLM weights; i.i.d. noise's
spectrum would be flat), stored in bf16 safetensors shards (one per layer, with model.safetensors.index.json)
beside an 8B LlamaConfig. The adapter is a plain PEFT LoRA directory, r = 16, α = 32, on every linear layer:
A Kaiming-uniform as PEFT draws it, B Gaussian scaled so that ‖ΔW‖₂ = 0.4 ‖W0‖₂ (large enough that some top-10
vectors are intruders, so the certificate's hard case, an intruder, is measured too).

Each measurement is one fresh subprocess (peak RSS is per process: ru_maxrss, imports included), timing
`analysis.spectral.run` on one matrix (`--layers` regex) with the base SVD already cached:
- low-rank: k = `--k` (default 10), the certified block-Krylov path (W read from the shards, ΔW from the adapter).
- full: k = all, one float64 SVD of W = W0 + ΔW (what every k cost before this path; at k = 10 the old code ran
  the same SVD), for `--full-types` only (default q, k: an 80 s SVD of a 4096×4096 matrix on this machine
  under load; the 14336×4096 ones are estimated as their base SVD, the same SVD of a matrix of the same shape).
- base SVD: the one-time cost per W0 (analysis.svd_cache.open_base, float64, written to the cache), shared by
  every checkpoint of the base model (the study's 33 runs pay it once), measured for every type.
Exactness: on the matrices that have the full path, the low-rank counts (at ε = 0.5 and on the ε grid) are
compared with the top-k of the full path's.

`--smollm2`: the same table for SmolLM2-135M's real weights (adapters.models "smollm2-135m", converted once),
a synthetic r = 16 PEFT LoRA on all 210 linear layers, every matrix measured by both paths, and exactness on all.
"""
import argparse
import json
import math
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 vocab_size=128256, num_hidden_layers=32, rms_norm_eps=1e-5, rope_theta=500000.0,
                 max_position_embeddings=8192, tie_word_embeddings=False)
TYPES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
         "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
RANK, ALPHA, DELTA_RATIO, MB = 16, 32, 0.4, 2 ** 20


def shape_of(cfg, t):
    h, f, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["hidden_size"] // cfg["num_attention_heads"] * \
        cfg["num_key_value_heads"]
    return {"q": (h, h), "k": (kv, h), "v": (kv, h), "o": (h, h), "gate": (f, h), "up": (f, h), "down": (h, f)}[t]


# ---------------------------------------------------------------- building the checkpoint
def decaying_w0(n, m, seed):
    import torch
    g = torch.Generator().manual_seed(seed)
    r = min(n, m)
    s = torch.arange(1, r + 1, dtype=torch.float32) ** -0.5
    G1 = torch.randn(n, r, generator=g) / math.sqrt(n)
    G2 = torch.randn(m, r, generator=g) / math.sqrt(m)
    return (G1 * s) @ G2.T


def lora_factors(W0, rank, seed):
    """PEFT's A (Kaiming-uniform) and a Gaussian B scaled to ‖(α/r) B A‖₂ = DELTA_RATIO ‖W0‖₂ (B stored unscaled)."""
    import torch
    from bounds.spectral_norm import lowrank_spectral_norm, spectral_norm
    n, m = W0.shape
    g = torch.Generator().manual_seed(seed)
    A = (torch.rand(rank, m, generator=g) * 2 - 1) / math.sqrt(m)
    B = torch.randn(n, rank, generator=g)
    scale = ALPHA / rank
    B *= DELTA_RATIO * spectral_norm(W0.float()) / lowrank_spectral_norm(scale * B, A)
    return B, A


def write_peft(adapter_dir, base_dir, factors, rank, targets):
    from safetensors.torch import save_file
    adapter_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (B, A) in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.contiguous()
    save_file(tensors, str(adapter_dir / "adapter_model.safetensors"))
    (adapter_dir / "adapter_config.json").write_text(json.dumps(dict(
        peft_type="LORA", r=rank, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=targets, bias="none",
        task_type="CAUSAL_LM", base_model_name_or_path=str(base_dir), fan_in_fan_out=False)))


def build_synthetic(work, layers, types, rank):
    """The bf16-sharded 8B-shaped base (only `layers` layers, `types` matrices) and its PEFT adapter."""
    import torch
    import transformers
    from safetensors.torch import save_file
    base, adapter = work / "llama3-8b-synthetic", work / "llama3-8b-synthetic-lora"
    stamp = dict(layers=layers, types=types, rank=rank, version=1)
    if (work / "built.json").exists() and json.loads((work / "built.json").read_text()) == stamp:
        return base, adapter
    base.mkdir(parents=True, exist_ok=True)
    transformers.LlamaConfig(**{**LLAMA3_8B, "num_hidden_layers": layers}).save_pretrained(base)
    weight_map, factors = {}, {}
    for layer in range(layers):
        shard = f"model-{layer + 1:05d}-of-{layers:05d}.safetensors"
        tensors = {}
        for i, t in enumerate(types):
            name = f"model.layers.{layer}.{TYPES[t]}"
            W0 = decaying_w0(*shape_of(LLAMA3_8B, t), seed=100 * layer + i).to(torch.bfloat16)
            tensors[f"{name}.weight"] = W0
            factors[name] = lora_factors(W0.float(), rank, seed=100 * layer + i)
            weight_map[f"{name}.weight"] = shard
            print(f"built {name} {tuple(W0.shape)}", flush=True)
        save_file(tensors, str(base / shard), metadata={"format": "pt"})
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    write_peft(adapter, base, factors, rank, [TYPES[t].split(".")[1] for t in types])
    (work / "built.json").write_text(json.dumps(stamp))
    return base, adapter


def build_smollm2(work, rank):
    """SmolLM2-135M's real weights (its converted directory, fp32) and an r = 16 PEFT LoRA on every linear layer."""
    from adapters import models, weights
    base = Path(models.resolve_model(models.SMOLLM2))
    adapter = work / "smollm2-lora"
    if (adapter / "adapter_config.json").exists():
        return base, adapter
    reader = weights.BaseWeights(base)
    linear = re.compile(r"layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")
    names = sorted(k[:-len(".weight")] for k in reader.keys if linear.search(k))
    factors = {n: lora_factors(reader.matrix(n), rank, seed=i) for i, n in enumerate(names)}
    write_peft(adapter, base, factors, rank, sorted({n.rsplit(".", 1)[1] for n in names}))
    return base, adapter


# ---------------------------------------------------------------- one measurement (a subprocess)
def worker(spec):
    import torch
    torch.set_num_threads(spec["threads"])
    from analysis import spectral, svd_cache
    from adapters import weights
    cache = spec["cache"]
    start = time.perf_counter()
    if spec["what"] == "base":
        stream = weights.open_stream(spec["adapter"])
        out = {}
        for name in spec["names"]:
            W0, _, _ = stream.matrix(name)
            t = time.perf_counter()
            e = svd_cache.open_base(W0, "bench", name, "left", cache)
            out[name] = dict(seconds=time.perf_counter() - t, hit=e.hit)
        result = dict(per_matrix=out)
    else:
        k = spec["k"] if spec["what"] == "lowrank" else "all"
        layers = "^(" + "|".join(re.escape(n) for n in spec["names"]) + ")$"
        res = spectral.run([spec["adapter"]], top_k=k, layers=layers, cache_dir=cache, progress=False)
        records, seconds = res["checkpoints"][0]["layers"], res["checkpoints"][0]["seconds"]
        result = dict(records={r["name"]: dict(max_cos=r["max_cos"][:spec["k"]], intruders=r["intruders"],
                                               sweep=r["sweep"], svd=r["svd"], seconds=seconds[r["name"]],
                                               error=r.get("max_cos_error")) for r in records},
                      hits=res["checkpoints"][0]["base_svd_cache_hits"])
    result.update(wall=time.perf_counter() - start,
                  peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print("RESULT " + json.dumps(result))


def measure(what, adapter, names, args):
    spec = dict(what=what, adapter=str(adapter), names=names, k=args.k, threads=args.threads,
                cache=str(args.work / "svd-cache"))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OMP_WAIT_POLICY="PASSIVE")
    p = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                       env=env)
    line = next((l for l in p.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        sys.exit(f"error: worker {what} {names[:1]} failed:\n{p.stderr[-2000:]}")
    return json.loads(line[len("RESULT "):])


def _base_seconds(work, name, measured):
    """The one-time base SVD's time: measured on a cache miss, and kept (work/base_times.json) for reruns,
    which find the entry cached."""
    file = work / "base_times.json"
    times = json.loads(file.read_text()) if file.exists() else {}
    key = f"{work}:{name}"
    if not measured["hit"]:
        times[key] = measured["seconds"]
        file.write_text(json.dumps(times))
    return times.get(key, math.nan)


def counts_equal(low, full, k):
    """Low-rank counts at ε = 0.5 and on the grid against the full path's top-k."""
    from analysis.spectral import EPS_GRID
    c = full["max_cos"][:k]
    return low["intruders"] == sum(x < 0.5 for x in c) and low["sweep"][:-1] == [sum(x < e for x in c)
                                                                               for e in EPS_GRID[:-1]]


# ---------------------------------------------------------------- the tables
def run_table(label, adapter, groups, full_groups, args, projection=None):
    """groups: {type: [matrix names]}; every name gets the base SVD and the low-rank path, names in full_groups
    the full path too. Returns rows for the Markdown table."""
    rows = []
    for t, names in groups.items():
        base = measure("base", adapter, names, args)
        low = measure("lowrank", adapter, names, args)
        per_matrix = lambda res: sum(r["seconds"] for r in res["records"].values()) / len(names)  # noqa: E731
        row = dict(type=t, matrices=len(names), base_s=sum(_base_seconds(args.work, n, v)
                                                           for n, v in base["per_matrix"].items()) / len(names),
                   base_rss=base["peak_rss"], low_s=per_matrix(low), low_rss=low["peak_rss"],
                   overhead_s=low["wall"] - per_matrix(low) * len(names),
                   krylov=sum(r["svd"].startswith("block Krylov") for r in low["records"].values()),
                   intruders=sum(r["intruders"] for r in low["records"].values()))
        if t in full_groups:
            full = measure("full", adapter, names, args)
            row.update(full_s=per_matrix(full), full_rss=full["peak_rss"], full_measured=True,
                       exact=sum(counts_equal(low["records"][n], full["records"][n], args.k) for n in names))
        else:
            row.update(full_s=row["base_s"], full_rss=None, full_measured=False, exact=None)
        print(f"{label} {t}: base {row['base_s']:.1f} s, low-rank {row['low_s']:.2f} s, "
              f"full {row['full_s']:.1f} s{'' if row['full_measured'] else ' (est.)'}", flush=True)
        rows.append(row)
    return rows


def markdown(label, rows, shapes):
    out = [f"**{label}**", "",
           "| type | shape | matrices | full-SVD path s/matrix | full peak RSS MB | low-rank s/matrix "
           "| low-rank peak RSS MB | speed-up | base SVD s (one-time) | intruders (top-k) | decided by Krylov "
           "| counts equal |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        full = f"{r['full_s']:.2f}" + ("" if r["full_measured"] else " (est.)")
        rss = f"{r['full_rss'] / MB:.0f}" if r["full_rss"] else "–"
        exact = f"{r['exact']}/{r['matrices']}" if r["exact"] is not None else "not checked"
        n, m = shapes[r["type"]]
        out.append(f"| {r['type']} | {n}×{m} | {r['matrices']} | {full} | {rss} | {r['low_s']:.2f} "
                   f"| {r['low_rss'] / MB:.0f} | {r['full_s'] / r['low_s']:.1f}× | {r['base_s']:.2f} "
                   f"| {r['intruders']} | {r['krylov']}/{r['matrices']} | {exact} |")
    return "\n".join(out)


def projections(rows, layers_total):
    by = {r["type"]: r for r in rows}
    out = {}
    for label, types in (("q/v", ("q", "v")), ("all-linear", tuple(TYPES))):
        if all(t in by for t in types):
            out[label] = {key: layers_total * sum(by[t][key] for t in types) for key in ("low_s", "full_s", "base_s")}
            out[label]["matrices"] = layers_total * len(types)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--layers", type=int, default=1, help="layers of the 32 to build (default 1)")
    p.add_argument("--types", default=",".join(TYPES), help="matrix types to build and measure")
    p.add_argument("--full-types", default="q,k", help="types whose full-SVD path is measured (default q,k)")
    p.add_argument("--rank", type=int, default=RANK)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_spectral_scale"))
    p.add_argument("--smollm2", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    if a.worker:
        return worker(json.loads(a.worker))
    types = [t.strip() for t in a.types.split(",") if t.strip()]
    full_types = {t.strip() for t in a.full_types.split(",") if t.strip()}
    bad = [t for t in types + sorted(full_types) if t not in TYPES]
    if bad or a.layers < 1 or a.rank < 1 or a.k < 1:
        sys.exit(f"error: unknown types {bad} (choose from {', '.join(TYPES)}), or --layers/--rank/--k below 1")
    a.work.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    result = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items() if k != "worker"},
              "load_average_start": load}
    base, adapter = build_synthetic(a.work, a.layers, types, a.rank)
    groups = {t: [f"model.layers.{i}.{TYPES[t]}" for i in range(a.layers)] for t in types}
    rows = run_table("llama3-8b", adapter, groups, full_types, a)
    shapes = {t: shape_of(LLAMA3_8B, t) for t in TYPES}
    result["llama3_8b"] = dict(rows=rows, projections=projections(rows, LLAMA3_8B["num_hidden_layers"]))
    text = [markdown(f"Llama-3-8B shapes ({a.layers} of 32 layers built, r = {a.rank}, top-{a.k})", rows, shapes), ""]
    for label, pr in result["llama3_8b"]["projections"].items():
        text.append(f"- projected {label} ({pr['matrices']} matrices), base SVD cached: low-rank "
                    f"{pr['low_s'] / 60:.1f} min vs full-SVD path {pr['full_s'] / 60:.0f} min; one-time base SVD "
                    f"{pr['base_s'] / 3600:.1f} h")
    if a.smollm2:
        from transformers import AutoConfig
        sbase, sadapter = build_smollm2(a.work, a.rank)
        cfg = AutoConfig.from_pretrained(sbase).to_dict()
        n_layers = cfg["num_hidden_layers"]
        sgroups = {t: [f"model.layers.{i}.{TYPES[t]}" for i in range(n_layers)] for t in TYPES}
        srows = run_table("smollm2", sadapter, sgroups, set(TYPES), a)
        result["smollm2_135m"] = dict(rows=srows)
        text += ["", markdown(f"SmolLM2-135M real weights (all {n_layers} layers, r = {a.rank}, top-{a.k})", srows,
                              {t: shape_of(cfg, t) for t in TYPES})]
    result["load_average_end"] = os.getloadavg()
    text.append(f"\nper-run overhead (imports excluded: reading the adapter, ordering the modules, settings): "
                f"{max(r['overhead_s'] for r in rows):.1f} s at most")
    text.append(f"\nload average at start {load[0]:.1f}, at end {result['load_average_end'][0]:.1f}; "
                f"{a.threads} threads per process")
    print("\n".join(text))
    if a.json:
        from adapters.io import write_json
        write_json(a.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
