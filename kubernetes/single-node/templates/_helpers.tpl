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
Flags the chart sets from values, which deployment.extraArgs may not carry: --exit-timeout, so that the grace
period above follows deployment.drainSeconds; the ports, so that the container and the Service name the ports the
server listens on; --api-key, so that the key stays in a Secret (a flag's value shows in the pod spec and in ps).
*/}}
{{- define "single-node.checkExtraArgs" -}}
{{- $owned := dict
      "--exit-timeout" "set deployment.drainSeconds instead, which the termination grace period follows"
      "--openai-port" "set service.ports.openai (or openai.enabled=false) instead, which the container and the Service follow"
      "--generation-metrics-port" "set service.ports.generationMetrics instead, which the container, the Service and the scrape settings follow"
      "--served-model-name" "set openai.servedModelName instead"
      "--api-key" "name a Secret in openai.apiKeySecret instead, so that the key is not a plain value" }}
{{- range .Values.deployment.extraArgs }}
{{- $flag := regexReplaceAll "=.*$" . "" }}
{{- with get $owned $flag }}
{{- fail (printf "deployment.extraArgs sets %s: %s" $flag .) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The server's flags for its other listeners: the generation metrics always, the OpenAI-compatible API while
openai.enabled (else --openai-port 0, none), and the API's second model name when it has one.
*/}}
{{- define "single-node.listenerFlags" -}}
{{- $ports := .Values.service.ports }}
{{- $flags := list "--generation-metrics-port" (int $ports.generationMetrics | toString)
      "--openai-port" (ternary (int $ports.openai) 0 .Values.openai.enabled | toString) }}
{{- if and .Values.openai.enabled .Values.openai.servedModelName }}
{{- $flags = concat $flags (list "--served-model-name" .Values.openai.servedModelName) }}
{{- end }}
{{- toJson $flags }}
{{- end }}

{{/*
Every port of the pod differs from the others (a Service refuses two of one number).
*/}}
{{- define "single-node.checkPorts" -}}
{{- $ports := .Values.service.ports }}
{{- $numbers := list (int $ports.http) (int $ports.grpc) (int $ports.metrics) (int $ports.generationMetrics) }}
{{- if .Values.openai.enabled }}
{{- $numbers = append $numbers (int $ports.openai) }}
{{- end }}
{{- if ne (len $numbers) (len (uniq $numbers)) }}
{{- fail (printf "service.ports gives one port number to two listeners (%s): give each its own" (join ", " $numbers)) }}
{{- end }}
{{- end }}

{{/*
The pod's annotations: Prometheus' scrape annotations for the generation metrics while metrics.scrapeAnnotations,
then deployment.podAnnotations, which win over them.
*/}}
{{- define "single-node.podAnnotations" -}}
{{- $annotations := dict }}
{{- if .Values.metrics.scrapeAnnotations }}
{{- $annotations = dict
      "prometheus.io/scrape" "true"
      "prometheus.io/port" (int .Values.service.ports.generationMetrics | toString)
      "prometheus.io/path" "/metrics" }}
{{- end }}
{{- toYaml (merge (deepCopy (.Values.deployment.podAnnotations | default dict)) $annotations) }}
{{- end }}
