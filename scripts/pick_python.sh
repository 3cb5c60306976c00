# Sourced by the GPU scripts: sets PY to the python that has torch on a GPU
# machine that may lack the project's venv: $PYTHON if set, else python3 when
# it imports torch, else python.
if [ -n "${PYTHON:-}" ]; then
  PY="$PYTHON"
elif command -v python3 >/dev/null 2>&1 && python3 -c "import torch" >/dev/null 2>&1; then
  PY=python3
else
  PY=python
fi
