{{/* Names, labels and the few derived values the templates share. */}}

{{- define "agentserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "agentserve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "agentserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels; call with (dict "root" $ "component" "api"). */}}
{{- define "agentserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "agentserve.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end -}}

{{/* Common labels; call with (dict "root" $ "component" "api"), component optional. */}}
{{- define "agentserve.labels" -}}
helm.sh/chart: {{ include "agentserve.chart" .root }}
{{ include "agentserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: {{ include "agentserve.name" .root }}
{{- end -}}

{{- define "agentserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "agentserve.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "agentserve.secretName" -}}
{{- default (include "agentserve.fullname" .) .Values.existingSecret -}}
{{- end -}}

{{- define "agentserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag | toString) -}}
{{- end -}}

{{/*
An env var's value as a string. Helm reads every number in values as a float, which
toString would print as 2.147483647e+09: whole numbers are printed as integers.
*/}}
{{- define "agentserve.envValue" -}}
{{- if and (kindIs "float64" .) (eq . (floor .)) -}}
{{- int64 . | toString | quote -}}
{{- else -}}
{{- toString . | quote -}}
{{- end -}}
{{- end -}}

{{/* The secret keys, and which of them a pod cannot start without. */}}
{{- define "agentserve.requiredSecretKeys" -}}
DATABASE_URL
{{- end -}}
{{- define "agentserve.optionalSecretKeys" -}}
AGENT_API_KEY AGENT_API_KEYS JWT_SECRET SESSION_SECRET WEBHOOK_SECRET OPENAI_API_KEY LANGSMITH_API_KEY
{{- end -}}

{{/*
Refuses settings the chart must not carry as plain env: secret names (they belong in
`secrets`/existingSecret) and names the chart sets itself. Call with (dict "where" "config" "env" $map).
*/}}
{{- define "agentserve.checkPlainEnv" -}}
{{- $secretNames := splitList " " (printf "%s %s DATABASE_DIRECT_URL" (include "agentserve.requiredSecretKeys" .) (include "agentserve.optionalSecretKeys" .)) -}}
{{- $reserved := list "ROLE" "HOST" "PORT" "DATA_DIR" "SETUP_SCHEMA_ON_START" "PROMETHEUS_MULTIPROC_DIR" -}}
{{- range $key, $_ := .env -}}
{{- if has $key $secretNames -}}
{{- fail (printf "%s.%s is a secret: set it under `secrets` or in existingSecret, never in plain env" $.where $key) -}}
{{- end -}}
{{- if has $key $reserved -}}
{{- fail (printf "%s.%s is set by the chart itself; remove it" $.where $key) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
terminationGracePeriodSeconds of a serving role: it must outlast the preStop sleep plus
the server's graceful shutdown, or the kubelet kills runs the server was finishing.
Call with (dict "root" $ "role" $roleValues "component" "api").
*/}}
{{- define "agentserve.gracePeriod" -}}
{{- $settings := merge (dict) .role.env .root.Values.config -}}
{{- $graceful := int (required "config.GRACEFUL_TIMEOUT_S is required" $settings.GRACEFUL_TIMEOUT_S) -}}
{{- $preStop := int .root.Values.shutdown.preStopSleepSeconds -}}
{{- $floor := add $graceful $preStop -}}
{{- $grace := add $floor (int .root.Values.shutdown.marginSeconds) -}}
{{- if not (kindIs "invalid" .role.terminationGracePeriodSeconds) -}}
{{- $grace = int .role.terminationGracePeriodSeconds -}}
{{- end -}}
{{- if le $grace $floor -}}
{{- fail (printf "%s.terminationGracePeriodSeconds (%d) must exceed GRACEFUL_TIMEOUT_S (%d) + shutdown.preStopSleepSeconds (%d)" .component $grace $graceful $preStop) -}}
{{- end -}}
{{- $grace -}}
{{- end -}}

{{/* The two emptyDirs every pod mounts (the root filesystem is read-only). */}}
{{- define "agentserve.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.volumes.tmpSizeLimit }}
- name: data
  emptyDir:
    sizeLimit: {{ .Values.volumes.dataSizeLimit }}
{{- end -}}

{{- define "agentserve.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: data
  mountPath: {{ .Values.dataDir }}
{{- end -}}
