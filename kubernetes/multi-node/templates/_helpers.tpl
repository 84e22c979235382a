{{/*
The chart's name, or nameOverride; 63 characters at most (a DNS label).
*/}}
{{- define "multi-node.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The StatefulSet's name: fullnameOverride, else <release>-<name>, or the release name alone when it already holds
the chart's name. 52 characters at most, not 63: the controller labels each pod with
controller-revision-hash=<name>-<10-character hash>, a label value of 63 characters at most.
*/}}
{{- define "multi-node.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The headless Service that gives pod N the DNS name <fullname>-N.<this>.<namespace>.svc.<cluster domain>
(61 characters at most).
*/}}
{{- define "multi-node.headlessServiceName" -}}
{{- printf "%s-headless" (include "multi-node.fullname" .) }}
{{- end }}

{{/*
The Service clients call, which reaches rank 0 only: <release>-service in the single-node and the multi-node chart
alike, so that the test chart's default serviceUrl (http://jax-example-service:8000) reaches whichever serves the
release jax-example.
*/}}
{{- define "multi-node.serviceName" -}}
{{- printf "%s-service" .Release.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Rank 0's pod: the StatefulSet's pod of ordinal 0.
*/}}
{{- define "multi-node.headPodName" -}}
{{- printf "%s-0" (include "multi-node.fullname" .) }}
{{- end }}

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "multi-node.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every resource.
*/}}
{{- define "multi-node.labels" -}}
helm.sh/chart: {{ include "multi-node.chart" . }}
{{ include "multi-node.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Labels that tell this release's resources from any other's.
*/}}
{{- define "multi-node.selectorLabels" -}}
app.kubernetes.io/name: {{ include "multi-node.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels that select the group's pods (and not the `helm test` pod, whose component is test).
*/}}
{{- define "multi-node.serverSelectorLabels" -}}
{{ include "multi-node.selectorLabels" . }}
app.kubernetes.io/component: server
{{- end }}

{{/*
Container resources: statefulset.resources with the nvidia.com/gpu limit set to statefulset.numOfGPUs.
*/}}
{{- define "multi-node.resources" -}}
{{- $resources := deepCopy (.Values.statefulset.resources | default dict) }}
{{- $limits := deepCopy ($resources.limits | default dict) }}
{{- $_ := set $limits "nvidia.com/gpu" (int .Values.statefulset.numOfGPUs) }}
{{- $_ := set $resources "limits" $limits }}
{{- toYaml $resources }}
{{- end }}

{{/*
Where the ConfigMap with entrypoint.sh is mounted in the server container.
*/}}
{{- define "multi-node.scriptDir" -}}
/opt/opt-jax-kubernetes
{{- end }}

{{/*
The exec probe of a rank: entrypoint.sh probe live|ready (the argument), the same for every pod.
*/}}
{{- define "multi-node.probe" -}}
exec:
  command: [sh, {{ include "multi-node.scriptDir" .root }}/entrypoint.sh, probe, {{ .kind }}]
{{- end }}

{{/*
Seconds from SIGTERM to SIGKILL. On SIGTERM the server takes no new requests, lets those in flight finish for up to
statefulset.drainSeconds (its --exit-timeout), then stops Triton (about 10 s) and exits 0. So the grace period is
statefulset.terminationGracePeriodSeconds when set, which must exceed drainSeconds by 20 s or more (the chart refuses
less), else drainSeconds + 30.
*/}}
{{- define "multi-node.terminationGracePeriodSeconds" -}}
{{- $drain := int .Values.statefulset.drainSeconds }}
{{- $grace := .Values.statefulset.terminationGracePeriodSeconds }}
{{- if kindIs "invalid" $grace }}
{{- add $drain 30 }}
{{- else if lt (int $grace) (add $drain 20) }}
{{- fail (printf "statefulset.terminationGracePeriodSeconds=%d is too short for statefulset.drainSeconds=%d: the server drains for drainSeconds, then stops Triton (about 10 s), so give at least drainSeconds + 20, or leave it unset (null) for drainSeconds + 30" (int $grace) $drain) }}
{{- else }}
{{- int $grace }}
{{- end }}
{{- end }}

{{/*
Flags the chart sets from values, which statefulset.extraArgs may not carry: --exit-timeout, so that the grace
period above follows statefulset.drainSeconds; the ports, so that the container and the Service name the ports
rank 0 listens on; --api-key, so that the key stays in a Secret (a flag's value shows in the pod spec and in ps).
*/}}
{{- define "multi-node.checkExtraArgs" -}}
{{- $owned := dict
      "--exit-timeout" "set statefulset.drainSeconds instead, which the termination grace period follows"
      "--openai-port" "set service.ports.openai (or openai.enabled=false) instead, which the container and the Service follow"
      "--generation-metrics-port" "set service.ports.generationMetrics instead, which the container, the Service and the scrape settings follow"
      "--served-model-name" "set openai.servedModelName instead"
      "--api-key" "name a Secret in openai.apiKeySecret instead, so that the key is not a plain value" }}
{{- range .Values.statefulset.extraArgs }}
{{- $flag := regexReplaceAll "=.*$" . "" }}
{{- with get $owned $flag }}
{{- fail (printf "statefulset.extraArgs sets %s: %s" $flag .) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The server's flags for rank 0's other listeners (the workers ignore them): the generation metrics always, the
OpenAI-compatible API while openai.enabled (else --openai-port 0, none), and the API's second model name when it has one.
*/}}
{{- define "multi-node.listenerFlags" -}}
{{- $ports := .Values.service.ports }}
{{- $flags := list "--generation-metrics-port" (int $ports.generationMetrics | toString)
      "--openai-port" (ternary (int $ports.openai) 0 .Values.openai.enabled | toString) }}
{{- if and .Values.openai.enabled .Values.openai.servedModelName }}
{{- $flags = concat $flags (list "--served-model-name" .Values.openai.servedModelName) }}
{{- end }}
{{- toJson $flags }}
{{- end }}

{{/*
Every port of the pod differs from the others (a Service refuses two of one number), the JAX coordinator's too.
*/}}
{{- define "multi-node.checkPorts" -}}
{{- $ports := .Values.service.ports }}
{{- $numbers := list (int .Values.jaxPort) (int $ports.http) (int $ports.grpc) (int $ports.metrics) (int $ports.generationMetrics) }}
{{- if .Values.openai.enabled }}
{{- $numbers = append $numbers (int $ports.openai) }}
{{- end }}
{{- if ne (len $numbers) (len (uniq $numbers)) }}
{{- fail (printf "jaxPort and service.ports give one port number to two listeners (%s): give each its own" (join ", " $numbers)) }}
{{- end }}
{{- end }}

{{/*
Prometheus' scrape annotations for the generation metrics (metrics.scrapeAnnotations). They go on <release>-service,
which reaches rank 0 only, and not on the pods: every pod of the StatefulSet has the same annotations, and a worker
serves no metrics, so a scrape of each pod would report every worker down.
*/}}
{{- define "multi-node.scrapeAnnotations" -}}
prometheus.io/scrape: "true"
prometheus.io/port: {{ int .Values.service.ports.generationMetrics | toString | quote }}
prometheus.io/path: /metrics
{{- end }}
