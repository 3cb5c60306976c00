"""`python -m neuralmem_fast demo`: the seed's continual-learning demo, headless, with metrics.

By default the fast agent (`neuralmem_fast.models.agent`, batched prioritized replay)
learns the seed's synthetic tasks; `--agent sequential` is the fast agent in
the seed's replay order, `--reference` the faithful reference agent.
`--compare-reference` also runs the reference agent on the same workload and
records both training times and their ratio. `--dataset digits` runs the
continual-learning experiment on scikit-learn's 8x8 digits instead
(`neuralmem_fast.apps.experiments.run_digits_experiment`: Split- and
Permuted-Digits, with and without replay, over several seeds).

The agent learns the seed's tasks one after the other, twice from the same
seed: with prioritized replay (from the second task on) and without. After
each task it is evaluated on every task's test split, which gives a
task-by-task error matrix per run; after the last task each task is also
evaluated after a few steps of test-time (MAML inner-loop) adaptation.

Writes under --out:
  neural_memory_results.png  memory heatmap (each slot minus the mean slot:
                             zero where the slots are identical); error on every task after learning
                             each task, with and without replay; both error
                             matrices as heatmaps
  metrics.json               error matrices, average final error, forgetting
                             per task, adapted errors, losses, wall times (and
                             with --compare-reference the reference agent's
                             runs, both training times and their ratio)
  with --dataset digits:     digits_continual.png and digits_metrics.json
  with --ablation too:       digits_ablation.png and digits_ablation.json (the
                             memory variants of experiments.ABLATION_VARIANTS)

Agents. `AGENTS` maps a name to a factory `(config, hidden_dim, input_dim,
seed_compat) -> agent`, and `build_agent` is the one place that builds one;
`--agent NAME` picks it and `--reference` is the faithful reference agent of
`neuralmem_fast.models.tutorial_reference`. An agent provides:
  train_step(x, y, use_replay) -> float    one training step on one sample
  evaluate(data, params=None) -> float     mean test MSE; must not change the agent
  adapt(support, num_steps, lr) -> params  parameters for evaluate(params=...)
  memory_bank.memory                       (N, D) tensor, drawn as the heatmap
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

from ..models import tutorial_reference as reference

# --------------------------------------------------------------------------
# agents
# --------------------------------------------------------------------------


def reference_agent(config, hidden_dim, input_dim=64, seed_compat=False):
    return reference.ContinualLearningAgent(input_dim, hidden_dim, config, seed_compat=seed_compat)


def _fast_agent(replay):
    def factory(config, hidden_dim, input_dim=64, seed_compat=False, write_mode=None):
        from ..models import agent

        if seed_compat:
            # The fast agent never writes memory during evaluation, by design.
            raise ValueError("seed_compat (evaluation writes to memory) needs the reference agent")
        return agent.make_agent(replay, input_dim=input_dim, hidden_dim=hidden_dim, config=config,
                                write_mode=write_mode)

    factory.__name__ = f"{replay}_agent"
    return factory


AGENTS = {"batched": _fast_agent("batched"), "sequential": _fast_agent("sequential"), "reference": reference_agent}
DEFAULT_AGENT = "batched"
FAST_AGENTS = ("batched", "sequential")


def build_agent(kind, config, hidden_dim, input_dim=64, seed_compat=False, write_mode=None):
    """Builds the agent named `kind` (a key of AGENTS) for a memory config.

    write_mode (fast agents): the bank's write addressing, "allocation" (their
    default), "content" (the tutorial's, as the reference agent) or "none"."""
    if kind not in AGENTS:
        raise ValueError(f"unknown agent {kind!r}; choose one of {sorted(AGENTS)}")
    if write_mode is None:
        return AGENTS[kind](config, hidden_dim, input_dim=input_dim, seed_compat=seed_compat)
    if kind == "reference" and write_mode != "content":
        raise ValueError(f"the reference agent writes as the tutorial (write_mode='content'), got {write_mode!r}")
    kw = {} if kind == "reference" else {"write_mode": write_mode}
    return AGENTS[kind](config, hidden_dim, input_dim=input_dim, seed_compat=seed_compat, **kw)


# --------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------
# The seed's workload; --quick is a tiny configuration for smoke tests.
DEFAULTS = dict(tasks=4, epochs=20, samples=50, test_samples=20, memory_size=128, memory_dim=64, read_heads=4,
                hidden=128, adapt_steps=5, adapt_shots=10, adapt_lr=0.01)
QUICK = dict(tasks=3, epochs=2, samples=12, test_samples=6, memory_size=16, memory_dim=8, read_heads=2,
             hidden=16, adapt_steps=2, adapt_shots=4, adapt_lr=0.01)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m neuralmem_fast demo",
        description="The continual-learning demo: with and without replay, figure and metrics.json.")
    p.add_argument("--tasks", type=int, help=f"number of tasks (default {DEFAULTS['tasks']})")
    p.add_argument("--epochs", type=int, help=f"epochs per task (default {DEFAULTS['epochs']})")
    p.add_argument("--samples", type=int, help=f"training samples per task (default {DEFAULTS['samples']})")
    p.add_argument("--test-samples", type=int, help=f"test samples per task (default {DEFAULTS['test_samples']})")
    p.add_argument("--memory-size", type=int, help=f"memory slots N (default {DEFAULTS['memory_size']})")
    p.add_argument("--memory-dim", type=int, help=f"slot width D (default {DEFAULTS['memory_dim']})")
    p.add_argument("--read-heads", type=int, help=f"read heads H (default {DEFAULTS['read_heads']})")
    p.add_argument("--hidden", type=int, help=f"controller LSTM width (default {DEFAULTS['hidden']})")
    p.add_argument("--adapt-steps", type=int,
                   help="test-time adaptation steps after the last task, 0 to skip "
                        f"(default {DEFAULTS['adapt_steps']})")
    p.add_argument("--adapt-shots", type=int,
                   help=f"support samples for adaptation (default {DEFAULTS['adapt_shots']})")
    p.add_argument("--adapt-lr", type=float, help=f"adaptation step size (default {DEFAULTS['adapt_lr']})")
    p.add_argument("--seed", type=int, default=0, help="seed of torch and numpy at the start of each run (default 0)")
    p.add_argument("--out", default="results", help="output folder (default results)")
    p.add_argument("--no-plot", action="store_true", help="write metrics.json only")
    p.add_argument("--quick", action="store_true", help="tiny configuration (seconds); explicit options still win")
    p.add_argument("--agent", choices=sorted(AGENTS), default=None,
                   help=f"agent implementation: the fast agent with batched or sequential (the seed's order) "
                        f"replay, or the faithful reference (default {DEFAULT_AGENT})")
    p.add_argument("--reference", action="store_true", help="use the faithful reference agent (--agent reference)")
    p.add_argument("--compare-reference", action="store_true",
                   help="also run the reference agent on the same workload; record both training times and "
                        "their ratio")
    p.add_argument("--dataset", choices=("synthetic", "digits"), default="synthetic",
                   help="the seed's synthetic tasks (default) or the 8x8 digits experiment")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="digits: seeds to average over (default 0 1 2)")
    p.add_argument("--train-per-task", type=int, default=None,
                   help="digits: training samples per task (default 300; all of them with 0)")
    p.add_argument("--test-per-task", type=int, default=None, help="digits: test samples per task (default all)")
    p.add_argument("--write-mode", choices=("allocation", "content", "none"), default=None,
                   help="fast agent's memory writes: allocation (least-used slot first; the default), content "
                        "(the tutorial's: from the zero memory every slot gets the same write; the default with "
                        "--compare-reference, which runs the same work as the reference) or none (reads stay zero)")
    p.add_argument("--ablation", action="store_true",
                   help="digits: compare memory variants (allocation writes, reads zero, the tutorial's uniform "
                        "writes, and an episodic memory of inputs and targets) instead of replay on/off")
    p.add_argument("--variants", nargs="+", default=None,
                   help="digits --ablation: the variants to run (default all: memory zero_reads uniform_writes "
                        "episodic episodic_uniform)")
    p.add_argument("--episodic-size", type=int, default=None,
                   help="digits --ablation: slots of the episodic memory (default 2048: every training sample)")
    p.add_argument("--seed-compat", action="store_true",
                   help="the seed's behaviour: test sets are training prefixes, evaluation writes to memory")
    # One sample per step on tensors of a few thousand elements: intra-op
    # threads only add synchronisation (and stall badly on a busy machine).
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads, 0 for torch's choice (default 1)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (there is none either when stderr is not a terminal: a log file or pipe "
                        "would collect every redrawn frame)")
    args = p.parse_args(argv)
    args.epochs_given = args.epochs
    base = QUICK if args.quick else DEFAULTS
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.reference:
        if args.agent not in (None, "reference"):
            p.error("--reference and --agent disagree")
        args.agent = "reference"
    args.agent = args.agent or DEFAULT_AGENT
    if args.seed_compat and args.agent != "reference":
        p.error("--seed-compat needs --reference (the fast agent's evaluation never writes to memory)")
    if args.compare_reference and args.agent == "reference":
        p.error("--compare-reference compares a fast agent with the reference: drop --reference")
    if args.agent == "reference" and args.write_mode not in (None, "content"):
        p.error("--write-mode applies to the fast agents (the reference writes as the tutorial)")
    if args.ablation and args.dataset != "digits":
        p.error("--ablation applies to --dataset digits")
    if not args.ablation and (args.variants is not None or args.episodic_size is not None):
        p.error("--variants and --episodic-size apply to --ablation")
    if args.episodic_size is not None and args.episodic_size < 1:
        p.error(f"--episodic-size must be at least 1, got {args.episodic_size}")
    if args.variants is not None:
        from .experiments import ABLATION_VARIANTS

        bad = [v for v in args.variants if v not in ABLATION_VARIANTS]
        if bad:
            p.error(f"--variants: unknown {bad}; choose among {sorted(ABLATION_VARIANTS)}")
    if args.ablation and args.write_mode is not None:
        p.error("--ablation sets each variant's write mode: drop --write-mode")
    if args.dataset == "digits":
        if args.agent not in FAST_AGENTS:
            p.error("--dataset digits runs the fast agent (--agent batched or sequential)")
        if args.compare_reference:
            p.error("--compare-reference applies to the synthetic tasks")
        if args.seeds is None:
            args.seeds = [0, 1, 2]
        if args.train_per_task is None:
            args.train_per_task = 300
        # epochs: one pass over each task's data unless asked (--quick: the smallest run)
        if args.epochs_given is None:
            args.epochs = 1
        if args.quick:
            args.seeds = args.seeds[:2]
            args.train_per_task = min(args.train_per_task or 12, 12)  # 0 (all) too: --quick wins
            args.test_per_task = args.test_per_task or 10
    for key in ("seeds", "train_per_task", "test_per_task"):
        if args.dataset != "digits" and getattr(args, key) is not None:
            p.error(f"--{key.replace('_', '-')} applies to --dataset digits")
    if args.train_per_task == 0:  # all of each task's training data
        args.train_per_task = None
    for key in ("tasks", "epochs", "samples", "test_samples", "memory_size", "memory_dim", "read_heads", "hidden"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1, got {getattr(args, key)}")
    if args.adapt_steps > 0 and not 1 <= args.adapt_shots <= args.samples:
        p.error(f"--adapt-shots must be in [1, --samples={args.samples}], got {args.adapt_shots}")
    return args


# --------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------


def average_final_error(error_matrix):
    """Mean test error over all tasks after learning the last one."""
    final = [e for e in error_matrix[-1] if e is not None]
    return sum(final) / len(final)


def forgetting(error_matrix):
    """Per task j: final error minus the lowest error it had after learning tasks j..T-2.

    Positive means forgotten, negative that later tasks helped; None for the
    last task (nothing is learned after it).
    """
    T = len(error_matrix)
    out = []
    for j in range(T):
        if j == T - 1:
            out.append(None)
            continue
        best = min(error_matrix[t][j] for t in range(j, T - 1))
        out.append(error_matrix[T - 1][j] - best)
    return out


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


# --------------------------------------------------------------------------
# runs
# --------------------------------------------------------------------------


def _config(args):
    return reference.MemoryConfig(memory_size=args.memory_size, memory_dim=args.memory_dim,
                                  num_read_heads=args.read_heads)


def run_one(args, use_replay, progress=None, log=print, kind=None):
    """One agent (`kind`, default args.agent), learned from scratch with seed args.seed; returns (metrics, agent)."""
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    kind = kind or args.agent
    write_mode = args.write_mode
    if kind == "reference":
        write_mode = None
    elif write_mode is None and args.compare_reference:
        write_mode = "content"  # the same work as the reference agent
    agent = build_agent(kind, _config(args), args.hidden, input_dim=64, seed_compat=args.seed_compat,
                        write_mode=write_mode)
    on_step = None
    if progress is not None:
        def on_step(loss, _n=[0]):
            _n[0] += 1
            if _n[0] == 1 and hasattr(progress, "reset"):
                # The first step also carries building the agent and one-time
                # warm-up (lazy imports, first calls into the kernels): a rate
                # measured over it put the first ETA at 72 s for a 4 s run.
                # The bar's clock starts after it (its elapsed time too: tqdm
                # falls back to n / elapsed before its smoothed rate has a
                # sample); the run's wall time printed at the end counts it all.
                progress.reset()
            progress.update(1)
            if _n[0] % 25 == 0:
                progress.set_postfix(loss=f"{loss:.4f}", refresh=False)
    t0 = time.perf_counter()
    run = reference.run_continual_learning(
        agent, num_tasks=args.tasks, epochs=args.epochs, num_samples=args.samples, test_samples=args.test_samples,
        use_replay=use_replay, seed_compat=args.seed_compat, adapt_steps=args.adapt_steps,
        adapt_shots=args.adapt_shots, adapt_lr=args.adapt_lr, on_step=on_step, log=log)
    wall = time.perf_counter() - t0
    E = run["error_matrix"]
    metrics = {
        "use_replay": use_replay,
        "error_matrix": E,
        "error_after_learning": [E[t][t] for t in range(args.tasks)],
        "average_final_error": average_final_error(E),
        "forgetting": forgetting(E),
        "average_forgetting": _mean(forgetting(E)),
        "adapted_error": run["adapted_error"],
        "average_adapted_error": _mean(run["adapted_error"] or []),
        "train_loss": run["train_loss"],
        "wall_time_s": wall,
        "train_time_s": run["train_time_s"],
        "eval_time_s": run["eval_time_s"],
    }
    return metrics, agent


def _on_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _progress_bar(args, total, desc):
    """A tqdm bar on stderr, or None: with --no-progress, and whenever stderr is
    not a terminal, where every redrawn frame would land in the log."""
    if args.no_progress or not _on_terminal(sys.stderr):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr)


def _both_runs(args, kind):
    """The run with replay and the run without, for agent `kind`; returns (runs, agents, seconds)."""
    from tqdm.auto import tqdm

    steps = args.tasks * args.epochs * args.samples
    runs, agents = {}, {}
    t0 = time.perf_counter()
    for name, replay in (("with_replay", True), ("without_replay", False)):
        tag = name if kind == args.agent else f"{kind}, {name}"
        bar = _progress_bar(args, steps, tag.replace("_", " "))
        log = (lambda s: tqdm.write(f"[{tag}] {s}")) if bar is not None else (lambda s: print(f"[{tag}] {s}"))
        try:
            runs[name], agents[name] = run_one(args, replay, bar, log, kind=kind)
        finally:
            if bar is not None:
                bar.close()
    return runs, agents, time.perf_counter() - t0


def _train_time(runs):
    return sum(r["train_time_s"] for r in runs.values())


def run_demo(args):
    """Both runs (and the reference's with --compare-reference), the figure and metrics.json. --threads
    holds for the run only: called in a process of the caller's (a test, a notebook), the caller's torch
    thread count is restored afterwards."""
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run_demo(args)
    finally:
        torch.set_num_threads(threads)


def _run_demo(args):
    os.makedirs(args.out, exist_ok=True)
    if args.dataset == "digits":
        return run_digits(args)
    runs, agents, total = _both_runs(args, args.agent)
    metrics = {
        "agent": args.agent,
        "dataset": "synthetic",
        "settings": {k: getattr(args, k) for k in (*DEFAULTS, "seed", "seed_compat", "quick", "write_mode")},
        "write_mode": getattr(agents["with_replay"].memory_bank, "write_mode", "content"),
        "torch_threads": torch.get_num_threads(),
        "runs": runs,
        # the seed's results dict, both curves filled
        "results": {"tasks": list(range(1, args.tasks + 1)),
                    "with_memory": runs["with_replay"]["error_after_learning"],
                    "without_memory": runs["without_replay"]["error_after_learning"]},
        "wall_time_s": total,
        "train_time_s": _train_time(runs),
    }
    if args.compare_reference:
        # The same work (same tasks, seeds, settings, both runs) by the reference agent.
        ref_runs, _, ref_total = _both_runs(args, "reference")
        metrics["reference_runs"] = ref_runs
        metrics["comparison"] = {
            "agent": args.agent,
            "train_time_s": metrics["train_time_s"],
            "wall_time_s": total,
            "reference_train_time_s": _train_time(ref_runs),
            "reference_wall_time_s": ref_total,
            "train_speedup": _train_time(ref_runs) / metrics["train_time_s"],
            "wall_speedup": ref_total / total,
            "average_final_error": {name: {args.agent: runs[name]["average_final_error"],
                                           "reference": ref_runs[name]["average_final_error"]}
                                    for name in runs},
        }
    metrics["memory_slot_spread"] = slot_spread(agents["with_replay"].memory_bank.memory)
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    if not args.no_plot:
        plot(metrics, agents["with_replay"].memory_bank.memory, os.path.join(args.out, "neural_memory_results.png"))
    return metrics


def slot_spread(memory):
    """How much the slots differ: the largest, over the slot's dimensions, of
    max - min across the slots of the (N, D) memory (0 when all slots are identical)."""
    m = memory.detach().float()
    return float((m.amax(dim=0) - m.amin(dim=0)).max()) if m.numel() else 0.0


def plot(metrics, memory, path):
    """Memory heatmap, per-task error curves with/without replay, both error matrices."""
    import matplotlib

    matplotlib.use("Agg")  # headless: writes the file, never opens a window
    import matplotlib.pyplot as plt

    runs = metrics["runs"]
    T = len(metrics["results"]["tasks"])
    fig, axes = plt.subplots(2, 2, figsize=(14, 10))

    ax = axes[0, 0]
    # Each slot minus the mean slot: what tells the slots apart. (Identical
    # slots, the tutorial's content writes from the zero memory, give zero
    # here; the raw memory showed them as constant columns.)
    m = memory.detach().cpu().float()
    dev = (m - m.mean(dim=0, keepdim=True)).numpy()
    lim = max(float(np.abs(dev).max()), 1e-3)  # rounding noise of identical slots stays white
    im = ax.imshow(dev, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    mode = metrics.get("write_mode", "content")
    ax.set_title(f"Memory bank after the last task (with replay), each slot minus the mean slot\n{mode} writes: "
                 f"slots differ by up to {slot_spread(memory):.3g} (mean slot in "
                 f"[{float(m.mean(0).min()):.2f}, {float(m.mean(0).max()):.2f}])", fontweight="bold", fontsize=10)
    ax.set_xlabel("Memory dimension")
    ax.set_ylabel("Memory slot")
    fig.colorbar(im, ax=ax)

    ax = axes[0, 1]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    stages = np.arange(1, T + 1)
    for name, style, label in (("with_replay", "-", "replay"), ("without_replay", "--", "no replay")):
        E = runs[name]["error_matrix"]
        for j in range(T):
            xs = [t + 1 for t in range(j, T) if E[t][j] is not None]
            ys = [E[t][j] for t in range(j, T) if E[t][j] is not None]
            ax.plot(xs, ys, style, marker="o", color=colors[j % len(colors)], alpha=0.8,
                    label=f"task {j + 1}, {label}")
        mean_seen = [_mean(E[t][: t + 1]) for t in range(T)]
        ax.plot(stages, mean_seen, style, color="black", linewidth=2.5, label=f"mean over seen tasks, {label}")
    ax.set_title("Test error on every task after learning each task", fontweight="bold")
    ax.set_xlabel("After learning task")
    ax.set_ylabel("Test MSE")
    ax.set_xticks(stages)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)

    mats = {name: np.array([[np.nan if e is None else e for e in row] for row in runs[name]["error_matrix"]])
            for name in ("with_replay", "without_replay")}
    vmax = max(np.nanmax(m) for m in mats.values())
    for ax, (name, m) in zip(axes[1], mats.items()):
        im = ax.imshow(np.ma.masked_invalid(m), cmap="magma_r", vmin=0.0, vmax=vmax)
        r = runs[name]
        ax.set_title(f"Error matrix, {name.replace('_', ' ')}\n"
                     f"final mean {r['average_final_error']:.3f}, forgetting "
                     f"{_fmt(r['average_forgetting'])}", fontweight="bold")
        ax.set_xlabel("Evaluated on task")
        ax.set_ylabel("After learning task")
        ax.set_xticks(range(T), [str(j + 1) for j in range(T)])
        ax.set_yticks(range(T), [str(t + 1) for t in range(T)])
        if T <= 10:
            for t in range(T):
                for j in range(T):
                    if not math.isnan(m[t, j]):
                        ax.text(j, t, f"{m[t, j]:.3f}", ha="center", va="center", fontsize=8,
                                color="white" if m[t, j] > 0.6 * vmax else "black")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _fmt(x):
    return "n/a" if x is None else f"{x:.3f}"


def run_digits(args):
    """The digits experiment with the chosen fast agent; returns its results dict."""
    from .experiments import ablation_agent, run_digits_experiment

    config = _config(args)

    def agent_factory():
        return build_agent(args.agent, config, args.hidden, input_dim=64, write_mode=args.write_mode)

    def variant_factory(variant):
        kw = {} if args.episodic_size is None else {"episodic_size": args.episodic_size}
        return ablation_agent(variant, args.agent, args.hidden, config=config, **kw)

    return run_digits_experiment(args.out, seeds=tuple(args.seeds), epochs=args.epochs,
                                 train_per_task=args.train_per_task, test_per_task=args.test_per_task,
                                 agent_factory=agent_factory, hidden_dim=args.hidden, replay=args.agent,
                                 plot=not args.no_plot, verbose=True, ablation=args.ablation,
                                 variants=args.variants, variant_factory=variant_factory)


def main(argv=None):
    args = parse_args(argv)
    metrics = run_demo(args)
    if args.dataset == "digits":
        print(f"digits experiment, {args.agent} agent, seeds {args.seeds}: {metrics['seconds']:.1f} s")
        stem = "digits_ablation" if args.ablation else "digits_metrics"
        png = "digits_ablation.png" if args.ablation else "digits_continual.png"
        print(f"wrote {os.path.join(args.out, stem + '.json')}"
              + ("" if args.no_plot else f" and {os.path.join(args.out, png)}"))
        return 0
    print(f"agent: {args.agent}")
    for name, r in metrics["runs"].items():
        print(f"{name:15s} average final error {r['average_final_error']:.4f}  "
              f"average forgetting {_fmt(r['average_forgetting'])}  "
              f"after adaptation {_fmt(r['average_adapted_error'])}  ({r['wall_time_s']:.1f} s)")
    c = metrics.get("comparison")
    if c is not None:
        for name, r in metrics["reference_runs"].items():
            print(f"{name:15s} reference: average final error {r['average_final_error']:.4f}  "
                  f"({r['wall_time_s']:.1f} s)")
        print(f"training time, same work: {args.agent} {c['train_time_s']:.2f} s, reference "
              f"{c['reference_train_time_s']:.2f} s, {c['train_speedup']:.1f}x faster "
              f"(wall incl. evaluation: {c['wall_time_s']:.2f} s vs {c['reference_wall_time_s']:.2f} s, "
              f"{c['wall_speedup']:.1f}x)")
    print(f"wrote {os.path.join(args.out, 'metrics.json')}"
          + ("" if args.no_plot else f" and {os.path.join(args.out, 'neural_memory_results.png')}"))
    return 0
