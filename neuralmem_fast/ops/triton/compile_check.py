"""Builds every launched kernel for a real GPU without one (Triton's bundled ptxas).

So that code which only the interpreter accepts is caught in CI, and so that
what a GPU kernel engineer reads off the compiled kernels (32-bit address
products, registers, spills, shared memory) is checked without a card.
"""
import contextlib
import os
import re
import shutil
import subprocess
import tempfile

import torch

from ._triton import triton

from . import planning
from .jit_common import INTERPRETED


# --------------------------------------------------------------------------
# compile check: build the launched kernels for a real GPU without one
# --------------------------------------------------------------------------
_SIG = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float64: "*fp64",
        torch.int32: "*i32", torch.int64: "*i64"}


@contextlib.contextmanager
def compile_only(arch=90, sms=None, inspect=False):
    """Within this context the ops compile every kernel they launch for CUDA sm_<arch>
    (to a cubin, with Triton's bundled ptxas) instead of running it; no GPU needed.

    Must run without the interpreter (TRITON_INTERPRET unset). Yields the list of
    records, one per distinct (kernel, signature, constexprs, num_warps) compiled:
    dicts with name, consts, num_warps and, when inspect, narrow (the 32-bit
    products of two runtime values, see narrow_products) and the resources of
    the cubin (see cubin_resources). sms: the SM count the split planner
    assumes (a card's real choices of splits with CPU or meta tensors).
    Call the IMPLS functions directly with CPU or meta tensors (outputs stay
    uninitialised).
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if INTERPRETED:
        raise RuntimeError("compile_only needs TRITON_INTERPRET unset before triton is imported")
    target = GPUTarget("cuda", arch, 32)
    done, seen = [], set()

    def hook(kernel, args, meta, num_warps, num_stages=None):
        names = kernel.arg_names
        sig, consts = {}, {}
        for name, val in zip(names, args):
            if isinstance(val, torch.Tensor):
                sig[name] = _SIG[val.dtype]
            elif isinstance(val, bool):
                sig[name] = "i1"
            elif isinstance(val, int):
                sig[name] = "i32" if -2**31 <= val < 2**31 else "i64"
            elif isinstance(val, float):
                sig[name] = "fp32"
            else:
                raise TypeError(f"compile_only: unsupported argument {name}={val!r}")
        for name, val in meta.items():
            sig[name] = "constexpr"
            consts[name] = val
        key = (kernel.__name__, tuple(sorted(sig.items())), tuple(sorted((k, str(v)) for k, v in consts.items())),
               num_warps, num_stages)
        if key in seen:
            return
        seen.add(key)
        options = {"num_warps": num_warps, "maxnreg": planning.MAX_REGS}
        if num_stages is not None:
            options["num_stages"] = num_stages
        compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts), target=target,
                                  options=options)
        rec = {"name": kernel.__name__, "consts": {k: str(v) for k, v in consts.items()}, "num_warps": num_warps,
               "num_stages": num_stages,
               "dtype": next((v for k, v in sig.items() if k == "mem_ptr" or k == "g_ptr"), None)
               or next((v for v in sig.values() if v.startswith("*f")), "?")}
        if inspect:
            rec["narrow"] = narrow_products(compiled.asm["ttir"])
            rec.update(cubin_resources(compiled.asm["cubin"]))
            rec["shared"] = max(rec.get("shared", 0), int(compiled.metadata.shared))
        done.append(rec)

    old_sms = planning.CONFIG.sms
    planning._LAUNCH_HOOK = hook
    planning.CONFIG.sms = sms
    try:
        yield done
    finally:
        planning._LAUNCH_HOOK = None
        planning.CONFIG.sms = old_sms


# --------------------------------------------------------------------------
# reading the compiled kernels
# --------------------------------------------------------------------------
_DEF = re.compile(r"^\s*(%[\w.#]+)(?::\d+)? = (\S+)")
_MULI = re.compile(r"^\s*%[\w.#]+ = arith\.muli (%[\w.#]+), (%[\w.#]+) : (tensor<[^>]*xi32>)\s+loc\((#loc\d*)\)")
_LOC = re.compile(r"^(#loc\d*) = loc\((.*)\)\s*$")


def _resolve_loc(locs, ref, depth=0):
    text = locs.get(ref, "")
    m = re.search(r'"([^"]+)":(\d+)', text)
    if m:
        return f"{os.path.basename(m.group(1))}:{m.group(2)}"
    m = re.search(r"(#loc\d*)", text)
    if m and depth < 8:
        return _resolve_loc(locs, m.group(1), depth + 1)
    return ref


def narrow_products(ttir):
    """The 32-bit tensor multiplies of two runtime values in a kernel's TTIR, as 'file:line'.

    An index tensor times a size (offs_h[:, None] * N) in int32 wraps once
    the product passes 2^31; a product with a compile-time constant (a block
    size) is left alone. Offsets that are cast to int64 before the multiply
    compile to an i64 multiply and are not listed.
    """
    defs, locs, found = {}, {}, []
    for line in ttir.splitlines():
        m = _LOC.match(line)
        if m:
            locs[m.group(1)] = m.group(2)
            continue
        m = _DEF.match(line)
        if m:
            defs[m.group(1)] = m.group(2)
    for line in ttir.splitlines():
        m = _MULI.match(line)
        if m and all(defs.get(v) != "arith.constant" for v in m.group(1, 2)):
            found.append(_resolve_loc(locs, m.group(4)))
    return found


def cuobjdump_path():
    """cuobjdump from the CUDA toolkit, else the one Triton ships; None when neither is found."""
    for cand in (shutil.which("cuobjdump"),
                 os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump")):
        if cand and os.path.exists(cand):
            return cand
    try:
        import triton.backends.nvidia as nv

        cand = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
        return cand if os.path.exists(cand) else None
    except Exception:
        return None


_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def parse_res_usage(text):
    """{mangled kernel name: {regs, stack, shared, local}} from `cuobjdump -res-usage` output."""
    out, name = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            name = m.group(1)
            continue
        m = _RES.search(line)
        if m and name:
            out[name] = dict(zip(("regs", "stack", "shared", "local"), map(int, m.groups())))
            name = None
    return out


def parse_sass_spills(text):
    """{mangled kernel name: number of local-memory stores (STL)} from `cuobjdump -sass` output."""
    out, name = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            name = m.group(1)
            out.setdefault(name, 0)
            continue
        if name and re.search(r"\bSTL(\.\w+)*\s", line):
            out[name] += 1
    return out


def cubin_resources(cubin):
    """regs, stack, shared, local and spill_stores (STL count) of a one-kernel cubin."""
    tool = cuobjdump_path()
    if tool is None:
        raise RuntimeError("cuobjdump not found (CUDA toolkit or Triton's NVIDIA backend)")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = parse_res_usage(subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True,
                                             check=True).stdout)
        sass = parse_sass_spills(subprocess.run([tool, "-sass", f.name], capture_output=True, text=True,
                                                check=True).stdout)
    (name, r), = res.items()
    r["spill_stores"] = sass.get(name, 0)
    return r
