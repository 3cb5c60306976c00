"""Figures and tables of the sparse-access experiments, from the train CLI's metrics files.

    python benchmarks/sparse_figures.py results/sparse docs/figures [NAME]

Reads RESULTS/*/{copy,recall,kv}_metrics.json (written by `python -m neuralmem_fast train ...`), groups
the runs by task, model, the sparse model's norm floor (settings' sparse_eps) and memory size, and writes:
  sparse_learning.png   bits wrong per sequence against training steps, copy and recall, one line per
                        run (dense MemoryCore at its N, sparse at each N); NAME.png instead when given;
  sparse_capacity.png   kv: query accuracy against the number of items stored, per model and N;
  sparse_capacity_recall.png   the same for recall runs trained with --eval-items;
and prints a markdown table of the steps to threshold (mean ± std over seeds) and of the capacity.
"""
import glob
import json
import os
import statistics
import sys


def load(folder):
    runs = []
    for path in sorted(glob.glob(os.path.join(folder, "*", "*_metrics.json"))):
        with open(path) as f:
            r = json.load(f)
        for m in r["models"]:
            if m is None:
                continue
            eps = r["settings"].get("sparse_eps") if m["model"] == "sparse" else None
            runs.append(dict(task=r["task"], model=m["model"], N=r["settings"]["memory_size"],
                             seed=r["settings"]["seed"], rec=m, threshold=r["threshold"], path=path, eps=eps,
                             k=r["settings"].get("sparse_k")))
    return runs


def _model(run):
    """The model's name in tables and legends: dense, sparse K=.., LSTM."""
    return {"core": "dense", "lstm": "LSTM", "sparse": f"sparse K={run['k']}"}.get(run["model"], run["model"])


def _label(run):
    if run["model"] == "lstm":
        return "LSTM"
    eps = f" eps={run['eps']:g}" if run["eps"] else ""
    return f"{_model(run)}{eps}, N={run['N']:,}"


def _group(run):
    """What runs of one row (or one line set) share: task, model, K, norm floor, N."""
    return run["task"], run["model"], run["k"] if run["model"] == "sparse" else 0, run["eps"] or 0, run["N"]


def steps_table(runs):
    lines = ["| task | model | sparse eps | N | seeds | reached threshold | steps to threshold (each) | mean ± std | "
             "last step: bits wrong |", "|---|---|---|---|---|---|---|---|---|"]
    groups, seen = {}, set()
    for r in runs:
        key = _group(r)
        if r["task"] in ("copy", "recall") and key + (r["seed"],) not in seen:  # a rerun of a seed counts once
            seen.add(key + (r["seed"],))
            groups.setdefault(key, []).append(r)
    for (task, _, _, eps, N), rs in sorted(groups.items()):
        reached = [r["rec"]["reached_step"] for r in rs if r["rec"]["reached_step"]]
        each = ", ".join(str(r["rec"]["reached_step"] or f">{r['rec']['steps'][-1]}") for r in rs)
        ms = (f"{statistics.mean(reached):.0f} ± {statistics.stdev(reached):.0f}" if len(reached) > 1
              else (str(reached[0]) if reached else "-"))
        last = ", ".join(f"{r['rec']['bits_wrong'][-1]:.2f} @ {r['rec']['steps'][-1]}" for r in rs)
        lines.append(f"| {task} | {_model(rs[0])} | {f'{eps:g}' if eps else ''} | {N:,} | {len(rs)} | "
                     f"{len(reached)}/{len(rs)} | {each} | {ms} | {last} |")
    return "\n".join(lines)


def capacity_table(runs, task="kv"):
    kv = sorted((r for r in runs if r["task"] == task and "capacity" in r["rec"]),
                key=lambda r: (r["model"], r["N"], r["seed"]))
    if not kv:
        return ""
    items = sorted({int(n) for r in kv for n in r["rec"]["capacity"]})
    lines = ["| task | model | N | params | steps trained | " + " | ".join(f"{n} items" for n in items) + " |",
             "|---|---|---|---|---|" + "---|" * len(items)]
    for r in kv:
        cap = r["rec"]["capacity"]
        cells = [f"{cap[str(n)]['query_accuracy']:.2f} ({cap[str(n)]['bit_accuracy']:.2f})" if str(n) in cap
                 else "" for n in items]
        n_txt = f"{r['N']:,}" if r["model"] != "lstm" else "-"
        lines.append(f"| {task} | {_label(r).split(',')[0]} | {n_txt} | "
                     f"{r['rec']['params']:,} | {r['rec']['steps'][-1]:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs, out, name="sparse_learning"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    seen = set()
    for ax, task in zip(axes, ("copy", "recall")):
        for r in runs:
            key = _group(r) + (r["seed"],)
            if r["task"] != task or key in seen:   # a rerun of a seed is drawn once
                continue
            seen.add(key)
            faint = r["model"] == "sparse" and (r["eps"] or 0) < 1e-6   # runs before the norm floor
            ls = ("-" if r["model"] == "sparse" else "--") if not faint else ":"
            ax.plot(r["rec"]["steps"], r["rec"]["bits_wrong"], ls, lw=1, alpha=0.5 if faint else 1.0,
                    label=f"{_label(r)}, seed {r['seed']}")
            ax.axhline(r["threshold"], color="k", ls=":", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel("bits wrong per sequence")
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"{name}.png"), dpi=90)
    plt.close(fig)
    for task, trained in (("kv", "2-16"), ("recall", "2-6")):
        kv = [r for r in runs if r["task"] == task and "capacity" in r["rec"]]
        if kv:
            _capacity_plot(kv, task, trained, out, plt)


def _capacity_plot(kv, task, trained, out, plt):
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in kv:
        cap = r["rec"]["capacity"]
        ns = sorted(int(n) for n in cap)
        ax.plot(ns, [cap[str(n)]["query_accuracy"] for n in ns], "o-",
                label=f"{_label(r)}, {r['rec']['steps'][-1]:,} steps")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"items stored (trained on {trained})")
    ax.set_ylabel("queries answered exactly" if task == "kv" else "answer steps with every bit right")
    ax.set_title(task)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "sparse_capacity.png" if task == "kv" else f"sparse_capacity_{task}.png"), dpi=90)
    plt.close(fig)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    folder = argv[0] if argv else "results/sparse"
    out = argv[1] if len(argv) > 1 else "docs/figures"
    name = argv[2] if len(argv) > 2 else "sparse_learning"
    runs = load(folder)
    os.makedirs(out, exist_ok=True)
    plot(runs, out, name)
    print(steps_table(runs))
    print()
    print(capacity_table(runs, "kv"))
    print()
    print(capacity_table(runs, "recall"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
