#!/usr/bin/env bash
# Builds the wheel and checks that it installs and works on its own:
#   1. pip wheel --no-build-isolation --no-deps .  (against the building python's torch)
#   2. a fresh virtual environment; torch and numpy come from the building
#      environment through a .pth line (nothing is downloaded), the package
#      only from the wheel (pip install --no-index --no-deps)
#   3. from a directory outside the source tree: neuralmem_fast must import from
#      the fresh environment, load its native extension, report its kernels,
#      and run a smoke of the ops (against the float64 references) and of the
#      replay buffer on the C++ sum tree.
# Usage: scripts/wheel_check.sh [PYTHON]  (default .venv/bin/python)
# NEURALMEM_NO_CUDA=1 builds a CPU-only wheel (what CI checks; much faster).
# WHEEL_DIR=dir keeps the wheel there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
case "$PY" in
  */*) PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") ;;
  *) PY=$(command -v "$PY") ;;
esac
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
start=$(date +%s)

echo "wheel_check: building the wheel (NEURALMEM_NO_CUDA=${NEURALMEM_NO_CUDA:-0})"
"$PY" -m pip wheel -q --no-build-isolation --no-deps . -w "${WHEEL_DIR:-$WORK/dist}"
WHEEL=$(ls "${WHEEL_DIR:-$WORK/dist}"/neuralmem_fast-*.whl | head -n 1)
echo "wheel_check: built $(basename "$WHEEL") ($(du -h "$WHEEL" | cut -f1)) in $(( $(date +%s) - start )) s"

"$PY" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
HOST_SITE=$("$PY" -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))")
VENV_SITE=$("$VPY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# Appended after the venv's own site-packages: the wheel's copy comes first, and
# .pth files of the host's site-packages (an editable install) are not processed.
echo "$HOST_SITE" > "$VENV_SITE/host_torch.pth"
"$VPY" -m pip install -q --no-index --no-deps "$WHEEL"

cd "$WORK"
"$VPY" - "$WORK/venv" <<'EOF'
import os
import sys

import torch

venv = os.path.realpath(sys.argv[1])
import neuralmem_fast as nm
from neuralmem_fast.replay import ExperienceReplay, PrioritizedReplayBuffer, has_native_sum_tree

where = os.path.realpath(nm.__file__)
assert where.startswith(venv + os.sep), f"neuralmem_fast was imported from {where}, not from the wheel in {venv}"
assert nm.has_extension(), "the wheel's native extension neuralmem_fast._C did not load"
assert has_native_sum_tree(), "the wheel's C++ sum tree is missing"
print(f"wheel_check: neuralmem_fast from {where}")
print(f"wheel_check: kernels: native extension {nm.has_extension()}, CUDA kernels {nm.has_cuda_kernels()}, "
      f"CPU instruction set {torch.ops.neuralmem.cpu_capability()}, Triton {nm.has_triton()}, "
      f"backends cpu {nm.available_backends('cpu')}, cuda {nm.available_backends('cuda')}")

torch.manual_seed(0)
dt = torch.float64
m, k = torch.randn(2, 40, 8, dtype=dt), torch.randn(2, 3, 8, dtype=dt)
s = torch.rand(2, 3, dtype=dt) * 5
r = nm.content_read(m, k, s, backend="cpu")
torch.testing.assert_close(r, nm.content_read_ref(m, k, s))
w = nm.content_addressing(m, k, s, backend="cpu")
torch.testing.assert_close(w, nm.content_addressing_ref(m, k, s))
torch.testing.assert_close(nm.memory_read(m, w, backend="cpu"), r)
e, a = torch.rand(2, 3, 8, dtype=dt), torch.randn(2, 3, 8, dtype=dt)
torch.testing.assert_close(nm.memory_write(m, w, e, a, backend="cpu"), nm.memory_write_ref(m, w, e, a))
mg, kg, sg = (x.clone().requires_grad_() for x in (m[:, :6], k, s))
assert torch.autograd.gradcheck(lambda *t: nm.content_read(*t, backend="cpu"), (mg, kg, sg))

buf = PrioritizedReplayBuffer(1000, generator=0)
buf.extend({"obs": torch.randn(1500, 4), "action": torch.arange(1500)})
batch, idx, weights = buf.sample(64)
assert batch["obs"].shape == (64, 4) and float(weights.max()) <= 1.0
assert buf.update_priorities(idx, torch.rand(64)) > 0
er = ExperienceReplay(100, generator=1)
for i in range(150):
    er.push(i, priority=1.0 + i % 7)
assert len(er.sample(16)[0]) == 16
print("wheel_check: ops and replay smoke passed")
EOF
echo "wheel_check: ok in $(( $(date +%s) - start )) s"
