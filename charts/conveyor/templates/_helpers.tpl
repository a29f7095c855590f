{{/* Names, labels and the operator's RBAC rules, shared by the templates. */}}

{{- define "conveyor.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "conveyor.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "conveyor.operatorName" -}}
{{- printf "%s-operator" (include "conveyor.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "conveyor.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "conveyor.operatorName" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "conveyor.selectorLabels" -}}
app.kubernetes.io/name: {{ include "conveyor.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "conveyor.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "conveyor.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: conveyor
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "conveyor.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/*
The operator's namespaced permissions: exactly the verbs it uses, nothing else (no Secrets, no Pods).
- Our kinds: kopf lists and watches them and patches its progress annotations and finalizers; the
  pipeline hands a passing model to its ModelDeployment with a patch. Status goes through /status.
- RayJobs and InferenceServices are written with server-side apply (patch; create when the child does
  not exist yet), read back for their status, and RayJobs beyond the history limit are deleted.
- A run's configuration ConfigMap is applied the same way and removed with its run.
- Events: kopf and the operator post them (create only).
*/}}
{{- define "conveyor.namespacedRules" -}}
- apiGroups: ["conveyor.dev"]
  resources: ["mlpipelines", "modeldeployments"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["conveyor.dev"]
  resources: ["mlpipelines/status", "modeldeployments/status"]
  verbs: ["get", "patch"]
- apiGroups: ["ray.io"]
  resources: ["rayjobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["serving.kserve.io"]
  resources: ["inferenceservices"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create"]
{{- end -}}

{{/* What kopf reads cluster-wide to notice namespaces and CRDs appearing (rbac.clusterDiscovery). */}}
{{- define "conveyor.discoveryRules" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end -}}
