"""Run every benchmark in bench/ and write the performance table (bench/results/summary.md).

    python bench/run_all.py            # run all benchmarks (tens of minutes on a 2-core CPU), then summarise
    python bench/run_all.py --summary  # only rebuild the table from bench/results/*.json

The documentation's performance table (docs/performance.md) is this file's output.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
# each benchmark with the arguments that produced the documentation's table
BENCHES: list[tuple[str, list[str]]] = [
    ("bench_shap.py", []),
    ("bench_shap.py", ["--models", "lenet5", "--threads", "2", "--out", str(RESULTS / "shap-2threads.json")]),
    ("bench_threads.py", []),
    ("bench_lrp.py", ["--models", "lenet5", "mobilenet", "resnet18", "efficientnet_b0", "efficientnet_b2"]),
    ("bench_impactx.py", ["--models", "lenet5,mobilenet,efficientnet_b2"]),
    (
        "bench_impactx.py",
        [
            "--models",
            "lenet5",
            "--decoders",
            "paper,unet,unet_input,additive",
            "--out",
            str(RESULTS / "impactx_decoders.json"),
        ],
    ),
    (
        "bench_impactx.py",
        [
            "--models",
            "lenet5",
            "--decoders",
            "unet_input,lite@16,lite_additive@16",
            "--per-class",
            "--map-loss",
            "pearson",
            "--threads",
            "2",
            "--out",
            str(RESULTS / "impactx_decoders_per_class.json"),
        ],
    ),
    (
        "bench_impactx.py",
        [
            "--models",
            "lenet5",
            "--decoders",
            "unet_input,unet_input@64",
            "--per-class",
            "--map-loss",
            "pearson",
            "--reads-m",
            "--threads",
            "2",
            "--out",
            str(RESULTS / "impactx_decoders_reads_m.json"),
        ],
    ),
    ("bench_integrity.py", []),
    ("bench_metrics.py", []),
    ("bench_allocator.py", []),
    ("bench_cpu_tuning.py", []),
    ("bench_scaling.py", []),
    ("bench_memory.py", []),
    ("bench_methods.py", ["--threads", "1"]),
    ("bench_reveal.py", []),
    ("bench_reveal.py", ["--n", "45000", "--out", str(RESULTS / "reveal_45000.json")]),
    ("bench_clarc.py", ["--threads", "1"]),
]


def load(name: str):
    p = RESULTS / name
    return json.loads(p.read_text()) if p.exists() else None


def _threads(n: int) -> str:
    return f"{n} thread" + ("s" if n != 1 else "")


def summary() -> str:
    rows = ["| target | model | measured | target | met |", "|---|---|---|---|---|"]
    for shap in filter(None, (load("shap.json"), load("shap-2threads.json"))):
        for name, r in shap["models"].items():
            rows.append(
                f"| DeepSHAP img/s vs bound (batch {shap['batch']}, background {shap['background']}, {_threads(shap['threads'])}) | {name} | "
                f"{r['ours_img_s']:.1f} img/s = {r['ratio_to_bound']:.2f}x bound ({r['bound_img_s']:.1f}), {r['speedup_vs_shap']:.1f}x shap.DeepExplainer, max rel. diff {r['rel_diff']:.1e} | "
                f">= 0.75x bound | {'yes' if r['ratio_to_bound'] >= 0.75 else 'no'} |"
            )
    lrp = load("lrp.json")
    if lrp:
        for r in lrp["results"]:
            for key, tgt in (("lrp_epsilon", 1.5), ("lrp_epsilon_plus_flat", 2.0)):
                v = r["ratio_vs_plain_input_grad"][key]
                rows.append(
                    f"| LRP {key[4:]} / forward+backward (batch {r['batch']}) | {r['model']} | {v:.2f}x | <= {tgt}x | {'yes' if v <= tgt else 'no'} |"
                )
    for rev in filter(None, (load("reveal.json"), load("reveal_45000.json"))):
        sec = rev["seconds"]
        rows.append(
            f"| teachx reveal over {rev['n']:,} images ({rev.get('images', 'seeded random 32x32x3')}; {rev['teacher']} maps, "
            f"{rev['method']}, {_threads(rev['threads'])}) | {rev.get('model', 'lenet5')} | "
            f"{rev['total_s']:.0f} s (maps {sec['maps_s']:.0f}, activations {sec['activations_s']:.0f}, per-class reveal {sec['reveal_s']:.0f}, "
            f"figures {sec['figures_s']:.0f}); projected for 45,000: {rev['projected_cifar10_45000_s']:.0f} s | <= 300 s for 45,000 | "
            f"{'yes' if rev['meets_target'] else 'no'} |"
        )
    imp = load("impactx.json")
    if imp:
        for r in imp["results"]:
            rows.append(
                f"| IMPACTX epoch / baseline epoch | {r['model']} | {r['ratio_impactx_to_baseline']:.2f}x (lambda=0: {r['ratio_impactx_lambda0_to_baseline']:.2f}x) | <= 2.5x | {'yes' if r['ratio_impactx_to_baseline'] <= 2.5 else 'no'} |"
            )
            direct = r["map_read_s"] / r["impactx_epoch_in_memory_maps_s"]
            rows.append(
                f"| reading stored maps, share of an epoch (A/B epoch difference, noisy) | {r['model']} | "
                f"{100 * direct:.2f}% ({100 * r.get('map_reading_ab_difference', r['map_reading_overhead']):+.1f}%) | <= 5% | {'yes' if direct <= 0.05 else 'no'} |"
            )
            parts = r.get("step_parts_s")
            if parts:
                cells = ", ".join(f"{k} {1000 * v:.1f}" for k, v in parts.items())
                mac = r.get("macs_per_image")
                macs = (
                    f"; multiply-adds per image: decoder {mac['decoder'] / mac['baseline']:.2f}x the baseline model's"
                    if mac
                    else ""
                )
                rows.append(
                    f"| where the IMPACTX step goes, ms per batch of {r['batch']} (sum {1000 * sum(parts.values()):.1f} vs step {1000 * r['step_s']:.1f}; "
                    f"baseline step {1000 * r['baseline_step_s']:.1f}) | {r['model']} | {cells}{macs} | (profile) | - |"
                )
            rows.append(
                f"| built-in maps / baseline forward | {r['model']} | {r['ratio_builtin_maps_to_forward']:.2f}x | <= 2.5x | {'yes' if r['ratio_builtin_maps_to_forward'] <= 2.5 else 'no'} |"
            )
            sp = r.get("speedup_builtin_vs_deepexplainer")
            if sp:
                rows.append(
                    f"| built-in maps vs post-hoc shap.DeepExplainer (bg 100) | {r['model']} | {sp:.0f}x | >= 100x | {'yes' if sp >= 100 else 'no'} |"
                )
    for dec in (
        load(name)
        for name in ("impactx_decoders.json", "impactx_decoders_per_class.json", "impactx_decoders_reads_m.json")
    ):
        for r in (dec or {}).get("decoders", []):
            what = (
                f"impactx.decoder={r['decoder']}"
                + (f" width {r['decoder_width']}" if r.get("decoder_width", 32) != 32 else "")
                + (" per class" if r.get("per_class") else "")
                + (f", {r['map_loss']} loss" if r.get("map_loss", "mse") != "mse" else "")
                + (", reading M" if r.get("decoder_reads_m") else "")
            )
            rows.append(
                f"| built-in maps / baseline forward; IMPACTX step / baseline step ({what}, batch {r['batch']}, {_threads(dec['threads'])}) | {r['model']} | "
                f"{r['ratio_builtin_maps_to_forward']:.2f}x; {r['ratio_impactx_step_to_baseline']:.2f}x (decoder multiply-adds "
                f"{r['macs_per_image']['decoder'] / r['macs_per_image']['baseline']:.2f}x the model's) | <= 2.5x; <= 2.5x | "
                f"{'yes' if max(r['ratio_builtin_maps_to_forward'], r['ratio_impactx_step_to_baseline']) <= 2.5 else 'no'} |"
            )
    integ = load("integrity.json")
    if integ:
        c, m, d = integ["checkpoint"], integ["map_store"], integ["data_cache"]
        rows.append(
            f"| verifying content digests on read ({_threads(integ['threads'])}, files in the page cache) | mobilenet, 45k maps, CIFAR-10 cache | "
            f"checkpoint {c['file_mb']:.0f} MB: {1000 * c['load_checkpoint_s']:.0f} ms vs {1000 * c['plain_load_s']:.0f} ms unverified; "
            f"map store {m['rows']:,} maps ({m['maps_mb']:.0f} MB) opened and verified in {1000 * m['open_store_s']:.0f} ms "
            f"(reading every row {1000 * m['plain_read_all_rows_s']:.0f} ms); data cache {d['entry_mb']:.0f} MB: first load in a process "
            f"{1000 * d['first_load_in_process_s']:.0f} ms, later {1000 * d['later_load_in_process_s']:.1f} ms | small | - |"
        )
    serve = load("serve.json")
    for label, run in ((serve or {}).get("runs") or {}).items():
        for scen, by in run["scenarios"].items():
            cells = ", ".join(
                f"{n} client{'s' if n != '1' else ''}: p50 {v['p50_ms']:.1f} / p95 {v['p95_ms']:.1f} ms ({v['errors']} errors)"
                for n, v in by.items()
            )
            target = {"cached_view": 20, "uncached_built_in": 50}.get(scen)
            met = "-" if target is None else ("yes" if max(v["p95_ms"] for v in by.values()) <= target else "no")
            rows.append(
                f"| teachx serve latency, {scen.replace('_', ' ')} ({label}, {run['n_images']:,} test images) | {run['model']} | {cells} | "
                f"{f'p95 <= {target} ms' if target else '(measured)'} | {met} |"
            )
        mem = run.get("memory")
        if mem:
            rows.append(
                f"| teachx serve memory over {mem['requests']:,} requests ({mem['clients']} clients) | {run['model']} | "
                f"RSS {mem['rss_first_mb']:.0f} -> {mem['rss_last_mb']:.0f} MB, {mem['errors']} errors | flat | {'yes' if mem['growth_mb'] < 10 else 'no'} |"
            )
    met = load("metrics.json")
    if met:
        q = met.get("quantus") or {}
        detail = (
            (
                f" ({met['teachx']['images_per_s']:.0f} vs {q['images_per_s']:.0f} img/s, Quantus {q.get('version')}, max curve diff {q.get('max_abs_curve_difference'):.1g}; "
                f"{q.get('forward_passes_per_image')} vs {met.get('forward_passes_per_image')} forwards per image)"
            )
            if q.get("available")
            else ""
        )
        rows.append(
            f"| pixel-flipping AUC throughput, 1,000 images | lenet5 | {met['speedup']:.1f}x {met['speedup_vs'].replace('_', ' ')}{detail} | >= 10x Quantus | {'yes' if met['speedup'] >= 10 else 'no'} |"
        )
    alloc = load("allocator.json")
    if alloc:
        for r in alloc["results"]:
            rows.append(
                f"| malloc tuning, training step speed-up | {r['model']} | {r['speedup']:.2f}x | (CPU tuning) | - |"
            )
    tune = load("cpu_tuning.json")
    if tune:
        label = {
            "channels_last": "channels_last",
            "compile": "torch.compile",
            "compile_channels_last": "torch.compile + channels_last",
        }
        threads = max(r["threads"] for r in tune["results"])
        for r in tune["results"]:
            if "error" in r:
                rows.append(
                    f"| {label.get(r['variant'], r['variant'])}, training step (batch {tune['batch']}) | {r['model']} | failed: {r['error']} | (CPU tuning) | - |"
                )
            elif r["variant"] in label:
                rows.append(
                    f"| {label[r['variant']]}, training-step speed-up vs eager ({r['threads']} threads, batch {tune['batch']}) | {r['model']} | "
                    f"{r['speedup_vs_eager']:.2f}x ({1000 * r['median_step_s']:.1f} ms/step; first-3-steps loss diff {r['max_abs_loss_diff_3_steps']:.0e}"
                    + (f", compile {r['warmup_s']:.0f} s" if "compile" in r["variant"] else "")
                    + ") | (CPU tuning) | - |"
                )
            elif r["variant"] == "eager" and r["threads"] != threads:
                rows.append(
                    f"| {r['threads']} thread(s) instead of {threads}, training step | {r['model']} | {r['speedup_vs_eager']:.2f}x ({1000 * r['median_step_s']:.1f} ms/step) | (CPU tuning) | - |"
                )
    thr = load("threads.json")
    if thr:
        by = {(r["load"], r["variant"]): r for r in thr["rows"]}
        for condition in dict.fromkeys(r["load"] for r in thr["rows"]):
            cells = ", ".join(
                f"{v} {1000 * by[(condition, v)]['median_step_s']:.1f}" for (ld, v) in by if ld == condition
            )
            rows.append(
                f"| training step under contention, ms (LeNet-5, batch {thr['batch']}, {thr['cores']} cores): {condition} | lenet5 | {cells} | (thread policy) | - |"
            )
    sc = load("scaling.json")
    if sc:
        by = {(r["stage"], r["n"]): r for r in sc["rows"]}
        names = {"maps": f"{sc['teacher']} teacher maps", "baseline": "baseline epoch", "impactx": "IMPACTX epoch"}
        for stage, s in sc["summary"].items():
            cells = ", ".join(
                f"{n // 1000}k: {by[(stage, n)]['seconds']:.1f} s / {by[(stage, n)]['anon_peak_mb']:.0f} MB"
                for n in sc["sizes"]
            )
            flat = s["anon_peak_ratio"] <= 1.1
            rows.append(
                f"| {names[stage]}: time and peak anonymous memory vs dataset size ({sc['threads']} threads) | lenet5 | {cells} "
                f"({s['size_ratio']:.0f}x images: {s['time_ratio']:.1f}x time, memory x{s['anon_peak_ratio']:.2f}) | memory flat in N | {'yes' if flat else 'no'} |"
            )
    mem = load("memory.json")
    if mem:
        label = {
            "forward": "forward",
            "input_gradient": "forward+input gradient",
            "train_step": "train step",
            "impactx_train_step": "IMPACTX train step",
            "builtin_maps": "built-in maps",
            "lrp_epsilon": "LRP eps",
            "lrp_epsilon_plus_flat": "LRP eps+flat",
            "deepshap": "DeepSHAP",
            "shap_deepexplainer": "shap.DeepExplainer",
            "pixel_flipping_teachx": "pixel flipping 1,000 images",
            "pixel_flipping_quantus": "Quantus pixel flipping",
        }
        for model in dict.fromkeys(r["model"] for r in mem["rows"]):
            cells = ", ".join(
                f"{label.get(r['operation'], r['operation'])} "
                + (f"{r['peak_extra_mb']:.0f}" if "error" not in r else "failed")
                for r in mem["rows"]
                if r["model"] == model
            )
            rows.append(
                f"| peak memory of one call, MB above the resident set before it (batch {mem['batch']}, fresh process each) | {model} | {cells} | (measured) | - |"
            )
    meth = load("methods.json")
    if meth:
        for r in meth["rows"]:
            if r.get("target"):
                rows.append(
                    f"| {r['method']} training step / baseline step (batch {meth['batch']}, {r['input']}, {_threads(meth['threads'])}) | "
                    f"{r['backbone']} | {r['ratio_to_baseline']:.2f}x ({r['step_ms']:.1f} ms) | <= {r['target']}x | {'yes' if r['meets_target'] else 'no'} |"
                )
    clarc = load("clarc.json")
    if clarc:
        where = f"batch {clarc['batch']}, {clarc['input']}, {_threads(clarc['threads'])}"
        for r in clarc["forward"]:
            if r["variant"] != "forward":
                name = {"p_clarc": "P-ClArC", "r_clarc": "R-ClArC"}.get(r["variant"], r["variant"])
                alone = (
                    f"; the projection alone {100 * clarc['p_clarc_transform_share']:.1f}%"
                    if r["variant"] == "p_clarc"
                    else ""
                )
                rows.append(
                    f"| {name} hook, share of a forward pass ({where}, layer {clarc['layer']}) | {clarc['model']} | "
                    f"{100 * r['overhead_share']:+.1f}% ({r['forward_ms']:.1f} ms){alone} | "
                    + (
                        f"<= {100 * r['target']:.0f}% | {'yes' if r['meets_target'] else 'no'} |"
                        if r["target"]
                        else "(measured) | - |"
                    )
                )
        for r in clarc["steps_vs_baseline"]:
            if r["method"] != "baseline":
                rows.append(
                    f"| {r['method']} training step / baseline step ({where}) | {clarc['model']} | {r['ratio_to_baseline']:.2f}x ({r['step_ms']:.1f} ms) | "
                    + (
                        f"<= {r['target']}x | {'yes' if r['meets_target'] else 'no'} |"
                        if r["target"]
                        else "(measured) | - |"
                    )
                )
    return "\n".join(rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--summary", action="store_true", help="only rebuild the table")
    args = ap.parse_args()
    if not args.summary:
        for script, extra in BENCHES:
            print(f"== {script} {' '.join(extra)}", flush=True)
            subprocess.run([sys.executable, str(HERE / script), *extra], check=True)
    from teachx.utils.io import write_text_atomic

    text = summary()
    write_text_atomic(RESULTS / "summary.md", text)
    print(text)


if __name__ == "__main__":
    main()
