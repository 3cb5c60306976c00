"""Every Triton kernel variant the ops launch on a card, over a representative set of shapes and dtypes.

The planners make their real choices (block sizes, num_warps, the split count
of an H200's 132 SMs) from meta tensors, so no memory is allocated and no GPU
is needed; compile_only builds each variant for sm_90 and reads it back.
"""
import torch

from .compile_check import compile_only
from .launch import (_content_addressing, _content_addressing_backward, _content_read, _content_read_backward,
                     _content_write_, _memory_read, _memory_read_backward, _memory_write, _memory_write_,
                     _memory_write_backward, _usage_update)

# (B, N, H, D, W): the shapes of the benchmarks and the models (one to many
# memories, small to 16M slots, D of 16 to 300, one to sixteen heads).
SHAPES = [
    (1, 1 << 24, 1, 64, 1),
    (1, 300_000, 4, 64, 1),
    (1, 300_000, 4, 300, 2),
    (8, 4096, 4, 64, 2),
    (32, 1024, 16, 64, 4),
    (64, 128, 1, 16, 1),
    (16, 512, 8, 128, 1),
]
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
H200_SMS = 132
# (dtype, shapes): every shape in float32, the three that give the other
# dtypes their distinct tiles (one head, D 300 with two write heads, the
# tl.dot path) in float16, two in float64; about half of all variants (389),
# so that CI compiles them in a few minutes. FULL: every dtype and shape.
QUICK = [(torch.float32, SHAPES), (torch.float16, [SHAPES[0], SHAPES[2], SHAPES[4]]),
         (torch.float64, [SHAPES[0], SHAPES[2]])]
FULL = [(dt, SHAPES) for dt in DTYPES]


def every_op(dtype, B, N, H, D, W, device="meta"):
    """Calls every op implementation once (forward, backward, in-place writes)."""
    r = lambda *s: torch.empty(*s, dtype=dtype, device=device)
    mem, k, s, w, g = r(B, N, D), r(B, H, D), r(B, H), r(B, H, N), r(B, H, D)
    ww, e, a, kw, sw = r(B, W, N), r(B, W, D), r(B, W, D), r(B, W, D), r(B, W)
    lse = torch.empty(B, H, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=device)
    _content_addressing(mem, k, s, 1e-12)
    _content_addressing_backward(w, w, mem, k, s, 1e-12)
    _content_read(mem, k, s, 1e-12)
    _content_read_backward(g, g, lse, mem, k, s, 1e-12)
    _memory_read(mem, w)
    _memory_read_backward(g, mem, w)
    _memory_write(mem, ww, e, a)
    _memory_write_(mem, ww, e, a)
    _memory_write_backward(mem, mem, ww, e, a)
    _usage_update(r(B, N), ww, 0.99)
    _content_write_(mem, r(B, N), kw, sw, e, a, 1e-12, 0.99)
    _content_write_(mem, None, kw, sw, e, a, 1e-12, 0.99)


def compile_variants(plan=QUICK, arch=90, sms=H200_SMS, inspect=True):
    """compile_only's records of every variant launched over plan's (dtype, shapes), each with a shape launching it."""
    with compile_only(arch, sms=sms, inspect=inspect) as done:
        for dt, shapes in plan:
            for shape in shapes:
                before = len(done)
                every_op(dt, *shape)
                for rec in done[before:]:
                    rec["shape"] = shape
    return done


def main(argv=None):
    """python -m neuralmem_fast.ops.triton.variants OUT.json [--full]: the records as JSON (TRITON_INTERPRET unset)."""
    import json
    import sys

    argv = sys.argv[1:] if argv is None else argv
    recs = compile_variants(FULL if "--full" in argv else QUICK)
    for r in recs:
        r["shape"] = list(r["shape"])
    with open(argv[0], "w") as f:
        json.dump(recs, f, indent=0)
    print("compiled", len(recs))


if __name__ == "__main__":
    main()
