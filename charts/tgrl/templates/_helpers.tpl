{{/*
Names. Every resource name is derived from tgrl.fullname and stays within 63 characters.
*/}}
{{- define "tgrl.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tgrl.fullname" -}}
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

{{- define "tgrl.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tgrl.mlflow.fullname" -}}
{{- printf "%s-mlflow" (include "tgrl.fullname" . | trunc 56 | trimSuffix "-") }}
{{- end }}

{{- define "tgrl.mlflow.migrate.fullname" -}}
{{- printf "%s-mlflow-db-upgrade" (include "tgrl.fullname" . | trunc 45 | trimSuffix "-") }}
{{- end }}

{{- define "tgrl.schedule.fullname" -}}
{{- printf "%s-schedule" (include "tgrl.fullname" . | trunc 54 | trimSuffix "-") }}
{{- end }}

{{- define "tgrl.pipelineConfig.fullname" -}}
{{- printf "%s-pipeline-config" (include "tgrl.fullname" . | trunc 47 | trimSuffix "-") }}
{{- end }}

{{- define "tgrl.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tgrl.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Labels. Selector labels are the stable subset; a component label tells the MLflow server from the Job.
*/}}
{{- define "tgrl.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tgrl.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "tgrl.labels" -}}
helm.sh/chart: {{ include "tgrl.chart" . }}
{{ include "tgrl.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tgrl
{{- end }}

{{/*
Image reference: repository:tag, or repository:tag@digest when a digest is given (the digest wins).
Usage: include "tgrl.image" .Values.mlflow.image
*/}}
{{- define "tgrl.image" -}}
{{- if .digest }}
{{- printf "%s:%s@%s" .repository .tag .digest }}
{{- else }}
{{- printf "%s:%s" .repository .tag }}
{{- end }}
{{- end }}

{{/*
Security contexts shared by every pod and container: a non-root numeric user, no privilege
escalation, no capabilities, the runtime's default seccomp profile, a read-only root filesystem
(writable paths are emptyDir volumes).
*/}}
{{- define "tgrl.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
fsGroup: {{ .Values.podSecurity.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "tgrl.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
privileged: false
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
MLflow: in-cluster URL, and the Host headers the server accepts (--allowed-hosts): the values'
external names, the Service's in-cluster names with and without a port, and localhost for
`kubectl port-forward`. MLflow matches the Host header exactly or by fnmatch wildcard.
*/}}
{{- define "tgrl.mlflow.url" -}}
{{- printf "http://%s.%s.svc.%s:%d" (include "tgrl.mlflow.fullname" .) .Release.Namespace .Values.clusterDomain (int .Values.mlflow.service.port) }}
{{- end }}

{{- define "tgrl.mlflow.allowedHosts" -}}
{{- $svc := include "tgrl.mlflow.fullname" . }}
{{- $ns := .Release.Namespace }}
{{- $hosts := list }}
{{- range .Values.mlflow.allowedHosts }}
{{- $hosts = append $hosts . }}
{{- end }}
{{- if .Values.mlflow.ingress.enabled }}
{{- range .Values.mlflow.ingress.hosts }}
{{- $hosts = append $hosts .host }}
{{- $hosts = append $hosts (printf "%s:*" .host) }}
{{- end }}
{{- end }}
{{- if eq (include "tgrl.mlflow.metrics" .) "true" }}
{{- /* Prometheus scrapes the pod IP: the private ranges (MLflow's own default allows them too) */}}
{{- $hosts = concat $hosts (list "10.*" "192.168.*") }}
{{- range $i := untilStep 16 32 1 }}
{{- $hosts = append $hosts (printf "172.%d.*" $i) }}
{{- end }}
{{- $hosts = concat $hosts (list "fc00:*" "fd00:*") }}
{{- end }}
{{- range (list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns $.Values.clusterDomain)) }}
{{- $hosts = append $hosts . }}
{{- $hosts = append $hosts (printf "%s:*" .) }}
{{- end }}
{{- $hosts = concat $hosts (list "localhost" "localhost:*" "127.0.0.1" "127.0.0.1:*") }}
{{- join "," (uniq $hosts) }}
{{- end }}

{{/*
"true" when the server exposes Prometheus metrics: asked for, or needed by the ServiceMonitor.
*/}}
{{- define "tgrl.mlflow.metrics" -}}
{{- or .Values.mlflow.metrics.enabled .Values.mlflow.metrics.serviceMonitor.enabled | toString }}
{{- end }}

{{/*
The pipeline recipe put in the ConfigMap: .Values.pipelineConfig, with tracking.tracking_uri
defaulting to this release's MLflow server when the recipe does not name one.
*/}}
{{- define "tgrl.pipelineConfig" -}}
{{- $config := deepCopy .Values.pipelineConfig }}
{{- $tracking := default dict (get $config "tracking") }}
{{- if not (get $tracking "tracking_uri") }}
{{- $_ := set $tracking "tracking_uri" (include "tgrl.mlflow.url" .) }}
{{- end }}
{{- $_ := set $config "tracking" $tracking }}
{{- toYaml $config }}
{{- end }}
