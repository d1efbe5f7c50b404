#!/usr/bin/env bash
# Checks the observability files: Prometheus alert rules, their unit tests, and the Grafana dashboard.
#
#   1. promtool check rules deploy/prometheus/rules.yml
#   2. promtool test rules  deploy/prometheus/rules_test.yml rules_test_long.yml
#   3. deploy/grafana/carhook.json is valid JSON (python3 -m json.tool), every panel uses the
#      ${datasource} variable and scopes every carhook selector with namespace=~"$namespace", and every metric named in a panel query, an alert expression or a test
#      series is in the metric catalogue below (which is itself checked against the metric
#      registrations in receiver/src/metrics.rs and processor/src/metrics.rs when they are present);
#      the dashboard queries are also parsed by promtool (as recording rules in a scratch file); every
#      alert has a severity, summary, description and runbook_url (RUNBOOK.md#<alert name in lower case>),
#      a section in RUNBOOK.md, and at least one firing and one not-firing case in rules_test.yml.
#
# promtool comes from, in order: $CARHOOK_PROMTOOL; the cache ${CARHOOK_STACK_DIR:-<repo>/.stack}/tools/bin;
# Debian's `prometheus` package, of which only /usr/bin/promtool is extracted into the cache
# (`apt-get download` + `dpkg-deb`: nothing is installed system-wide, no service is created or
# started; a 19 MB download, ~1-2 s); else `go install` of the pinned version below into the cache
# (last resort: ~7 minutes and ~3 GB of Go module/build cache on this 2-core machine). A second run
# finds the cached binary: about a second in all.
#
# Exit status: 0 when everything passes; 1 if any check fails (every check runs, the failures are
# listed at the end).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
STACK_DIR="${CARHOOK_STACK_DIR:-$root/.stack}"
TOOLS_BIN="$STACK_DIR/tools/bin"
# Fallback only (no Debian apt): the Go module version of Prometheus whose promtool is built.
# v0.316.0 is Prometheus 3.x (needs Go >= 1.26.7); 2.x module versions cannot be `go install`ed
# (their go.mod has replace/exclude directives). The rules and tests pass on 2.42 and 3.x alike.
PROMTOOL_GO_VERSION="${CARHOOK_PROMTOOL_GO_VERSION:-v0.316.0}"

RULES="$root/deploy/prometheus/rules.yml"
RULES_TEST="$root/deploy/prometheus/rules_test.yml"
# Tests over a week and more (offset 1w, DLQ retention), evaluated every 15 minutes to stay fast.
RULES_TEST_LONG="$root/deploy/prometheus/rules_test_long.yml"
DASHBOARD="$root/deploy/grafana/carhook.json"
PYTHON="${CARHOOK_PYTHON:-python3}"

log() { echo "check-observability: $*" >&2; }
die() { echo "check-observability: error: $*" >&2; exit 1; }

promtool_works() { [[ -x $1 ]] && "$1" --version >/dev/null 2>&1; }

install_promtool_deb() { # Debian: extract promtool from the `prometheus` package, install nothing
  command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || return 1
  local tmp="$scratch/deb" debs
  mkdir -p "$tmp"
  local dl=(apt-get download -qq -o APT::Sandbox::User=root prometheus)
  if ! (cd "$tmp" && "${dl[@]}") >/dev/null 2>"$tmp/err"; then
    log "apt-get download failed ($(tail -n1 "$tmp/err")); refreshing the package lists"
    apt-get update -qq >/dev/null 2>&1 || return 1
    (cd "$tmp" && "${dl[@]}") >/dev/null 2>"$tmp/err" || { cat "$tmp/err" >&2; return 1; }
  fi
  debs=("$tmp"/prometheus_*.deb)
  [[ -f ${debs[0]} ]] || return 1
  dpkg-deb --fsys-tarfile "${debs[0]}" | tar -x -C "$tmp" ./usr/bin/promtool || return 1
  mkdir -p "$TOOLS_BIN"
  mv -f "$tmp/usr/bin/promtool" "$TOOLS_BIN/promtool.tmp.$$"
  mv -f "$TOOLS_BIN/promtool.tmp.$$" "$TOOLS_BIN/promtool"
  rm -rf "$tmp"
  log "promtool from ${debs[0]##*/}"
}

install_promtool_go() { # anywhere with Go: build it (slow: a large module graph)
  command -v go >/dev/null || return 1
  log "building promtool $PROMTOOL_GO_VERSION with go install (this takes a few minutes)"
  mkdir -p "$TOOLS_BIN"
  GOBIN="$TOOLS_BIN" go install \
    "github.com/prometheus/prometheus/cmd/promtool@$PROMTOOL_GO_VERSION" >&2
}

find_promtool() {
  if [[ -n ${CARHOOK_PROMTOOL:-} ]]; then
    promtool_works "$CARHOOK_PROMTOOL" || die "CARHOOK_PROMTOOL=$CARHOOK_PROMTOOL does not run"
    echo "$CARHOOK_PROMTOOL"
    return
  fi
  if promtool_works "$TOOLS_BIN/promtool"; then
    echo "$TOOLS_BIN/promtool"
    return
  fi
  install_promtool_deb || install_promtool_go || die "cannot install promtool (no apt-get/dpkg-deb, no go)"
  promtool_works "$TOOLS_BIN/promtool" || die "installed promtool does not run: $TOOLS_BIN/promtool"
  echo "$TOOLS_BIN/promtool"
}

for f in "$RULES" "$RULES_TEST" "$RULES_TEST_LONG" "$DASHBOARD"; do
  [[ -f $f ]] || die "missing $f"
done
command -v "$PYTHON" >/dev/null || die "python3 not found"

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

PROMTOOL="$(find_promtool)"
log "using $("$PROMTOOL" --version 2>&1 | head -n1)"

failures=()
step() { # description command... : runs one check, records a failure and goes on
  local what=$1
  shift
  log "$what"
  if ! "$@"; then
    failures+=("$what")
    log "FAILED: $what"
  fi
}
promtool_test() { (cd "$(dirname "$RULES_TEST")" && "$PROMTOOL" test rules "$(basename "$RULES_TEST")" "$(basename "$RULES_TEST_LONG")"); }
dashboard_queries_parse() {
  "$PROMTOOL" check rules "$scratch/dashboard_queries.yml" >"$scratch/dq.out" 2>&1 || { cat "$scratch/dq.out" >&2; return 1; }
}

cat >"$scratch/check_names.py" <<'PY'
import json
import os
import re
import sys

root, dashboard_path, rules_path, tests_paths, scratch_rules = sys.argv[1:6]
tests_paths = tests_paths.split(":")
tests_path = tests_paths[0]

# The metric catalogue: every series the receiver, processor and poller expose (README "Metrics"), plus `up`.
CATALOGUE = {
    "counter": [
        "carhook_receiver_requests_total",
        "carhook_receiver_signature_failures_total",
        "carhook_receiver_quarantined_total",
        "carhook_receiver_verify_challenges_total",
        "carhook_processor_events_total",
        "carhook_processor_signals_written_total",
        "carhook_processor_stale_signals_total",
        "carhook_processor_store_errors_total",
        "carhook_processor_dead_letters_total",
        "carhook_processor_actions_total",
        "carhook_processor_vehicle_errors_total",
        "carhook_processor_transactions_total",
        "carhook_processor_rebalances_total",
        "carhook_poller_requests_total",
    ],
    "gauge": [
        "carhook_receiver_inflight_requests",
        "carhook_receiver_body_reads",
        "carhook_receiver_circuit_open",
        "carhook_processor_consumer_lag",
        "carhook_processor_last_commit_timestamp_seconds",
        "carhook_processor_consumer_lag_age_seconds",
        "carhook_poller_last_success_timestamp_seconds",
        "carhook_poller_paused_seconds",
        "carhook_poller_requests_queued",
        "carhook_poller_requests_in_flight",
        "carhook_poller_retry_after_waits",
    ],
    "histogram": [
        "carhook_receiver_request_duration_seconds",
        "carhook_receiver_produce_duration_seconds",
        "carhook_processor_processing_duration_seconds",
        "carhook_processor_event_freshness_seconds",
        "carhook_processor_cql_duration_seconds",
        "carhook_processor_transaction_duration_seconds",
        "carhook_receiver_request_body_bytes",
    ],
}
# Standard exporters' metrics the rules may read (documented in rules.yml and the chart README).
EXTERNAL = {"kafka_consumergroup_lag"}
KNOWN = {"up"} | EXTERNAL
for kind, names in CATALOGUE.items():
    for n in names:
        if kind == "histogram":
            KNOWN.update(n + s for s in ("_bucket", "_sum", "_count"))
        else:
            KNOWN.add(n)

errors = []

# The catalogue against the code: each metric's registered name (prefix, `_total` for counters and
# `_seconds` / `_bytes` for a unit are added by prometheus_client) must appear in metrics.rs.
for service, rel in (("receiver", "receiver/src/metrics.rs"), ("processor", "processor/src/metrics.rs"),
                     ("poller", "processor/src/poll/metrics.rs")):
    src_path = os.path.join(root, rel)
    if not os.path.exists(src_path):
        continue
    src = open(src_path, encoding="utf-8").read()
    if f'"carhook_{service}"' not in src:
        errors.append(f"{rel}: prefix \"carhook_{service}\" not found")
    for kind, names in CATALOGUE.items():
        for n in names:
            if not n.startswith(f"carhook_{service}_"):
                continue
            short = n[len(f"carhook_{service}_"):]
            short = re.sub(r"_(total|seconds|bytes)$", "", short)
            if not re.search(r'register(_with_unit)?\(\s*"' + re.escape(short) + '"', src):
                errors.append(f"{rel}: no registration of \"{short}\" ({n})")

FUNCTIONS = {
    "abs", "absent", "absent_over_time", "avg_over_time", "ceil", "changes", "clamp", "clamp_max",
    "clamp_min", "count_over_time", "day_of_month", "day_of_week", "days_in_month", "delta", "deriv",
    "exp", "floor", "histogram_quantile", "holt_winters", "hour", "idelta", "increase", "irate",
    "label_join", "label_replace", "last_over_time", "ln", "log10", "log2", "max_over_time",
    "min_over_time", "minute", "month", "predict_linear", "present_over_time", "quantile_over_time",
    "rate", "resets", "round", "scalar", "sgn", "sort", "sort_desc", "sqrt", "stddev_over_time",
    "stdvar_over_time", "sum_over_time", "time", "timestamp", "vector", "year",
}
AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
                "bottomk", "topk", "quantile"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
            "offset", "bool", "inf", "nan"}


def metric_names(expr):
    """Metric names a PromQL expression selects (plain identifiers and __name__ matchers)."""
    names = set()
    # __name__="x" / __name__=~"a|b" inside selectors.
    for op, val in re.findall(r'__name__\s*(=~|=)\s*"([^"]*)"', expr):
        names.update(val.split("|") if op == "=~" else [val])
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # strings
    e = re.sub(r"#[^\n]*", " ", e)                                  # PromQL comments
    e = re.sub(r"\{[^{}]*\}", " ", e)                                # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)                                # ranges, subqueries
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\$\{?\w+\}?", " ", e)                               # Grafana variables
    for m in re.finditer(r"(?<![\w.$])([A-Za-z_:][A-Za-z0-9_:]*)", e):
        tok = m.group(1)
        rest = e[m.end():].lstrip()
        if rest.startswith("(") and (tok in FUNCTIONS or tok in AGGREGATIONS):
            continue
        if tok.lower() in KEYWORDS or re.fullmatch(r"\d+[smhdwy]", tok):
            continue
        if re.fullmatch(r"(\d+(ms|[smhdwy]))+", tok):
            continue
        names.add(tok)
    return names


def check_names(where, expr):
    names = metric_names(expr)
    if not names:
        errors.append(f"{where}: no metric found in {expr!r}")
    for n in sorted(names - KNOWN):
        errors.append(f"{where}: unknown metric {n!r}")


# --- dashboard
def panels(items):
    for p in items:
        yield p
        yield from panels(p.get("panels", []))


def check_dashboard(dash):
    """Structure checks; returns [(title, refId, expr)] of every panel query."""
    if not isinstance(dash.get("schemaVersion"), int) or dash["schemaVersion"] < 36:
        errors.append("dashboard: schemaVersion missing or older than 36")
    ds_vars = [v for v in dash.get("templating", {}).get("list", [])
               if v.get("name") == "datasource" and v.get("type") == "datasource"
               and v.get("query") == "prometheus"]
    if not ds_vars:
        errors.append("dashboard: no `datasource` template variable of type prometheus")
    if not any(v.get("name") == "namespace" for v in dash.get("templating", {}).get("list", [])):
        errors.append("dashboard: no `namespace` template variable")
    queries, ids = [], set()
    for p in panels(dash.get("panels", [])):
        title = p.get("title", "?")
        pid = p.get("id")
        if pid in ids:
            errors.append(f"panel {title!r}: duplicate id {pid}")
        ids.add(pid)
        if "gridPos" not in p:
            errors.append(f"panel {title!r}: no gridPos")
        if p.get("type") == "row":
            continue
        ds = p.get("datasource") or {}
        if ds.get("uid") != "${datasource}":
            errors.append(f"panel {title!r}: datasource is not ${{datasource}}")
        targets = p.get("targets") or []
        if not targets:
            errors.append(f"panel {title!r}: no targets")
        for t in targets:
            tds = t.get("datasource") or {}
            if tds and tds.get("uid") != "${datasource}":
                errors.append(f"panel {title!r} target {t.get('refId')}: datasource is not ${{datasource}}")
            expr = t.get("expr", "")
            check_names(f"panel {title!r} target {t.get('refId')}", expr)
            # One environment at a time: every carhook selector is scoped by the namespace variable.
            for sel in re.findall(r"\{[^{}]*\}", expr):
                if "carhook-" in sel and 'namespace=~"$namespace"' not in sel:
                    errors.append(f"panel {title!r} target {t.get('refId')}: selector {sel} without namespace=~\"$namespace\"")
            queries.append((title, t.get("refId", "?"), expr))
    return queries


try:
    dash = json.load(open(dashboard_path, encoding="utf-8"))
except ValueError as e:
    errors.append(f"{os.path.basename(dashboard_path)}: not valid JSON: {e}")
    dash = None
queries = check_dashboard(dash) if isinstance(dash, dict) else []
n_panels = len({t for t, _, _ in queries})

# The dashboard queries as recording rules, so that promtool parses them (Grafana's range variables
# replaced by a fixed range, other variables are inside label matcher strings).
if queries:
    with open(scratch_rules, "w", encoding="utf-8") as f:
        f.write("groups:\n  - name: dashboard\n    rules:\n")
        for i, (title, ref, expr) in enumerate(queries):
            e = re.sub(r"\$__(rate_interval|interval|range)|\$\{__(rate_interval|interval|range)\}", "5m", expr)
            f.write(f"      - record: dashboard:query_{i}\n        expr: {json.dumps(e)}\n")

# --- rules: expressions of `expr:` keys (plain or block scalars)
def rule_exprs(path):
    lines = open(path, encoding="utf-8").read().splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)(?:-\s+)?expr:\s*(.*)$", lines[i])
        if not m:
            i += 1
            continue
        indent, value = len(m.group(1)), m.group(2).strip()
        line_no = i + 1
        if value in ("|", "|-", ">", ">-", "|+", ">+"):
            body = []
            i += 1
            while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
                body.append(lines[i].strip())
                i += 1
            yield line_no, "\n".join(body)
        else:
            if value[:1] in "'\"":
                value = value[1:-1]
            yield line_no, value
            i += 1

# Recorded series (record: names) are known to the expressions that read them.
RECORDED = set(re.findall(r"^\s*-\s+record:\s*(\S+)", open(rules_path, encoding="utf-8").read(), re.M))
KNOWN |= RECORDED
# Tunable constants: `<number or duration>  # <marker>`; the chart replaces them by name.
MARKERS = {"threshold", "floor", "lag_floor", "max_replicas", "offset"}
for line_no, expr in rule_exprs(rules_path):
    for m in re.finditer(r"#\s*(\S+)", expr):
        if m.group(1) not in MARKERS:
            errors.append(f"{os.path.basename(rules_path)}:{line_no}: unknown marker comment '# {m.group(1)}' (known: {sorted(MARKERS)})")
        before = expr[:m.start()].rstrip()
        if not re.search(r"(?<![\w.])(\d+(\.\d+)?([eE][+-]?\d+)?|(\d+(ms|[smhdwy]))+)$", before):
            errors.append(f"{os.path.basename(rules_path)}:{line_no}: marker '# {m.group(1)}' does not follow a number or duration")

n_rules = 0
for line_no, expr in rule_exprs(rules_path):
    n_rules += 1
    check_names(f"{os.path.basename(rules_path)}:{line_no}", expr)

# --- tests: input series and promql_expr_test expressions
n_series = 0
test_text = "\n".join(open(p, encoding="utf-8").read() for p in tests_paths)
for m in re.finditer(r"^\s*-?\s*series:\s*['\"]?([A-Za-z_:][A-Za-z0-9_:]*)", test_text, re.M):
    n_series += 1
    if m.group(1) not in KNOWN:
        line_no = test_text.count("\n", 0, m.start()) + 1
        errors.append(f"{os.path.basename(tests_path)}:{line_no}: unknown metric {m.group(1)!r} in series")
for line_no, expr in (x for p in tests_paths for x in rule_exprs(p)):
    check_names(f"{os.path.basename(tests_path)}:{line_no}", expr)

# --- alerts: labels/annotations, a runbook section each, a firing and a not-firing test each
rules_text = open(rules_path, encoding="utf-8").read()
blocks = re.split(r"^\s*- (?=alert:|record:)", rules_text, flags=re.M)[1:]
alerts = set()
for b in blocks:
    m = re.match(r"alert:\s*(\S+)", b)
    if not m:
        continue
    name = m.group(1)
    alerts.add(name)
    if not re.search(r"^\s+severity:\s*(warning|critical)\s*$", b, re.M):
        errors.append(f"alert {name}: no severity label warning|critical")
    for key in ("summary", "description"):
        if not re.search(rf"^\s+{key}:\s*\S", b, re.M):
            errors.append(f"alert {name}: no {key} annotation")
    # No runbook_url in the source: the chart adds <runbookBaseUrl>/RUNBOOK.md#<name> when a base is set.
    if re.search(r"^\s+runbook_url:", b, re.M):
        errors.append(f"alert {name}: runbook_url in rules.yml (the chart adds it from metrics.prometheusRule.runbookBaseUrl)")
runbook_path = os.path.join(os.path.dirname(rules_path), "RUNBOOK.md")
anchors = set()
if os.path.exists(runbook_path):
    for h in re.findall(r"^#{1,6}\s+(.+?)\s*$", open(runbook_path, encoding="utf-8").read(), re.M):
        anchors.add(re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-"))  # GitHub's anchors
for name in sorted(alerts):
    if name.lower() not in anchors:
        errors.append(f"RUNBOOK.md: no section for {name} (anchor #{name.lower()})")
firing, quiet = set(), set()
for m in re.finditer(r"alertname:\s*(\S+)\s*\n\s*exp_alerts:\s*(\[\s*\])?", test_text):
    (quiet if m.group(2) else firing).add(m.group(1))
for m in re.finditer(r"alertname:\s*(\S+)\s*\n(?!\s*exp_alerts:)", test_text):
    quiet.add(m.group(1))  # no exp_alerts key: expects none
for name in sorted(alerts):
    if name not in firing:
        errors.append(f"rules_test.yml: no firing case for {name}")
    if name not in quiet:
        errors.append(f"rules_test.yml: no not-firing case for {name}")
# No placeholder address anywhere in the rules, the tests or the runbook.
for path in (rules_path, *tests_paths, runbook_path):
    if os.path.exists(path):
        for bad in re.findall(r"https?://(?:[\w.-]*example\.(?:com|org)|github\.com/carhook/carhook)\S*", open(path, encoding="utf-8").read()):
            errors.append(f"{os.path.basename(path)}: placeholder URL {bad}")

if errors:
    for e in errors:
        print(f"check-observability: {e}", file=sys.stderr)
    sys.exit(1)
print(f"dashboard: {n_panels} panels, {len(queries)} queries; rules: {n_rules} expressions "
      f"({len(alerts)} alerts, each with a runbook section and firing + not-firing tests); "
      f"tests: {n_series} input series; all metric names are in the catalogue")
PY

step "promtool check rules ${RULES#"$root"/}" "$PROMTOOL" check rules "$RULES"
step "python3 -m json.tool ${DASHBOARD#"$root"/}" "$PYTHON" -m json.tool "$DASHBOARD" /dev/null
step "dashboard structure; metric names in dashboard, rules and tests against the catalogue" \
  "$PYTHON" "$scratch/check_names.py" "$root" "$DASHBOARD" "$RULES" "$RULES_TEST:$RULES_TEST_LONG" "$scratch/dashboard_queries.yml"
if [[ -s $scratch/dashboard_queries.yml ]]; then
  step "promtool check rules <dashboard queries as recording rules>" dashboard_queries_parse
fi
step "promtool test rules ${RULES_TEST#"$root"/} ${RULES_TEST_LONG#"$root"/}" promtool_test

if ((${#failures[@]})); then
  log "${#failures[@]} check(s) failed:"
  printf '  - %s\n' "${failures[@]}" >&2
  exit 1
fi
log "ok: rules, rule tests and dashboard all pass"
