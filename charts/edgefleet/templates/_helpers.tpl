{{/* Names and labels shared by every template. */}}
{{- define "edgefleet.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "edgefleet.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "edgefleet.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "edgefleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: edgefleet
{{- end -}}

{{- define "edgefleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "edgefleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end -}}

{{- define "edgefleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "edgefleet.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "edgefleet.mqttHost" -}}
{{- if .Values.mqtt.bundled.enabled -}}
{{- printf "%s-mosquitto" (include "edgefleet.fullname" .) -}}
{{- else -}}
{{- .Values.mqtt.host -}}
{{- end -}}
{{- end -}}

{{/* MQTT TLS: on for an external broker with mqtt.tls; the bundled trial broker is plain. */}}
{{- define "edgefleet.mqttTls" -}}
{{- if and .Values.mqtt.tls (not .Values.mqtt.bundled.enabled) -}}true{{- end -}}
{{- end -}}

{{/* Client certificate from mqtt.tlsSecret: both keys or neither. */}}
{{- define "edgefleet.mqttClientCert" -}}
{{- $s := .Values.mqtt.tlsSecret -}}
{{- if and (include "edgefleet.mqttTls" .) $s.name -}}
{{- if and $s.certKey $s.keyKey -}}true
{{- else if or $s.certKey $s.keyKey -}}
{{- fail "mqtt.tlsSecret: set both certKey and keyKey (client certificate) or neither (CA only)" -}}
{{- end -}}
{{- end -}}
{{- end -}}
