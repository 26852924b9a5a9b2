#!/usr/bin/env bash
# Checks deploy/loadtest (the generator's Indexed Job) without a cluster, as
# scripts/check-kube.sh checks deploy/kubernetes; scripts/test.sh runs it.
#  1. `kubectl kustomize` renders the base and the example overlay;
#  2. the rendered objects validate strictly against the Kubernetes API schemas of the
#     oldest and newest Kubernetes we support (kubernetes-validate from PyPI, the same
#     copy check-kube.sh installs); the PodMonitor (a CRD) has no schema there and is
#     reported as skipped;
#  3. loadtest/tests/kube_job.rs runs the rendered pod's script and args, one process
#     per index, against a proxy, and checks the reports and their merge.
# A step that cannot run says SKIPPED and why.
set -euo pipefail
cd "$(dirname "$0")/.."

KUBE_VERSIONS="1.30.0 1.37.0"
KUBERNETES_VALIDATE=1.37.0
CRDS="PodMonitor monitoring.coreos.com/v1"

if ! ./scripts/setup.sh kubectl:kubernetes-client; then
  echo "check-loadtest-kube: SKIPPED: kubectl is not installed and Debian's kubernetes-client could not be installed" >&2
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The overlay reads the run's secret, CA and start from files an operator puts in
# overlays/example/local/ (never committed): placeholders in a copy of the tree.
cp -a deploy/loadtest "$work/loadtest"
for file in secret-access-key ca.pem start-at; do
  echo placeholder >"$work/loadtest/overlays/example/local/$file"
done
for target in base overlays/example; do
  out="$work/$(echo "$target" | tr / -).yaml"
  kubectl kustomize "$work/loadtest/$target" >"$out" 2>"$work/stderr" || {
    cat "$work/stderr" >&2
    echo "check-loadtest-kube: kubectl kustomize $target failed" >&2
    exit 1
  }
  echo "check-loadtest-kube: rendered $target: $(grep -c '^kind:' "$out") objects"
done

venv="$HOME/.cache/xks-proxy/kube-validate"
validate="$venv/bin/kubernetes-validate"
if [ "$("$validate" --version 2>/dev/null)" != "$KUBERNETES_VALIDATE" ]; then
  if ! command -v python3 >/dev/null 2>&1; then
    echo "check-loadtest-kube: SKIPPED schema validation: no python3 for kubernetes-validate" >&2
    validate=""
  else
    rm -rf "$venv"
    if ! { python3 -m venv "$venv" &&
           "$venv/bin/pip" install --quiet "kubernetes-validate==$KUBERNETES_VALIDATE"; }; then
      rm -rf "$venv"
      echo "check-loadtest-kube: SKIPPED schema validation: kubernetes-validate could not be installed from PyPI" >&2
      validate=""
    fi
  fi
fi
if [ -n "$validate" ]; then
  # The validator must be able to fail: an Indexed Job with a wrong type is refused.
  cat >"$work/canary.yaml" <<'CANARY'
apiVersion: batch/v1
kind: Job
metadata: {name: canary}
spec:
  completionMode: Indexed
  parallelism: three
  template: {spec: {restartPolicy: Never, containers: [{name: c, image: i}]}}
CANARY
  if "$validate" --quiet "$work/canary.yaml" >/dev/null 2>&1; then
    echo "check-loadtest-kube: kubernetes-validate accepted an invalid Job" >&2
    exit 1
  fi
  for version in $KUBE_VERSIONS; do
    for target in base overlays-example; do
      report="$work/report"
      if ! "$validate" --strict -k "$version" "$work/$target.yaml" >"$report" 2>&1; then
        grep -v '^INFO' "$report" >&2
        echo "check-loadtest-kube: $target does not validate against Kubernetes $version" >&2
        exit 1
      fi
      passed=$(grep -c '^INFO .* passed for resource' "$report" || true)
      skipped=""
      while read -r line; do
        kind=$(echo "$line" | sed -n 's/.*schema for kind \([^ ]*\) with api version \([^ ]*\) .*/\1 \2/p')
        case " $CRDS " in
          *" $kind "*) skipped="$skipped ${kind%% *}" ;;
          *) echo "check-loadtest-kube: $target: $line" >&2
             echo "check-loadtest-kube: no schema for a kind that is no known CRD (a mistyped apiVersion?)" >&2
             exit 1 ;;
        esac
      done < <(grep '^WARN' "$report" || true)
      echo "check-loadtest-kube: $target valid for Kubernetes $version: $passed objects;${skipped:+ skipped (CRD, no schema):$skipped}"
    done
  done
fi

# --workspace as scripts/test.sh builds it: the same features, nothing rebuilt.
XKS_REQUIRE_KUBECTL=1 cargo test --quiet --workspace --test kube_job
echo "check-loadtest-kube: ok"
