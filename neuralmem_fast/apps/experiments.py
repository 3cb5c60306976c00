"""Continual learning on real data: Split-Digits and Permuted-Digits.

Data: scikit-learn's bundled 8x8 handwritten digits (1797 images, no
download), pixels scaled to [-1, 1], a stratified 75/25 train/test split
drawn per seed. The 64 pixels are the agent's 64 inputs; the target is the
one-hot class in the first 10 of the 64 outputs (zeros elsewhere), learned
with the agent's MSE train_step, one sample per step as in the seed.

* Split-Digits: 5 tasks of two classes each ({0,1}, {2,3}, ..., {8,9}).
  Accuracy is task-incremental: the argmax over the two classes of the task
  being tested (the task identity is known at test time). The class-
  incremental accuracy (argmax over all 10 outputs) is recorded as well.
* Permuted-Digits: 5 tasks, all 10 classes, each task a fixed random
  permutation of the pixels (task 1 is the identity); 10-way accuracy.

Metrics (Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual
Learning", NeurIPS 2017): R[i, j] is the test accuracy on task j after
training on tasks 0..i; with T tasks,
  ACC = 1/T sum_j R[T-1, j]
  BWT = 1/(T-1) sum_{j<T-1} (R[T-1, j] - R[j, j])     (negative = forgetting)
  FWT = 1/(T-1) sum_{j>0} (R[j-1, j] - b_j), b_j the accuracy of the untrained agent.
Each condition (benchmark x replay on/off) runs over several seeds; the JSON
holds every run's matrix and the mean and standard deviation of each metric.

Ablation (`ablation=True`, CLI `demo --dataset digits --ablation`): does the
agent's memory carry information? Each benchmark, with and without replay,
for the memory variants of `ABLATION_VARIANTS`: the fast agent with
allocation writes (its default), with reads replaced by zeros (no writes:
the memory stays zero, so every read is exactly zero), with the tutorial's
content-addressed writes (uniform from the zero memory), and the same agent
plus an episodic memory of (input, target) pairs read by content
(`models.episodic.EpisodicAgent`), written by allocation or by the
tutorial's addressing. Each ablation run also records ACC_memory_zeroed: the
trained agent's final ACC with its memory bank (the episodic one for the
episodic variants) zeroed at test time, i.e. how much its predictions depend
on what the memory holds. Written to digits_ablation.json and
digits_ablation.png.
"""
import json
import os
import time

import numpy as np
import torch

__all__ = ["load_digits_tasks", "gem_metrics", "run_digits_experiment", "ABLATION_VARIANTS", "ablation_agent"]

NUM_TASKS = 5
NUM_CLASSES = 10


def load_digits_tasks(benchmark, seed, train_per_task=None, test_per_task=None):
    """Tasks as a list of dicts: x_train, y_train, x_test, y_test (tensors), classes."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    X = torch.tensor(digits.data, dtype=torch.float32) / 8.0 - 1.0
    y = torch.tensor(digits.target, dtype=torch.long)
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for c in range(NUM_CLASSES):
        idx = rng.permutation(np.flatnonzero(digits.target == c))
        n_test = len(idx) // 4
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    tasks = []
    if benchmark == "split":
        for t in range(NUM_TASKS):
            classes = [2 * t, 2 * t + 1]
            tr = rng.permutation(np.concatenate([train_idx[c] for c in classes]))
            te = np.concatenate([test_idx[c] for c in classes])
            tasks.append(_task(X[tr], y[tr], X[te], y[te], classes, train_per_task, test_per_task))
    elif benchmark == "permuted":
        tr_all = rng.permutation(np.concatenate(train_idx))
        te_all = np.concatenate(test_idx)
        for t in range(NUM_TASKS):
            perm = torch.arange(64) if t == 0 else torch.from_numpy(rng.permutation(64))
            tr = rng.permutation(tr_all)
            tasks.append(_task(X[tr][:, perm], y[tr], X[te_all][:, perm], y[te_all], list(range(NUM_CLASSES)),
                               train_per_task, test_per_task))
    else:
        raise ValueError(f"benchmark must be 'split' or 'permuted', got {benchmark!r}")
    return tasks


def _task(x_tr, y_tr, x_te, y_te, classes, n_train, n_test):
    if n_train is not None:
        x_tr, y_tr = x_tr[:n_train], y_tr[:n_train]
    if n_test is not None:
        x_te, y_te = x_te[:n_test], y_te[:n_test]
    return {"x_train": x_tr, "y_train": y_tr, "x_test": x_te, "y_test": y_te, "classes": classes}


def _targets(y, dim=64):
    t = torch.zeros(len(y), dim)
    t[torch.arange(len(y)), y] = 1.0
    return t


def _accuracy(agent, task):
    out = agent.predict(task["x_test"])[:, :NUM_CLASSES]
    classes = torch.tensor(task["classes"])
    task_il = classes[out[:, classes].argmax(dim=1)]
    class_il = out.argmax(dim=1)
    y = task["y_test"]
    return (task_il == y).float().mean().item(), (class_il == y).float().mean().item()


def gem_metrics(R, baseline=None):
    """ACC, BWT (and FWT given the untrained accuracies) of an accuracy matrix R[i, j]."""
    R = np.asarray(R, dtype=float)
    T = R.shape[0]
    out = {"ACC": float(R[-1].mean()),
           "BWT": float(np.mean([R[-1, j] - R[j, j] for j in range(T - 1)])) if T > 1 else 0.0}
    if baseline is not None and T > 1:
        out["FWT"] = float(np.mean([R[j - 1, j] - baseline[j] for j in range(1, T)]))
    return out


def run_condition(tasks, make, use_replay, epochs, seed, return_agent=False):
    """Trains one agent through the tasks; returns the task-IL and class-IL matrices
    and the untrained accuracies (and the trained agent with return_agent)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    agent = make()
    T = len(tasks)
    base = [_accuracy(agent, t)[0] for t in tasks]
    R, R_class = np.zeros((T, T)), np.zeros((T, T))
    gen = torch.Generator().manual_seed(seed)
    for i, task in enumerate(tasks):
        x, y = task["x_train"], _targets(task["y_train"])
        for _ in range(epochs):
            for k in torch.randperm(len(x), generator=gen).tolist():
                agent.train_step(x[k], y[k], use_replay=use_replay and i > 0)
        for j, other in enumerate(tasks):
            R[i, j], R_class[i, j] = _accuracy(agent, other)
    if return_agent:
        return R, R_class, base, agent
    return R, R_class, base


def _acc_memory_zeroed(agent, tasks):
    """Final task-IL accuracy over the tasks with the agent's memory bank zeroed
    (every read then exactly zero), memory and usage restored after: how much
    the trained agent's predictions depend on what its memory holds."""
    bank = agent.memory_bank
    state = bank.snapshot()
    try:
        bank.reset()
        return float(np.mean([_accuracy(agent, t)[0] for t in tasks]))
    finally:
        bank.restore(state)


def _summary(values):
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "runs": a.tolist()}


ABLATION_VARIANTS = {
    "memory": "agent's memory, allocation writes (the default)",
    "zero_reads": "reads replaced by zeros (no writes)",
    "uniform_writes": "the tutorial's content writes (uniform)",
    "episodic": "+ episodic memory of (x, y), allocation writes",
    "episodic_uniform": "+ episodic memory of (x, y), the tutorial's writes",
}


def ablation_agent(variant, replay="batched", hidden_dim=128, config=None, episodic_size=2048,
                   episodic_strength=50.0):
    """A fresh agent for one variant of ABLATION_VARIANTS."""
    from ..models import make_agent
    from ..models.episodic import EpisodicAgent

    if variant not in ABLATION_VARIANTS:
        raise ValueError(f"variant must be one of {sorted(ABLATION_VARIANTS)}, got {variant!r}")
    mode = {"zero_reads": "none", "uniform_writes": "content"}.get(variant, "allocation")
    agent = make_agent(replay, input_dim=64, hidden_dim=hidden_dim, config=config, write_mode=mode)
    if variant.startswith("episodic"):
        agent = EpisodicAgent(agent, input_dim=64, target_dim=NUM_CLASSES, memory_size=episodic_size,
                              strength=episodic_strength,
                              write_mode="content" if variant == "episodic_uniform" else "allocation")
    return agent


def _run_seeds(bench, seeds, factory, use_replay, epochs, train_per_task, test_per_task, zeroed=False):
    """One condition over `seeds`: the metrics' summaries and every run's matrices.
    zeroed: also ACC_memory_zeroed, the final ACC with the memory zeroed at test time."""
    mats, mats_class, runs = [], [], {"ACC": [], "BWT": [], "FWT": [], "ACC_class_il": [], "BWT_class_il": []}
    if zeroed:
        runs["ACC_memory_zeroed"] = []
    t0 = time.perf_counter()
    for s in seeds:
        tasks = load_digits_tasks(bench, s, train_per_task, test_per_task)
        R, Rc, base, agent = run_condition(tasks, factory, use_replay, epochs, s, return_agent=True)
        if zeroed:
            runs["ACC_memory_zeroed"].append(_acc_memory_zeroed(agent, tasks))
        m, mc = gem_metrics(R, base), gem_metrics(Rc)
        for k in ("ACC", "BWT", "FWT"):
            runs[k].append(m[k])
        runs["ACC_class_il"].append(mc["ACC"])
        runs["BWT_class_il"].append(mc["BWT"])
        mats.append(R.tolist())
        mats_class.append(Rc.tolist())
    entry = {k: _summary(v) for k, v in runs.items()}
    entry["R_mean"] = np.mean(mats, axis=0).tolist()
    entry["R_runs"] = mats
    entry["R_class_il_runs"] = mats_class
    entry["seconds"] = time.perf_counter() - t0
    return entry


def _print_entry(name, entry):
    z = entry.get("ACC_memory_zeroed")
    print(f"{name:36s} ACC {entry['ACC']['mean']:.3f} +- {entry['ACC']['std']:.3f}   "
          f"BWT {entry['BWT']['mean']:+.3f} +- {entry['BWT']['std']:.3f}   "
          + ("" if z is None else f"memory zeroed at test: ACC {z['mean']:.3f} +- {z['std']:.3f}   ")
          + f"({entry['seconds']:.1f} s)", flush=True)


def run_digits_experiment(out_dir="results", seeds=(0, 1, 2), benchmarks=("split", "permuted"), epochs=1,
                          train_per_task=300, test_per_task=None, agent_factory=None, hidden_dim=128,
                          replay="batched", plot=True, verbose=True, ablation=False, variants=None,
                          variant_factory=None):
    """Runs every benchmark with and without replay over `seeds`; writes JSON and PNG.

    agent_factory: a callable returning a fresh agent with train_step(x, y,
    use_replay) and predict(xs); default: the fast agent (make_agent(replay)).
    Returns the results dict that is written to out_dir/digits_metrics.json.

    ablation=True runs the memory variants instead (`variants`, default all of
    ABLATION_VARIANTS; `variant_factory(variant)` builds an agent, default
    `ablation_agent(variant, replay, hidden_dim)`); conditions are named
    "bench/replay|no_replay/variant"; writes digits_ablation.json and .png.
    """
    if ablation:
        return _run_ablation(out_dir, seeds, benchmarks, epochs, train_per_task, test_per_task, hidden_dim, replay,
                             plot, verbose, variants, variant_factory)
    if agent_factory is None:
        from ..models import make_agent

        def agent_factory():
            return make_agent(replay, input_dim=64, hidden_dim=hidden_dim)

    os.makedirs(out_dir, exist_ok=True)
    results = {"config": {"seeds": list(seeds), "epochs": epochs, "train_per_task": train_per_task,
                          "test_per_task": test_per_task, "hidden_dim": hidden_dim, "replay": replay,
                          "tasks": NUM_TASKS, "metric_definitions": "GEM (Lopez-Paz & Ranzato, 2017)",
                          "split_accuracy": "task-incremental (argmax over the task's two classes)"},
               "conditions": {}}
    t_start = time.perf_counter()
    for bench in benchmarks:
        for use_replay in (False, True):
            name = f"{bench}/{'replay' if use_replay else 'no_replay'}"
            entry = _run_seeds(bench, seeds, agent_factory, use_replay, epochs, train_per_task, test_per_task)
            results["conditions"][name] = entry
            if verbose:
                _print_entry(name, entry)
    results["seconds"] = time.perf_counter() - t_start
    with open(os.path.join(out_dir, "digits_metrics.json"), "w") as f:
        json.dump(results, f, indent=1)
    if plot:
        _plot(results, os.path.join(out_dir, "digits_continual.png"))
    return results


def _run_ablation(out_dir, seeds, benchmarks, epochs, train_per_task, test_per_task, hidden_dim, replay, plot,
                  verbose, variants, variant_factory):
    variants = list(ABLATION_VARIANTS if variants is None else variants)
    for v in variants:
        if v not in ABLATION_VARIANTS:
            raise ValueError(f"variants must be among {sorted(ABLATION_VARIANTS)}, got {v!r}")
    if variant_factory is None:
        def variant_factory(variant):
            return ablation_agent(variant, replay, hidden_dim)

    os.makedirs(out_dir, exist_ok=True)
    results = {"config": {"seeds": list(seeds), "epochs": epochs, "train_per_task": train_per_task,
                          "test_per_task": test_per_task, "hidden_dim": hidden_dim, "replay": replay,
                          "tasks": NUM_TASKS, "metric_definitions": "GEM (Lopez-Paz & Ranzato, 2017)",
                          "split_accuracy": "task-incremental (argmax over the task's two classes)",
                          "torch_threads": torch.get_num_threads(),
                          "variants": {v: ABLATION_VARIANTS[v] for v in variants},
                          "episodic_size": _episodic_size(variant_factory, variants)},
               "conditions": {}}
    t_start = time.perf_counter()
    for bench in benchmarks:
        for use_replay in (False, True):
            for v in variants:
                name = f"{bench}/{'replay' if use_replay else 'no_replay'}/{v}"
                entry = _run_seeds(bench, seeds, lambda v=v: variant_factory(v), use_replay, epochs,
                                   train_per_task, test_per_task, zeroed=True)
                results["conditions"][name] = entry
                if verbose:
                    _print_entry(name, entry)
    results["seconds"] = time.perf_counter() - t_start
    with open(os.path.join(out_dir, "digits_ablation.json"), "w") as f:
        json.dump(results, f, indent=1)
    if plot:
        _plot_ablation(results, os.path.join(out_dir, "digits_ablation.png"))
    return results


def _episodic_size(factory, variants):
    """The episodic memory's slots in this run (None without an episodic variant)."""
    v = next((v for v in variants if v.startswith("episodic")), None)
    if v is None:
        return None
    bank = getattr(factory(v), "memory_bank", None)
    return None if bank is None else bank.memory_size


def _plot_ablation(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conds = results["conditions"]
    variants = list(results["config"]["variants"])
    benches = list(dict.fromkeys(k.split("/")[0] for k in conds))
    fig, axes = plt.subplots(len(benches), 2, figsize=(12, 3.8 * len(benches)), squeeze=False)
    width = 0.8 / len(variants)
    for b_i, bench in enumerate(benches):
        for m_i, metric in enumerate(("ACC", "BWT")):
            ax = axes[b_i, m_i]
            for v_i, v in enumerate(variants):
                es = [conds[f"{bench}/{rep}/{v}"][metric] for rep in ("no_replay", "replay")]
                x = np.arange(2) + (v_i - (len(variants) - 1) / 2) * width
                ax.bar(x, [e["mean"] for e in es], width, yerr=[e["std"] for e in es], capsize=3,
                       label=results["config"]["variants"][v])
            ax.axhline(0, color="k", lw=0.8)
            ax.set_xticks([0, 1], ["no replay", "replay"])
            ax.set_ylabel(metric)
            if metric == "ACC":
                ax.set_ylim(0, 1.05)
            ax.set_title(f"{bench.capitalize()}-Digits: {metric}, mean +- std over "
                         f"{len(results['config']['seeds'])} seeds")
            ax.grid(alpha=0.3, axis="y")
    axes[0, 0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conds = results["conditions"]
    benches = sorted({k.split("/")[0] for k in conds}, key=["split", "permuted"].index)
    fig, axes = plt.subplots(1, 1 + len(benches), figsize=(5 * (1 + len(benches)), 4.2))
    ax = axes[0]
    width = 0.2
    labels = []
    for b_i, bench in enumerate(benches):
        for r_i, rep in enumerate(("no_replay", "replay")):
            e = conds[f"{bench}/{rep}"]
            x = np.array([0, 1]) + (2 * b_i + r_i - 1.5) * width
            ax.bar(x, [e["ACC"]["mean"], e["BWT"]["mean"]], width,
                   yerr=[e["ACC"]["std"], e["BWT"]["std"]], capsize=3,
                   label=f"{bench}, {rep.replace('_', ' ')}")
        labels.append(bench)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks([0, 1], ["ACC", "BWT"])
    ax.set_title(f"GEM metrics, mean +- std over {len(results['config']['seeds'])} seeds")
    ax.legend(fontsize=8)
    for b_i, bench in enumerate(benches):
        ax = axes[1 + b_i]
        for rep, color in (("no_replay", "C0"), ("replay", "C3")):
            R = np.array(conds[f"{bench}/{rep}"]["R_mean"])
            T = R.shape[0]
            ax.plot(range(1, T + 1), R[-1], "-", color=color, marker="o",
                    label=f"{rep.replace('_', ' ')}: after the last task")
            ax.plot(range(1, T + 1), np.diag(R), ":", color=color, marker="x", alpha=0.6,
                    label=f"{rep.replace('_', ' ')}: right after learning it")
        ax.set_xticks(range(1, T + 1))
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("task")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{bench.capitalize()}-Digits")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------
# timing the seed's demo workload (an ad-hoc measurement, not a test)
# --------------------------------------------------------------------------
class _NullBank(torch.nn.Module):
    """A bank that costs nothing (reads zeros, ignores writes): the floor for drop-in banks."""

    def __init__(self, config):
        super().__init__()
        self.size = config.num_read_heads * config.memory_dim
        self.register_buffer("memory", torch.zeros(config.memory_size, config.memory_dim))

    def read(self, read_keys, read_strengths):
        return read_keys.new_zeros(self.size)

    def write(self, *args):
        pass


def time_demo_workload(seed_module, kinds=("seed", "seed+fast-bank", "sequential", "batched"), num_tasks=4,
                       epochs=20, samples=50, buffer_factory=None, threads=1, verbose=True):
    """Seconds of training (train_step calls) for the seed's demo work, per agent kind.

    Kinds: "seed" (the seed's agent), "seed+fast-bank" (the seed's agent with
    this package's NeuralMemoryBank), "seed+null-bank" (a bank that costs
    nothing: the floor for any drop-in bank), "reference" (the package's
    faithful reference agent), "sequential" and "batched" (the fast agent). The kinds run interleaved epoch by epoch, so that load on a
    shared machine falls on all of them alike. buffer_factory(kind) may supply
    a replay buffer for the fast agent.
    """
    from ..models import FastAgent
    from ..nn import NeuralMemoryBank

    n_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)

    def make(kind):
        torch.manual_seed(0)
        np.random.seed(0)
        if kind == "reference":
            from ..models.tutorial_reference import ContinualLearningAgent as ReferenceAgent

            return ReferenceAgent()
        if kind.startswith("seed"):
            agent = seed_module.ContinualLearningAgent()
            if kind == "seed+fast-bank":
                agent.memory_bank = NeuralMemoryBank(agent.config)
            elif kind == "seed+null-bank":
                agent.memory_bank = _NullBank(agent.config)
            return agent
        buf = buffer_factory(kind) if buffer_factory is not None else None
        return FastAgent(replay=kind, replay_buffer=buf, seed_compat=True)  # the seed's writes: the same work

    try:
        agents = {k: make(k) for k in kinds}
        seconds = {k: 0.0 for k in kinds}
        for t in range(num_tasks):
            data = seed_module.create_task_data(t, num_samples=samples)
            for _ in range(epochs):
                for k, agent in agents.items():
                    t0 = time.perf_counter()
                    for x, y in data:
                        agent.train_step(x, y, use_replay=t > 0)
                    seconds[k] += time.perf_counter() - t0
            if verbose:
                print(f"task {t + 1}: " + "  ".join(f"{k} {s:.1f}s" for k, s in seconds.items()), flush=True)
        errors = {k: [a.evaluate(seed_module.create_task_data(j, 20)) for j in range(num_tasks)]
                  for k, a in agents.items()}
    finally:
        torch.set_num_threads(n_threads)
    base = seconds.get("seed")
    return {k: {"seconds": s, "speedup_vs_seed": (base / s if base else None), "final_errors": errors[k]}
            for k, s in seconds.items()}
