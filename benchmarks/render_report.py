"""Renders a pytest-benchmark JSON into benchmarks/REPORT.md and benchmarks/ops_vs_n.png.

    python benchmarks/render_report.py bench.json [--out DIR]

Works on any suite that follows the benchmark convention (see
benchmarks/conftest.py): rows are grouped by `benchmark.group`; in each group
the row with extra_info "baseline": True is the reference, and every other
row's ratio is taken against it -- always from the same JSON, that is, from
the same run. Rows with "bytes" at N >= 65536 also report their achieved
bandwidth as a fraction of the floor (a row whose provider starts with
"floor", in the same group or in a floor group of the same device, B, N, D).

The "Goals" section restates the ratios that the issues set and computes each
measured value from the rows; a goal whose rows are missing is listed as not
measured, never filled in from elsewhere.
"""
import argparse
import json
import math
import os
import re
from collections import OrderedDict

LARGE_N = 65536
PEER_PROVIDERS = {"torch", "torch.compile", "seed", "torchrl", "cpprb", "dnc package", "LSTM (same size)"}


# --------------------------------------------------------------------------
# rows
# --------------------------------------------------------------------------
class Row:
    def __init__(self, bench):
        self.raw = bench
        self.group = bench.get("group") or bench.get("name")
        self.name = bench.get("name", "")
        self.fullname = bench.get("fullname", self.name)
        self.info = dict(bench.get("extra_info") or {})
        st = bench.get("stats") or {}
        self.median = st.get("median")
        self.iqr = st.get("iqr")
        self.stddev = st.get("stddev")
        self.rounds = st.get("rounds")
        self.iterations = st.get("iterations")
        self.provider = str(self.info.get("provider", self.name))
        self.baseline = bool(self.info.get("baseline", False))

    @property
    def source(self):
        return self.fullname.split("::")[0]

    @property
    def is_floor(self):
        return self.provider.startswith("floor") or bool(self.info.get("floor"))

    def get(self, key, default=None):
        return self.info.get(key, default)


def natural_key(text):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(text))]


def load_rows(data):
    return [Row(b) for b in data.get("benchmarks", []) if (b.get("stats") or {}).get("median") is not None]


def group_rows(rows):
    groups = OrderedDict()
    for r in sorted(rows, key=lambda r: (r.source, natural_key(r.group))):
        groups.setdefault(r.group, []).append(r)
    return groups


def baseline_of(rows):
    base = [r for r in rows if r.baseline]
    return base[0] if base else None


def floor_for(row, groups):
    """The floor row this row's bandwidth is measured against, or None."""
    for r in groups.get(row.group, []):
        if r.is_floor and r is not row:
            return r
    key = (row.get("device", "cpu"), row.get("B"), row.get("N"), row.get("D"))
    if None in key[1:]:
        return None
    for rows in groups.values():
        for r in rows:
            if r.is_floor and (r.get("device", "cpu"), r.get("B"), r.get("N"), r.get("D")) == key:
                return r
    return None


def bandwidth_fraction(row, floor):
    """Achieved bandwidth of `row` as a fraction of the floor's (1.0 = as fast as one pass per byte)."""
    if floor is None or not row.get("bytes") or not floor.get("bytes"):
        return None
    return (row.get("bytes") / row.median) / (floor.get("bytes") / floor.median)


# --------------------------------------------------------------------------
# formatting
# --------------------------------------------------------------------------
def fmt_time(seconds):
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "—"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9)):
        if seconds >= scale or unit == "ns":
            v = seconds / scale
            return f"{v:.3g} {unit}" if v < 100 else f"{v:.0f} {unit}"
    return str(seconds)


def fmt_bytes(n):
    if not n:
        return "—"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def fmt_ratio(x):
    if x is None:
        return "—"
    return f"{x:.3g}x" if x < 1000 else f"{x:.0f}x"


def machine_section(data):
    mi = data.get("machine_info") or {}
    nm = mi.get("neuralmem") or {}
    cpu = nm.get("cpu_model") or (mi.get("cpu") or {}).get("brand_raw") or mi.get("processor") or "unknown"
    cores = nm.get("cores") or (mi.get("cpu") or {}).get("count")
    lines = [
        "| | |",
        "|---|---|",
        f"| CPU | {cpu} |",
        f"| cores | {cores} (torch threads: {nm.get('torch_threads', '?')}) |",
        f"| torch | {nm.get('torch', '?')} |",
        f"| GPU | {nm.get('cuda_device') or 'none'} |",
        f"| date | {nm.get('date') or data.get('datetime', '?')} |",
        f"| python | {mi.get('python_implementation', '')} {mi.get('python_version', '')} |",
        f"| native extension | {nm.get('extension', '?')}; backends {nm.get('backends', '?')} |",
        f"| subset | {'quick' if nm.get('quick') else 'full'}, device {nm.get('bench_device', 'cpu')} |",
    ]
    ls, le = nm.get("loadavg_start"), nm.get("loadavg_end")
    if ls or le:
        lines.append(f"| load average (1, 5, 15 min) | start {ls}, end {le} |")
    return "\n".join(lines)


def busy_note(data):
    """A warning when other work was loading the machine: its timings are then inflated and noisy."""
    nm = (data.get("machine_info") or {}).get("neuralmem") or {}
    cores = nm.get("cores") or 1
    ls, le = nm.get("loadavg_start"), nm.get("loadavg_end")
    # Our own run keeps about `threads` cores busy; load beyond that is someone else's.
    threads = nm.get("torch_threads") or cores
    busy = (ls and ls[0] > 0.5 * cores) or (le and le[1] > threads + 0.5 * cores)
    if not busy:
        return None
    return (f"the machine was busy during this run (load average {ls} at the start, {le} at the end, on {cores} "
            "cores): multi-threaded rows wait for descheduled threads, so timings are inflated and ratios "
            "unreliable. Regenerate on an idle machine.")


def group_table(rows, groups):
    base = baseline_of(rows)
    large = any((r.get("N") or 0) >= LARGE_N and r.get("bytes") for r in rows)
    head = ["provider", "median", "IQR", "stddev", "rounds", f"speedup vs {base.provider if base else '—'}"]
    if large:
        head += ["bytes", "GB/s", "of floor"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: r.median):
        ratio = base.median / r.median if base and r is not base else (1.0 if r is base else None)
        prov = f"**{r.provider}**" if r is base else r.provider
        cells = [prov, fmt_time(r.median), fmt_time(r.iqr), fmt_time(r.stddev), str(r.rounds),
                 fmt_ratio(ratio) + (" (baseline)" if r is base else "")]
        if large:
            nbytes = r.get("bytes")
            frac = bandwidth_fraction(r, floor_for(r, groups)) if (r.get("N") or 0) >= LARGE_N else None
            cells += [fmt_bytes(nbytes), f"{nbytes / r.median / 1e9:.3g}" if nbytes else "—",
                      f"{frac:.2f}" if frac is not None else "—"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


# --------------------------------------------------------------------------
# goals
# --------------------------------------------------------------------------
def _num(row, keys, patterns):
    """An integer field of a row: from extra_info, else from its group name."""
    for k in keys:
        v = row.get(k)
        if v is not None:
            try:
                return int(float(v))
            except (TypeError, ValueError):
                pass
    for pat in patterns:
        m = re.search(pat, row.group, re.IGNORECASE)
        if m:
            s = m.group(1).replace("_", "")
            if re.fullmatch(r"10\^\d+", s):
                return 10 ** int(s.split("^")[1])
            try:
                return int(float(s))
            except ValueError:
                pass
    return None


def _op(row):
    return str(row.get("op") or row.group.split()[0])


def _mode(row):
    if row.get("mode"):
        return row.get("mode")
    return "fwd+bwd" if "fwd+bwd" in row.group else "fwd"


def find_op_rows(rows, op, mode, B, N, device="cpu"):
    return [r for r in rows if _op(r) == op and _mode(r) == mode and r.get("B") == B and r.get("N") == N
            and r.get("device", "cpu") == device]


def native(rows):
    """Rows of our own kernels: everything that is not a peer, a reference or a floor."""
    return [r for r in rows if r.provider not in PEER_PROVIDERS and not r.is_floor]


class Goal:
    """One ratio an issue sets: `speedup` (ref time / ours >= target) or `within` (ours / ref <= target)."""

    def __init__(self, issue, text, kind, target, ours, ref, ref_label, note=""):
        self.issue, self.text, self.kind, self.target = issue, text, kind, target
        self.ours, self.ref, self.ref_label, self.note = ours, ref, ref_label, note

    def evaluate(self):
        """[(provider, measured ratio or None, status)] for every candidate row."""
        if not self.ours:
            return [("—", None, "not measured (no row of our kernels)")]
        if self.ref is None:
            return [(r.provider, None, f"not measured (no {self.ref_label}" + ("" if " row" in self.ref_label else " row") + ")") for r in self.ours]
        out = []
        for r in self.ours:
            if self.kind == "speedup":
                v = self.ref.median / r.median
                ok = v >= self.target
            else:
                v = r.median / self.ref.median
                ok = v <= self.target
            out.append((r.provider, v, "met" if ok else "not met"))
        return out

    @property
    def target_text(self):
        return f">= {self.target:g}x faster" if self.kind == "speedup" else f"<= {self.target:g}x the time"


def _first(rows, provider=None, floor=False):
    for r in rows:
        if floor and r.is_floor:
            return r
        if provider is not None and r.provider == provider:
            return r
    return None


def _floor_of_size(rows, B, N, device="cpu"):
    for r in rows:
        if r.is_floor and r.get("B") == B and r.get("N") == N and r.get("device", "cpu") == device:
            return r
    return None


def issue3_goals(rows):
    goals = []
    step = find_op_rows(rows, "step", "fwd", 1, 128)
    goals.append(Goal(3, "one step (content_read_write_: 4 read heads, then the in-place write with usage), N=128, B=1, forward, "
                      "vs the seed's bank",
                      "speedup", 10, native(step), _first(step, "seed"), "seed"))
    cr = find_op_rows(rows, "content_read", "fwd", 1, 1_000_000)
    goals.append(Goal(3, "content_read, N=10^6, B=1, forward, vs the seed's read", "speedup", 30,
                      native(cr), _first(cr, "seed"), "seed"))
    goals.append(Goal(3, "content_read, N=10^6, B=1, vs the floor memory.sum()", "within", 1.5,
                      native(cr), _first(cr, floor=True) or _floor_of_size(rows, 1, 1_000_000), "floor"))
    mw = find_op_rows(rows, "memory_write_", "fwd", 1, 1_000_000)
    goals.append(Goal(3, "memory_write_, N=10^6, B=1, vs the floor memory.sum()", "within", 3,
                      native(mw), _first(mw, floor=True) or _floor_of_size(rows, 1, 1_000_000), "floor"))
    bs = find_op_rows(rows, "step", "fwd+bwd", 32, 128)
    goals.append(Goal(3, "batched step forward+backward, B=32, N=128, vs the torch backend", "speedup", 3,
                      native(bs), _first(bs, "torch"), "torch"))
    return goals


def _replay_rows(rows):
    out = []
    for r in rows:
        text = (r.group + " " + r.source).lower()
        if "replay" in text or r.provider in ("torchrl", "cpprb"):
            out.append(r)
    return out


def _replay_match(rows, verb, capacity, batch):
    out = []
    for r in rows:
        op = str(r.get("op") or r.group).lower()
        if verb not in op:
            continue
        cap = _num(r, ("capacity", "N"), (r"capacity[ =_]?([\d_.e^]+)", r"\bcap[ =_]?([\d_]+)", r"\bC([\d_]+)\b",
                                          r"\bN[ =]?([\d_]+)"))
        bat = _num(r, ("batch", "batch_size", "B"), (r"batch[ =_]?(\d+)", r"\bbs[ =]?(\d+)", r"\bB(\d+)\b"))
        if cap == capacity and bat == batch:
            out.append(r)
    return out


def _replay_group_op(group_rows):
    """'sample' or 'update' for a group timing one replay operation; None otherwise."""
    r0 = group_rows[0]
    op = str(r0.get("op") or r0.group).lower()
    if "+" in op:  # combined groups (update + sample) are reported, not goals
        return None
    if "update" in op:
        return "update"
    if "sample" in op:
        return "sample"
    return None


def _pick_group(by_group, verb, with_provider):
    """Rows of the first group timing `verb` at capacity 10^6, batch 256 that has a `with_provider` row."""
    for group_rows in by_group.values():
        if _replay_group_op(group_rows) != verb:
            continue
        sel = _replay_match(group_rows, verb, 1_000_000, 256)
        if sel and any(r.provider in with_provider for r in sel):
            return sel
    return []


def issue4_goals(rows):
    """Issue 4's ratios, each taken inside one group so that both rows come from the same case."""
    rr = _replay_rows(rows)
    if not rr:
        return []
    by_group = {}
    for r in rr:
        by_group.setdefault(r.group, []).append(r)
    chosen = {
        "sample": _pick_group(by_group, "sample", ("torchrl", "cpprb")),
        "update": _pick_group(by_group, "update", ("torchrl", "cpprb")),
        "seed": _pick_group(by_group, "sample", ("seed",)),
    }
    goals = []
    for verb, key in (("sample", "sample"), ("update_priorities", "update")):
        sel = chosen.get(key, [])
        for peer in ("torchrl", "cpprb"):
            goals.append(Goal(4, f"replay {verb}, capacity 10^6, batch 256, vs {peer}", "speedup", 5, native(sel),
                              _first(sel, peer), f"{peer} row; is {peer} installed?"))
    sel = chosen.get("seed", [])
    goals.append(Goal(4, "replay sample, capacity 10^6, batch 256, vs the seed's ExperienceReplay.sample",
                      "speedup", 1000, native(sel), _first(sel, "seed"), "seed"))
    return goals


# The seed's demo: task 0 trains without replay, tasks 1-3 with it (the
# buffer is past 16 items by then), 20 epochs x 50 samples per task.
DEMO_STEPS_NO_REPLAY, DEMO_STEPS_REPLAY = 1000, 3000


class _Estimate:
    """A demo-workload time estimated from the two per-step medians of one provider."""

    def __init__(self, provider, median):
        self.provider, self.median = provider, median


def issue5_goals(rows):
    ag = [r for r in rows if _op(r).startswith("agent") or "agent" in r.source]
    if not ag:
        return []
    rep = [r for r in ag if r.get("replay", "no-replay" not in r.group)]
    norep = [r for r in ag if r not in rep]
    provs = OrderedDict((r.provider, None) for r in ag)
    est = []
    for p in provs:
        a, b = _first(rep, p), _first(norep, p)
        if a and b:
            est.append(_Estimate(p, DEMO_STEPS_REPLAY * a.median + DEMO_STEPS_NO_REPLAY * b.median))
    src = est if _first(est, "seed") else rep
    label = ("the seed's demo workload, estimated from per-step medians "
             f"({DEMO_STEPS_NO_REPLAY} steps without replay + {DEMO_STEPS_REPLAY} with)"
             if src is est else "one training step with replay")
    seed = _first(src, "seed")
    pick = lambda pred: [r for r in src if pred(r.provider)]
    return [
        Goal(5, f"fast agent, replay='batched', {label}, vs the seed's agent", "speedup", 10,
             pick(lambda p: "batched" in p), seed, "seed"),
        Goal(5, f"fast agent, replay='sequential', {label}, vs the seed's agent", "speedup", 2,
             pick(lambda p: "sequential" in p), seed, "seed"),
        Goal(5, f"the seed's agent with the drop-in bank, {label}, vs the seed's agent", "speedup", 1.5,
             pick(lambda p: "bank" in p), seed, "seed"),
    ]


class PeakGoal(Goal):
    """Peak memory of a row (extra_info peak_bytes) against the memory's size (memory_bytes)."""

    def evaluate(self):
        if not self.ours:
            return [("—", None, "not measured (no row of our kernels)")]
        out = []
        for r in self.ours:
            peak, size = r.get("peak_bytes"), r.get("memory_bytes")
            if not peak or not size:
                out.append((r.provider, None, "not measured (no peak memory on the row)"))
                continue
            v = peak / size
            out.append((r.provider, v, "met" if v <= self.target else "not met"))
        return out

    @property
    def target_text(self):
        return f"<= {self.target:g}x the memory"


def issue9_goals(rows):
    big = find_op_rows(rows, "step", "fwd", 1, 10_000_000)
    bwd = find_op_rows(rows, "content_read", "fwd+bwd", 1, 10_000_000)
    goals = []
    if big:
        goals.append(Goal(9, "one read-then-write step, N=10^7, B=1, forward in place, vs the floor memory.sum()",
                          "within", 4, native(big), _first(big, floor=True) or _floor_of_size(rows, 1, 10_000_000),
                          "floor"))
    if bwd:
        goals.append(PeakGoal(9, "peak memory of content_read forward+backward, N=10^7, B=1 (memory + all it holds)",
                              "peak", 2.2, native(bwd), None, "memory"))
    return goals


def issue17_goals(rows):
    goals = []
    for N, target in ((128, 20), (1024, 200)):
        sel = [r for r in rows if _op(r) == "memory core train step" and r.get("N") == N and r.get("B") == 16]
        if sel:
            goals.append(Goal(17, f"MemoryCore training step, B=16, T=22, 4 reads, D=64, hidden 64, N={N}, "
                              "vs the dnc package", "speedup", target, native(sel), _first(sel, "dnc package"),
                              "dnc package"))
    return goals


def all_goals(rows):
    return issue3_goals(rows) + issue4_goals(rows) + issue5_goals(rows) + issue9_goals(rows) + issue17_goals(rows)


def goals_table(goals):
    out = ["| issue | goal | target | provider | measured | status |", "|---|---|---|---|---|---|"]
    for g in goals:
        for prov, v, status in g.evaluate():
            unit = {"speedup": " faster", "peak": " the memory"}.get(g.kind, " the time")
            meas = "—" if v is None else fmt_ratio(v) + unit
            mark = {"met": "**met**", "not met": "not met"}.get(status, status)
            out.append(f"| #{g.issue} | {g.text} | {g.target_text} | {prov} | {meas} | {mark} |")
    return "\n".join(out)


# --------------------------------------------------------------------------
# plot
# --------------------------------------------------------------------------
def plot_ops_vs_n(rows, path):
    """Log-log time against N, one panel per op and mode, one line per provider (B=1 solid, B=32 dashed)."""
    pts = [r for r in rows if r.get("N") and r.get("op") and r.get("op") != "floor" and "agent" not in r.source
           and "replay" not in r.source]
    if not pts:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floors = [r for r in rows if r.is_floor and r.get("N")]
    panels = sorted({(r.get("op"), r.get("mode", "fwd")) for r in pts}, key=lambda k: (k[0], k[1]))
    cols = min(4, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    providers = sorted({r.provider for r in pts})
    colors = {p: plt.cm.tab10(i % 10) for i, p in enumerate(providers)}
    styles = {}
    for i, (op, mode) in enumerate(panels):
        ax = axes[i // cols][i % cols]
        sel = [r for r in pts if r.get("op") == op and r.get("mode", "fwd") == mode]
        for B in sorted({r.get("B") for r in sel}):
            ls = styles.setdefault(B, ["-", "--", ":", "-."][len(styles) % 4])
            for p in providers:
                line = sorted((r.get("N"), r.median) for r in sel if r.provider == p and r.get("B") == B)
                if line:
                    ax.plot(*zip(*line), ls, marker="o", ms=3, color=colors[p], label=f"{p} B={B}")
            fl = sorted((r.get("N"), r.median) for r in floors if r.get("B") == B
                        and r.get("device", "cpu") == sel[0].get("device", "cpu"))
            if fl:
                ax.plot(*zip(*fl), ls, marker="s", ms=4, color="black", lw=2, alpha=0.6,
                        label=f"floor memory.sum() B={B}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{op} {mode}", fontsize=10)
        ax.set_xlabel("N (slots)")
        ax.set_ylabel("median time (s)")
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=6)
    for j in range(len(panels), nrows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.suptitle("Memory ops: time against N (D=64; B=1 solid, B=32 dashed; black: one pass over the memory)",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------
def scale_section(scale):
    """Markdown for a `scale` sweep (scale.json): its goals and the per-point table."""
    cfg = scale.get("config", {})
    # What the peak counts is the sweep's to say: since a warm-up step runs
    # before each point's baseline it is the point's own peak above that
    # baseline; older sweeps counted the process's one-time costs too.
    accounting = cfg.get("memory_accounting") or "the process's resident high-water mark"
    out = [f"From `python -m neuralmem_fast scale` (its own run, D={cfg.get('D', cfg.get('dim', 64))}, "
           f"H={cfg.get('H', cfg.get('heads', 4))}, W={cfg.get('W', cfg.get('write_heads', 1))}); step/floor is "
           "the best step over the best `memory.sum()` pass at the same N, measured in the same run; peak / memory "
           f"is the peak ({accounting}) over the memory tensor's size.", ""]
    for name, goal in (scale.get("goals") or {}).items():
        if not isinstance(goal, dict) or "results" not in goal:
            continue
        for who, res in goal["results"].items():
            val = res.get("value")
            status = ("**met**" if res.get("met") else "not met") if val is not None else res.get("reason", "—")
            shown = "—" if val is None else f"{val:.3g}x"
            out.append(f"- #9 {name} at N={int(scale['goals'].get('N', 0)):.0e}, {goal.get('target')}: "
                       f"{who} {shown} ({status})")
    out += ["", "| B | N | provider | mode | median step | step / floor | peak / memory |", "|---|---|---|---|---|---|---|"]
    for p in scale.get("points", []):
        if p.get("status") != "ok":
            continue
        out.append(f"| {p['B']} | {p['N']:.0e} | {p['provider']} | {p['mode']} | {fmt_time(p['step_s'])} | "
                   f"{p['ratio_to_floor']:.3g}x | {p.get('peak_ratio', float('nan')):.3g}x |")
    for d in scale.get("dropped", []):
        out.append(f"\nDropped: {d if isinstance(d, str) else json.dumps(d)}")
    return "\n".join(out)


def render(data, out_dir, json_name="bench.json", plot_name="ops_vs_n.png", provisional=None, scale=None):
    rows = load_rows(data)
    groups = group_rows(rows)
    os.makedirs(out_dir, exist_ok=True)
    has_plot = plot_ops_vs_n(rows, os.path.join(out_dir, plot_name))
    goals = all_goals(rows)

    md = ["# Throughput report", ""]
    for note in (provisional, busy_note(data)):
        if note:
            md += [f"> **Provisional:** {note}", ""]
    md += [f"Rendered from `{json_name}` (pytest-benchmark {data.get('version', '?')}) by "
           "`benchmarks/render_report.py`; regenerate with `make bench` (`QUICK=1` for the short subset). "
           "Every ratio compares rows of this one run: a speedup is the group's baseline median over the row's "
           "median; \"of floor\" is the row's achieved bandwidth (bytes that must move / median) over that of "
           "one streaming pass over the same memory (`memory.sum()`), measured in the same run.", ""]
    md += ["## Machine", "", machine_section(data), ""]
    md += ["## Goals", "", "Each ratio an issue sets as a goal, computed from the rows below.", ""]
    md += [goals_table(goals) if goals else "No rows of the goal cases in this run.", ""]
    if has_plot:
        md += ["## Time against N", "", f"![time against N]({plot_name})", ""]
    if scale:
        md += ["## Large-memory sweep", "", scale_section(scale), ""]
    md += ["## Results", ""]
    current = None
    for name, grows in groups.items():
        src = grows[0].source
        if src != current:
            md += [f"### {os.path.basename(src)}", ""]
            current = src
        md += [f"#### {name}", "", group_table(grows, groups), ""]
    with open(os.path.join(out_dir, "REPORT.md"), "w") as f:
        f.write("\n".join(md))
    return os.path.join(out_dir, "REPORT.md")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", help="pytest-benchmark JSON (--benchmark-json)")
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)),
                    help="folder for REPORT.md and ops_vs_n.png (default: benchmarks/)")
    ap.add_argument("--provisional", default=None, help="a note printed at the top (e.g. a contended machine)")
    ap.add_argument("--scale", default=None, help="a scale.json from `python -m neuralmem_fast scale` to tabulate")
    args = ap.parse_args(argv)
    with open(args.json) as f:
        data = json.load(f)
    scale = None
    if args.scale:
        with open(args.scale) as f:
            scale = json.load(f)
    rel = os.path.relpath(os.path.abspath(args.json), os.path.abspath(args.out))
    path = render(data, args.out, json_name=rel, provisional=args.provisional, scale=scale)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
