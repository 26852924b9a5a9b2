#!/usr/bin/env bash
# Checks deploy/kubernetes without a cluster (docs/deployment.md, "Checking the
# manifests"); scripts/test.sh runs it.
#  1. `kubectl kustomize` renders the base and every overlay;
#  2. the rendered objects validate against the Kubernetes API schemas, strictly (no
#     unknown fields), for the oldest and the newest Kubernetes we support, with
#     kubernetes-validate (PyPI; it ships the schemas, so it validates offline). CRDs
#     have no schema there: the ServiceMonitor is reported as skipped, and
#     tests/kube_manifests.rs checks its port and selector instead;
#  3. tests/kube_manifests.rs cross-checks the manifests with the proxy itself.
# kubectl comes from Debian (kubernetes-client) when missing; kubernetes-validate is
# installed once into ~/.cache/xks-proxy/kube-validate. A step that cannot run says
# SKIPPED and why.
set -euo pipefail
cd "$(dirname "$0")/.."

KUBE_VERSIONS="1.30.0 1.37.0"          # oldest supported (preStop sleep), newest known
KUBERNETES_VALIDATE=1.37.0
# Kinds without a schema in kubernetes-validate; anything else without one fails
# (a mistyped apiVersion must not pass as "no schema").
CRDS="ServiceMonitor monitoring.coreos.com/v1"

if ! ./scripts/setup.sh kubectl:kubernetes-client; then
  echo "check-kube: SKIPPED: kubectl is not installed and Debian's kubernetes-client could not be installed" >&2
  exit 0
fi
echo "check-kube: $(kubectl version --client 2>/dev/null | head -1)"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The AWS overlay reads its Secrets' values from files an operator puts in
# overlays/aws/secrets/ (never committed): placeholders in a copy of the tree.
cp -a deploy/kubernetes "$work/kubernetes"
for file in tls.crt tls.key secret-access-key pin; do
  echo placeholder >"$work/kubernetes/overlays/aws/secrets/$file"
done
for target in base overlays/aws overlays/softhsm-demo; do
  out="$work/$(echo "$target" | tr / -).yaml"
  # Current kubectl warns on stderr about the v2.0.3-compatible fields; errors fail.
  kubectl kustomize "$work/kubernetes/$target" >"$out" 2>"$work/stderr" || {
    cat "$work/stderr" >&2
    echo "check-kube: kubectl kustomize $target failed" >&2
    exit 1
  }
  echo "check-kube: rendered $target: $(grep -c '^kind:' "$out") objects"
done

venv="$HOME/.cache/xks-proxy/kube-validate"
validate="$venv/bin/kubernetes-validate"
if [ "$("$validate" --version 2>/dev/null)" != "$KUBERNETES_VALIDATE" ]; then
  if ! command -v python3 >/dev/null 2>&1; then
    echo "check-kube: SKIPPED schema validation: no python3 for kubernetes-validate" >&2
    validate=""
  else
    rm -rf "$venv"
    if ! { python3 -m venv "$venv" &&
           "$venv/bin/pip" install --quiet "kubernetes-validate==$KUBERNETES_VALIDATE"; }; then
      rm -rf "$venv"
      echo "check-kube: SKIPPED schema validation: kubernetes-validate could not be installed from PyPI" >&2
      validate=""
    fi
  fi
fi
if [ -n "$validate" ]; then
  # The validator must be able to fail: a Deployment with a wrong type is refused.
  cat >"$work/canary.yaml" <<'CANARY'
apiVersion: apps/v1
kind: Deployment
metadata: {name: canary}
spec:
  replicas: two
  selector: {matchLabels: {a: b}}
  template: {metadata: {labels: {a: b}}, spec: {containers: [{name: c, image: i}]}}
CANARY
  if "$validate" --quiet "$work/canary.yaml" >/dev/null 2>&1; then
    echo "check-kube: kubernetes-validate accepted an invalid Deployment" >&2
    exit 1
  fi
  for version in $KUBE_VERSIONS; do
    for target in base overlays-aws overlays-softhsm-demo; do
      report="$work/report"
      if ! "$validate" --strict -k "$version" "$work/$target.yaml" >"$report" 2>&1; then
        grep -v '^INFO' "$report" >&2
        echo "check-kube: $target does not validate against Kubernetes $version" >&2
        exit 1
      fi
      passed=$(grep -c '^INFO .* passed for resource' "$report" || true)
      skipped=""
      while read -r line; do
        kind=$(echo "$line" | sed -n 's/.*schema for kind \([^ ]*\) with api version \([^ ]*\) .*/\1 \2/p')
        case " $CRDS " in
          *" $kind "*) skipped="$skipped ${kind%% *}" ;;
          *) echo "check-kube: $target: $line" >&2
             echo "check-kube: no schema for a kind that is no known CRD (a mistyped apiVersion?)" >&2
             exit 1 ;;
        esac
      done < <(grep '^WARN' "$report" || true)
      echo "check-kube: $target valid for Kubernetes $version: $passed objects;${skipped:+ skipped (CRD, no schema):$skipped}"
    done
  done
fi

# --workspace as scripts/test.sh builds it: the same features, nothing rebuilt.
XKS_REQUIRE_KUBECTL=1 cargo test --quiet --workspace --test kube_manifests
echo "check-kube: ok"
