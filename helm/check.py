#!/usr/bin/env python3
"""Structural checks behind helm/check.sh: what a schema cannot say about the rendered chart, the
compose file and the Dockerfile. Each subcommand prints one line per problem and exits 1 if any.

  check.py manifests RENDER.yaml...      rendered chart: selectors, ports, probes, env, security, KEDA,
                                         secret files (every CARHOOK__*_FILE is a mounted read-only
                                         Secret/ConfigMap key), TriggerAuthentication vs the pods
  check.py secured RENDER.yaml...        a render of ci/values-secured.yaml: every connection key and
                                         mount of issue #15 present in each component, and nothing more
  check.py compose COMPOSE_SCHEMA.json   deploy/compose.yaml (+ deploy/compose/*): compose-spec schema
                                         and cross-references
  check.py dockerfile                    deploy/docker/Dockerfile and .dockerignore
  check.py config-keys                   print the CARHOOK__ variables the application accepts

The application's configuration keys are read from shared/src/config.rs (the structs with
deny_unknown_fields), so a variable the chart or compose file sets but the binaries would refuse
(exit code 2 at start) is caught here, before a pod crash-loops.
"""
import fnmatch
import json
import math
import os
import re
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_RS = os.path.join(ROOT, "shared", "src", "config.rs")
problems = []


def problem(msg):
    problems.append(msg)
    print(f"  FAIL {msg}")


def done(what):
    if problems:
        print(f"check.py {what}: {len(problems)} problem(s)")
        sys.exit(1)
    print(f"check.py {what}: ok")


# ------------------------------------------------------------------------------- application keys

def config_keys():
    """{"CARHOOK__KAFKA__BROKERS", ...} from shared/src/config.rs."""
    src = open(CONFIG_RS, encoding="utf-8").read()

    def struct_fields(name):
        m = re.search(r"pub struct %s\s*\{(.*?)\n\}" % re.escape(name), src, re.S)
        if not m:
            return None
        return re.findall(r"^\s*pub\s+(\w+)\s*:\s*([\w:<>]+)", m.group(1), re.M)

    sections = struct_fields("Settings")
    if not sections:
        sys.exit(f"check.py: cannot find `pub struct Settings` in {CONFIG_RS}")
    keys = set()
    for section, typ in sections:
        fields = struct_fields(typ)
        if fields is None:
            sys.exit(f"check.py: cannot find `pub struct {typ}` in {CONFIG_RS}")
        for field, ftype in fields:
            key = f"CARHOOK__{section.upper()}__{field.upper()}"
            keys.add(key)
            if re.match(r"(Option<)?(std::collections::)?(BTree|Hash|Index)Map\b", ftype):
                keys.add(key + "__*")  # a table: CARHOOK__<SECTION>__<FIELD>__<NAME>
    if not keys & CONNECTION_KEYS:
        # The chart side of issue #15 can land before the application side: until config.rs declares
        # any of the connection keys, the chart may use exactly the ones the issue specifies. As soon
        # as config.rs declares one of them, only config.rs counts again.
        global PENDING_NOTE
        PENDING_NOTE = True
        keys |= CONNECTION_KEYS
    return keys


# The connection keys of issue #15 (secured Kafka, CQL and OTLP), as the chart renders them.
CONNECTION_KEYS = {
    "CARHOOK__KAFKA__SECURITY_PROTOCOL", "CARHOOK__KAFKA__SASL_MECHANISM", "CARHOOK__KAFKA__SASL_USERNAME",
    "CARHOOK__KAFKA__SASL_PASSWORD_FILE", "CARHOOK__KAFKA__SSL_CA_FILE", "CARHOOK__KAFKA__SSL_CERTIFICATE_FILE",
    "CARHOOK__KAFKA__SSL_KEY_FILE", "CARHOOK__KAFKA__SSL_KEY_PASSWORD_FILE",
    "CARHOOK__KAFKA__SSL_ENDPOINT_IDENTIFICATION", "CARHOOK__KAFKA__PROPERTIES", "CARHOOK__KAFKA__PROPERTIES__*",
    "CARHOOK__CQL__USERNAME", "CARHOOK__CQL__PASSWORD_FILE", "CARHOOK__CQL__TLS_CA_FILE", "CARHOOK__CQL__TLS_CERT_FILE",
    "CARHOOK__CQL__TLS_KEY_FILE", "CARHOOK__CQL__LOCAL_DATACENTER", "CARHOOK__CQL__CONSISTENCY",
    "CARHOOK__CQL__SERIAL_CONSISTENCY",
    "CARHOOK__TELEMETRY__OTLP_PROTOCOL", "CARHOOK__TELEMETRY__OTLP_CA_FILE", "CARHOOK__TELEMETRY__OTLP_HEADERS_FILE",
}
PENDING_NOTE = False


def known_key(name, keys):
    if name in keys:
        return True
    parts = name.split("__")
    return len(parts) > 3 and "__".join(parts[:3]) + "__*" in keys and all(parts[3:])


def check_env_names(where, names, keys):
    for n in names:
        if n.startswith("CARHOOK__") and not known_key(n, keys):
            problem(f"{where}: {n} is not a configuration key of the application (shared/src/config.rs); "
                    "the process would exit with code 2")


# ------------------------------------------------------------------------------------- manifests

def load_docs(paths):
    docs = []
    for p in paths:
        with open(p, encoding="utf-8") as f:
            for d in yaml.safe_load_all(f):
                if d:
                    d["__file"] = os.path.basename(p)
                    docs.append(d)
    return docs


def labels_match(selector, labels):
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        val = labels.get(e["key"])
        op = e["operator"]
        if op == "In" and val not in e.get("values", []):
            return False
        if op == "NotIn" and val in e.get("values", []):
            return False
        if op == "Exists" and e["key"] not in labels:
            return False
        if op == "DoesNotExist" and e["key"] in labels:
            return False
    return True


def env_map(container):
    out = {}
    for e in container.get("env") or []:
        out[e["name"]] = e
    return out


def env_value(container, name):
    e = env_map(container).get(name)
    return None if e is None else e.get("value")


def ms_to_s(v, default):
    return math.ceil(int(v if v is not None else default) / 1000)


def check_pod(where, pod, keys, component):
    spec = pod["spec"]
    if spec.get("automountServiceAccountToken") is not False:
        problem(f"{where}: automountServiceAccountToken should be false (carhook never calls the API)")
    psc = spec.get("securityContext") or {}
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        cw = f"{where} container {c['name']}"
        if c.get("terminationMessagePolicy") != "FallbackToLogsOnError":
            problem(f"{cw}: terminationMessagePolicy is not FallbackToLogsOnError (a crash would leave no reason in kubectl describe)")
        attrs = env_value(c, "OTEL_RESOURCE_ATTRIBUTES") or ""
        for want in ("k8s.pod.name=$(CARHOOK_K8S_POD_NAME)", "k8s.namespace.name=$(CARHOOK_K8S_NAMESPACE)"):
            if want not in attrs:
                problem(f"{cw}: OTEL_RESOURCE_ATTRIBUTES lacks {want} (spans would not say which pod and namespace they came from)")
        if env_map(c).get("CARHOOK_K8S_POD_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != "metadata.name":
            problem(f"{cw}: CARHOOK_K8S_POD_NAME is not the pod name from the downward API")
        sc = c.get("securityContext") or {}
        if not (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")):
            problem(f"{cw}: runAsNonRoot is not set")
        if (sc.get("runAsUser", psc.get("runAsUser")) or 0) == 0:
            problem(f"{cw}: runs as uid 0")
        if sc.get("readOnlyRootFilesystem") is not True:
            problem(f"{cw}: readOnlyRootFilesystem is not true")
        if sc.get("allowPrivilegeEscalation") is not False:
            problem(f"{cw}: allowPrivilegeEscalation is not false")
        if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
            problem(f"{cw}: capabilities do not drop ALL")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problem(f"{cw}: seccompProfile is {seccomp!r}, expected RuntimeDefault")
        res = c.get("resources") or {}
        for kind in ("requests", "limits"):
            for r in ("cpu", "memory"):
                if r not in (res.get(kind) or {}):
                    problem(f"{cw}: resources.{kind}.{r} is missing")
        check_secret_files(cw, c, volumes)
        names = [e["name"] for e in c.get("env") or []]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            problem(f"{cw}: environment variables set twice: {sorted(dup)}")
        check_env_names(cw, names, keys)
        env = env_map(c)
        tok = env.get("CARHOOK__SMARTCAR__MANAGEMENT_TOKENS")
        if tok is not None and "valueFrom" not in tok:
            problem(f"{cw}: CARHOOK__SMARTCAR__MANAGEMENT_TOKENS has a literal value; tokens must come from a Secret")
        ports = {p.get("name"): p["containerPort"] for p in c.get("ports") or []}
        for probe_name, path in (("livenessProbe", "/health"), ("readinessProbe", "/ready"), ("startupProbe", "/health")):
            probe = c.get(probe_name)
            if component in ("receiver", "processor", "poller"):
                if not probe:
                    problem(f"{cw}: {probe_name} is missing")
                    continue
                get = probe.get("httpGet") or {}
                if get.get("path") != path:
                    problem(f"{cw}: {probe_name} path is {get.get('path')!r}, expected {path}")
                port = get.get("port")
                if isinstance(port, str) and port not in ports:
                    problem(f"{cw}: {probe_name} port {port!r} is not a declared container port {sorted(ports)}")
                if isinstance(port, int) and port not in ports.values():
                    problem(f"{cw}: {probe_name} port {port} is not a declared container port")
        listen_vars = {"receiver": ["CARHOOK__RECEIVER__LISTEN", "CARHOOK__RECEIVER__ADMIN_LISTEN"],
                       "processor": ["CARHOOK__PROCESSOR__ADMIN_LISTEN"],
                       "poller": ["CARHOOK__POLLER__ADMIN_LISTEN"]}.get(component, [])
        if component == "receiver":
            for probe_name in ("livenessProbe", "readinessProbe", "startupProbe"):
                if ((c.get(probe_name) or {}).get("httpGet") or {}).get("port") != "admin":
                    problem(f"{cw}: {probe_name} must use the admin port (the webhook port serves only the webhook)")
        for listen_var in listen_vars:
            listen = env_value(c, listen_var) or ""
            port = int(listen.rsplit(":", 1)[-1]) if ":" in listen else None
            if port not in ports.values():
                problem(f"{cw}: {listen_var}={listen!r} does not listen on a declared container port {sorted(ports.values())}")
            if listen.startswith("127.") or listen.startswith("[::1]"):
                problem(f"{cw}: {listen_var}={listen!r} is loopback-only: probes and Services cannot reach it")
            for var in ("CARHOOK__CQL__MIGRATE", "CARHOOK__KAFKA__CREATE_TOPICS"):
                if env_value(c, var) != "false":
                    problem(f"{cw}: {var} should be \"false\" (the migration hook Job does it)")
        if component == "processor":
            iid = env.get("CARHOOK__PROCESSOR__INSTANCE_ID") or {}
            if ((iid.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath") != "metadata.name":
                problem(f"{cw}: CARHOOK__PROCESSOR__INSTANCE_ID must come from fieldRef metadata.name")
        if component == "receiver":
            # The receiver remembers the vehicles it answered 503 for and requests their polls after
            # the outage: it reads these poller keys (and no other, so tuning the poller's budgets
            # does not restart the receivers).
            for var in RECEIVER_POLLER_KEYS:
                if env_value(c, var) is None:
                    problem(f"{cw}: {var} is missing (config.poller.{var.split('__')[-1].lower()} never reaches the receiver)")
            extra = sorted(n for n in names if n.startswith("CARHOOK__POLLER__") and n not in RECEIVER_POLLER_KEYS)
            if extra:
                problem(f"{cw}: poller keys the receiver does not read: {extra}")
            tf = env_value(c, "CARHOOK__SMARTCAR__MANAGEMENT_TOKENS_FILE")
            if tok is None and tf is None:
                problem(f"{cw}: no token source (CARHOOK__SMARTCAR__MANAGEMENT_TOKENS or _FILE)")
            if tf is not None:
                mounts = [m for m in c.get("volumeMounts") or [] if tf.startswith(m["mountPath"].rstrip("/") + "/")]
                if not mounts:
                    problem(f"{cw}: CARHOOK__SMARTCAR__MANAGEMENT_TOKENS_FILE={tf} is not under a volume mount")
                for m in mounts:
                    if "secret" not in volumes.get(m["name"], {}):
                        problem(f"{cw}: the tokens file comes from volume {m['name']}, which is not a Secret")
            sleep = (((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep") or {}).get("seconds", 0)
            need = sleep + ms_to_s(env_value(c, "CARHOOK__RECEIVER__SHUTDOWN_GRACE_MS"), 10000)
            if spec.get("terminationGracePeriodSeconds", 30) < need:
                problem(f"{cw}: terminationGracePeriodSeconds {spec.get('terminationGracePeriodSeconds', 30)} "
                        f"< preStop sleep + drain ({need} s)")
        if component == "poller":
            sf = env_value(c, "CARHOOK__SMARTCAR__CLIENT_SECRET_FILE")
            if env.get("CARHOOK__SMARTCAR__CLIENT_SECRET") is not None:
                problem(f"{cw}: CARHOOK__SMARTCAR__CLIENT_SECRET is set; the secret must come from a mounted Secret file")
            if not env_value(c, "CARHOOK__SMARTCAR__CLIENT_ID"):
                problem(f"{cw}: CARHOOK__SMARTCAR__CLIENT_ID is missing")
            mounts = [m for m in c.get("volumeMounts") or [] if sf and sf.startswith(m["mountPath"].rstrip("/") + "/")]
            if not mounts:
                problem(f"{cw}: CARHOOK__SMARTCAR__CLIENT_SECRET_FILE={sf} is not under a volume mount")
            for m in mounts:
                if "secret" not in volumes.get(m["name"], {}):
                    problem(f"{cw}: the client secret comes from volume {m['name']}, which is not a Secret")
        if component == "processor":
            need = ms_to_s(env_value(c, "CARHOOK__PROCESSOR__SHUTDOWN_GRACE_MS"), 20000)
            if spec.get("terminationGracePeriodSeconds", 30) < need:
                problem(f"{cw}: terminationGracePeriodSeconds < processor drain ({need} s)")


# The poller settings the receiver reads (shared/src/config.rs: PollerSettings, "Receiver: …").
RECEIVER_POLLER_KEYS = ("CARHOOK__POLLER__OUTAGE_WINDOW_SECS", "CARHOOK__POLLER__OUTAGE_MAX_VEHICLES")


def file_source(container, volumes, path):
    """(volume, {"secret"|"configMap": name, "key": key}) of a file path in the container, or None."""
    for m in container.get("volumeMounts") or []:
        base = m["mountPath"].rstrip("/") + "/"
        if not path.startswith(base):
            continue
        vol = volumes.get(m["name"], {})
        rel = path[len(base):]
        if m.get("subPath"):
            continue
        sources = []
        if "secret" in vol:
            sources = [{"secret": vol["secret"]}]
        elif "configMap" in vol:
            sources = [{"configMap": vol["configMap"]}]
        elif "projected" in vol:
            sources = vol["projected"].get("sources") or []
        for src in sources:
            for kind, name_field in (("secret", "secretName"), ("configMap", "name")):
                obj = src.get(kind)
                if obj is None:
                    continue
                name = obj.get(name_field) or obj.get("name")
                for item in obj.get("items") or []:
                    if item["path"] == rel:
                        return m, vol, {kind: name, "key": item["key"]}
        return m, vol, None
    return None, None, None


def file_mode(vol):
    for kind in ("secret", "configMap", "projected"):
        if kind in vol:
            return vol[kind].get("defaultMode", 0o644)
    return None


def check_secret_files(cw, c, volumes):
    """Every CARHOOK__*_FILE names a key of a Secret or ConfigMap mounted read-only, not writable and
    not world-readable beyond 0444; a variable that names a secret file never has a literal secret."""
    for e in c.get("env") or []:
        n = e["name"]
        if not (n.startswith("CARHOOK__") and n.endswith("_FILE")):
            continue
        path = e.get("value")
        if not isinstance(path, str) or not path.startswith("/"):
            problem(f"{cw}: {n} is not an absolute file path ({path!r})")
            continue
        m, vol, src = file_source(c, volumes, path)
        if m is None:
            problem(f"{cw}: {n}={path} is not under a volume mount: the process would exit with code 2")
            continue
        if src is None:
            problem(f"{cw}: {n}={path}: volume {m['name']} has no item with that path")
            continue
        if not m.get("readOnly"):
            problem(f"{cw}: {n}: volume mount {m['name']} is not readOnly")
        mode = file_mode(vol)
        if mode is not None and (mode & 0o333):
            problem(f"{cw}: {n}: volume {m['name']} defaultMode {oct(mode)} grants write or execute")
        if n.endswith(("PASSWORD_FILE", "KEY_FILE", "HEADERS_FILE", "TOKENS_FILE")) and "secret" not in src:
            problem(f"{cw}: {n} comes from {src}, not from a Secret")


KEDA_SASL = {"PLAIN": "plaintext", "SCRAM-SHA-256": "scram_sha256", "SCRAM-SHA-512": "scram_sha512",
             "OAUTHBEARER": "oauthbearer"}
# KEDA Kafka scaler auth parameter -> the processor's variable for the same credential.
KEDA_FILE_PARAMS = {"password": "CARHOOK__KAFKA__SASL_PASSWORD_FILE", "ca": "CARHOOK__KAFKA__SSL_CA_FILE",
                    "cert": "CARHOOK__KAFKA__SSL_CERTIFICATE_FILE", "key": "CARHOOK__KAFKA__SSL_KEY_FILE",
                    "keyPassword": "CARHOOK__KAFKA__SSL_KEY_PASSWORD_FILE"}


def check_keda_auth(where, trigger, deployment, trigger_auths):
    """The KEDA trigger speaks to Kafka as the processor does: same protocol and mechanism, and the
    chart's TriggerAuthentication takes each credential from the same Secret/ConfigMap key."""
    pod = deployment["spec"]["template"]["spec"]
    c = pod["containers"][0]
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    md = trigger.get("metadata") or {}
    proto = env_value(c, "CARHOOK__KAFKA__SECURITY_PROTOCOL") or "plaintext"
    mech = env_value(c, "CARHOOK__KAFKA__SASL_MECHANISM")
    want_tls = "enable" if proto in ("ssl", "sasl_ssl") else None
    if md.get("tls") != want_tls and not (want_tls is None and md.get("tls") in (None, "disable")):
        problem(f"{where}: trigger tls={md.get('tls')!r} but the processor uses {proto}")
    want_sasl = KEDA_SASL.get(mech) if proto.startswith("sasl_") else None
    if md.get("sasl") != want_sasl and not (want_sasl is None and md.get("sasl") in (None, "none")):
        problem(f"{where}: trigger sasl={md.get('sasl')!r}, expected {want_sasl!r} (processor: {proto} {mech})")
    ref = (trigger.get("authenticationRef") or {}).get("name")
    has_credentials = "CARHOOK__KAFKA__SASL_USERNAME" in env_map(c) or any(env_value(c, v) for v in KEDA_FILE_PARAMS.values())
    if has_credentials and mech != "OAUTHBEARER" and not ref:
        problem(f"{where}: the processor authenticates to Kafka ({proto}) but the trigger has no authenticationRef")
    names = {t["metadata"]["name"]: t for t in trigger_auths}
    for n in names:
        if n != ref:
            problem(f"{where}: TriggerAuthentication {n} is rendered but not the trigger's authenticationRef")
    ta = names.get(ref)
    if ta is None:
        return  # none, or the user's own (processor.autoscaling.authenticationRef)
    tw = f"{where} TriggerAuthentication {ref}"
    spec = ta.get("spec") or {}
    got = {}
    for kind in ("secretTargetRef", "configMapTargetRef"):
        for r in spec.get(kind) or []:
            if r["parameter"] in got:
                problem(f"{tw}: parameter {r['parameter']} given twice")
            got[r["parameter"]] = {("secret" if kind == "secretTargetRef" else "configMap"): r["name"], "key": r["key"]}
    for r in spec.get("env") or []:
        got[r["parameter"]] = {"env": r["name"], "containerName": r.get("containerName")}
    for param, var in KEDA_FILE_PARAMS.items():
        path = env_value(c, var)
        src = file_source(c, volumes, path)[2] if path else None
        if src != got.get(param):
            problem(f"{tw}: parameter {param} is {got.get(param)}, but the processor reads {var} from {src}")
    user = env_map(c).get("CARHOOK__KAFKA__SASL_USERNAME")
    if user is None:
        want_user = None
    elif "valueFrom" in user:
        skr = user["valueFrom"].get("secretKeyRef") or {}
        want_user = {"secret": skr.get("name"), "key": skr.get("key")}
    else:
        want_user = {"env": "CARHOOK__KAFKA__SASL_USERNAME", "containerName": c["name"]}
    if got.get("username") != want_user:
        problem(f"{tw}: parameter username is {got.get('username')}, expected {want_user}")
    extra = set(got) - set(KEDA_FILE_PARAMS) - {"username"}
    if extra:
        problem(f"{tw}: unexpected parameters {sorted(extra)}")


RENDER_NAMESPACE = "carhook"  # helm/check.sh renders with --namespace carhook
_NOTES = set()


def note_once(msg):
    if msg not in _NOTES:
        _NOTES.add(msg)
        print(f"  note {msg}")


def check_manifests(paths):
    keys = config_keys()
    for p in paths:
        check_render(p, keys)
    if PENDING_NOTE:
        print("  note shared/src/config.rs declares none of the issue #15 connection keys yet: "
              "check.py's list of them (CONNECTION_KEYS) stands in until it does")
    done("manifests")


def check_render(path, keys):
    docs = load_docs([path])
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    deployments = by_kind.get("Deployment", [])
    dep_by_name = {d["metadata"]["name"]: d for d in deployments}

    def component_of(obj):
        return (obj["metadata"].get("labels") or {}).get("app.kubernetes.io/component")

    def pods_selected(selector):
        return [d for d in deployments if labels_match(selector, d["spec"]["template"]["metadata"].get("labels") or {})]

    comps = sorted(component_of(d) for d in deployments)
    if comps not in (["processor", "receiver"], ["poller", "processor", "receiver"]):
        problem(f"expected one receiver, one processor and at most one poller Deployment, found {comps}")

    for d in deployments:
        where = f"{d['__file']}: Deployment {d['metadata']['name']}"
        sel = d["spec"]["selector"]
        tmpl_labels = d["spec"]["template"]["metadata"].get("labels") or {}
        if not labels_match(sel, tmpl_labels):
            problem(f"{where}: selector {sel} does not match its pod template labels")
        others = [o["metadata"]["name"] for o in pods_selected(sel) if o is not d]
        if others:
            problem(f"{where}: selector also matches the pods of {others}")
        check_pod(where, d["spec"]["template"], keys, component_of(d))

    for svc in by_kind.get("Service", []):
        where = f"{svc['__file']}: Service {svc['metadata']['name']}"
        targets = pods_selected({"matchLabels": svc["spec"].get("selector") or {}})
        if len(targets) != 1:
            problem(f"{where}: selector matches {len(targets)} Deployments, expected 1")
            continue
        cports = {p.get("name"): p["containerPort"] for c in targets[0]["spec"]["template"]["spec"]["containers"]
                  for p in c.get("ports") or []}
        for p in svc["spec"]["ports"]:
            tp = p.get("targetPort", p["port"])
            if (isinstance(tp, str) and tp not in cports) or (isinstance(tp, int) and tp not in cports.values()):
                problem(f"{where}: targetPort {tp!r} is not a container port of {targets[0]['metadata']['name']}")

    for pdb in by_kind.get("PodDisruptionBudget", []):
        where = f"{pdb['__file']}: PodDisruptionBudget {pdb['metadata']['name']}"
        if len(pods_selected(pdb["spec"]["selector"])) != 1:
            problem(f"{where}: selector does not match exactly one Deployment")

    so_targets = set()
    for so in by_kind.get("ScaledObject", []):
        where = f"{so['__file']}: ScaledObject {so['metadata']['name']}"
        ref = so["spec"]["scaleTargetRef"]["name"]
        target = dep_by_name.get(ref)
        if target is None:
            problem(f"{where}: scaleTargetRef {ref} is not a rendered Deployment")
            continue
        so_targets.add(ref)
        if "replicas" in target["spec"]:
            problem(f"{where}: Deployment {ref} sets replicas although KEDA owns them (every upgrade would reset the scale)")
        c = target["spec"]["template"]["spec"]["containers"][0]
        partitions = int(env_value(c, "CARHOOK__KAFKA__PARTITIONS") or 6)
        if so["spec"].get("maxReplicaCount", 100) > partitions:
            problem(f"{where}: maxReplicaCount {so['spec'].get('maxReplicaCount')} > {partitions} partitions")
        triggers = so["spec"].get("triggers") or []
        kafka = [t for t in triggers if t.get("type") == "kafka"]
        if len(kafka) != 1:
            problem(f"{where}: expected one kafka trigger, found {len(kafka)}")
            continue
        md = kafka[0].get("metadata") or {}
        for k, v in md.items():
            if not isinstance(v, str):
                problem(f"{where}: trigger metadata {k} is {type(v).__name__}, KEDA needs strings")
        expect = {
            "bootstrapServers": env_value(c, "CARHOOK__KAFKA__BROKERS"),
            "consumerGroup": env_value(c, "CARHOOK__KAFKA__CONSUMER_GROUP"),
            "topic": env_value(c, "CARHOOK__KAFKA__EVENTS_TOPIC"),
            "offsetResetPolicy": "earliest",
            "excludePersistentLag": "true",
            "limitToPartitionsWithLag": "true",
        }
        for k, v in expect.items():
            if md.get(k) != v:
                problem(f"{where}: trigger metadata {k}={md.get(k)!r}, expected {v!r}")
        for k in ("lagThreshold", "activationLagThreshold"):
            if not re.fullmatch(r"[0-9]+", str(md.get(k, ""))):
                problem(f"{where}: trigger metadata {k}={md.get(k)!r} is not a whole number")
        check_keda_auth(where, kafka[0], target, by_kind.get("TriggerAuthentication", []))

    for hpa in by_kind.get("HorizontalPodAutoscaler", []):
        where = f"{hpa['__file']}: HorizontalPodAutoscaler {hpa['metadata']['name']}"
        ref = hpa["spec"]["scaleTargetRef"]["name"]
        if ref not in dep_by_name:
            problem(f"{where}: scaleTargetRef {ref} is not a rendered Deployment")
        elif component_of(dep_by_name[ref]) == "processor":
            problem(f"{where}: targets the processor; KEDA makes the processor's HPA, a second one would fight it")
        elif "replicas" in dep_by_name[ref]["spec"]:
            problem(f"{where}: Deployment {ref} sets replicas although the HPA owns them")
        if ref in so_targets:
            problem(f"{where}: {ref} is also scaled by a ScaledObject")

    receiver = next((d for d in deployments if component_of(d) == "receiver"), None)
    webhook_path = env_value(receiver["spec"]["template"]["spec"]["containers"][0], "CARHOOK__RECEIVER__PATH") if receiver else None
    services = {s["metadata"]["name"]: s for s in by_kind.get("Service", [])}
    for ing in by_kind.get("Ingress", []):
        where = f"{ing['__file']}: Ingress {ing['metadata']['name']}"
        for rule in ing["spec"].get("rules") or []:
            for p in (rule.get("http") or {}).get("paths") or []:
                if p.get("path") != webhook_path or p.get("pathType") != "Exact":
                    problem(f"{where}: exposes {p.get('path')!r} ({p.get('pathType')}); only the webhook path "
                            f"{webhook_path!r} (Exact) may be public")
                b = p["backend"]["service"]
                svc = services.get(b["name"])
                if svc is None:
                    problem(f"{where}: backend Service {b['name']} is not rendered")
                elif b["port"].get("name") not in [sp.get("name") for sp in svc["spec"]["ports"]] and \
                        b["port"].get("number") not in [sp["port"] for sp in svc["spec"]["ports"]]:
                    problem(f"{where}: backend port {b['port']} is not a port of Service {b['name']}")

    for job in by_kind.get("Job", []):
        where = f"{job['__file']}: Job {job['metadata']['name']}"
        ann = job["metadata"].get("annotations") or {}
        hooks = set((ann.get("helm.sh/hook") or "").split(","))
        if not {"pre-install", "pre-upgrade"} <= hooks:
            problem(f"{where}: helm.sh/hook is {ann.get('helm.sh/hook')!r}, expected pre-install,pre-upgrade")
        if "before-hook-creation" not in (ann.get("helm.sh/hook-delete-policy") or ""):
            problem(f"{where}: hook-delete-policy lacks before-hook-creation (the next upgrade would fail on the old Job)")
        try:
            int(ann.get("helm.sh/hook-weight", "0"))
        except ValueError:
            problem(f"{where}: helm.sh/hook-weight is not an integer string")
        pod = job["spec"]["template"]
        if pod["spec"].get("restartPolicy") not in ("Never", "OnFailure"):
            problem(f"{where}: restartPolicy must be Never or OnFailure")
        if pod["spec"].get("serviceAccountName") and pod["spec"]["serviceAccountName"] in \
                [s["metadata"]["name"] for s in by_kind.get("ServiceAccount", [])]:
            problem(f"{where}: uses the chart's ServiceAccount, which does not exist yet when a pre-install hook runs")
        c = pod["spec"]["containers"][0]
        if (c.get("command") or [""])[0].rsplit("/", 1)[-1] != "processor" or c.get("args") != ["migrate"]:
            problem(f"{where}: expected `processor migrate`, got {c.get('command')} {c.get('args')}")
        check_pod(where, pod, keys, "migrate")

    for sm in by_kind.get("ServiceMonitor", []):
        where = f"{sm['__file']}: ServiceMonitor {sm['metadata']['name']}"
        selected = [s for s in services.values() if labels_match(sm["spec"]["selector"], s["metadata"].get("labels") or {})]
        want_n = 3 if any(component_of(d) == "poller" for d in deployments) else 2
        if len(selected) != want_n:
            problem(f"{where}: selects {len(selected)} Services, expected the receiver's, the processor's (and the poller's when enabled)")
        job_label = sm["spec"].get("jobLabel")
        for s in selected:
            port_names = {p.get("name") for p in s["spec"]["ports"]}
            if not port_names & {e.get("port") for e in sm["spec"]["endpoints"]}:
                problem(f"{where}: no endpoint port matches Service {s['metadata']['name']} ports {sorted(port_names)}")
            if job_label and job_label not in (s["metadata"].get("labels") or {}):
                problem(f"{where}: Service {s['metadata']['name']} lacks the jobLabel {job_label}")

    for pr in by_kind.get("PrometheusRule", []):
        where = f"{pr['__file']}: PrometheusRule {pr['metadata']['name']}"
        src = os.path.join(ROOT, "deploy", "prometheus", "rules.yml")
        # The rendered rules derive from deploy/prometheus/rules.yml: the same groups and rule kinds, each
        # alert (name, severity) of the source at most once per rule, severity kept. (check.sh also
        # checks that an unscoped default render equals the source exactly, and runs promtool on every
        # render.)
        if os.path.exists(src):
            want = yaml.safe_load(open(src, encoding="utf-8")).get("groups")
            want_rules = {(g["name"], r.get("alert") or r.get("record"), (r.get("labels") or {}).get("severity"))
                          for g in want for r in g["rules"]}
            for g in pr["spec"].get("groups") or []:
                for r in g.get("rules") or []:
                    key = (g["name"], r.get("alert") or r.get("record"), (r.get("labels") or {}).get("severity"))
                    if key not in want_rules:
                        problem(f"{where}: rule {key} is not in deploy/prometheus/rules.yml (run helm/sync-rules.sh)")
            if [g["name"] for g in pr["spec"].get("groups") or []] != [g["name"] for g in want]:
                problem(f"{where}: groups differ from deploy/prometheus/rules.yml (run helm/sync-rules.sh)")
        text = json.dumps(pr["spec"])
        jobs = set(re.findall(r'job=~?\\"([^"\\]+)\\"', text))
        labelled = {(s["metadata"].get("labels") or {}).get("carhook.io/prometheus-job") for s in services.values()}
        # The poller is optional: its alerts stay in the rules and are silent while none runs; once
        # one is rendered, its Service must carry the job like the others.
        poller_rendered = any(component_of(d) == "poller" for d in deployments)
        for j in jobs:
            for alt in j.split("|"):
                if alt == "carhook-poller" and not poller_rendered:
                    continue
                if alt.startswith("carhook-") and alt not in labelled:
                    problem(f"{where}: rules select job {alt!r}, but no Service carries that carhook.io/prometheus-job")
        ns = pr["metadata"].get("namespace") or RENDER_NAMESPACE
        for g in pr["spec"].get("groups") or []:
            for r in g.get("rules") or []:
                name = r.get("alert") or r.get("record")
                expr = r.get("expr", "")
                # Scoped (the default): every carhook selector carries this release's namespace.
                for sel in re.findall(r"\{[^{}]*job=~?\"carhook-[^{}]*\}", expr):
                    if f'namespace="{ns}"' not in sel:
                        problem(f"{where}: {name}: selector {sel} is not scoped to namespace {ns}")
                if "example.com" in expr or "example.com" in json.dumps(r.get("annotations") or {}):
                    problem(f"{where}: {name}: placeholder example.com")
                if r.get("alert"):
                    if (r.get("labels") or {}).get("severity") not in ("warning", "critical"):
                        problem(f"{where}: {name}: severity is not warning|critical")
                    url = (r.get("annotations") or {}).get("runbook_url")
                    if url is not None and not re.fullmatch(r"https?://\S+/RUNBOOK\.md#" + name.lower(), url):
                        problem(f"{where}: {name}: runbook_url {url!r} is not <base>/RUNBOOK.md#{name.lower()}")

    for np_ in by_kind.get("NetworkPolicy", []):
        where = f"{np_['__file']}: NetworkPolicy {np_['metadata']['name']}"
        sel = np_["spec"]["podSelector"]
        pods = [d["spec"]["template"] for d in deployments] + [j["spec"]["template"] for j in by_kind.get("Job", [])]
        selected = [p for p in pods if labels_match(sel, p["metadata"].get("labels") or {})]
        if len(selected) != 1:
            problem(f"{where}: podSelector matches {len(selected)} pod templates, expected 1")
            continue
        pod = selected[0]
        comp = (pod["metadata"].get("labels") or {}).get("app.kubernetes.io/component")
        if set(np_["spec"].get("policyTypes") or []) != {"Ingress", "Egress"}:
            problem(f"{where}: policyTypes should be Ingress and Egress")
        ports = {p.get("name"): p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports") or []}
        for rule in np_["spec"].get("ingress") or []:
            rp = [p.get("port") for p in rule.get("ports") or []]
            if not rp:
                problem(f"{where}: an ingress rule without ports opens every port")
            for port in rp:
                if port not in ports.values() and port not in ports:
                    problem(f"{where}: ingress port {port} is not a container port of the {comp}")
                if port in (ports.get("admin"), "admin") and not rule.get("from"):
                    problem(f"{where}: the admin port (/metrics) is open to every source")
                if port in (ports.get("http"), "http") and comp != "receiver":
                    problem(f"{where}: webhook port on a {comp}")
        opened = {p.get("port") for r in np_["spec"].get("ingress") or [] for p in r.get("ports") or []}
        if comp == "receiver" and ports.get("http") not in opened:
            problem(f"{where}: the receiver's webhook port {ports.get('http')} is not open")
        if comp == "processor" and ports.get("http") in opened:
            problem(f"{where}: processor exposes a webhook port")
        egress_ports = {p.get("port") for r in np_["spec"].get("egress") or [] for p in r.get("ports") or []}
        if 53 not in egress_ports:
            problem(f"{where}: no DNS egress (port 53)")
        c = pod["spec"]["containers"][0]
        for env, default in (("CARHOOK__KAFKA__BROKERS", None), ("CARHOOK__CQL__NODES", None),
                             ("CARHOOK__TELEMETRY__OTLP_ENDPOINT", None)):
            v = env_value(c, env)
            if not v:
                continue
            for hostport in re.split(r"[,\s]+", re.sub(r"^\w+://", "", v).split("/")[0]):
                m = re.search(r":(\d+)$", hostport)
                if m and int(m.group(1)) not in egress_ports:
                    problem(f"{where}: {env} uses port {m.group(1)}, which no egress rule allows")

    for cm in by_kind.get("ConfigMap", []):
        data = cm.get("data") or {}
        if "carhook.json" not in data:
            continue
        where = f"{cm['__file']}: ConfigMap {cm['metadata']['name']}"
        if (cm["metadata"].get("labels") or {}).get("grafana_dashboard") is None:
            note_once("dashboard ConfigMap without the grafana_dashboard label (a custom sidecar label is set)")
        src = os.path.join(ROOT, "deploy", "grafana", "carhook.json")
        if json.loads(data["carhook.json"]) != json.load(open(src, encoding="utf-8")):
            problem(f"{where}: the dashboard differs from deploy/grafana/carhook.json (run helm/sync-rules.sh)")

    for hpa in by_kind.get("HorizontalPodAutoscaler", []):
        for m in hpa["spec"].get("metrics") or []:
            if m.get("type") == "Pods":
                name = m["pods"]["metric"]["name"]
                readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
                if name.startswith("carhook_") and f"`{name}`" not in readme:
                    problem(f"{hpa['__file']}: HPA Pods metric {name} is not a metric of the README's Metrics table")

    print(f"check.py manifests: {os.path.basename(path)}: {len(docs)} objects checked")


# ------------------------------------------------------------------------------- secured values

SECURED_KAFKA = ["CARHOOK__KAFKA__SECURITY_PROTOCOL", "CARHOOK__KAFKA__SASL_MECHANISM", "CARHOOK__KAFKA__SASL_USERNAME",
                 "CARHOOK__KAFKA__SASL_PASSWORD_FILE", "CARHOOK__KAFKA__SSL_CA_FILE",
                 "CARHOOK__KAFKA__SSL_CERTIFICATE_FILE", "CARHOOK__KAFKA__SSL_KEY_FILE",
                 "CARHOOK__KAFKA__SSL_ENDPOINT_IDENTIFICATION", "CARHOOK__KAFKA__PROPERTIES__SOCKET_TIMEOUT_MS"]
SECURED_CQL = ["CARHOOK__CQL__USERNAME", "CARHOOK__CQL__PASSWORD_FILE", "CARHOOK__CQL__TLS_CA_FILE",
               "CARHOOK__CQL__TLS_CERT_FILE", "CARHOOK__CQL__TLS_KEY_FILE", "CARHOOK__CQL__LOCAL_DATACENTER"]
SECURED_OTLP = ["CARHOOK__TELEMETRY__OTLP_ENDPOINT", "CARHOOK__TELEMETRY__OTLP_PROTOCOL",
                "CARHOOK__TELEMETRY__OTLP_HEADERS_FILE", "CARHOOK__TELEMETRY__OTLP_CA_FILE"]


def check_secured(paths):
    """Renders of ci/values-secured.yaml: each component has exactly its connections' keys, secret
    files are mounted from the Secrets/ConfigMaps the values name, with mode 0440 (fsGroup), and KEDA
    authenticates from the same Secrets (check_keda_auth, run by `manifests`, compares the sources)."""
    values = yaml.safe_load(open(os.path.join(ROOT, "helm", "carhook", "ci", "values-secured.yaml"), encoding="utf-8"))
    want = {"receiver": SECURED_KAFKA + SECURED_OTLP,
            "processor": SECURED_KAFKA + SECURED_CQL + SECURED_OTLP,
            "migrate": SECURED_KAFKA + SECURED_CQL + SECURED_OTLP}
    expected_sources = {
        "CARHOOK__KAFKA__SASL_PASSWORD_FILE": {"secret": values["kafka"]["auth"]["existingSecret"],
                                               "key": values["kafka"]["auth"]["passwordKey"]},
        "CARHOOK__KAFKA__SSL_CA_FILE": {"secret": values["kafka"]["tls"]["ca"]["existingSecret"],
                                        "key": values["kafka"]["tls"]["ca"]["key"]},
        "CARHOOK__KAFKA__SSL_CERTIFICATE_FILE": {"secret": values["kafka"]["tls"]["clientCert"]["existingSecret"], "key": "tls.crt"},
        "CARHOOK__KAFKA__SSL_KEY_FILE": {"secret": values["kafka"]["tls"]["clientCert"]["existingSecret"], "key": "tls.key"},
        "CARHOOK__CQL__PASSWORD_FILE": {"secret": values["cql"]["auth"]["existingSecret"], "key": values["cql"]["auth"]["passwordKey"]},
        "CARHOOK__CQL__TLS_CA_FILE": {"configMap": values["cql"]["tls"]["ca"]["existingConfigMap"], "key": "ca.crt"},
        "CARHOOK__CQL__TLS_CERT_FILE": {"secret": values["cql"]["tls"]["clientCert"]["existingSecret"], "key": "tls.crt"},
        "CARHOOK__CQL__TLS_KEY_FILE": {"secret": values["cql"]["tls"]["clientCert"]["existingSecret"], "key": "tls.key"},
        "CARHOOK__TELEMETRY__OTLP_HEADERS_FILE": {"secret": values["otlp"]["headers"]["existingSecret"], "key": "headers"},
        "CARHOOK__TELEMETRY__OTLP_CA_FILE": {"secret": values["otlp"]["tls"]["ca"]["existingSecret"], "key": "ca.crt"},
    }
    connection_prefixes = ("CARHOOK__KAFKA__SASL_", "CARHOOK__KAFKA__SSL_", "CARHOOK__KAFKA__SECURITY_",
                           "CARHOOK__KAFKA__PROPERTIES__", "CARHOOK__CQL__USERNAME",
                           "CARHOOK__CQL__PASSWORD", "CARHOOK__CQL__TLS", "CARHOOK__TELEMETRY__OTLP_")
    for path in paths:
        docs = load_docs([path])
        seen = set()
        for d in docs:
            if d["kind"] not in ("Deployment", "Job"):
                continue
            comp = (d["metadata"].get("labels") or {}).get("app.kubernetes.io/component")
            seen.add(comp)
            pod = d["spec"]["template"]["spec"]
            volumes = {v["name"]: v for v in pod.get("volumes") or []}
            c = pod["containers"][0]
            where = f"{os.path.basename(path)}: {d['kind']} {d['metadata']['name']}"
            env = env_map(c)
            for k in want.get(comp, []):
                if k not in env:
                    problem(f"{where}: {k} is missing")
            for k in env:
                if k.startswith(connection_prefixes) and k not in want.get(comp, []) and \
                        not k.startswith("CARHOOK__KAFKA__PROPERTIES__"):
                    problem(f"{where}: {k} is set, but {comp} does not use that connection (least privilege)")
            if comp == "receiver" and any(k.startswith("CARHOOK__CQL__") and k != "CARHOOK__CQL__MIGRATE" for k in env):
                problem(f"{where}: the receiver gets CQL settings; it never talks to the store")
            props = {k: v.get("value") for k, v in env.items() if k.startswith("CARHOOK__KAFKA__PROPERTIES__")}
            want_props = {"CARHOOK__KAFKA__PROPERTIES__" + n.replace(".", "_").upper(): str(v).lower() if isinstance(v, bool) else str(v)
                          for n, v in values["kafka"]["properties"].items()}
            if props != want_props:
                problem(f"{where}: pass-through properties {props}, expected {want_props}")
            for k, src in expected_sources.items():
                if k not in want.get(comp, []) or k not in env:
                    continue
                m, vol, got = file_source(c, volumes, env[k].get("value", ""))
                if got != src:
                    problem(f"{where}: {k} comes from {got}, expected {src}")
                elif file_mode(vol) != 0o440:
                    problem(f"{where}: {k}: volume {m['name']} defaultMode {oct(file_mode(vol) or 0)}, expected 0440 (fsGroup)")
            for k, v in (("CARHOOK__KAFKA__SECURITY_PROTOCOL", "sasl_ssl"), ("CARHOOK__KAFKA__SASL_MECHANISM", "SCRAM-SHA-512"),
                         ("CARHOOK__CQL__LOCAL_DATACENTER", values["config"]["cql"]["local_datacenter"])):
                if k in want.get(comp, []) and env_value(c, k) != v:
                    problem(f"{where}: {k}={env_value(c, k)!r}, expected {v!r}")
        if seen != {"receiver", "processor", "migrate"}:
            problem(f"{os.path.basename(path)}: expected receiver, processor and migrate, found {sorted(seen)}")
        tas = [d for d in docs if d["kind"] == "TriggerAuthentication"]
        sos = [d for d in docs if d["kind"] == "ScaledObject"]
        if len(tas) != 1 or len(sos) != 1:
            problem(f"{os.path.basename(path)}: expected one TriggerAuthentication and one ScaledObject, "
                    f"found {len(tas)} and {len(sos)}")
        else:
            trig = sos[0]["spec"]["triggers"][0]
            if (trig.get("authenticationRef") or {}).get("name") != tas[0]["metadata"]["name"]:
                problem(f"{os.path.basename(path)}: the kafka trigger does not reference the TriggerAuthentication")
            params = sorted(r["parameter"] for kind in ("secretTargetRef", "configMapTargetRef", "env")
                            for r in tas[0]["spec"].get(kind) or [])
            if params != ["ca", "cert", "key", "password", "username"]:
                problem(f"{os.path.basename(path)}: TriggerAuthentication parameters {params}")
            md = trig.get("metadata") or {}
            if (md.get("sasl"), md.get("tls")) != ("scram_sha512", "enable"):
                problem(f"{os.path.basename(path)}: trigger sasl/tls {md.get('sasl')}/{md.get('tls')}, expected scram_sha512/enable")
        print(f"check.py secured: {os.path.basename(path)}: {len(docs)} objects checked")
    done("secured")


# --------------------------------------------------------------------------------------- compose

def check_compose(schema_path):
    import jsonschema

    keys = config_keys()
    deploy = os.path.join(ROOT, "deploy")
    path = os.path.join(deploy, "compose.yaml")
    doc = yaml.safe_load(open(path, encoding="utf-8"))
    schema = json.load(open(schema_path, encoding="utf-8"))
    validator = jsonschema.validators.validator_for(schema)(schema)
    for e in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
        problem(f"compose.yaml {'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:300]}")

    services = doc.get("services") or {}
    want = ["kafka", "scylla", "migrate", "receiver", "processor", "otel-collector", "jaeger", "prometheus", "grafana"]
    for s in want:
        if s not in services:
            problem(f"compose.yaml: service {s} is missing")
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        for dep in (deps if isinstance(deps, list) else deps.keys()):
            if dep not in services:
                problem(f"compose.yaml: {name} depends on unknown service {dep}")
            elif isinstance(deps, dict) and deps[dep].get("condition") == "service_healthy" and not services[dep].get("healthcheck"):
                problem(f"compose.yaml: {name} waits for {dep} to be healthy, but {dep} has no healthcheck")
        env = svc.get("environment") or {}
        if isinstance(env, list):
            env = dict(x.split("=", 1) for x in env)
        check_env_names(f"compose.yaml service {name}", env.keys(), keys)
        for vol in svc.get("volumes") or []:
            src = vol.split(":", 1)[0] if isinstance(vol, str) else vol.get("source", "")
            if src.startswith("."):
                full = os.path.normpath(os.path.join(deploy, src))
                rel = os.path.relpath(full, ROOT)
                if not os.path.exists(full):
                    if rel in ("deploy/grafana/carhook.json", "deploy/prometheus/rules.yml"):
                        print(f"  note compose.yaml {name}: {rel} does not exist yet (another change provides it)")
                    else:
                        problem(f"compose.yaml {name}: bind-mount source {rel} does not exist")

    carhook = {n: services[n] for n in ("migrate", "receiver", "processor") if n in services}
    for name, svc in carhook.items():
        env = svc.get("environment") or {}
        if name != "migrate":
            dep = (svc.get("depends_on") or {}).get("migrate") or {}
            if dep.get("condition") != "service_completed_successfully":
                problem(f"compose.yaml {name}: must wait for migrate (condition service_completed_successfully)")
            for var in ("CARHOOK__CQL__MIGRATE", "CARHOOK__KAFKA__CREATE_TOPICS"):
                if str(env.get(var)).lower() != "false":
                    problem(f"compose.yaml {name}: {var} should be false (the migrate service does it)")
        otlp = env.get("CARHOOK__TELEMETRY__OTLP_ENDPOINT")
        if otlp != "http://otel-collector:4317":
            problem(f"compose.yaml {name}: CARHOOK__TELEMETRY__OTLP_ENDPOINT={otlp!r}, expected http://otel-collector:4317")
        repl = env.get("CARHOOK__CQL__REPLICATION", "")
        if "tablets" not in repl or "'enabled': false" not in repl:
            problem(f"compose.yaml {name}: CARHOOK__CQL__REPLICATION must disable tablets for ScyllaDB LWTs")
        if "MANAGEMENT_TOKENS" in " ".join(env) and name != "receiver":
            problem(f"compose.yaml {name}: only the receiver needs the Smartcar tokens")
    mig = services.get("migrate") or {}
    if (mig.get("command") or [""])[-1] != "migrate":
        problem("compose.yaml migrate: command should be `processor migrate`")
    for need in ("kafka", "scylla"):
        if ((mig.get("depends_on") or {}).get(need) or {}).get("condition") != "service_healthy":
            problem(f"compose.yaml migrate: should wait for {need} to be healthy")
    scylla_cmd = " ".join(map(str, (services.get("scylla") or {}).get("command") or []))
    for flag in ("--smp 1", "--memory 750M"):
        if flag not in scylla_cmd:
            problem(f"compose.yaml scylla: command lacks {flag}")

    # Prometheus: scrape jobs named as the rules expect, targets on the services' listen ports.
    prom = yaml.safe_load(open(os.path.join(deploy, "compose", "prometheus.yml"), encoding="utf-8"))
    jobs = {j["job_name"]: j for j in prom.get("scrape_configs") or []}
    port_of = {
        "carhook-receiver": ("receiver", "CARHOOK__RECEIVER__ADMIN_LISTEN"),
        "carhook-processor": ("processor", "CARHOOK__PROCESSOR__ADMIN_LISTEN"),
    }
    for job, (svc, var) in port_of.items():
        if job not in jobs:
            problem(f"compose/prometheus.yml: scrape job {job} is missing (rules.yml selects it)")
            continue
        listen = str(((services.get(svc) or {}).get("environment") or {}).get(var, ""))
        want_target = f"{svc}:{listen.rsplit(':', 1)[-1]}"
        targets = [t for sc in jobs[job].get("static_configs") or [] for t in sc.get("targets") or []]
        if targets != [want_target]:
            problem(f"compose/prometheus.yml: job {job} scrapes {targets}, expected [{want_target!r}]")
    rules_src = os.path.join(deploy, "prometheus", "rules.yml")
    if os.path.exists(rules_src):
        used = set(re.findall(r'job=~?"([^"]+)"', open(rules_src, encoding="utf-8").read()))
        # The compose stack runs no poller (it has no Smartcar API credentials): its alerts stay silent.
        for j in {a for u in used for a in u.split("|")} - {"carhook-poller"}:
            if j not in jobs:
                problem(f"compose/prometheus.yml: rules.yml selects job {j!r}, which is not scraped")
    mounts = [v.split(":")[1] for v in (services.get("prometheus") or {}).get("volumes") or [] if isinstance(v, str)]
    for pattern in prom.get("rule_files") or []:
        if not any(fnmatch.fnmatch(m, pattern) for m in mounts):
            problem(f"compose/prometheus.yml: rule_files {pattern} matches no file mounted into the prometheus service")
    if not any(v.startswith("./prometheus/rules.yml:") for v in (services.get("prometheus") or {}).get("volumes") or []):
        problem("compose.yaml prometheus: deploy/prometheus/rules.yml is not mounted")

    # OpenTelemetry collector: OTLP gRPC in, traces out to a service that exists.
    otel = yaml.safe_load(open(os.path.join(deploy, "compose", "otel-collector.yaml"), encoding="utf-8"))
    grpc = (((otel.get("receivers") or {}).get("otlp") or {}).get("protocols") or {}).get("grpc") or {}
    if not str(grpc.get("endpoint", "")).endswith(":4317"):
        problem("compose/otel-collector.yaml: the otlp receiver does not listen for gRPC on :4317")
    pipelines = ((otel.get("service") or {}).get("pipelines") or {})
    if "traces" not in pipelines:
        problem("compose/otel-collector.yaml: no traces pipeline")
    for kind in ("receivers", "processors", "exporters"):
        for name in (pipelines.get("traces") or {}).get(kind) or []:
            if name not in (otel.get(kind) or {}):
                problem(f"compose/otel-collector.yaml: traces pipeline uses undefined {kind[:-1]} {name}")
    for name, exp in (otel.get("exporters") or {}).items():
        host = str((exp or {}).get("endpoint", "")).split("://")[-1].split(":")[0]
        if host and host not in services:
            problem(f"compose/otel-collector.yaml: exporter {name} sends to {host}, not a compose service")

    # Grafana: provisioned datasource and the dashboard directory the compose file mounts into.
    prov = os.path.join(deploy, "compose", "grafana", "provisioning")
    ds = yaml.safe_load(open(os.path.join(prov, "datasources", "datasources.yaml"), encoding="utf-8"))
    if not any(d.get("type") == "prometheus" and "prometheus:9090" in d.get("url", "") for d in ds.get("datasources") or []):
        problem("compose/grafana: no Prometheus datasource at http://prometheus:9090")
    dash = yaml.safe_load(open(os.path.join(prov, "dashboards", "carhook.yaml"), encoding="utf-8"))
    dirs = [((p.get("options") or {}).get("path") or "") for p in dash.get("providers") or []]
    gmounts = [v.split(":")[1] for v in (services.get("grafana") or {}).get("volumes") or [] if isinstance(v, str)]
    if not any(m.startswith(d.rstrip("/") + "/") for d in dirs for m in gmounts):
        problem(f"compose/grafana: dashboard provider paths {dirs} contain no mounted dashboard {gmounts}")
    if not any(v.startswith("./grafana/carhook.json:") for v in (services.get("grafana") or {}).get("volumes") or []):
        problem("compose.yaml grafana: deploy/grafana/carhook.json is not mounted")
    done("compose")


# ------------------------------------------------------------------------------------ dockerfile

def check_dockerfile():
    path = os.path.join(ROOT, "deploy", "docker", "Dockerfile")
    lines, cur = [], ""
    for raw in open(path, encoding="utf-8"):
        s = raw.rstrip("\n")
        if not cur and (s.lstrip().startswith("#") or not s.strip()):
            continue
        if s.endswith("\\"):
            cur += s[:-1] + " "
            continue
        lines.append((cur + s).strip())
        cur = ""
    instr = [(l.split(None, 1)[0].upper(), l.split(None, 1)[1] if " " in l else "") for l in lines]
    froms = [a for i, a in instr if i == "FROM"]
    if not froms or not re.match(r"rust:\$\{RUST_VERSION\}-bookworm|rust:1\.95-bookworm", froms[0]):
        problem(f"Dockerfile: the first stage should build FROM rust:1.95-bookworm, got {froms[:1]}")
    args = dict(re.findall(r"^(\w+)=(\S+)$", "\n".join(a for i, a in instr if i == "ARG"), re.M))
    if args.get("RUST_VERSION") not in (None, "1.95"):
        problem(f"Dockerfile: RUST_VERSION is {args.get('RUST_VERSION')}, expected 1.95")
    final = froms[-1] if froms else ""
    if not (final.startswith("gcr.io/distroless/cc-debian12:nonroot") or final.startswith("debian:bookworm-slim")):
        problem(f"Dockerfile: the runtime stage is {final!r}, expected distroless cc-debian12:nonroot or bookworm-slim")
    last_from = max(n for n, (i, _) in enumerate(instr) if i == "FROM")
    runtime = instr[last_from:]
    users = [a for i, a in runtime if i == "USER"]
    if not users or users[-1].split(":")[0] in ("0", "root"):
        problem("Dockerfile: the runtime stage must end with a non-root USER")
    copied = " ".join(a for i, a in runtime if i == "COPY")
    for b in ("receiver", "processor"):
        if b not in copied:
            problem(f"Dockerfile: the runtime stage does not copy the {b} binary")
    build = " ".join(a for i, a in instr[:last_from] if i == "RUN")
    if "--bin receiver" not in build or "--bin processor" not in build:
        problem("Dockerfile: the builder does not build both binaries (--bin receiver --bin processor)")
    env = " ".join(a for i, a in runtime if i == "ENV")
    if "0.0.0.0:8080" not in env or "0.0.0.0:9090" not in env or "0.0.0.0:9091" not in env:
        problem("Dockerfile: the runtime stage should listen on all interfaces (CARHOOK__RECEIVER__LISTEN, __ADMIN_LISTEN)")
    check_env_names("Dockerfile ENV", re.findall(r"(CARHOOK__\w+)=", env), config_keys())

    # .dockerignore is an allow-list: every workspace member must be in the build context.
    ignore = [l.strip() for l in open(os.path.join(ROOT, ".dockerignore"), encoding="utf-8")
              if l.strip() and not l.startswith("#")]
    cargo = open(os.path.join(ROOT, "Cargo.toml"), encoding="utf-8").read()
    m = re.search(r"members\s*=\s*\[(.*?)\]", cargo, re.S)
    members = re.findall(r'"([^"]+)"', m.group(1)) if m else []
    allowed = {l[1:].rstrip("/") for l in ignore if l.startswith("!")}
    if "*" in ignore:
        for need in ["Cargo.toml", "Cargo.lock"] + members:
            if need not in allowed:
                problem(f".dockerignore: {need} is not allowed into the build context (workspace member or manifest)")
    done("dockerfile")


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "manifests" and len(sys.argv) > 2:
        check_manifests(sys.argv[2:])
    elif cmd == "secured" and len(sys.argv) > 2:
        check_secured(sys.argv[2:])
    elif cmd == "compose" and len(sys.argv) == 3:
        check_compose(sys.argv[2])
    elif cmd == "dockerfile":
        check_dockerfile()
    elif cmd == "config-keys":
        print("\n".join(sorted(config_keys())))
    else:
        sys.exit(__doc__)
