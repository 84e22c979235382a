{{/*
The chart's name, or nameOverride; 63 characters at most (a DNS label).
*/}}
{{- define "test.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The Job's name: fullnameOverride, else <release>-<name>, or the release name alone when it already holds the
chart's name (jax-example-test stays jax-example-test); 63 characters at most.
*/}}
{{- define "test.fullname" -}}
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
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "test.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every resource.
*/}}
{{- define "test.labels" -}}
helm.sh/chart: {{ include "test.chart" . }}
{{ include "test.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Labels that tell this release's resources from any other's.
*/}}
{{- define "test.selectorLabels" -}}
app.kubernetes.io/name: {{ include "test.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The client's command line: the image's client and the values' request.
*/}}
{{- define "test.clientArgs" -}}
{{- $flags := list
      "--server-url" .Values.serviceUrl
      "--input" .Values.input
      "--output-length" (int .Values.outputLength | toString)
      "--timeout" (int .Values.timeoutSeconds | toString) }}
{{- toYaml (concat .Values.command $flags) }}
{{- end }}

{{/*
Where the ConfigMap with openai_completion.py is mounted, and its name.
*/}}
{{- define "test.scriptDir" -}}
/opt/opt-jax-test
{{- end }}

{{- define "test.scriptConfigMap" -}}
{{- printf "%s-openai" (include "test.fullname" . | trunc 56 | trimSuffix "-") }}
{{- end }}

{{/*
The container's command line. Without openaiUrl the client's alone. With it, sh runs the client and then, once the
client has succeeded, openai_completion.py (the image's python3): the pod's one log shows both answers, and its exit
status is the first failure's. The client's words go to sh as "$@", unquoted by nothing in between.
*/}}
{{- define "test.args" -}}
{{- $client := include "test.clientArgs" . | fromYamlArray }}
{{- if .Values.openaiUrl }}
{{- $script := printf "\"$@\" && exec python3 %s/openai_completion.py" (include "test.scriptDir" .) }}
{{- toYaml (concat (list "sh" "-c" $script "sh") $client) }}
{{- else }}
{{- toYaml $client }}
{{- end }}
{{- end }}

{{/*
openai_completion.py's settings, with openaiUrl set: the request of client.py again, and the API key from a Secret.
*/}}
{{- define "test.openaiEnv" -}}
- name: OPT_OPENAI_URL
  value: {{ .Values.openaiUrl | quote }}
- name: OPT_OPENAI_MODEL
  value: {{ .Values.openaiModel | quote }}
- name: OPT_OPENAI_PROMPT
  value: {{ .Values.input | quote }}
- name: OPT_OPENAI_MAX_TOKENS
  value: {{ int .Values.outputLength | quote }}
- name: OPT_OPENAI_TIMEOUT
  value: {{ int .Values.timeoutSeconds | quote }}
{{- with .Values.openaiApiKeySecret.name }}
# The key the server's openai.apiKeySecret names: from the Secret, never a value or a flag.
- name: OPT_SERVER_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . | quote }}
      key: {{ $.Values.openaiApiKeySecret.key | quote }}
{{- end }}
{{- end }}
