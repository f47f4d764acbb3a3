{{/* Names, labels and the operator's RBAC rules, shared by every template. */}}

{{- define "specops.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "specops.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "specops.selectorLabels" -}}
app.kubernetes.io/name: {{ include "specops.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{/* Labels of every object, without the component. */}}
{{- define "specops.commonLabels" -}}
app.kubernetes.io/name: {{ include "specops.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: specops
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "specops.labels" -}}
{{ include "specops.commonLabels" . }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "specops.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* Namespaces that get namespaced objects (Roles, workload ServiceAccounts, LocalQueues). */}}
{{- define "specops.namespaces" -}}
{{- if .Values.watchNamespaces -}}
{{- toJson (uniq .Values.watchNamespaces) -}}
{{- else -}}
{{- toJson (list .Release.Namespace) -}}
{{- end -}}
{{- end -}}

{{/*
What the operator does, verb by verb (tests/e2e/test_rbac.py checks each is used and none is missing):
its resources (watch, patch finalizers/annotations, status), the children it creates and deletes,
pods it reads for workload reports, Events it posts. `update` on the finalizers subresource is no
request the operator sends: with the OwnerReferencesPermissionEnforcement admission plugin
(OpenShift, hardened clusters) a child whose ownerReference sets blockOwnerDeletion is refused
unless its creator may update the owner's finalizers.
*/}}
{{- define "specops.operatorRules" -}}
- apiGroups: ["specops.dev"]
  resources: ["speculatordatagens", "speculatortrainings"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["specops.dev"]
  resources: ["speculatordatagens"]
  verbs: ["create", "delete"]
- apiGroups: ["specops.dev"]
  resources: ["speculatordatagens/status", "speculatortrainings/status"]
  verbs: ["patch"]
- apiGroups: ["specops.dev"]
  resources: ["speculatordatagens/finalizers", "speculatortrainings/finalizers"]
  verbs: ["update"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["apps"]
  resources: ["statefulsets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["services", "configmaps", "persistentvolumeclaims"]
  verbs: ["get", "list", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
{{- /* A stream's CURVE key Secret and its broker's NetworkPolicy: made once, read back to check
  ownership, never listed, patched or deleted (the garbage collector removes them with their owner). */}}
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "create"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "create"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "list"]
{{- if .Values.kueue.enabled }}
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloads"]
  verbs: ["list", "patch"]
{{- end }}
{{- end -}}
