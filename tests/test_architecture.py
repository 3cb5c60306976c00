"""The package's shape: one-way layers, no import cycle, a core without the apps' dependencies,
no registration at import beyond the native ops, one op registry that every list derives from,
and files that do one job."""
import ast
import os
import subprocess
import sys

import pytest
import torch

import neuralmem_fast as nm
from neuralmem_fast.ops import autograd as op_autograd
from neuralmem_fast.ops import functional, registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "neuralmem_fast")

# Lower layers never import higher ones; replay and nn sit side by side and
# do not import each other.
LAYER = {"_ext": 0, "config": 0, "ops": 1, "replay": 2, "nn": 2, "models": 3, "apps": 4}
MAX_PY_LINES = 600
MAX_CPP_LINES = 1000


def _modules():
    out = {}
    for dirpath, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                name = rel[: -len(".__init__")] if rel.endswith(".__init__") else rel
                out[name] = path
    return out


MODULES = _modules()


def _imports(name, path):
    """Every neuralmem_fast module `name` imports (function-local imports included)."""
    is_pkg = path.endswith("__init__.py")
    tree = ast.parse(open(path).read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("neuralmem_fast")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("neuralmem_fast"):
                continue
            for a in node.names:
                sub = f"{mod}.{a.name}"
                if a.name == "_C":
                    continue  # the native extension, below every layer
                found.add(sub if sub in MODULES else mod)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(name):
    parts = name.split(".")
    if len(parts) == 1:
        return None  # the package's own __init__ / __main__: the public API, above every layer
    if parts[1] in ("__main__",):
        return None
    return LAYER[parts[1]]


def test_every_module_belongs_to_a_layer():
    for name in MODULES:
        parts = name.split(".")
        assert len(parts) == 1 or parts[1] in LAYER or parts[1] == "__main__", f"{name} is in no layer"


def test_imports_run_one_way():
    bad = []
    for name, deps in GRAPH.items():
        lo = _layer(name)
        if lo is None:
            continue
        for d in deps:
            ld = _layer(d)
            if ld is None:
                bad.append(f"{name} imports the top-level package {d}")
            elif ld > lo or (ld == lo and name.split(".")[1] != d.split(".")[1]):
                bad.append(f"{name} (layer {lo}) imports {d} (layer {ld})")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycle():
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in sorted(GRAPH[n]):
            # A package's __init__ that re-exports its own submodules is not a cycle
            # through them: skip child -> parent-package edges.
            if n.startswith(d + "."):
                continue
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in sorted(GRAPH):
        if n not in state:
            visit(n)


def _run(code):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_core_imports_without_the_apps_dependencies():
    _run(
        "import sys\n"
        "for m in ('matplotlib', 'tqdm', 'sklearn', 'torchrl', 'tensordict', 'cpprb', 'faiss'):\n"
        "    sys.modules[m] = None  # any import of them now raises ImportError\n"
        "import neuralmem_fast, neuralmem_fast.ops, neuralmem_fast.replay, neuralmem_fast.nn, neuralmem_fast.models\n"
        "from neuralmem_fast.models import tutorial_reference\n"
        "print('ok')\n"
    )


def test_import_registers_nothing_but_the_native_ops():
    _run(
        "import sys, torch\n"
        "import neuralmem_fast as nm\n"
        "nm.available_backends('cpu'); nm.available_backends('cuda'); nm.has_triton()\n"
        "assert 'neuralmem_fast.ops.triton.kernels' not in sys.modules, 'the Triton kernels were imported'\n"
        "names = torch._C._dispatch_get_all_op_names()\n"
        "assert not [n for n in names if n.startswith('neuralmem_triton::')], 'the Triton library was registered'\n"
        "print('ok')\n"
    )


# ------------------------------------------------------------------ registry
def test_registry_reads_the_ops_csrc_declares():
    if not nm.has_extension():
        pytest.skip("the native extension is not built")
    assert "content_read" in registry.public_ops()
    assert "content_read_write_" in registry.public_ops()
    assert set(registry.inplace_ops()) == {"memory_write_", "content_write_", "content_read_write_"}
    assert set(registry.backward_ops()) == {f"{op}_backward" for op in
                                            ("content_addressing", "memory_read", "content_read", "memory_write",
                                             "content_write", "content_read_write")}
    assert registry.utility_ops() == ("cpu_capability",)


def test_every_registered_op_has_its_kernels_formulas_and_a_public_function():
    if not nm.has_extension():
        pytest.skip("the native extension is not built")
    from torch._library.simple_registry import singleton

    has = torch._C._dispatch_has_kernel_for_dispatch_key
    missing = []
    for op in registry.public_ops() + registry.backward_ops():
        q = f"neuralmem::{op}"
        if not has(q, "CPU"):
            missing.append(f"{op}: no CPU kernel")
        if nm.has_cuda_kernels() and not has(q, "CUDA"):
            missing.append(f"{op}: no CUDA kernel")
        if singleton.find(q).fake_impl.kernel is None:
            missing.append(f"{op}: no fake kernel")
    for op in registry.public_ops():
        if not has(f"neuralmem::{op}", "Autograd"):
            missing.append(f"{op}: no autograd formula (or in-place rules)")
        if op not in functional.__all__:
            missing.append(f"{op}: no public function")
        nm.ops.choose("auto", op, torch.device("cpu"), 128)  # backend resolution knows it
    for op in registry.differentiable_ops():
        if op not in op_autograd.DIFFERENTIABLE_OPS:
            missing.append(f"{op}: differentiable, but ops/autograd.py has no formula")
    assert not missing, "\n".join(missing)


def test_torch_ops_called_directly_are_differentiable():
    if not nm.has_extension():
        pytest.skip("the native extension is not built")
    g = torch.Generator().manual_seed(0)
    m = torch.randn(1, 9, 4, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(1, 2, 4, dtype=torch.float64, generator=g, requires_grad=True)
    s = torch.tensor([[2.0, 5.0]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda m, k, s: torch.ops.neuralmem.content_read(m, k, s, 1e-12)[0], (m, k, s))
    w = torch.softmax(torch.randn(1, 2, 9, dtype=torch.float64, generator=g), -1).requires_grad_(True)
    e = torch.rand(1, 2, 4, dtype=torch.float64, generator=g, requires_grad=True)
    a = torch.randn(1, 2, 4, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(torch.ops.neuralmem.memory_write, (m, w, e, a))
    assert torch.autograd.gradcheck(lambda m, k, s: torch.ops.neuralmem.content_addressing(m, k, s, 1e-12), (m, k, s))
    assert torch.autograd.gradcheck(torch.ops.neuralmem.memory_read, (m, w))


# --------------------------------------------------------------------- sizes
def _line_counts(root, exts):
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.endswith(exts):
                path = os.path.join(dirpath, f)
                with open(path) as fh:
                    yield os.path.relpath(path, ROOT), sum(1 for _ in fh)


def test_python_modules_do_one_job():
    big = [f"{p}: {n} lines" for p, n in _line_counts(PKG, (".py",)) if n > MAX_PY_LINES]
    assert not big, f"modules over {MAX_PY_LINES} lines:\n" + "\n".join(big)


def test_cpp_files_do_one_job():
    big = [f"{p}: {n} lines" for p, n in _line_counts(os.path.join(ROOT, "csrc"), (".cpp", ".h", ".cu", ".cuh"))
           if n > MAX_CPP_LINES]
    assert not big, f"C++/CUDA files over {MAX_CPP_LINES} lines:\n" + "\n".join(big)


def test_replay_native_code_does_not_depend_on_the_memory_kernels():
    for p, _ in _line_counts(os.path.join(ROOT, "csrc", "replay"), (".cpp", ".h")):
        src = open(os.path.join(ROOT, p)).read()
        assert '#include "cpu/' not in src, f"{p} includes the memory ops' CPU kernels"


@pytest.mark.parametrize("op", ["content_addressing", "memory_read", "content_read", "memory_write", "usage_update"])
def test_opcheck_with_inputs_that_require_grad(op):
    """The registered gradient formulas pass opcheck's autograd checks."""
    if not nm.has_extension():
        pytest.skip("the native extension is not built")
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, dtype=torch.float64, generator=g).requires_grad_(True)  # noqa: E731
    m, k, s = r(2, 7, 3), r(2, 2, 3), (torch.rand(2, 2, dtype=torch.float64, generator=g) + 1).requires_grad_(True)
    w = torch.softmax(torch.randn(2, 2, 7, dtype=torch.float64, generator=g), -1).requires_grad_(True)
    e = torch.rand(2, 2, 3, dtype=torch.float64, generator=g).requires_grad_(True)
    u = torch.rand(2, 7, dtype=torch.float64, generator=g).requires_grad_(True)
    args = {"content_addressing": (m, k, s, 1e-12), "memory_read": (m, w), "content_read": (m, k, s, 1e-12),
            "memory_write": (m, w, e, r(2, 2, 3)), "usage_update": (u, w, 0.99)}[op]
    torch.library.opcheck(getattr(torch.ops.neuralmem, op), args)
