"""The measured table behind backend="auto" on GPUs, built from a benchmark run.

    python -m neuralmem_fast bench --gpu [--write-table]     # measure, then write <out>/autotune_table.json
    python -m neuralmem_fast autotune BENCH_JSON [--out PATH] [--install]
    python -m neuralmem_fast autotune --show [--table PATH]

`build_table` is a pure function from a pytest-benchmark JSON (the dict that
`bench --gpu` saves as bench.json) to the table that ops.dispatch.resolve()
reads. How a choice is made, so that it can be checked against the medians
the table records next to it:

- Rows: memory-op rows (benchmarks/test_bench_ops.py) of a non-CPU device
  whose extra_info "op" is one of the ops that resolve() is asked about
  (the public ops of ops.registry) and whose provider is a candidate backend ("cuda",
  "triton"). The torch reference, torch.compile, the seed and the floor are
  not candidates: `auto` chooses between our kernels.
- Mode: resolve() does not know whether a backward will follow, and the
  backward runs on the backend the forward chose. The forward+backward rows
  decide where there are any for that op and N (training runs both);
  otherwise the forward rows (the in-place ops have only those). Where the
  forward alone would have chosen otherwise, the decision says so.
- Batch: resolve() keys on N only. At one (op, N) the candidates are
  compared on the batch sizes B that every one of them measured, by the
  geometric mean of their medians over those B (each B weighs the same in
  ratio terms). A backend with no row at an (op, N) is not a candidate
  there; if the candidates share no B, that N is left undecided (and said
  so). Equal scores go to the earlier candidate ("cuda").
- Runs: over the decided N in increasing order, consecutive equal choices
  merge into [max_n, backend] with max_n the largest N of the run; the last
  run's max_n is None, so any N above the largest measured one keeps the
  choice made there. Between two measured sizes, the larger one's choice
  applies.

The file written is {device_type: {op: [[max_n, backend], ...]}, "_meta": {...}}:
the layout that ops.dispatch._from_table reads, plus "_meta" (card, versions,
dates, command, and per decision the medians it rests on), which no device
lookup ever reaches.
"""
import argparse
import datetime
import json
import math
import os
import statistics
import sys
from collections import defaultdict

SCHEMA = 1
CANDIDATES = ("cuda", "triton")
MODES = ("fwd+bwd", "fwd")  # preferred first
TABLE_NAME = "autotune_table.json"


def _public_ops():
    from ..ops.registry import public_ops

    return public_ops()


class TableError(ValueError):
    """A bench JSON (or table) that cannot give a table; the message names the file."""


# --------------------------------------------------------------------------
# rows of a bench JSON
# --------------------------------------------------------------------------
def _device_of(bench, info):
    dev = info.get("device")
    if dev:
        return str(dev)
    group = str(bench.get("group") or "")
    # The suites mark non-CPU groups with a "[device]" suffix.
    if group.endswith("]") and "[" in group:
        return group[group.rindex("[") + 1:-1]
    return "cpu"


def gpu_rows(data, candidates=CANDIDATES):
    """The rows that count, as dicts (device, op, mode, N, B, provider, median)."""
    rows = []
    for bench in data.get("benchmarks") or []:
        info = bench.get("extra_info") or {}
        median = (bench.get("stats") or {}).get("median")
        op, prov = info.get("op"), info.get("provider")
        if median is None or op not in _public_ops() or prov not in candidates:
            continue
        dev = _device_of(bench, info)
        if dev == "cpu" or info.get("N") is None:
            continue
        rows.append(dict(device=dev, op=op, mode=str(info.get("mode", "fwd")), N=int(info["N"]),
                         B=int(info.get("B", 1)), provider=prov, median=float(median)))
    return rows


def compress(decisions):
    """[(n, backend), ...] in any order -> [[max_n, backend], ...], the last max_n None."""
    runs = []
    for n, backend in sorted(decisions):
        if runs and runs[-1][1] == backend:
            runs[-1][0] = n
        else:
            runs.append([n, backend])
    if runs:
        runs[-1][0] = None
    return runs


def _geomean(xs):
    # A zero median (a timer that could not resolve the call) has no logarithm.
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if all(x > 0 for x in xs) else min(xs)


def _decide(rows, candidates):
    """One (op, N, mode): {choice, B, median_s, score_s} or {skipped: reason}."""
    medians = defaultdict(lambda: defaultdict(list))  # provider -> B -> medians (re-runs)
    for r in rows:
        medians[r["provider"]][r["B"]].append(r["median"])
    provs = [p for p in candidates if p in medians]
    common = sorted(set.intersection(*(set(medians[p]) for p in provs)))
    if not common:
        return {"skipped": "the backends measured here share no batch size: "
                           + ", ".join(f"{p} B={sorted(medians[p])}" for p in provs)}
    per_b = {p: {str(b): statistics.median(medians[p][b]) for b in common} for p in provs}
    score = {p: _geomean(list(per_b[p].values())) for p in provs}
    choice = min(provs, key=lambda p: (score[p], candidates.index(p)))
    return {"choice": choice, "B": common, "median_s": per_b, "score_s": score}


def decide(rows, candidates=CANDIDATES):
    """{device: {op: [decision, ...]}} over the measured N of each op, in increasing N."""
    by_key = defaultdict(list)
    for r in rows:
        by_key[(r["device"], r["op"], r["N"], r["mode"])].append(r)
    out = defaultdict(dict)
    ops = sorted({(r["device"], r["op"]) for r in rows})
    for dev, op in ops:
        decisions = []
        for n in sorted({r["N"] for r in rows if (r["device"], r["op"]) == (dev, op)}):
            modes = [m for m in MODES if (dev, op, n, m) in by_key]
            if not modes:  # a mode this module does not know: not a basis for a choice
                continue
            d = {"N": n, "mode": modes[0], **_decide(by_key[(dev, op, n, modes[0])], candidates)}
            if len(modes) > 1 and "choice" in d:
                other = _decide(by_key[(dev, op, n, modes[1])], candidates)
                if other.get("choice") not in (None, d["choice"]):
                    d[f"{modes[1]}_alone_would_choose"] = other["choice"]
            decisions.append(d)
        out[dev][op] = decisions
    return dict(out)


# --------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------
def environment():
    """Versions and card of the process building the table."""
    env = {"torch": None, "triton": None, "cuda": None, "card": None}
    try:
        import torch

        env["torch"] = torch.__version__
        env["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            env["card"] = torch.cuda.get_device_name(0)
    except Exception:  # the table can be built from a JSON without a working torch
        pass
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        pass
    return env


def build_table(data, source="bench.json", candidates=CANDIDATES, bench_command=None, env=None, now=None):
    """The table (a JSON-ready dict) from a pytest-benchmark JSON dict; raises TableError naming `source`."""
    if not isinstance(data, dict):
        raise TableError(f"{source}: not a pytest-benchmark JSON object (got {type(data).__name__})")
    try:
        rows = gpu_rows(data, candidates)
    except (TypeError, ValueError, AttributeError) as exc:
        raise TableError(f"{source}: a benchmark row is malformed ({type(exc).__name__}: {exc})") from exc
    if not rows:
        raise TableError(
            f"{source}: no GPU rows to build a table from: none of its {len(data.get('benchmarks') or [])} "
            f"benchmarks is a memory op ({', '.join(_public_ops())}) measured on a non-CPU device with provider "
            f"{' or '.join(repr(c) for c in candidates)}; write it with `python -m neuralmem_fast bench --gpu` "
            "on a machine with a GPU")
    decisions = decide(rows, candidates)
    table = {}
    for dev, ops in decisions.items():
        for op, ds in ops.items():
            runs = compress([(d["N"], d["choice"]) for d in ds if "choice" in d])
            if runs:
                table.setdefault(dev, {})[op] = runs
    if not table:
        raise TableError(f"{source}: GPU rows are there but no N could be decided (see the reasons: "
                         f"{json.dumps(decisions)[:500]})")
    env = environment() if env is None else env
    info = ((data.get("machine_info") or {}).get("neuralmem") or {})
    meta = {
        "schema": SCHEMA,
        # The bench run's own record of its card and torch comes first: the
        # table may be rebuilt later from its JSON, elsewhere.
        "card": info.get("cuda_device") or env.get("card") or "unknown",
        "torch": info.get("torch") or env.get("torch"),
        "triton": info.get("triton") or env.get("triton"),
        "cuda": env.get("cuda"),
        # Versions of the process that built this file; the fields above
        # fall back to them where the bench JSON does not record its own.
        "built_with": {k: env.get(k) for k in ("torch", "triton", "cuda")},
        "measured": info.get("date") or data.get("datetime"),
        "built": (now or datetime.datetime.now(datetime.timezone.utc)).strftime("%Y-%m-%d %H:%M UTC"),
        "bench_json": os.path.basename(str(source)),
        "bench_command": bench_command,
        "quick": info.get("quick"),
        "candidates": list(candidates),
        "rule": ("per op and measured N: the forward+backward rows where present, else the forward rows; "
                 "the candidate with the lowest geometric mean of medians over the batch sizes all "
                 "candidates measured; [max_n, backend] runs, the last with max_n null (any larger N)"),
        "decisions": decisions,
    }
    table["_meta"] = meta
    return table


def load_json(path, what="bench JSON"):
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as exc:
        raise TableError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise TableError(f"{path}: not valid JSON ({exc})") from exc


def write_table(table, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return path


def install_table(table, path=None):
    """Writes the table where backend='auto' reads it first (`path`, default the
    user's table, ops.dispatch.user_table_path()) and reloads it."""
    from ..ops import dispatch

    path = path or dispatch.user_table_path()
    write_table(table, path)
    dispatch.reload_table()
    return path


def table_from_bench(json_path, out_path=None, install=False, bench_command=None):
    """bench.json -> the table written to out_path (default: beside the JSON); returns (table, paths)."""
    table = build_table(load_json(json_path), source=json_path, bench_command=bench_command)
    out_path = out_path or os.path.join(os.path.dirname(os.path.abspath(json_path)), TABLE_NAME)
    paths = [write_table(table, out_path)]
    if install:
        paths.append(install_table(table))
    return table, paths


def describe_runs(runs):
    parts, lo = [], None
    for max_n, backend in runs:
        if max_n is None:
            parts.append(f"{backend} for every N" if lo is None else f"{backend} for N > {lo}")
        else:
            parts.append(f"{backend} for N <= {max_n}" if lo is None else f"{backend} for {lo} < N <= {max_n}")
        lo = max_n
    return ", ".join(parts)


def format_table(table):
    """Readable lines: where the table comes from and the choice per device and op."""
    meta = table.get("_meta") or {}
    lines = [f"autotune table: measured on {meta.get('card', 'an unrecorded card')}"
             f" ({meta.get('measured') or 'date not recorded'}; torch {meta.get('torch')}, "
             f"triton {meta.get('triton')})"]
    for dev in sorted(k for k in table if not k.startswith("_")):
        for op in sorted(table[dev]):
            lines.append(f"  {dev:5s} {op:19s} {describe_runs(table[dev][op])}")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m neuralmem_fast autotune",
                                 description="Build the backend table of backend='auto' from a GPU bench.json, "
                                             "or show the table in use.")
    ap.add_argument("bench_json", nargs="?", help="a bench.json written by `python -m neuralmem_fast bench --gpu`")
    ap.add_argument("--out", default=None, help=f"where to write the table (default: {TABLE_NAME} beside BENCH_JSON)")
    ap.add_argument("--install", action="store_true",
                    help="also install it as the user's table (~/.cache/neuralmem_fast/autotune_table.json, or "
                         "$NEURALMEM_AUTOTUNE_TABLE), the first one backend='auto' reads")
    ap.add_argument("--bench-command", default=None, help="the command that produced BENCH_JSON, for the record")
    ap.add_argument("--show", action="store_true",
                    help="print a table (--table, default the installed one) and what auto picks on this machine")
    ap.add_argument("--table", default=None, help="with --show: the table file to print")
    args = ap.parse_args(argv)

    if args.show:
        return _show(args.table)
    if not args.bench_json:
        ap.error("give a BENCH_JSON to build from, or --show")
    try:
        table, paths = table_from_bench(args.bench_json, args.out, args.install, args.bench_command)
    except TableError as exc:
        print(f"autotune: {exc}", file=sys.stderr)
        return 2
    print(format_table(table))
    for p in paths:
        print(f"autotune: wrote {p}")
    return 0


def _show(path):
    from ..ops import dispatch

    try:
        table = load_json(path, "table") if path else dispatch._table()
    except TableError as exc:
        print(f"autotune: {exc}", file=sys.stderr)
        return 2
    if not any(not k.startswith("_") for k in table):
        print(f"autotune: no table at {path or ', '.join(dispatch.table_paths())}; auto uses the defaults "
              "(the CUDA C++ kernels when built, else Triton, on CUDA tensors)")
        return 0
    print(format_table(table))
    if path is None:
        for line in dispatch.auto_report():
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
