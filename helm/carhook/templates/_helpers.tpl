{{/* Chart name. */}}
{{- define "carhook.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name prefix: <release>-carhook, or the release name if it already contains the chart name.
Kept to 50 characters so "<fullname>-processor" and friends stay within 63. */}}
{{- define "carhook.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "carhook.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every resource. */}}
{{- define "carhook.labels" -}}
helm.sh/chart: {{ include "carhook.chart" . }}
app.kubernetes.io/name: {{ include "carhook.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: carhook
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component: include "carhook.selectorLabels" (dict "ctx" $ "component" "receiver"). */}}
{{- define "carhook.selectorLabels" -}}
app.kubernetes.io/name: {{ include "carhook.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* All labels of one component. */}}
{{- define "carhook.componentLabels" -}}
{{ include "carhook.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "carhook.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "carhook.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "carhook.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* "0.0.0.0" + 8080 -> "0.0.0.0:8080"; "::" -> "[::]:8080". */}}
{{- define "carhook.listen" -}}
{{- if contains ":" .host }}
{{- printf "[%s]:%d" .host (int .port) }}
{{- else }}
{{- printf "%s:%d" .host (int .port) }}
{{- end }}
{{- end }}

{{/* A values scalar as an environment string: whole floats (YAML numbers) without exponent. */}}
{{- define "carhook.envValue" -}}
{{- if and (kindIs "float64" .) (eq (floor .) .) }}
{{- int64 . }}
{{- else }}
{{- toString . }}
{{- end }}
{{- end }}

{{/* The required token Secret. */}}
{{- define "carhook.tokensSecret" -}}
{{- required "smartcar.existingSecret is required: create a Secret with the comma-separated Smartcar Application Management Tokens (kubectl create secret generic carhook-smartcar --from-literal=management-tokens=TOKEN) and set smartcar.existingSecret to its name; tokens are never taken from values" .Values.smartcar.existingSecret }}
{{- end }}

{{/* CARHOOK__* from the given sections of .Values.config, then extraEnv:
include "carhook.configEnv" (dict "ctx" $ "sections" (list "kafka" "receiver" "telemetry")).
Each component gets only the sections it reads, so changing a receiver setting does not restart
(and rebalance) the processors. Sections left out keep the application defaults, which validate.
"keys" adds single keys of other sections, for a component that reads only those:
(dict "poller" (list "outage_window_secs" "outage_max_vehicles")) for the receiver. */}}
{{- define "carhook.configEnv" -}}
{{- $config := .ctx.Values.config }}
{{- $pick := dict }}
{{- range $section := .sections }}{{ $_ := set $pick $section (keys (index $config $section)) }}{{ end }}
{{- $only := .keys | default dict }}
{{- range $section := keys $only | sortAlpha }}{{ $_ := set $pick $section (get $only $section) }}{{ end }}
{{- range $section := concat .sections (keys $only | sortAlpha) | uniq }}
{{- $kv := index $config $section | default dict }}
{{- range $key := index $pick $section | sortAlpha }}
{{- $v := index $kv $key }}
{{- if and (not (kindIs "invalid" $v)) (ne (toString $v) "") }}
- name: {{ printf "CARHOOK__%s__%s" $section $key | upper }}
  value: {{ include "carhook.envValue" $v | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- with .ctx.Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Default topology spread of one component (best effort over nodes and zones). */}}
{{- define "carhook.topologySpread" -}}
{{- $tsc := .values.topologySpreadConstraints }}
{{- if kindIs "invalid" $tsc }}
- maxSkew: 1
  topologyKey: kubernetes.io/hostname
  whenUnsatisfiable: ScheduleAnyway
  labelSelector:
    matchLabels:
      {{- include "carhook.selectorLabels" (dict "ctx" .ctx "component" .component) | nindent 6 }}
- maxSkew: 1
  topologyKey: topology.kubernetes.io/zone
  whenUnsatisfiable: ScheduleAnyway
  labelSelector:
    matchLabels:
      {{- include "carhook.selectorLabels" (dict "ctx" .ctx "component" .component) | nindent 6 }}
{{- else if $tsc }}
{{- toYaml $tsc }}
{{- end }}
{{- end }}

{{/* httpGet probes of one container: include "carhook.probes" (dict "probes" .Values.x.probes "port" "http"). */}}
{{- define "carhook.probes" -}}
startupProbe:
  httpGet:
    path: /health
    port: {{ .port }}
  {{- toYaml .probes.startup | nindent 2 }}
livenessProbe:
  httpGet:
    path: /health
    port: {{ .port }}
  {{- toYaml .probes.liveness | nindent 2 }}
readinessProbe:
  httpGet:
    path: /ready
    port: {{ .port }}
  {{- toYaml .probes.readiness | nindent 2 }}
{{- end }}

{{/* Seconds as an integer, rounded up, from milliseconds. */}}
{{- define "carhook.ceilSeconds" -}}
{{- div (add (int64 .) 999) 1000 }}
{{- end }}

{{/* Whether the cluster supports the preStop sleep action (beta and on by default since 1.30). */}}
{{- define "carhook.preStopSleep" -}}
{{- if and (gt (int .Values.receiver.preStopSleepSeconds) 0) (semverCompare ">=1.30-0" .Capabilities.KubeVersion.Version) }}
{{- int .Values.receiver.preStopSleepSeconds }}
{{- else }}
{{- 0 }}
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------- connections (kafka, cql, otlp) */}}

{{/* Mode of the mounted secret files: group-readable through fsGroup when the pod has one (the
files are then root:<fsGroup>), otherwise readable by the non-root user through "other". */}}
{{- define "carhook.secretFileMode" -}}
{{- if .Values.podSecurityContext.fsGroup }}0440{{ else }}0444{{ end }}
{{- end }}

{{/* Whether Kafka uses SASL / TLS ("true" or ""). */}}
{{- define "carhook.kafkaSasl" -}}
{{- if has .Values.kafka.securityProtocol (list "sasl_plaintext" "sasl_ssl") }}true{{ end }}
{{- end }}
{{- define "carhook.kafkaTls" -}}
{{- if has .Values.kafka.securityProtocol (list "ssl" "sasl_ssl") }}true{{ end }}
{{- end }}

{{/* Directory of one connection's mounted files: section kafka, cql or telemetry. */}}
{{- define "carhook.connDir" -}}
/var/run/secrets/carhook/{{ ternary "otlp" . (eq . "telemetry") }}
{{- end }}

{{/* The files each connection mounts, as JSON {"kafka": [...], "cql": [...], "telemetry": [...]};
each file {env, file, secret | configMap, key}: the source key, the file name in the connection's
directory and the CARHOOK__*_FILE variable that points at it. The TriggerAuthentication, the
volumes, the mounts and the variables are all derived from this one list. */}}
{{- define "carhook.connFiles" -}}
{{- $v := .Values }}
{{- $kafka := list }}
{{- if and (include "carhook.kafkaSasl" .) $v.kafka.auth.existingSecret }}
{{- $kafka = append $kafka (dict "env" "CARHOOK__KAFKA__SASL_PASSWORD_FILE" "file" "sasl-password" "secret" $v.kafka.auth.existingSecret "key" $v.kafka.auth.passwordKey "keda" "password") }}
{{- end }}
{{- if include "carhook.kafkaTls" . }}
{{- $ca := $v.kafka.tls.ca }}
{{- if $ca.existingSecret }}
{{- $kafka = append $kafka (dict "env" "CARHOOK__KAFKA__SSL_CA_FILE" "file" "ca.crt" "secret" $ca.existingSecret "key" $ca.key "keda" "ca") }}
{{- else if $ca.existingConfigMap }}
{{- $kafka = append $kafka (dict "env" "CARHOOK__KAFKA__SSL_CA_FILE" "file" "ca.crt" "configMap" $ca.existingConfigMap "key" $ca.key "keda" "ca") }}
{{- end }}
{{- $cc := $v.kafka.tls.clientCert }}
{{- if $cc.existingSecret }}
{{- $kafka = append $kafka (dict "env" "CARHOOK__KAFKA__SSL_CERTIFICATE_FILE" "file" "client.crt" "secret" $cc.existingSecret "key" $cc.certKey "keda" "cert") }}
{{- $kafka = append $kafka (dict "env" "CARHOOK__KAFKA__SSL_KEY_FILE" "file" "client.key" "secret" $cc.existingSecret "key" $cc.keyKey "keda" "key") }}
{{- with $cc.keyPasswordKey }}
{{- $kafka = append $kafka (dict "env" "CARHOOK__KAFKA__SSL_KEY_PASSWORD_FILE" "file" "client-key-password" "secret" $cc.existingSecret "key" . "keda" "keyPassword") }}
{{- end }}
{{- end }}
{{- end }}
{{- $cql := list }}
{{- with $v.cql.auth.existingSecret }}
{{- $cql = append $cql (dict "env" "CARHOOK__CQL__PASSWORD_FILE" "file" "password" "secret" . "key" $v.cql.auth.passwordKey) }}
{{- end }}
{{- if $v.cql.tls.enabled }}
{{- $ca := $v.cql.tls.ca }}
{{- if $ca.existingSecret }}
{{- $cql = append $cql (dict "env" "CARHOOK__CQL__TLS_CA_FILE" "file" "ca.crt" "secret" $ca.existingSecret "key" $ca.key) }}
{{- else if $ca.existingConfigMap }}
{{- $cql = append $cql (dict "env" "CARHOOK__CQL__TLS_CA_FILE" "file" "ca.crt" "configMap" $ca.existingConfigMap "key" $ca.key) }}
{{- end }}
{{- $cc := $v.cql.tls.clientCert }}
{{- if $cc.existingSecret }}
{{- $cql = append $cql (dict "env" "CARHOOK__CQL__TLS_CERT_FILE" "file" "client.crt" "secret" $cc.existingSecret "key" $cc.certKey) }}
{{- $cql = append $cql (dict "env" "CARHOOK__CQL__TLS_KEY_FILE" "file" "client.key" "secret" $cc.existingSecret "key" $cc.keyKey) }}
{{- end }}
{{- end }}
{{- $otlp := list }}
{{- with $v.otlp.headers.existingSecret }}
{{- $otlp = append $otlp (dict "env" "CARHOOK__TELEMETRY__OTLP_HEADERS_FILE" "file" "headers" "secret" . "key" $v.otlp.headers.key) }}
{{- end }}
{{- $ca := $v.otlp.tls.ca }}
{{- if $ca.existingSecret }}
{{- $otlp = append $otlp (dict "env" "CARHOOK__TELEMETRY__OTLP_CA_FILE" "file" "ca.crt" "secret" $ca.existingSecret "key" $ca.key) }}
{{- else if $ca.existingConfigMap }}
{{- $otlp = append $otlp (dict "env" "CARHOOK__TELEMETRY__OTLP_CA_FILE" "file" "ca.crt" "configMap" $ca.existingConfigMap "key" $ca.key) }}
{{- end }}
{{- dict "kafka" $kafka "cql" $cql "telemetry" $otlp | toJson }}
{{- end }}

{{/* Environment of the connections of the given sections (a subset of kafka, cql, telemetry):
include "carhook.connectionEnv" (dict "ctx" $ "sections" (list "kafka" "telemetry")). Only what is
configured is rendered, so a plaintext setup has the environment it always had. */}}
{{- define "carhook.connectionEnv" -}}
{{- $ctx := .ctx }}
{{- $v := $ctx.Values }}
{{- $files := include "carhook.connFiles" $ctx | fromJson }}
{{- if has "kafka" .sections }}
{{- if ne $v.kafka.securityProtocol "plaintext" }}
- name: CARHOOK__KAFKA__SECURITY_PROTOCOL
  value: {{ $v.kafka.securityProtocol | quote }}
{{- end }}
{{- if include "carhook.kafkaSasl" $ctx }}
- name: CARHOOK__KAFKA__SASL_MECHANISM
  value: {{ $v.kafka.auth.saslMechanism | quote }}
{{- if $v.kafka.auth.usernameKey }}
- name: CARHOOK__KAFKA__SASL_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ $v.kafka.auth.existingSecret }}
      key: {{ $v.kafka.auth.usernameKey }}
{{- else if $v.kafka.auth.username }}
- name: CARHOOK__KAFKA__SASL_USERNAME
  value: {{ $v.kafka.auth.username | quote }}
{{- end }}
{{- end }}
{{- if include "carhook.kafkaTls" $ctx }}
- name: CARHOOK__KAFKA__SSL_ENDPOINT_IDENTIFICATION
  value: {{ $v.kafka.tls.endpointIdentification | toString | quote }}
{{- end }}
{{- range $name := keys $v.kafka.properties | sortAlpha }}
- name: {{ printf "CARHOOK__KAFKA__PROPERTIES__%s" ($name | replace "." "_" | upper) }}
  value: {{ include "carhook.envValue" (index $v.kafka.properties $name) | quote }}
{{- end }}
{{- end }}
{{- if has "cql" .sections }}
{{- if $v.cql.auth.usernameKey }}
- name: CARHOOK__CQL__USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ $v.cql.auth.existingSecret }}
      key: {{ $v.cql.auth.usernameKey }}
{{- else if $v.cql.auth.username }}
- name: CARHOOK__CQL__USERNAME
  value: {{ $v.cql.auth.username | quote }}
{{- end }}
{{- end }}
{{- range $section := .sections }}
{{- range $f := index $files $section }}
- name: {{ $f.env }}
  value: {{ printf "%s/%s" (include "carhook.connDir" $section) $f.file | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* volumeMounts of the connections of the given sections. */}}
{{- define "carhook.connectionMounts" -}}
{{- $files := include "carhook.connFiles" .ctx | fromJson }}
{{- range $section := .sections }}
{{- if index $files $section }}
- name: {{ ternary "otlp" $section (eq $section "telemetry") }}-credentials
  mountPath: {{ include "carhook.connDir" $section }}
  readOnly: true
{{- end }}
{{- end }}
{{- end }}

{{/* volumes of the connections of the given sections: one projected volume per connection. */}}
{{- define "carhook.connectionVolumes" -}}
{{- $files := include "carhook.connFiles" .ctx | fromJson }}
{{- $mode := include "carhook.secretFileMode" .ctx }}
{{- range $section := .sections }}
{{- with index $files $section }}
- name: {{ ternary "otlp" $section (eq $section "telemetry") }}-credentials
  projected:
    defaultMode: {{ $mode }}
    sources:
      {{- range $f := . }}
      {{- if $f.secret }}
      - secret:
          name: {{ $f.secret }}
          items:
            - key: {{ $f.key }}
              path: {{ $f.file }}
      {{- else }}
      - configMap:
          name: {{ $f.configMap }}
          items:
            - key: {{ $f.key }}
              path: {{ $f.file }}
      {{- end }}
      {{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* KEDA's name of a SASL mechanism. */}}
{{- define "carhook.kedaSasl" -}}
{{- get (dict "PLAIN" "plaintext" "SCRAM-SHA-256" "scram_sha256" "SCRAM-SHA-512" "scram_sha512" "OAUTHBEARER" "oauthbearer") . }}
{{- end }}

{{/* Name of the TriggerAuthentication the ScaledObject uses ("" for none). */}}
{{- define "carhook.triggerAuthName" -}}
{{- if .Values.processor.autoscaling.authenticationRef }}
{{- .Values.processor.autoscaling.authenticationRef }}
{{- else if or (include "carhook.connFiles" . | fromJson).kafka (and (include "carhook.kafkaSasl" .) (or .Values.kafka.auth.username .Values.kafka.auth.usernameKey)) }}
{{- include "carhook.fullname" . }}-processor-kafka
{{- end }}
{{- end }}

{{/*
OpenTelemetry resource attributes from the downward API, so every span names the pod, namespace,
node and workload it came from (Kubernetes semantic conventions), plus telemetryResourceAttributes
from values (e.g. deployment.environment.name). The services read OTEL_RESOURCE_ATTRIBUTES on top
of service.name, service.version and service.instance.id.
Call with (dict "ctx" $ "workload" "<deployment or job name>" "kind" "deployment|job").
*/}}
{{- define "carhook.otelResourceEnv" -}}
- name: CARHOOK_K8S_POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: CARHOOK_K8S_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: CARHOOK_K8S_NODE_NAME
  valueFrom:
    fieldRef:
      fieldPath: spec.nodeName
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ printf "k8s.pod.name=$(CARHOOK_K8S_POD_NAME),k8s.namespace.name=$(CARHOOK_K8S_NAMESPACE),k8s.node.name=$(CARHOOK_K8S_NODE_NAME),k8s.%s.name=%s%s" .kind .workload (include "carhook.extraResourceAttributes" .ctx) | quote }}
{{- end }}

{{- define "carhook.extraResourceAttributes" -}}
{{- range $k, $v := .Values.telemetryResourceAttributes }},{{ $k }}={{ $v }}{{ end }}
{{- end }}
