"""Results out: JSON + CSV + PNG per op under bench/results/<device>/, markdown tables on stdout."""
from __future__ import annotations

import csv
import json
import os

from bench.ops import OPS
from bench.spec import case_label, format_param

NA = "n/a"


# ---- files ---------------------------------------------------------------------------

def write(doc: dict, out_dir: str) -> list:
    """Write <out_dir>/<device>/<op>.{json,csv,png}; returns the paths written."""
    folder = os.path.join(out_dir, doc["device"])
    os.makedirs(folder, exist_ok=True)
    base = os.path.join(folder, doc["op"])
    with open(base + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    _write_csv(doc, base + ".csv")
    paths = [base + ".json", base + ".csv"]
    if plot(doc, base + ".png"):
        paths.append(base + ".png")
    return paths


def _write_csv(doc, path):
    rows = [r for run in doc["runs"] for r in run["rows"]]
    fields = []
    for r in rows:
        fields += [k for k in r if k not in fields and k != "times_ms"]  # raw times live in the JSON
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: format_param(v) if isinstance(v, (tuple, list)) else v for k, v in r.items()})


def plot(doc: dict, path: str) -> bool:
    """Speedup vs eager per case, bars at the median with a q20-q80 whisker; one panel per run and mode."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return False
    spec = OPS[doc["op"]]
    runs = doc["runs"]
    fig, axes = plt.subplots(len(runs), len(spec.modes), squeeze=False, sharey=True,
                             figsize=(7 * len(spec.modes), 3.6 * len(runs)))
    for run, row_axes in zip(runs, axes):
        for mode, ax in zip(spec.modes, row_axes):
            _plot_panel(ax, [r for r in run["rows"] if r["mode"] == mode], spec)
            ax.set_title(f"{doc['op']} {mode} - {run['allocator']}, {run['threads']} thread(s)", fontsize=10)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"speedup vs eager PyTorch on {doc['device_name']} (dot: median of per-round ratios, "
                 "whisker: q20-q80)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # room for the suptitle
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_panel(ax, rows, spec):
    labels = list(dict.fromkeys(case_label(_case(r, spec)) for r in rows))
    providers = [p for p in dict.fromkeys(r["provider"] for r in rows) if p != "eager"]
    width = 0.6 / max(1, len(providers))
    for i, provider in enumerate(providers):
        xs, ys, lo, hi = [], [], [], []
        for r in rows:
            if r["provider"] == provider and r.get("speedup"):
                xs.append(labels.index(case_label(_case(r, spec))) + (i - (len(providers) - 1) / 2) * width)
                ys.append(r["speedup"])
                lo.append(r["speedup"] - r["speedup_q20"])
                hi.append(r["speedup_q80"] - r["speedup"])
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", capsize=3, markersize=4, label=provider)
    ax.axhline(1.0, color="black", linewidth=0.8, label="eager")
    ax.set_yscale("log", base=2)  # ratios: 2x faster and 2x slower sit at the same distance from 1
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=7)
    ax.set_xlim(-0.5, len(labels) - 0.5)
    ax.grid(axis="y", alpha=0.3)
    ax.set_ylabel("speedup vs eager")


def _case(row, spec):
    return {k: row[k] for k in spec.params}


# ---- markdown ----------------------------------------------------------------------------

def tables(doc: dict) -> str:
    """One markdown table per run (allocator, threads), mode and value of the op's table_by params."""
    spec = OPS[doc["op"]]
    out = [f"## {doc['op']} on {doc['device_name']}", "", f"{spec.formula}", ""]
    for run in doc["runs"]:
        roof = run["roofline"]
        for mode in spec.modes:
            rows = [r for r in run["rows"] if r["mode"] == mode]
            groups = dict.fromkeys(tuple(r[k] for k in spec.table_by) for r in rows)
            for group in groups:
                grows = [r for r in rows if tuple(r[k] for k in spec.table_by) == group]
                title = " · ".join([doc["op"], mode, *map(format_param, group)])
                out.append(f"### {title} · {run['allocator']} · {run['threads']} thread(s) · copy "
                           f"{roof['copy']['gbps']:.1f} GB/s · GEMM fp32 {roof['gemm']['gflops']:.0f} GFLOP/s")
                if run.get("busy_warning"):
                    out += ["", f"**{run['busy_warning']}**"]
                out += ["", *_table(grows, spec), ""]
        if run.get("cases_left_out"):
            out.append(f"Left out at {run['allocator']}, {run['threads']} thread(s): " + "; ".join(
                f"{label} ({why})" for label, why in run["cases_left_out"].items()))
            out.append("")
        if run.get("unavailable_providers"):
            out.append("Not run here: " + "; ".join(f"{k} ({v})" for k, v in run["unavailable_providers"].items()))
            out.append("")
    return "\n".join(out)


def _table(rows, spec):
    params = list(_case(rows[0], spec))
    head = params + ["mode", "provider", "median ms", "q20–q80 ms"]
    if spec.bytes_moved:
        head += ["GB/s", "% copy BW"]
    if spec.flops:
        head += ["GFLOP/s", "% GEMM"]
    head += ["speedup vs eager: median [q20, q80]"]
    if spec.compare_to:
        head += [f"vs {spec.compare_to}: median [q20, q80]"]
    head += ["saved for bwd MB", "peak MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [format_param(r[k]) for k in params] + [r["mode"], r["provider"]]
        if r["status"] != "ok":
            cells += [f"skipped: {r['reason'][:70]}"] + ["—"] * (len(head) - len(cells) - 1)
        else:
            cells += [f"{r['median_ms']:.3f}", f"{r['q20_ms']:.3f}–{r['q80_ms']:.3f}"]
            if spec.bytes_moved:
                cells += [f"{r['gbps']:.1f}", f"{r['pct_copy_bw']:.0f}%"]
            if spec.flops:
                cells += [f"{r['gflops']:.1f}", f"{r['pct_gemm']:.0f}%"]
            cells += [_speedup(r)]
            if spec.compare_to:
                cells += [_speedup(r, f"vs_{spec.compare_to}")]
            cells += [_mb(r["saved_bytes"]),
                      NA if r["peak_mem_bytes"] is None else _mb(r["peak_mem_bytes"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _mb(nbytes):
    return f"{nbytes / 1e6:.1f}" if nbytes >= 1e5 or nbytes == 0 else f"{nbytes / 1e6:.4f}"


def _speedup(r, key="speedup"):
    if r.get(key) is None:
        return "—"
    return f"{r[key]:.2f} [{r[key + '_q20']:.2f}, {r[key + '_q80']:.2f}]"


def summary(doc: dict) -> str:
    """The op's key cases side by side across runs: median ms (speedup vs eager)."""
    spec = OPS[doc["op"]]
    runs = doc["runs"]
    keyed = {}
    for i, run in enumerate(runs):
        for r in run["rows"]:
            case = _case(r, spec)
            if spec.is_key_case(case):
                keyed.setdefault((case_label(case), r["mode"], r["provider"]), {})[i] = r
    if not keyed:
        return ""
    head = ["case", "mode", "provider"] + [f"{run['allocator']}, {run['threads']}t" for run in runs]
    lines = [f"## {doc['op']}: key cases, median ms (speedup vs eager) per allocator and thread count", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (label, mode, provider), by_run in keyed.items():
        cells = [label, mode, provider]
        for i in range(len(runs)):
            r = by_run.get(i)
            if r is None or r["status"] != "ok":
                cells.append("—")
            else:
                versus = f", {r[f'vs_{spec.compare_to}']:.2f}x vs {spec.compare_to}" if spec.compare_to and r.get(
                    f"vs_{spec.compare_to}") else ""
                cells.append(f"{r['median_ms']:.2f}" + (f" ({r['speedup']:.2f}x{versus})" if r.get("speedup") else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
