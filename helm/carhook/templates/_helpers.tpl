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
(and rebalance) the processors. Sections left out keep the application defaults, which validate. */}}
{{- define "carhook.configEnv" -}}
{{- $config := .ctx.Values.config }}
{{- range $section := .sections }}
{{- $kv := index $config $section }}
{{- range $key := keys $kv | sortAlpha }}
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
