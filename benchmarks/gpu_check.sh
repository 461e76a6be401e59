#!/usr/bin/env bash
# The prepared GPU check of issue 17 (item 8): one call on a lent GPU box, under 8 minutes on one H100.
#
# Prints one JSON line per part (stdout), also when a part fails or runs out of time ("ok": false with the
# exit status and the tail of its error output), then a summary line:
#   pytest     pytest -m gpu (the gpu-marked tests: CUDA predictions equal CPU, OOM halving on a real GPU, ...)
#   predict    predict_raster windows/s on a generated 8192^2 scene, resnet34 U-Net, 512 px windows, bf16,
#              TTA none and d4 at the default batches, against the bare forward passes of the same windows
#              and views in the same run (targets: >= 1500 windows/s with TTA none; >= 0.85x the bare passes)
#   train      training images/s of `rsseg train` (resnet34 U-Net, 256 px crops, bf16) against the bare
#              training step on a fixed batch (bench_train.train_rate) (target: >= 0.9x)
#   pipeline   `rsseg run pipelines/demo.yaml --set device=cuda`, shrunk with --set, on the default
#              LocalCluster, completing
#
# Usage: benchmarks/gpu_check.sh [--cpu-smoke]
#   --cpu-smoke (or GPU_CHECK_CPU_SMOKE=1): device cpu and everything tiny, to check the script without a GPU.
# Environment: PYTHON (default .venv/bin/python if present, else python3), GPU_CHECK_WORKDIR (default: a new
# temporary folder), GPU_CHECK_PARTS (default: "pytest predict train pipeline").
set -u
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON; elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
SMOKE=${GPU_CHECK_CPU_SMOKE:-0}
[[ "${1:-}" == "--cpu-smoke" ]] && SMOKE=1  # (--part NAME: internal, see part())
PARTS=${GPU_CHECK_PARTS:-pytest predict train pipeline}
WORK=${GPU_CHECK_WORKDIR:-$(mktemp -d "${TMPDIR:-/tmp}/rsseg-gpu-check.XXXXXX")}
mkdir -p "$WORK"
if [[ "$SMOKE" == 1 ]]; then
    DEVICE=cpu; SCENE=512; TRAIN_IMAGES=16; TRAIN_BATCH=4; TRAIN_EPOCHS=2; TRAIN_STEPS=2
    DEMO_SETS=(--set device=cpu --set data.n_train=16 --set data.n_test=4 --set scenes.size=640
               --set train_tianchi.config.run.epochs=1 --set train_chips.config.run.epochs=1)
    LIMITS=(pytest=300 predict=300 train=300 pipeline=600)
else
    DEVICE=cuda; SCENE=8192; TRAIN_IMAGES=1024; TRAIN_BATCH=32; TRAIN_EPOCHS=3; TRAIN_STEPS=20
    DEMO_SETS=(--set device=cuda --set data.n_train=96 --set data.n_test=16 --set scenes.size=1024
               --set train_tianchi.config.run.epochs=2 --set train_chips.config.run.epochs=1)
    LIMITS=(pytest=75 predict=150 train=120 pipeline=120)  # 465 s at most, parts one after another
fi
limit() { local kv; for kv in "${LIMITS[@]}"; do [[ "${kv%%=*}" == "$1" ]] && echo "${kv#*=}"; done; }
FAILED=0

# Run part $1 under `timeout`: its last stdout line must be a JSON object; otherwise print one saying why.
part() {
    local name=$1 out err rc start seconds
    out="$WORK/$name.out"; err="$WORK/$name.err"
    start=$(date +%s)
    GPU_CHECK_CPU_SMOKE=$SMOKE GPU_CHECK_WORKDIR=$WORK PYTHON=$PY \
        timeout --kill-after=10 "$(limit "$name")" bash "$0" --part "$name" >"$out" 2>"$err"
    rc=$?
    seconds=$(( $(date +%s) - start ))
    "$PY" - "$name" "$rc" "$seconds" "$out" "$err" <<'EOF' || { FAILED=1; printf '{"part": "%s", "ok": false, "rc": %s, "error": "python could not report"}\n' "$name" "$rc"; }
import json, sys
name, rc, seconds, out, err = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
lines = [l for l in open(out, errors="replace").read().splitlines() if l.strip()]
try:
    result = json.loads(lines[-1]) if lines else {}
    result = result if isinstance(result, dict) else {"output": result}
except ValueError:
    result = {"output_tail": lines[-5:]}
result = {"part": name, "ok": rc == 0 and "error" not in result, "rc": rc, "seconds": seconds, **result}
if rc in (124, 137):
    result["error"] = f"timed out after {seconds} s"
if not result["ok"]:
    result.setdefault("error", "failed")
    result["stderr_tail"] = open(err, errors="replace").read().splitlines()[-15:]
print(json.dumps(result))
sys.exit(0 if result["ok"] else 1)
EOF
    [[ $? -eq 0 ]] || FAILED=1
}

pytest_part() {
    "$PY" -m pytest -p no:cacheprovider -q -m gpu --no-header -rfEs 2>&1 | tail -n 40 >"$WORK/pytest.log"
    local rc=${PIPESTATUS[0]}
    "$PY" - "$rc" "$WORK/pytest.log" <<'EOF'
import json, sys
rc, lines = int(sys.argv[1]), open(sys.argv[2]).read().splitlines()
summary = lines[-1] if lines else ""
print(json.dumps({"pytest_rc": rc, "summary": summary, "failures": [l for l in lines if l.startswith(("FAILED", "ERROR"))],
                  **({} if rc in (0, 5) else {"error": "gpu tests failed"})}))
EOF
}

predict_part() {
    "$PY" - "$SCENE" "$WORK" "$DEVICE" <<'EOF'
import json, sys
from pathlib import Path

from rsseg.pipeline.process import configure_process

configure_process()
sys.path.insert(0, "benchmarks")
import torch  # noqa: E402

import bench_inference as bi  # noqa: E402
from rsseg.inference.batching import batch_plan  # noqa: E402
from rsseg.inference.tta import resolve_device, tta_views  # noqa: E402
from rsseg.models import create_model  # noqa: E402

size, work, device = int(sys.argv[1]), Path(sys.argv[2]), resolve_device(sys.argv[3])
src = bi.scene(work, size)
torch.manual_seed(0)
model, precision = create_model("unet", "resnet34").eval(), "bf16"
out = {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
       "scene_px": size, "model": "unet/resnet34 (random init)", "precision": precision, "window": bi.TILE,
       "overlap": bi.OVERLAP, "output": "both (uint8)"}
for tta in ("none", "d4"):
    windows, views = batch_plan(None, len(tta_views(tta)), device, bi.TILE, precision)
    bare = min(bi.bare_forward_seconds(model, src, device, precision, tta, windows)[0] for _ in range(2))
    n = len(bi.TileGrid(size, size, bi.TILE, bi.OVERLAP))
    wall = min(bi.timed_predict(model, src, work / f"predict_{tta}.tif", tta=tta, device=device,
                                precision=precision, output="both", cog=False) for _ in range(2))
    out.update({f"{tta}_windows": n, f"{tta}_windows_per_batch": windows, f"{tta}_views_per_forward": views,
                f"{tta}_predict_s": round(wall, 3), f"{tta}_bare_forward_s": round(bare, 3),
                f"{tta}_windows_per_s": round(n / wall, 1), f"{tta}_bare_windows_per_s": round(n / bare, 1),
                f"{tta}_predict_to_bare": round(bare / wall, 3)})
cog = bi.timed_predict(model, src, work / "predict_cog.tif", tta="none", device=device, precision=precision,
                       output="both")
out.update({"none_predict_s_with_cog": round(cog, 3),
            "none_windows_per_s_with_cog": round(out["none_windows"] / cog, 1)})
import rsseg.inference.predict as predict_module  # noqa: E402

threads, predict_module.reader_threads = predict_module.reader_threads(device), lambda device: 1
one = min(bi.timed_predict(model, src, work / "predict_one_reader.tif", tta="none", device=device,
                           precision=precision, output="both", cog=False) for _ in range(2))
out.update({"reader_threads": threads, "none_windows_per_s_one_reader": round(out["none_windows"] / one, 1)})
out["targets"] = {"none_windows_per_s_min": 1500, "predict_to_bare_min": 0.85}
print(json.dumps(out))
EOF
}

train_part() {
    "$PY" - "$WORK" "$DEVICE" "$TRAIN_IMAGES" "$TRAIN_BATCH" "$TRAIN_EPOCHS" "$TRAIN_STEPS" <<'EOF'
import csv, json, os, sys
from pathlib import Path

from rsseg.pipeline.process import configure_process

configure_process()
sys.path.insert(0, "benchmarks")
import torch  # noqa: E402

from bench_train import train_rate  # noqa: E402
from rsseg.synth.generate import make_tianchi  # noqa: E402
from rsseg.training.launch import launch  # noqa: E402

work, device = Path(sys.argv[1]), torch.device(sys.argv[2])
images, batch, epochs, steps = map(int, sys.argv[3:7])
root = work / "tianchi"
if not (root / "train_mask.csv").exists():
    make_tianchi(root, n_train=images, n_test=0, seed=0, progress=False)
arch = {"arch": "unet", "encoder": "resnet34"}
bare = train_rate(arch, device, True, True, 256, batch, steps)
workers = 0 if device.type == "cpu" else max(1, min(8, len(os.sched_getaffinity(0)) - 2))
cfg = {"data": {"source": "tianchi", "root": str(root), "batch_size": batch, "val_batch_size": batch,
                "val_fraction": 0.05, "seed": 0, "num_workers": workers, "augment": {"d4": True, "crop": 256}},
       "model": arch,
       "run": {"out_dir": str(work / "train"), "epochs": epochs, "device": str(device), "precision": "bf16",
               "overwrite": True, "progress": False, "thresholds": [0.5], "min_pixels": [0]}}
launch(cfg)
rows = list(csv.DictReader(open(work / "train" / "metrics.csv")))
rates = [round(float(r["train_images_per_s"]), 1) for r in rows]
trainer = max(rates[1:] or rates)  # the first epoch pays for start-up (workers, cuDNN autotuning)
print(json.dumps({"device": str(device), "model": "unet/resnet34", "crop": 256, "batch": batch, "precision": "bf16",
                  "channels_last": True, "loader_workers": workers, "images": images,
                  "train_images_per_s_by_epoch": rates, "train_images_per_s": trainer,
                  "bare_step_images_per_s": round(bare, 1), "train_to_bare": round(trainer / bare, 3),
                  "targets": {"train_to_bare_min": 0.9}}))
EOF
}

pipeline_part() {
    "$PY" -m rsseg.cli run pipelines/demo.yaml --workdir "$WORK/demo" --no-resume "${DEMO_SETS[@]}" \
        >"$WORK/pipeline.json" 2>"$WORK/pipeline.log"
    local rc=$?
    "$PY" - "$rc" "$WORK/pipeline.json" "$WORK/pipeline.log" "${DEMO_SETS[*]}" <<'EOF'
import json, sys
rc, sets = int(sys.argv[1]), sys.argv[4]
result = {"command": f"rsseg run pipelines/demo.yaml {sets}", "rsseg_rc": rc}
try:  # the summary: from the first line that opens a JSON object (a dashboard line may come first)
    lines = open(sys.argv[2], errors="replace").read().splitlines()
    summary = json.loads("\n".join(lines[next(i for i, l in enumerate(lines) if l.startswith("{")):]))
    result.update({k: v for k, v in summary.items() if k != "stages"})
    result["stage_seconds"] = {k: round(v.get("seconds", 0), 1) for k, v in summary.get("stages", {}).items()}
    result["evaluate"] = summary.get("stages", {}).get("evaluate")
except (ValueError, StopIteration, AttributeError):
    result["log_tail"] = open(sys.argv[3], errors="replace").read().splitlines()[-15:]
if rc != 0:
    result["error"] = "rsseg run failed"
print(json.dumps(result, default=str))
EOF
}

if [[ "${1:-}" == "--part" ]]; then  # one part, run by part() under timeout
    "${2}_part"
    exit $?
fi
echo "{\"gpu_check\": \"start\", \"smoke\": $SMOKE, \"device\": \"$DEVICE\", \"workdir\": \"$WORK\", \"parts\": \"$PARTS\"}"
for name in $PARTS; do
    case $name in
        pytest | predict | train | pipeline) part "$name" ;;
        *) echo "{\"part\": \"$name\", \"ok\": false, \"error\": \"unknown part (pytest predict train pipeline)\"}"; FAILED=1 ;;
    esac
done
echo "{\"gpu_check\": \"done\", \"ok\": $([[ $FAILED == 0 ]] && echo true || echo false)}"
exit "$FAILED"
