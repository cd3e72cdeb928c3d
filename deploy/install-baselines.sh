#!/usr/bin/env bash
# Installs the `baselines` extra of pyproject.toml (the maintained baselines of `quept eval`) into the
# environment of PYTHON (default .venv/bin/python), at the versions the extra pins.
# llmcompressor and compressed-tensors go in with --no-deps: llmcompressor pins transformers <= 5.17 and
# would replace our transformers 5.24 (and pull nvidia-ml-py and auto-round, which these baselines do
# not use); the extra's other packages (its real runtime needs) install normally. Fails if torch changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"

mapfile -t requirements < <("$PYTHON" - <<'PY'
import tomllib
print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["baselines"], sep="\n")
PY
)
no_deps=() with_deps=()
for requirement in "${requirements[@]}"; do
  case "$requirement" in
    llmcompressor==*|compressed-tensors==*) no_deps+=("$requirement") ;;
    *) with_deps+=("$requirement") ;;
  esac
done

torch_before="$("$PYTHON" -c 'import torch; print(torch.__version__)')"
"$PYTHON" -m pip install -q --no-deps "${no_deps[@]}"
"$PYTHON" -m pip install -q "${with_deps[@]}"
torch_after="$("$PYTHON" -c 'import torch; print(torch.__version__)')"
if [ "$torch_before" != "$torch_after" ]; then
  echo "error: installing the baselines changed torch from $torch_before to $torch_after" >&2
  exit 1
fi
"$PYTHON" -c 'import llmcompressor, llama_cpp; print("baselines installed: llmcompressor", llmcompressor.__version__)'
