{{/* Names, labels and image references shared by the templates. */}}

{{- define "finetune-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "finetune-operator.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "finetune-operator.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "finetune-operator.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "finetune-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "finetune-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "finetune-operator.labels" -}}
{{ include "finetune-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "finetune-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "finetune-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "finetune-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "finetune-operator.trainerImage" -}}
{{- printf "%s:%s" .Values.trainer.image.repository (default .Chart.AppVersion .Values.trainer.image.tag) -}}
{{- end -}}

{{- define "finetune-operator.webhookService" -}}
{{- printf "%s-webhook" (include "finetune-operator.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "finetune-operator.peering" -}}
{{- gt (int .Values.replicaCount) 1 | ternary (include "finetune-operator.fullname" .) "" -}}
{{- end -}}

{{/* Rules for the namespaced resources the operator reconciles, in a Role or a ClusterRole. */}}
{{- define "finetune-operator.namespacedRules" -}}
- apiGroups: [finetune.dev]
  resources: [finetunejobs]
  verbs: [get, list, watch, patch]
- apiGroups: [finetune.dev]
  resources: [finetunejobs/status]
  verbs: [get, patch]
- apiGroups: [finetune.dev]
  resources: [finetunejobs/finalizers]
  verbs: [update]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
- apiGroups: [""]
  resources: [services]
  verbs: [get, list, watch, create, delete]
{{- if .Values.trainer.statusReporting }}
# The namespace's trainer identity (the finetune-trainer ServiceAccount, Role and RoleBinding),
# made by its first job and again if deleted; never deleted by the operator.
- apiGroups: [""]
  resources: [serviceaccounts]
  verbs: [get, list, watch, create]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles, rolebindings]
  verbs: [get, list, watch, create]
{{- end }}
- apiGroups: [""]
  resources: [events]
  verbs: [create, patch, list]
# Kueue (queued jobs): read the Workload of a training Job; patch only its spec.active, Kueue's
# own switch for spec.suspend of a queued job. Harmless where Kueue is not installed.
- apiGroups: [kueue.x-k8s.io]
  resources: [workloads]
  verbs: [get, list, watch, patch]
{{- if eq .Values.gpuAllocation "dra" }}
# Dynamic Resource Allocation: each job's ResourceClaimTemplate (watched so a deleted one is made
# again, deleted only to undo a half-created set), and the claims made from it (read: which
# devices were allocated).
- apiGroups: [resource.k8s.io]
  resources: [resourceclaimtemplates]
  verbs: [get, list, watch, create, delete]
- apiGroups: [resource.k8s.io]
  resources: [resourceclaims]
  verbs: [get]
{{- end }}
{{- if include "finetune-operator.peering" . }}
- apiGroups: [kopf.dev]
  resources: [kopfpeerings]
  verbs: [get, list, watch, patch]
{{- end }}
{{- end -}}
