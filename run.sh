#!/usr/bin/env bash
# CAUSE end to end: crops -> mediator -> front door -> fine-tuning -> test.
# Edit the variables below (or set them in the environment: `head=tr bash run.sh`).
# The default is the embedded toy dataset with a random ViT-Tiny: a plumbing check that runs on a CPU.
set -euo pipefail

dataset="${dataset:-toy}"          # toy, cocostuff27, cityscapes, pascalvoc, coco81, coco171, folder
head="${head:-${structure:-mlp}}"  # mlp or tr (the reference's "structure": cnn/detr also work)
ckpt="${ckpt:-}"                   # e.g. checkpoint/dino_vitbase8_pretrain.pth, weights/toy_vit_dino.pth (toy); empty = random --arch
arch="${arch:-vit_tiny_patch16_224}"  # timm ViT used when ckpt is empty
gpu="${gpu:-0}"                    # e.g. 0,1,2,3: one process per GPU (ignored on a CPU-only machine)
data_dir="${data_dir:-data}"       # dataset root (the toy data is generated here on first use)
out="${out:-CAUSE}"                # artifact root
reference_stage3="${reference_stage3:-yes}"  # yes: stage 3 as the published CAUSE (the linear probe's labels
                                   # train the head); no: strictly label-free (see README, "Stage 3: two protocols")
extra="${extra:-}"                 # extra flags for every stage, e.g. "--num_heads 12 --batch_size 8"
head_flags="${head_flags:-}"       # extra flags for the stages with a head (2, 3, test), e.g. "--reduced_dim 64"
train_flags="${train_flags:-}"     # extra flags for the three training stages only, e.g. "--resume auto --save_every 500"
test_flags="${test_flags:-}"       # extra flags for test.py only, e.g. "--save_images 20 --crf_workers 8"
launcher="${launcher:-}"           # e.g. "torchrun --nnodes=2 --nproc_per_node=8 --rdzv_endpoint=host:29500"

cd "$(dirname "$0")"
source scripts/bootstrap.sh

if [ "$dataset" = "toy" ]; then
  # Toy-sized settings (a CPU run of a few minutes; the published defaults apply to every other
  # dataset): a 256-concept codebook and 256-d projections, and every stage at 320 px so that the
  # 4x4 grid sampling of the patch-16 ViT-Tiny keeps 25 tokens per image (at 224 it would keep 9,
  # against 49 for the published patch-8 MLP runs); with 18 steps an epoch, stage 3 runs 5 epochs.
  # The frozen tokens of the training crops are cached: every stage reads the same 320-px crops.
  toy_flags=(--num_codebook 256 --num_workers 2 --train_resolution 320)
  toy_head=(--projection_dim 256)
  toy_train=(--feature_cache "$out/feature_cache")
  toy_stage3=(--epoch 5)
else
  toy_flags=() toy_head=() toy_train=() toy_stage3=()
fi
# Paths are quoted as they are (spaces welcome); extra, test_flags and launcher are split on spaces.
common=(--dataset "$dataset" --data_dir "$data_dir" --arch "$arch" --gpu "$gpu" --out "$out" "${toy_flags[@]}")
[ -n "$ckpt" ] && common=(--ckpt "$ckpt" "${common[@]}")
read -r -a head_extra <<< "$head_flags"
heads=(--head "$head" "${toy_head[@]}" "${head_extra[@]}")
read -r -a extra_flags <<< "$extra"
read -r -a train_extra <<< "$train_flags"
read -r -a test_extra <<< "$test_flags"
if [ -n "$launcher" ]; then read -r -a run_py <<< "$launcher"; else run_py=("$PY"); fi

# A stage's own exit code is run.sh's (130 after Ctrl-C, 2 for bad input: see the README's exit codes).
step() {
  echo; echo "=== $1"; local name="$1"; shift
  "$@" && return 0 || local code=$?
  case "$code" in
    130|143) echo "run.sh: interrupted in $name (exit code $code); rerun with train_flags=\"--resume auto\" to continue" >&2 ;;
    *) echo "run.sh: step failed (exit code $code): $*" >&2 ;;
  esac
  exit "$code"
}

case "$dataset" in
  cocostuff27|cityscapes|coco81|coco171|pascalvoc)
    step "crops" "$PY" crop_dataset.py --dataset "$dataset" --data_dir "$data_dir" ;;
esac
step "stage 1: mediator (concept codebook)" "${run_py[@]}" train_mediator.py "${common[@]}" "${toy_train[@]}" \
  "${extra_flags[@]}" "${train_extra[@]}"
step "stage 2: front-door adjustment ($head head)" "${run_py[@]}" train_front_door.py "${common[@]}" "${heads[@]}" \
  "${toy_train[@]}" "${extra_flags[@]}" "${train_extra[@]}"
step "stage 3: cluster-probe fine-tuning ($head head)" "${run_py[@]}" fine_tuning.py "${common[@]}" "${heads[@]}" \
  "${toy_train[@]}" "${toy_stage3[@]}" --reference_stage3 "$reference_stage3" "${extra_flags[@]}" "${train_extra[@]}"
step "test" "$PY" test.py "${common[@]}" "${heads[@]}" "${extra_flags[@]}" "${test_extra[@]}"
