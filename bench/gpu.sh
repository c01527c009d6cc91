#!/usr/bin/env bash
# The prepared script for a GPU machine: checks that teachx's GPU paths work there, measures its step times and
# runs the IMPACTX paper grid's scarce-data studies within a time budget, leaving what it found in a few files.
#
# What it runs, in parts (PARTS picks them, MODE sizes them):
#   checks   nvidia-smi; the DDP / NCCL path as far as one GPU allows: `teachx train --nproc 1 device=cuda` on the
#            bundled data (2 epochs), a world-size-1 NCCL process group with DDP around a teachx backbone on the GPU
#            (parity with the same steps without DDP), and the 2-process CPU gloo parity tests
#            (tests/test_distributed.py, CUDA hidden, in the background meanwhile). A 2-process NCCL run needs
#            2 GPUs: summary.txt says so.
#   bench    python bench/bench_paper_grid.py --device cuda (AMP on): per-step costs of the 3 backbones x 3 cells,
#            baseline / IMPACTX / lambda = 0 / ABN, and the DeepSHAP teacher-map throughput -> paper_grid_gpu.json.
#   studies  the paper grid's scarce-data cells, studies/study-cifar10-mobilenet.yaml and
#            studies/study-cifar10-efficientnet_b2.yaml (CIFAR-10 (JPEG), 5,000 training images, 5 seeds x baseline /
#            IMPACTX / lambda = 0 / shuffled / ABN), one after the other, each with the study workers WORKERS gives
#            it on the one GPU (units are locked, each worker skips what another holds); the first worker makes the
#            teacher and its DeepSHAP maps alone before the others join. With time left over: the 45k-image
#            CIFAR-10 cell of MobileNet (paper-cifar10-mobilenet, 3 seeds, baseline / IMPACTX / lambda = 0).
# MODE=smoke runs every code path of the above on tiny settings instead (a first call that finds CUDA-only bugs
# cheaply): 2 epochs of the checks, the bench on the CIFAR-10 shape only, the two studies on 512 images x 1 epoch
# x 2 seeds with 2 workers each, no 45k cell. MODE=full (the default) runs them at their size.
# Machines without internet access read the JPEG copy of CIFAR-10 (imagefolder:<zip> with data.hflip=true)
# instead of the official files.
#
# From the repository root (or anywhere: it changes to the root):
#   bash bench/gpu.sh                         # BUDGET_S=840 by default: 14 minutes in all
#   DRY_RUN=1 bash bench/gpu.sh               # print the commands instead of running them (any machine)
#   MODE=smoke BUDGET_S=220 bash bench/gpu.sh # a quick first call, then the real one with what is left:
#   PARTS="bench studies" BUDGET_S=540 bash bench/gpu.sh
# On a machine that gets a copy of the checkout, the CIFAR-10 JPEG zip must travel with it (a shared/ folder
# inside the checkout: mkdir -p shared/data && cp ../shared/data/cifar10-jpg.zip shared/data/).
# Afterwards: python bench/bench_paper_grid.py --headers-from OUT/paper_grid_gpu.json (the paper configs' GPU
# lines), python bench/gpu_partial_studies.py on the studies' archives (study-5k-*.tgz: every unit's records, no
# weights), or unpack them and run `teachx report` on them.
#
# Environment variables:
#   MODE       full (default) or smoke, as above.
#   PARTS      the parts that run, from "checks bench studies" (the default); a second call can skip what a first
#              one did.
#   BUDGET_S   total seconds (default 840). Before each step the time left is checked, a step that does not fit is
#              skipped (and logged), and every step runs under a timeout of the time left.
#   OUT        where the results go (default bench/results/gpu): summary.txt, log.txt, paper_grid_gpu.json,
#              nccl_check.json, study-5k-<backbone>.tgz and study-45k-mobilenet.json (at most 8 files).
#   WORK       run and study directories, data and map caches (default /tmp/teachx-gpu).
#   CIFAR10_ZIP  the JPEG zip (default: shared/data/cifar10-jpg.zip, else ../shared/data/cifar10-jpg.zip).
#   WORKERS    the 5k studies in order, with their study workers (default "mobilenet=3 efficientnet_b2=3").
#   STUDY_OVERRIDES  extra KEY=VALUE overrides for the study cells, separated by spaces (e.g. "train.epochs=10").
#   DRY_RUN=1  print the commands only; FORCE_CPU=1 runs the GPU steps on the CPU (tests this script anywhere).
# A failing step is logged and the next one runs. No virtual environment is made: .venv/bin/python when it has
# torch, else python3 with the checkout on PYTHONPATH (the machine needs teachx's dependencies installed).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-bench/results/gpu}"
WORK="${WORK:-/tmp/teachx-gpu}"
BUDGET_S="${BUDGET_S:-840}"
DRY_RUN="${DRY_RUN:-0}"
MODE="${MODE:-full}"
FORCE_CPU="${FORCE_CPU:-0}" # 1: run the GPU steps on the CPU (tests this script's logic on any machine)
DEV=cuda
WORKERS="${WORKERS:-mobilenet=3 efficientnet_b2=3}" # the 5k studies, in order, and the study workers of each
PARTS="${PARTS:-checks bench studies}"               # which of (1) checks, (2) bench, (3)+(4) studies run
STUDY_OVERRIDES="${STUDY_OVERRIDES:-}"
RESERVE_S=20 # kept for the summary at the end
START=$(date +%s)
mkdir -p "$OUT" "$WORK"
LOG="$OUT/log.txt"
SUMMARY="$OUT/summary.txt"
: >"$LOG"
: >"$SUMMARY"

if [[ -x .venv/bin/python ]] && .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    PY=.venv/bin/python
else
    PY=$(command -v python3)
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TEACHX_CACHE="$WORK/cache" # decoded data and teacher-map stores
export TEACHX_DATA="$WORK/data"
TEACHX=("$PY" -m teachx)

elapsed() { echo $(($(date +%s) - START)); }
left() { echo $((BUDGET_S - $(elapsed) - RESERVE_S)); }
log() { echo "[$(date +%H:%M:%S) +$(elapsed)s] $*" | tee -a "$LOG"; }
note() {
    echo "$*" >>"$SUMMARY"
    log "$*"
}

# step NAME NEED_S CAP_S CMD...: run CMD under a timeout of min(CAP_S, time left) when at least NEED_S are left;
# its output goes to the terminal, log.txt and $WORK/NAME.out; the outcome goes to summary.txt. Never fails.
step() {
    local name=$1 need=$2 cap=$3
    shift 3
    local avail limit t0 rc
    avail=$(left)
    if ((avail < need)); then
        note "SKIPPED $name: ${avail}s of the budget left, it needs >= ${need}s"
        return 0
    fi
    limit=$((cap < avail ? cap : avail))
    if [[ $DRY_RUN == 1 ]]; then
        note "DRY-RUN $name (timeout ${limit}s): $(printf '%q ' "$@")"
        return 0
    fi
    log "START $name (timeout ${limit}s): $*"
    t0=$(date +%s)
    set +e
    timeout --signal=INT --kill-after=20 "$limit" "$@" 2>&1 | tee "$WORK/$name.out" | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    set -e
    if ((rc == 0)); then
        note "OK $name ($(($(date +%s) - t0))s)"
    elif ((rc == 124 || rc == 137)); then
        note "TIMED OUT $name after $(($(date +%s) - t0))s (the budget); what it finished is kept"
    else
        note "FAILED $name (exit $rc after $(($(date +%s) - t0))s): see log.txt"
    fi
    return 0
}

note "teachx GPU script, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
note "mode $MODE; budget ${BUDGET_S}s; python $PY; OUT=$OUT; WORK=$WORK; WORKERS=$WORKERS; DRY_RUN=$DRY_RUN"

# ------------------------------------------------------------------------------ (1) the device, DDP / NCCL
NGPU="?"
if [[ $DRY_RUN == 1 ]]; then
    note "DRY-RUN nvidia-smi >> $LOG"
    CUDA_OK=1
elif [[ $FORCE_CPU == 1 ]]; then
    note "FORCE_CPU=1: the GPU steps run on the CPU (a test of this script; no figure from it is a GPU figure)"
    CUDA_OK=1
    DEV=cpu
else
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi >>"$LOG" 2>&1 || true
        note "GPU: $(nvidia-smi -L 2>/dev/null | head -n 4 | tr '\n' ' ')"
    else
        note "no nvidia-smi on this machine"
    fi
    if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
        CUDA_OK=1
        NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo "?")
        note "torch: $("$PY" -c "import torch; print(torch.__version__, 'CUDA', torch.version.cuda, 'GPUs', torch.cuda.device_count(), 'NCCL', '.'.join(map(str, torch.cuda.nccl.version())))" 2>&1)"
    else
        CUDA_OK=0
        note "torch sees no CUDA device: the GPU steps are skipped, the CPU gloo parity tests still run"
    fi
fi

NCCL_PY="$WORK/nccl_check.py"
cat >"$NCCL_PY" <<'EOF'
"""World-size-1 NCCL process group on this GPU; DDP around a teachx backbone, AMP steps, parity with no DDP."""
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from teachx.models import build_model
from teachx.utils.seeding import seed_everything

out = sys.argv[1]
local = int(os.environ.get("LOCAL_RANK", "0"))
torch.cuda.set_device(local)
dev = torch.device("cuda", local)
seed_everything(0)
dist.init_process_group("nccl")
ws = dist.get_world_size()
res = {"backend": dist.get_backend(), "world_size": ws, "device": torch.cuda.get_device_name(dev),
       "nccl": ".".join(map(str, torch.cuda.nccl.version())), "torch": torch.__version__}
t = torch.full((8,), float(dist.get_rank() + 1), device=dev)
dist.all_reduce(t)
res["all_reduce_ok"] = bool(torch.all(t == ws * (ws + 1) / 2))
g = torch.Generator().manual_seed(0)
xs = [torch.randn(64, 3, 32, 32, generator=g) for _ in range(4)]
ys = [torch.randint(0, 10, (64,), generator=g) for _ in range(4)]


def train(ddp):
    torch.manual_seed(0)
    model = build_model("mobilenet", 3, 10, (32, 32)).to(dev).train()
    net = DistributedDataParallel(model, device_ids=[local]) if ddp else model
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for x, y in zip(xs, ys):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(net(x.to(dev)), y.to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    torch.cuda.synchronize()
    return [p.detach().float().clone() for p in model.parameters()]


plain, wrapped = train(False), train(True)
res["ddp_vs_plain_max_abs_diff"] = max(float((a - b).abs().max()) for a, b in zip(plain, wrapped))
res["parity_ok"] = res["ddp_vs_plain_max_abs_diff"] <= 1e-3  # 0 expected, up to non-deterministic CUDA kernels
dist.barrier(device_ids=[local])
dist.destroy_process_group()
with open(out, "w") as f:
    json.dump(res, f, indent=1)
print(json.dumps(res))
sys.exit(0 if res["all_reduce_ok"] and res["parity_ok"] else 1)
EOF

# the CPU gloo parity tests in the background (CPU only, 4 threads of the 16 cores) while the GPU steps of (1) run
GLOO_OUT="$WORK/gloo_parity_cpu.out"
GLOO_PID=""
has() { [[ " $PARTS " == *" $1 "* ]]; }
if ! has checks; then
    note "SKIPPED (1): PARTS=$PARTS"
elif [[ $DRY_RUN == 1 ]]; then
    note "DRY-RUN (background) gloo_parity_cpu: CUDA_VISIBLE_DEVICES= pytest tests/test_distributed.py"
else
    log "START (background) gloo_parity_cpu: tests/test_distributed.py with CUDA hidden"
    (
        t0=$(date +%s)
        set +e
        CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=2 timeout --signal=INT --kill-after=20 300 \
            "$PY" -m pytest -q -x -p no:cacheprovider tests/test_distributed.py >"$GLOO_OUT" 2>&1
        echo "$? $(($(date +%s) - t0))" >"$GLOO_OUT.rc"
    ) &
    GLOO_PID=$!
fi

if ((CUDA_OK)) && has checks; then
    step train_nproc1_cuda 45 150 "${TEACHX[@]}" train device=$DEV train.epochs=2 --nproc 1 --out "$WORK/train-nproc1-cuda" --overwrite -q
    if [[ $DEV == cuda ]]; then
        step nccl_world1_ddp 30 150 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 "$NCCL_PY" "$OUT/nccl_check.json"
    fi
fi
if [[ -n $GLOO_PID ]]; then
    wait "$GLOO_PID" || true
    cat "$GLOO_OUT" >>"$LOG"
    read -r grc gsec <"$GLOO_OUT.rc" || { grc="?"; gsec="?"; }
    if [[ $grc == 0 ]]; then note "OK gloo_parity_cpu (${gsec}s): $(tail -n 1 "$GLOO_OUT")"; else note "FAILED gloo_parity_cpu (exit $grc after ${gsec}s): see log.txt"; fi
fi
has checks && {
    echo "NOT CHECKED: a 2-process NCCL run (teachx's own DDP path with world size > 1 on GPUs: sharded map filling,"
    echo "  gradient all-reduce and buffer broadcasts over NCCL) needs 2 GPUs and this machine has $NGPU."
    echo "  teachx --nproc 1 starts no process group (torchrun only for N > 1), and NCCL refuses two ranks on one GPU."
    echo "  Checked instead: the single-GPU CLI run (train_nproc1_cuda), NCCL + DDP at world size 1 on the GPU with"
    echo "  parity against plain steps (nccl_world1_ddp, nccl_check.json), and teachx's DDP logic with 2 gloo"
    echo "  processes on the CPU against 1 process (gloo_parity_cpu: tests/test_distributed.py, CUDA hidden)."
} | tee -a "$LOG" >>"$SUMMARY"

# ------------------------------------------------------------------------------ (2) per-step costs on the GPU
if ((CUDA_OK)) && has bench; then
    if [[ $MODE == smoke ]]; then
        bench_args=(--shapes 3x32x32:10 --steps 3 --repeats 3)
    else
        bench_args=()
    fi
    step bench_paper_grid_gpu 60 240 "$PY" bench/bench_paper_grid.py --device $DEV "${bench_args[@]}" --out "$OUT/paper_grid_gpu.json"
    if [[ -f "$WORK/bench_paper_grid_gpu.out" ]]; then
        grep -v '^wrote ' "$WORK/bench_paper_grid_gpu.out" >>"$SUMMARY" || true
        echo "  -> configs' GPU lines: python bench/bench_paper_grid.py --headers-from paper_grid_gpu.json" >>"$SUMMARY"
    fi
fi

# ------------------------------------------------------------------------------ (3) + (4) the CIFAR-10 studies
ZIP=""
for z in "${CIFAR10_ZIP:-}" shared/data/cifar10-jpg.zip ../shared/data/cifar10-jpg.zip; do
    if [[ -n $z && -f $z ]]; then
        ZIP=$z
        break
    fi
done

study_progress() { # what a (possibly interrupted) study directory holds: rows, units, epochs, seconds per epoch
    "$PY" - "$1" <<'PYEOF'
import json
import statistics
import sys
from pathlib import Path

root = Path(sys.argv[1])
if (root / "study.json").is_file():
    data = json.loads((root / "study.json").read_text())
    for row in data["rows"]:
        s = row["summary"]
        print(f"  {row['arm']:<10} test acc {s.get('mean', float('nan')):.4f} over {len(row['test_acc'])} seed(s)"
              + (f"; vs {row['vs_control']['control']}: {row['vs_control']['mean_diff']:+.4f}, p={row['vs_control'].get('p_ttest')}"
                 if "vs_control" in row else ""))
n_done = 0
for unit in sorted((root / "units").glob("*/unit.json")):
    info = json.loads(unit.read_text())
    cfg = info.get("config", {})
    hist_path = unit.parent / "history.json"
    hist = json.loads(hist_path.read_text()) if hist_path.is_file() else []
    secs = [h["seconds"] for h in hist if isinstance(h, dict) and "seconds" in h]
    n_done += (unit.parent / "stage.json").is_file()
    what = info.get("kind", "?")
    print(f"  unit {unit.parent.name} {what:<10} seed {cfg.get('seed')}: {len(hist)}/{cfg.get('train', {}).get('epochs')} epochs"
          + (f", median {statistics.median(secs):.2f} s/epoch" if secs else "")
          + (" (complete)" if (unit.parent / "stage.json").is_file() else ""))
print(f"  {n_done} unit(s) complete")
PYEOF
}

# workers NAME SECONDS DIR N CONFIG OVERRIDES...: N study workers on DIR, each under a timeout of SECONDS; waits for
# them. Worker 1 runs alone until it has finished 2 units -- the seed-0 baseline (the teacher) and the first IMPACTX
# unit, whose start made the teacher's DeepSHAP maps -- and only then do the others join: measured on an H200
# (2026-11-30), 8 processes sharing the GPU from the start made every epoch 3-9x slower and the fp32 DeepSHAP pass,
# time-sliced with 7 training processes, did not finish 5,500 MobileNet maps in 400 s (58 s alone).
workers() {
    local name=$1 secs=$2 dir=$3 n=$4 config=$5
    shift 5
    local -a pids=()
    if [[ $DRY_RUN == 1 ]]; then
        note "DRY-RUN $name: $n x (timeout ${secs}s; workers 2..$n once worker 1 has finished 2 units) $(printf '%q ' "${TEACHX[@]}" study "$config" "$@" --out "$dir" -q --no-report)"
        return 0
    fi
    log "START $name: $n worker(s), timeout ${secs}s: teachx study $config $* --out $dir"
    local t_end=$(($(date +%s) + secs))
    for i in $(seq 1 "$n"); do
        local rest=$((t_end - $(date +%s)))
        ((rest > 30)) || break
        OMP_NUM_THREADS=2 TEACHX_THREADS=2 timeout --signal=INT --kill-after=20 "$rest" \
            "${TEACHX[@]}" study "$config" "$@" --out "$dir" -q --no-report >"$WORK/$name.w$i.out" 2>&1 &
        pids+=($!)
        if ((i == 1)); then # alone until the teacher and its maps exist (or it has stopped)
            while kill -0 "${pids[0]}" 2>/dev/null && (($(grep -c '^\[[0-9]*/' "$WORK/$name.w1.out" || true) < 2)); do sleep 2; done
            log "$name: worker 1 has $(grep -c '^\[[0-9]*/' "$WORK/$name.w1.out" || true) unit(s) done; the other workers join"
        fi
    done
    for pid in "${pids[@]}"; do wait "$pid" || true; done
}

collect() { # collect NAME DIR: what each worker said, the study's state, and an archive of it (no weights)
    local name=$1 dir=$2
    [[ $DRY_RUN == 1 ]] && return 0
    for f in "$WORK/$name".w*.out; do
        [[ -f $f ]] || continue
        echo "--- $f" >>"$LOG"
        cat "$f" >>"$LOG"
        if grep -q "Traceback\|error" "$f"; then note "$name: $(basename "$f") reports an error (log.txt): $(grep -m1 -i "error" "$f")"; fi
    done
    if [[ -d $dir ]]; then
        {
            echo "$name ($dir):"
            study_progress "$dir" 2>&1 || echo "  (could not read $dir)"
        } | tee -a "$LOG" >>"$SUMMARY"
        tar -czf "$OUT/$name.tgz" -C "$(dirname "$dir")" --exclude='*.safetensors' --exclude='.lock' "$(basename "$dir")" \
            || note "could not archive $dir"
    fi
}

if ! has studies; then
    note "SKIPPED (3) and (4): PARTS=$PARTS"
elif ((!CUDA_OK)); then
    note "SKIPPED the CIFAR-10 studies: no CUDA device"
elif [[ -z $ZIP ]]; then
    note "SKIPPED the CIFAR-10 studies: no cifar10-jpg.zip (CIFAR10_ZIP, shared/data/ or ../shared/data/); the machine"
    note "  has no internet for data.download=true. Copy the zip to shared/data/ in the checkout before calling the device."
else
    ZIP_LOCAL="$WORK/cifar10-jpg.zip"
    [[ $DRY_RUN == 1 ]] || cp "$ZIP" "$ZIP_LOCAL"
    note "The CIFAR-10 studies read imagefolder:$ZIP (the JPEG copy of CIFAR-10, copied to $ZIP_LOCAL)."
    extra=()
    [[ -n $STUDY_OVERRIDES ]] && read -r -a extra <<<"$STUDY_OVERRIDES"
    common=("data.name=imagefolder:$ZIP_LOCAL" device=$DEV)
    if [[ $MODE == smoke ]]; then
        common+=(data.train_size=512 train.epochs=1 "study.seeds=[0,1]" teacher.eval_images=64 teacher.faith_images=16)
    fi
    avail=$(left)
    if ((avail < 60)); then
        note "SKIPPED the 5k studies: ${avail}s left"
    else
        # one study at a time, in WORKERS' order, each with all the time left (less 25 s to collect it); the 45k cell
        # only gets what they leave
        for spec in $WORKERS; do
            bb=${spec%%=*}
            nw=${spec#*=}
            [[ $MODE == smoke ]] && nw=2
            avail=$(left)
            if ((avail < 60)); then
                note "SKIPPED study-5k-$bb: ${avail}s left"
                continue
            fi
            t0=$(date +%s)
            workers "study-5k-$bb" "$((avail - 25))" "$WORK/study-5k-$bb" "$nw" "studies/study-cifar10-$bb.yaml" "${common[@]}" "${extra[@]}"
            note "study-5k-$bb: workers ended after $(($(date +%s) - t0))s"
            collect "study-5k-$bb" "$WORK/study-5k-$bb"
        done
    fi
    if [[ $MODE != smoke ]] && (($(left) >= 240)); then
        workers study-45k-mobilenet "$(($(left) - 15))" "$WORK/study-45k-mobilenet" 3 paper-cifar10-mobilenet \
            "data.name=imagefolder:$ZIP_LOCAL" data.download=false device=$DEV "study.seeds=[0,1,2]" \
            "study.arms={impactx: {}, lambda0: {impactx.lam: 0}}" "${extra[@]}"
        if [[ -f $WORK/study-45k-mobilenet/study.json ]]; then cp "$WORK/study-45k-mobilenet/study.json" "$OUT/study-45k-mobilenet.json"; fi
        { echo "study-45k-mobilenet:"; study_progress "$WORK/study-45k-mobilenet" 2>&1 || true; } | tee -a "$LOG" >>"$SUMMARY"
    elif [[ $MODE != smoke ]]; then
        note "SKIPPED the 45k MobileNet cell: $(left)s left after the 5k studies (it needs >= 240s)"
    fi
fi

note "done in $(elapsed)s of ${BUDGET_S}s"
