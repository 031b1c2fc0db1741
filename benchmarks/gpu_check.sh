#!/usr/bin/env bash
# GPU check: build megatron_bridge_ext with its CUDA kernels, run the CUDA test cases and the GPU benchmark.
# Needs a torch with CUDA, a CUDA toolkit (nvcc) and a visible GPU; no network. Run from anywhere:
#   bash benchmarks/gpu_check.sh            (PYTHON=/path/to/python to pick the interpreter)
# The end-to-end step (1.1B Llama import + export on one GPU, NCCL, world 1) needs megatron-core and transformers in
# that interpreter (pip install -e ".[megatron]" or wheels carried to an offline machine); GPU_CHECK_E2E=0 skips it.
# The Transformer Engine step (benchmarks/te_check.py: import checkpoints written on the CPU, loaded into real TE
# models with strict=RAISE_ALL at TP1 and TP2, logits against transformers) also needs transformer_engine;
# GPU_CHECK_TE=0 skips it, GPU_CHECK_TE_LAYOUTS=1 reads at TP1 only.
# The DSA step (benchmarks/dsa_check.py: DeepSeek-V3.2 / GLM-5 checkpoints imported on the CPU, loaded into megatron's
# TE DSA model, logits against transformers) needs megatron-core >= 0.19 and transformer_engine; GPU_CHECK_DSA=0 skips.
# The hybrid step (benchmarks/hybrid_check.py: a tiny NemotronH Mamba / attention / MLP checkpoint imported into
# megatron-core's HybridModel at TP1 and TP2, logits against transformers) needs megatron-core >= 0.19 and mamba_ssm
# (megatron's Mamba scan is Triton only); GPU_CHECK_HYBRID=0 skips it.
# The gated delta-net step (benchmarks/gdn_check.py: Qwen3-Next / Qwen3.5 imported on the CPU, read into TE models whose
# GatedDeltaNet runs megatron-core's fla kernels, logits against transformers) also needs megatron-core >= 0.19 and
# flash-linear-attention; GPU_CHECK_GDN=0 skips it.
# Exits non-zero on the first failing step; prints everything.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo}
if [[ -z "${CUDA_HOME:-}" && -x /usr/local/cuda/bin/nvcc ]]; then export CUDA_HOME=/usr/local/cuda; fi

step() { echo; echo "== $* =="; }

step "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$PYTHON" - <<'PY'
import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch.cuda.is_available() is False")
print("device:", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
PY
command -v nvcc && nvcc --version | tail -1

step "build (CUDAExtension, MAX_JOBS=$MAX_JOBS)"
BRIDGE_USE_CUDA=1 "$PYTHON" setup.py build_ext --inplace

step "CUDA kernels registered"
"$PYTHON" - <<'PY'
import sys, torch
import megatron_bridge_ext  # noqa: F401
ops = ["qkv_pack", "qkv_pack_out", "qkv_unpack", "qkv_unpack_out", "gate_up_pack", "gate_up_pack_out",
       "gate_up_unpack", "gate_up_unpack_out", "expert_pack_fc1", "expert_pack_fc1_out", "expert_pack_fc2",
       "expert_pack_fc2_out", "expert_unpack_fc1", "expert_unpack_fc1_out", "expert_unpack_fc2",
       "expert_unpack_fc2_out", "shard_copy", "flat_range_copy"]
ops += sorted(o for o in dir(torch.ops.bridge) if o.startswith(("fp8_", "mxfp4_")))  # the block-quantized ops
missing = [o for o in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"bridge::{o}", "CUDA")]
print("CUDA kernels:", len(ops) - len(missing), "of", len(ops), "registered")
sys.exit(f"missing CUDA kernels: {missing}" if missing else 0)
PY

step "tests (CUDA cases)"
set +e
"$PYTHON" -m pytest -q -rs tests -k "cuda and not compile"
rc=$?
set -e
if [[ $rc -ne 0 && $rc -ne 5 ]]; then echo "gpu_check: CUDA tests failed (pytest exit $rc)"; exit $rc; fi
if [[ $rc -eq 5 ]]; then echo "gpu_check: no test matched -k cuda"; exit 1; fi

step "benchmark (--device cuda --check)"
"$PYTHON" benchmarks/bench_ops.py --device cuda --check

if [[ "${GPU_CHECK_E2E:-1}" != "0" ]]; then
  step "end-to-end benchmark (one GPU, NCCL, world 1)"
  if ! "$PYTHON" -c "import megatron.core, transformers" 2>/dev/null; then
    echo "gpu_check: megatron-core or transformers is not importable by $PYTHON; install them or set GPU_CHECK_E2E=0"
    exit 1
  fi
  "$PYTHON" benchmarks/bench_convert.py --device cuda --layouts 1x1 --layers "${GPU_CHECK_LAYERS:-22}"
fi

# The logits checks (imported checkpoints in megatron-core models on the GPU, logits against transformers), one row
# each: script (benchmarks/<script>.py) | switch (<switch>=0 skips it, <switch>_LAYOUTS sets its --layouts, default
# 1,2) | the modules it needs | what it checks.
LOGITS_CHECKS=(
  "te_check|GPU_CHECK_TE|megatron.core, transformers, transformer_engine|Transformer Engine models, dense and MoE"
  "dsa_check|GPU_CHECK_DSA|megatron.core, transformers, transformer_engine|DeepSeek sparse attention, TE DSA model"
  "hybrid_check|GPU_CHECK_HYBRID|megatron.core, transformers, mamba_ssm|NemotronH hybrid (Mamba-2 / attention / MLP)"
  "gdn_check|GPU_CHECK_GDN|megatron.core, transformers, transformer_engine, fla|gated delta-net, megatron's fla kernels"
)
for row in "${LOGITS_CHECKS[@]}"; do
  IFS='|' read -r script switch modules title <<<"$row"
  if [[ "${!switch:-1}" == "0" ]]; then continue; fi
  layouts="${switch}_LAYOUTS"
  layouts="${!layouts:-1,2}"
  step "$script: $title, logits against transformers (TP $layouts)"
  if ! "$PYTHON" -c "import $modules" 2>/dev/null; then
    echo "gpu_check: $script needs $modules, not all importable by $PYTHON; install them or set $switch=0"
    exit 1
  fi
  "$PYTHON" "benchmarks/$script.py" --layouts "$layouts"
done

echo; echo "gpu_check: all steps passed"
