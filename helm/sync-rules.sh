#!/usr/bin/env bash
# Copies the Prometheus alerting rules into the chart, where the PrometheusRule template reads them
# with .Files.Get (a chart cannot read files outside its directory):
#   deploy/prometheus/rules.yml  ->  helm/carhook/files/rules.yml
#   deploy/grafana/carhook.json  ->  helm/carhook/files/dashboard.json  (the dashboard ConfigMap)
# If deploy/prometheus/rules.yml does not exist and the chart has no copy yet, a minimal valid rules
# file (one "target down" alert) is written instead so the chart still renders.
#
# Usage: helm/sync-rules.sh           copy when different (prints what it did)
#        helm/sync-rules.sh --check   exit 1 when the chart's copy differs from the source
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
src="$root/deploy/prometheus/rules.yml"
dst="$here/carhook/files/rules.yml"

dash_src="$root/deploy/grafana/carhook.json"
dash_dst="$here/carhook/files/dashboard.json"

if [[ ${1:-} == --check ]]; then
  rc=0
  if [[ -f $src ]] && ! cmp -s "$src" "$dst"; then
    echo "sync-rules: $dst differs from $src; run helm/sync-rules.sh" >&2
    rc=1
  fi
  if [[ -f $dash_src ]] && ! cmp -s "$dash_src" "$dash_dst"; then
    echo "sync-rules: $dash_dst differs from $dash_src; run helm/sync-rules.sh" >&2
    rc=1
  fi
  exit $rc
fi

if [[ -f $dash_src ]] && ! cmp -s "$dash_src" "$dash_dst"; then
  mkdir -p "$(dirname "$dash_dst")"
  cp -f "$dash_src" "$dash_dst.tmp.$$" && mv -f "$dash_dst.tmp.$$" "$dash_dst"
  echo "sync-rules: copied deploy/grafana/carhook.json into the chart (commit helm/carhook/files/dashboard.json)" >&2
fi

mkdir -p "$(dirname "$dst")"
if [[ -f $src ]]; then
  if cmp -s "$src" "$dst"; then
    exit 0
  fi
  cp -f "$src" "$dst.tmp.$$" && mv -f "$dst.tmp.$$" "$dst"
  echo "sync-rules: copied deploy/prometheus/rules.yml into the chart (commit helm/carhook/files/rules.yml)" >&2
elif [[ ! -f $dst ]]; then
  cat >"$dst" <<'RULES'
# Placeholder: deploy/prometheus/rules.yml did not exist when this was written; helm/sync-rules.sh
# replaces this file with it once it does.
groups:
  - name: carhook
    rules:
      - alert: CarhookTargetDown
        expr: up{job=~"carhook-receiver|carhook-processor"} == 0
        for: 5m
        labels:
          severity: warning
        annotations:
          summary: "{{ $labels.job }} target {{ $labels.instance }} is down"
RULES
  echo "sync-rules: deploy/prometheus/rules.yml not found; wrote a minimal placeholder $dst" >&2
fi
