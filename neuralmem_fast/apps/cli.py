"""`python -m neuralmem_fast demo|bench|scale|autotune|train`: each subcommand lives in its own module."""
import importlib
import sys

COMMANDS = {
    "demo": ("neuralmem_fast.apps.demo", "the continual-learning demo (results/ PNG + metrics.json)"),
    "bench": ("neuralmem_fast.apps.bench", "the benchmark suites and benchmarks/REPORT.md"),
    "scale": ("neuralmem_fast.apps.scale", "the large-memory sweep (results/scale.json + plot)"),
    "autotune": ("neuralmem_fast.apps.autotune", "the GPU backend table of backend='auto', from a bench.json"),
    "train": ("neuralmem_fast.apps.train", "train memory models on copy / associative recall (curves PNG + JSON)"),
}


def _usage():
    lines = ["usage: python -m neuralmem_fast {" + "|".join(COMMANDS) + "} [options]", ""]
    lines += [f"  {name:8s} {doc}" for name, (_, doc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[cmd][0])
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
