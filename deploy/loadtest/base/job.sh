#!/bin/sh
# One generator of the Indexed Job xks-loadtest (docs/capacity.md, "Load from several
# machines on Kubernetes"). Runs `xks-loadtest "$@" --start-at START --report FILE`:
# "$@" is the container's args (`run` and its flags), START the one start time of
# the run (the mounted start-at file), FILE generator-$JOB_COMPLETION_INDEX.json in
# the run's folder $REPORTS/START on the shared volume. Index 0 then waits for the
# GENERATORS reports and merges them into merged.json beside them.
set -eu
: "${JOB_COMPLETION_INDEX:?is set by Kubernetes in the pods of an Indexed Job}"
: "${GENERATORS:?}" "${REPORTS:?}" "${START_AT_FILE:?}"
merge_wait="${MERGE_WAIT:-600}"

start_at=""
if [ -s "$START_AT_FILE" ]; then
  read -r start_at <"$START_AT_FILE" || true
fi
case "$start_at" in
  "" | *[!0-9.]*)
    echo "job.sh: no start time in $START_AT_FILE (Unix seconds, written once per run: docs/capacity.md)" >&2
    exit 2 ;;
esac
run="$REPORTS/$start_at"
mkdir -p "$run"
mine="$run/generator-$JOB_COMPLETION_INDEX.json"

# Written under another name and renamed once whole: index 0 merges whole reports only.
# A run that found wrong answers still writes its report (and fails the pod).
status=0
xks-loadtest "$@" --start-at "$start_at" --report "$mine.part" || status=$?
if [ -f "$mine.part" ]; then
  mv "$mine.part" "$mine"
fi
[ "$status" -eq 0 ] || exit "$status"
[ "$JOB_COMPLETION_INDEX" = 0 ] || exit 0

waited=0
while :; do
  count=0
  for report in "$run"/generator-*.json; do
    [ -f "$report" ] && count=$((count + 1))
  done
  [ "$count" -ge "$GENERATORS" ] && break
  if [ "$waited" -ge "$merge_wait" ]; then
    echo "job.sh: $count of $GENERATORS reports in $run after $merge_wait s; merge what there is by hand (docs/capacity.md)" >&2
    exit 1
  fi
  sleep 5
  waited=$((waited + 5))
done
xks-loadtest merge "$run"/generator-*.json --output "$run/merged.json"
echo "job.sh: merged $count reports into $run/merged.json"
