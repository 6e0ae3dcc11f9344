#!/usr/bin/env bash
# Run experiment variants one after another, single-threaded, from a clone of
# this repository pinned at one commit -- how the claims' runs are made (see
# docs/claims-runs.md).  Resumable: a variant with a checkpoint resumes, a
# finished one is skipped.
#
#   bash experiments/pinned_queue.sh COMMIT CLONE QUEUE SCRIPT VARIANTS [ARGS...]
#   e.g. bash experiments/pinned_queue.sh 54c82c7 /work/claims A fig3_resnet50 bn_s1,bn_s2
#
# ARGS go to the script after its --preset/--runs/--only (e.g. --other-seeds 0,1).
#
# CLONE is created at COMMIT if missing (and must be at COMMIT if present);
# checkpoints saved under checkpoints/<SCRIPT>/<variant>/ in this repository
# are copied into CLONE/runs/cpu/<SCRIPT>/<variant>/ when that has none, unless
# the run is finished: then its log from plots/logs/<SCRIPT>/<variant>.h5 is
# copied instead (as log.h5: the script then skips the run as done -- a later
# run may need it, e.g. the NormProp sweep's logs before normprop_s0); the
# output goes to CLONE/logs/QUEUE.log.  Start it with setsid nohup ... & to
# keep it running in the background.
set -euo pipefail
[ $# -ge 5 ] || { echo "usage: $0 COMMIT CLONE QUEUE SCRIPT VARIANTS [ARGS...]" >&2; exit 2; }
commit=$1 clone=$2 queue=$3 script=$4 variants=$5
shift 5
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ ! -d "$clone/.git" ]; then
  git clone -q "$repo" "$clone"
  git -C "$clone" checkout -q "$commit"
fi
head=$(git -C "$clone" rev-parse HEAD)
want=$(git -C "$repo" rev-parse "$commit")
[ "$head" = "$want" ] || { echo "error: $clone is at $head, not $commit" >&2; exit 1; }
IFS=, read -ra names <<< "$variants"
for name in "${names[@]}"; do
  saved="$repo/checkpoints/$script/$name"
  dest="$clone/runs/cpu/$script/$name"
  finished="$repo/plots/logs/$script/$name.h5"
  # a finished log wins over a checkpoint left behind (the run is done: resuming
  # the checkpoint would run its end again and overwrite the finished log)
  if [ -f "$finished" ] && [ ! -f "$dest/log.h5" ]; then
    mkdir -p "$dest" && cp "$finished" "$dest/log.h5"
    echo "restored finished $finished -> $dest/log.h5"
  elif [ ! -f "$finished" ] && [ -f "$saved/checkpoint.h5" ] && [ ! -f "$dest/checkpoint.h5" ]; then
    mkdir -p "$dest" && cp "$saved"/*.h5 "$dest"/
    echo "restored $saved -> $dest"
  fi
done
mkdir -p "$clone/logs"
cd "$clone"
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=1 PYTHONHASHSEED=0
exec python experiments/"$script".py --preset cpu --runs "$clone/runs" --only "$variants" "$@" \
  >> "logs/$queue.log" 2>&1
