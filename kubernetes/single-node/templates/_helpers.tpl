{{/*
The chart's name, or nameOverride; 63 characters at most (a DNS label).
*/}}
{{- define "single-node.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The Deployment's name: fullnameOverride, else <release>-<name>, or the release name alone when it already holds
the chart's name; 63 characters at most.
*/}}
{{- define "single-node.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The Service clients call: <release>-service in the single-node and the multi-node chart alike, so that the test
chart's default serviceUrl (http://jax-example-service:8000) reaches whichever serves the release jax-example.
*/}}
{{- define "single-node.serviceName" -}}
{{- printf "%s-service" .Release.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "single-node.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every resource.
*/}}
{{- define "single-node.labels" -}}
helm.sh/chart: {{ include "single-node.chart" . }}
{{ include "single-node.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Labels that tell this release's resources from any other's.
*/}}
{{- define "single-node.selectorLabels" -}}
app.kubernetes.io/name: {{ include "single-node.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels that select the server's pods (and not the `helm test` pod, whose component is test).
*/}}
{{- define "single-node.serverSelectorLabels" -}}
{{ include "single-node.selectorLabels" . }}
app.kubernetes.io/component: server
{{- end }}

{{/*
Container resources: deployment.resources with the nvidia.com/gpu limit set to deployment.numOfGPUs.
*/}}
{{- define "single-node.resources" -}}
{{- $resources := deepCopy (.Values.deployment.resources | default dict) }}
{{- $limits := deepCopy ($resources.limits | default dict) }}
{{- $_ := set $limits "nvidia.com/gpu" (int .Values.deployment.numOfGPUs) }}
{{- $_ := set $resources "limits" $limits }}
{{- toYaml $resources }}
{{- end }}

{{/*
Seconds from SIGTERM to SIGKILL. On SIGTERM the server takes no new requests, lets those in flight finish for up to
deployment.drainSeconds (its --exit-timeout), then stops Triton (about 10 s) and exits 0. So the grace period is
deployment.terminationGracePeriodSeconds when set, which must exceed drainSeconds by 20 s or more (the chart refuses
less), else drainSeconds + 30.
*/}}
{{- define "single-node.terminationGracePeriodSeconds" -}}
{{- $drain := int .Values.deployment.drainSeconds }}
{{- $grace := .Values.deployment.terminationGracePeriodSeconds }}
{{- if kindIs "invalid" $grace }}
{{- add $drain 30 }}
{{- else if lt (int $grace) (add $drain 20) }}
{{- fail (printf "deployment.terminationGracePeriodSeconds=%d is too short for deployment.drainSeconds=%d: the server drains for drainSeconds, then stops Triton (about 10 s), so give at least drainSeconds + 20, or leave it unset (null) for drainSeconds + 30" (int $grace) $drain) }}
{{- else }}
{{- int $grace }}
{{- end }}
{{- end }}

{{/*
The server's --exit-timeout comes from deployment.drainSeconds only, so that the grace period above follows it.
*/}}
{{- define "single-node.checkExtraArgs" -}}
{{- range .Values.deployment.extraArgs }}
{{- if regexMatch "^--exit-timeout(=.*)?$" . }}
{{- fail "deployment.extraArgs sets --exit-timeout: set deployment.drainSeconds instead, which the termination grace period follows" }}
{{- end }}
{{- end }}
{{- end }}
