"""`python -m neuralmem_fast train copy|recall|kv`: train memory models on the classic tasks and on a
key-value recall that needs capacity (kv).

    python -m neuralmem_fast train copy --model core,lstm --steps 20000 --out results/copy

trains each model in turn (same seed, same batches) with Adam and gradient
clipping, logs the loss and the bits wrong per sequence (means over the last
`--log-every` steps) against steps and wall time, and writes
OUT/<task>_metrics.json (curves, parameter counts, the first step and time at
which the bits wrong fell below `--threshold`) and OUT/<task>_curves.png.
`--model dnc` is the `dnc` package's DNC (pytorch-dnc), an optional peer:
skipped with a note when it does not import. The JSON and the PNG are
rewritten at every log point, so a run that is stopped keeps its curves.
"""
import argparse
import json
import math
import os
import time

import torch

from ..config import DEFAULT_SPARSE_EPS
from .memory_tasks import (TASKS, bits_wrong, build_model, dnc_package_available, param_count, sequence_loss,
                           task_sizes)

DEFAULT_THRESHOLD = {"copy": 0.1, "recall": 0.5, "kv": 0.5}


def _parser():
    p = argparse.ArgumentParser(prog="python -m neuralmem_fast train", description=__doc__.split("\n\n")[0])
    p.add_argument("task", choices=sorted(TASKS))
    p.add_argument("--model", default="core,lstm",
                   help="comma-separated: core, sparse (core with --sparse-k), lstm, dnc (default core,lstm)")
    p.add_argument("--memory-size", type=int, default=32, help="N slots")
    p.add_argument("--word-size", type=int, default=16, help="D, the slot width")
    p.add_argument("--num-reads", type=int, default=1)
    p.add_argument("--num-writes", type=int, default=1)
    p.add_argument("--hidden-size", type=int, default=64, help="the controller's LSTM units")
    p.add_argument("--alloc-topk", type=int, default=None, help="top-k allocation (default: exact sort)")
    p.add_argument("--sparse-k", type=int, default=8, help="sparse model: candidate slots per read head")
    p.add_argument("--index", default="auto", choices=["auto", "rows", "exact", "faiss"],
                   help="sparse model: how candidates are found (auto: exact over the rows written)")
    p.add_argument("--sparse-eps", type=float, default=DEFAULT_SPARSE_EPS,
                   help=f"sparse model: norm floor of its cosine (default {DEFAULT_SPARSE_EPS:g}; see "
                        "nn/sparse_access.py)")
    p.add_argument("--read-topk", type=int, default=None,
                   help="core model: each read head's weights restricted to its K best slots, as a sparse "
                        "read's (an ablation; default: the DNC's dense read)")
    p.add_argument("--write-topk", type=int, default=None,
                   help="core model: each write head's content weights restricted to its K best slots, as the "
                        "sparse model's content-keyed write (an ablation; default: the DNC's dense write)")
    p.add_argument("--allocation", default="usage", choices=["usage", "lru"],
                   help="core model: the DNC's allocation by usage (default) or the least recently used slot, "
                        "as the sparse model allocates (an ablation; needs --read-topk, and --write-topk or "
                        "--write-rule previous_reads)")
    p.add_argument("--write-rule", default=None, choices=["content", "previous_reads"],
                   help="core and sparse models: write by the write key's content (the core's default, the "
                        "DNC's) or to the previous step's reads (the sparse model's default, Sparse Access "
                        "Memory's rule); with the sparse model, content writes go to the write key's K "
                        "candidates")
    p.add_argument("--steps", type=int, default=10000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--clip", type=float, default=10.0, help="gradient-norm clipping")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-len", type=int, default=None, help="copy: longest sequence; recall, kv: most items")
    p.add_argument("--threshold", type=float, default=None, help="bits wrong per sequence to reach "
                   "(default: copy 0.1, recall 0.5)")
    p.add_argument("--stop-at-threshold", action="store_true", help="stop a model once it reaches the threshold")
    p.add_argument("--max-minutes", type=float, default=None, help="wall-time budget per model")
    p.add_argument("--eval-items", default=None,
                   help="kv, recall: after training, accuracy on sequences of exactly these numbers of items "
                        "(comma-separated, e.g. 4,16,64,256), 256 sequences each")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--out", default="results/train")
    p.add_argument("--no-progress", action="store_true")
    return p


def _batch_fn(args):
    gen_fn, kw = TASKS[args.task]
    kw = dict(kw)
    if args.max_len is not None:
        kw["max_len" if args.task == "copy" else "max_items"] = args.max_len
    return gen_fn, kw


def _threshold(args):
    return DEFAULT_THRESHOLD[args.task] if args.threshold is None else args.threshold


def train_one(kind, args, log=print):
    """Train one model; returns its record (curves and threshold crossing)."""
    gen_fn, kw = _batch_fn(args)
    n_in, n_out = task_sizes(args.task, kw)
    torch.manual_seed(args.seed)
    model = build_model(kind, n_in, n_out, args.memory_size, args.word_size, args.num_reads, args.num_writes,
                        args.hidden_size, args.alloc_topk, args.sparse_k, args.index, args.sparse_eps,
                        read_topk=args.read_topk if kind == "core" else None,
                        write_topk=args.write_topk if kind == "core" else None,
                        allocation=args.allocation if kind == "core" else "usage",
                        write_rule=args.write_rule if kind in ("core", "sparse") else None)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed + 1)
    threshold = _threshold(args)
    rec = {"model": kind, "params": param_count(model), "steps": [], "wall_s": [], "loss": [], "bits_wrong": [],
           "threshold": threshold, "reached_step": None, "reached_wall_s": None}
    try:
        from tqdm import tqdm
        bar = tqdm(total=args.steps, desc=f"{args.task}/{kind}", disable=args.no_progress, mininterval=2.0)
    except ImportError:  # tqdm is an apps dependency; train without a bar when it is missing
        bar = None
    win_loss, win_bits, t0 = [], [], time.perf_counter()
    for step in range(1, args.steps + 1):
        x, target, mask = gen_fn(args.batch_size, generator=gen, **kw)
        y, _ = model(x)
        loss = sequence_loss(y, target, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        win_loss.append(loss.item())
        win_bits.append(bits_wrong(y, target, mask))
        if bar is not None:
            bar.update(1)
        if not math.isfinite(win_loss[-1]):
            log(f"{kind}: loss is not finite at step {step}; stopping this model")
            break
        if step % args.log_every == 0 or step == args.steps:
            wall = time.perf_counter() - t0
            rec["steps"].append(step)
            rec["wall_s"].append(wall)
            rec["loss"].append(sum(win_loss) / len(win_loss))
            rec["bits_wrong"].append(sum(win_bits) / len(win_bits))
            win_loss, win_bits = [], []
            if bar is not None:
                bar.set_postfix(loss=f"{rec['loss'][-1]:.3f}", bits=f"{rec['bits_wrong'][-1]:.3f}")
            if rec["reached_step"] is None and rec["bits_wrong"][-1] < threshold:
                rec["reached_step"], rec["reached_wall_s"] = step, wall
                if args.stop_at_threshold:
                    break
            yield rec
            if args.max_minutes is not None and wall > 60 * args.max_minutes:
                log(f"{kind}: wall-time budget of {args.max_minutes} min spent at step {step}")
                break
    if bar is not None:
        bar.close()
    if args.task in ("kv", "recall") and args.eval_items:
        rec["capacity"] = evaluate_capacity(model, kw, [int(v) for v in args.eval_items.split(",")], args.seed,
                                            task=args.task)
    yield rec


@torch.no_grad()
def evaluate_capacity(model, kw, items, seed, sequences=256, batch=64, task="kv"):
    """kv or recall: per number of stored items n, the fraction of answer bits right and of answer steps
    with every bit right (kv: queries answered exactly), over `sequences` fresh sequences of exactly n
    items. Numbers of items beyond those trained on test how far the learned access generalizes, and
    where a dense memory runs out of slots (recall writes about item_len + 1 rows per item)."""
    gen = torch.Generator().manual_seed(seed + 7)
    out = {}
    for n in items:
        kwn = dict(kw, min_items=n, max_items=n)
        right = exact = total = 0
        for _ in range(max(1, sequences // batch)):
            x, target, mask = TASKS[task][0](batch, generator=gen, **kwn)
            y, _ = model(x)
            ok = ((y > 0).to(target.dtype) == target)[mask.bool()]
            right += int(ok.sum())
            exact += int(ok.all(dim=-1).sum())
            total += ok.shape[0]
        out[str(n)] = {"bit_accuracy": right / (total * target.shape[-1]), "query_accuracy": exact / total}
    return out


def plot(result, path):
    """Loss and bits wrong per sequence against steps and against wall time, one line per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for rec in result["models"]:
        label = f"{rec['model']} ({rec['params']} params)"
        for row, key in enumerate(("loss", "bits_wrong")):
            axes[row, 0].plot(rec["steps"], rec[key], label=label)
            axes[row, 1].plot(rec["wall_s"], rec[key], label=label)
    for row, key in enumerate(("loss (nats per sequence)", "bits wrong per sequence")):
        for col, xl in enumerate(("training step", "wall time (s)")):
            ax = axes[row, col]
            ax.set_xlabel(xl)
            ax.set_ylabel(key)
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
    axes[1, 0].axhline(result["threshold"], color="k", ls=":", lw=1)
    axes[1, 1].axhline(result["threshold"], color="k", ls=":", lw=1)
    axes[0, 0].legend()
    import textwrap
    fig.suptitle("\n".join(textwrap.wrap(f"{result['task']}: {result['settings']}", 160)), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None):
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    kinds = [k.strip() for k in args.model.split(",") if k.strip()]
    for k in kinds:
        if k not in ("core", "sparse", "lstm", "dnc"):
            raise SystemExit(f"unknown model {k!r}: use core, sparse, lstm or dnc")
    for flag, given in (("--read-topk", args.read_topk is not None), ("--write-topk", args.write_topk is not None),
                        ("--allocation", args.allocation != "usage")):
        if given and "core" not in kinds:
            raise SystemExit(f"{flag} applies to the core model only: add core to --model")
    if args.write_rule is not None and not {"core", "sparse"} & set(kinds):
        raise SystemExit("--write-rule applies to the core and sparse models only: add one to --model")
    _, kw = _batch_fn(args)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "no_progress", "model")}
    settings.update(kw)
    result = {"task": args.task, "settings": settings, "threshold": _threshold(args), "models": [], "skipped": {}}
    json_path = os.path.join(args.out, f"{args.task}_metrics.json")
    png_path = os.path.join(args.out, f"{args.task}_curves.png")

    def save():
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
        try:
            plot(result, png_path)
        except ImportError:
            pass

    for kind in kinds:
        if kind == "dnc" and not dnc_package_available():
            result["skipped"]["dnc"] = "the dnc package (pytorch-dnc) is not installed or does not import"
            print("dnc: skipped (the dnc package does not import)")
            continue
        result["models"].append(None)
        for i, rec in enumerate(train_one(kind, args)):
            result["models"][-1] = rec
            if i % 10 == 0:
                save()
        save()
        r = result["models"][-1]
        reached = (f"reached {r['threshold']} bits wrong at step {r['reached_step']} "
                   f"({r['reached_wall_s']:.0f} s)" if r["reached_step"] else "did not reach the threshold")
        last = f"last: loss {r['loss'][-1]:.3f}, bits wrong {r['bits_wrong'][-1]:.3f}" if r["loss"] else ""
        print(f"{args.task}/{kind}: {r['params']} params, {reached}; {last}")
    save()
    print(f"wrote {json_path} and {png_path}")
    return 0
