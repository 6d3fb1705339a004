{{/* Chart name, release-and-chart name and labels, the Bitnami way. */}}
{{- define "headwater.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "headwater.fullname" -}}
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

{{- define "headwater.selectorLabels" -}}
app.kubernetes.io/name: {{ include "headwater.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "headwater.labels" -}}
{{ include "headwater.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "headwater.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "headwater.headlessName" -}}
{{- printf "%s-headless" (include "headwater.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The DNS suffix of every pod: <pod>.<this>. */}}
{{- define "headwater.podDomain" -}}
{{- printf "%s.%s.svc.%s" (include "headwater.headlessName" .) .Release.Namespace .Values.clusterDomain -}}
{{- end -}}

{{- define "headwater.secretName" -}}
{{- default (printf "%s-cluster-secret" (include "headwater.fullname" .)) .Values.clusterSecret.existingSecret -}}
{{- end -}}

{{/* Voters: the first .Values.voters pods, node id = ordinal + 1, on their Raft port. */}}
{{- define "headwater.voters" -}}
{{- $fullname := include "headwater.fullname" . -}}
{{- $domain := include "headwater.podDomain" . -}}
{{- $out := list -}}
{{- range $i := until (int .Values.voters) -}}
{{- $out = append $out (printf "%d@%s-%d.%s:%d" (add1 $i) $fullname $i $domain (int $.Values.ports.raft)) -}}
{{- end -}}
{{- join "," $out -}}
{{- end -}}

{{/* Controller addresses: the voters' client (gRPC) addresses. */}}
{{- define "headwater.controllerAddresses" -}}
{{- $fullname := include "headwater.fullname" . -}}
{{- $domain := include "headwater.podDomain" . -}}
{{- $out := list -}}
{{- range $i := until (int .Values.voters) -}}
{{- $out = append $out (printf "%s-%d.%s:%d" $fullname $i $domain (int $.Values.ports.client)) -}}
{{- end -}}
{{- join "," $out -}}
{{- end -}}

{{/* Bootstrap address for clients inside the cluster: the client Service. */}}
{{- define "headwater.bootstrap" -}}
{{- printf "%s.%s.svc.%s:%d" (include "headwater.fullname" .) .Release.Namespace .Values.clusterDomain (int .Values.ports.client) -}}
{{- end -}}

{{/* Refuse shapes the quorum cannot have; called from the StatefulSet. */}}
{{- define "headwater.validate" -}}
{{- $voters := int .Values.voters -}}
{{- if not (has $voters (list 1 3 5)) -}}
{{- fail (printf "voters must be 1, 3 or 5 (a Raft quorum of an odd size), got %v" .Values.voters) -}}
{{- end -}}
{{- if gt $voters (int .Values.replicaCount) -}}
{{- fail (printf "voters (%d) must not exceed replicaCount (%d): the voters are the first pods" $voters (int .Values.replicaCount)) -}}
{{- end -}}
{{- $grace := float64 (default 10 (index .Values.config "shutdown_grace_s")) -}}
{{- if lt (float64 .Values.terminationGracePeriodSeconds) (addf (mulf $grace 2) 5) -}}
{{- fail (printf "terminationGracePeriodSeconds (%v) must be at least 2 x shutdown_grace_s + 5 (%v) for the controlled shutdown" .Values.terminationGracePeriodSeconds (addf (mulf $grace 2) 5)) -}}
{{- end -}}
{{- range $k := list "node_id" "host" "port" "advertised_host" "data_dir" "voters" "controller_addresses" "cluster_secret" "cluster_secret_file" "raft_port" "metrics_port" -}}
{{- if hasKey $.Values.config $k -}}
{{- fail (printf "config.%s is set by the chart; use the chart's values instead" $k) -}}
{{- end -}}
{{- end -}}
{{- end -}}
