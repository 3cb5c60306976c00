"""Installs optional packages unless pip would replace torch or numpy to do so.

    python scripts/install_optional.py torchrl tensordict

Asks pip first (`pip install --dry-run --report`): when the resolution would
install another torch or numpy, or fails, nothing is installed and it says
why. Always exits 0: the tests that need these packages skip without them.
"""
import json
import os
import subprocess
import sys
import tempfile

KEEP = {"torch", "numpy"}


def main(pkgs):
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.json")
        dry = subprocess.run(pip + ["--dry-run", "--report", report] + pkgs, capture_output=True, text=True)
        if dry.returncode != 0:
            print(f"install_optional: pip cannot resolve {' '.join(pkgs)}; not installed "
                  f"({dry.stderr.strip().splitlines()[-1] if dry.stderr.strip() else 'no message'})")
            return 0
        with open(report) as f:
            planned = {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in json.load(f)["install"]}
    replaced = sorted(KEEP & set(planned))
    if replaced:
        print(f"install_optional: not installing {' '.join(pkgs)}: pip would install "
              + ", ".join(f"{n} {planned[n]}" for n in replaced) + " over the installed one")
        return 0
    if not planned:
        print(f"install_optional: {' '.join(pkgs)} already installed")
        return 0
    done = subprocess.run(pip + pkgs)
    print(f"install_optional: {'installed' if done.returncode == 0 else 'failed to install'} "
          + ", ".join(f"{n} {v}" for n, v in sorted(planned.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
