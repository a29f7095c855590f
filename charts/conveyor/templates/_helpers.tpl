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
The operator's namespaced permissions: exactly the verbs it uses (each kind's reconcile.py and controller/client.py under operator/),
nothing else (no Secrets, no Pods, no deletes of users' objects).
- Our kinds: kopf lists and watches them (event handlers only: no finalizers, no annotations); the
  operator re-reads one after a write conflict (get) and merge-patches its status subresource.
- RayJobs and InferenceServices: watched (list, watch) for their status and written with server-side
  apply, which is a patch, and also needs create when the child does not exist yet. RayJobs: read back
  after a restart (get) and deleted beyond the pipeline's history limit. InferenceServices: a shadow
  rollout's own `<name>-shadow` is deleted when the shadow stage ends.
- A run's configuration ConfigMap: server-side apply (create, patch); it is owned by its RayJob, so
  the garbage collector removes it.
- Events: the operator posts core/v1 Events on transitions (create only; kopf's own posting is off).
- The finalizers subresource of our kinds: RayJobs and InferenceServices carry a controller owner
  reference with blockOwnerDeletion, which clusters enforcing OwnerReferencesPermissionEnforcement
  allow only with update on the owner's finalizers (the operator sets no finalizers itself).
*/}}
{{- define "conveyor.namespacedRules" -}}
- apiGroups: ["conveyor.dev"]
  resources: ["mlpipelines", "modeldeployments", "batchpredictions"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["conveyor.dev"]
  resources: ["mlpipelines/status", "modeldeployments/status", "batchpredictions/status"]
  verbs: ["patch"]
- apiGroups: ["conveyor.dev"]
  resources: ["mlpipelines/finalizers", "modeldeployments/finalizers", "batchpredictions/finalizers"]
  verbs: ["update"]
- apiGroups: ["ray.io"]
  resources: ["rayjobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Why a run pending too long does not start: its RayCluster's conditions and the events (read only then).
- apiGroups: ["ray.io"]
  resources: ["rayclusters"]
  verbs: ["get"]
# Why a run Kueue holds is queued: its Workload's conditions.
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloads"]
  verbs: ["list"]
- apiGroups: ["serving.kserve.io"]
  resources: ["inferenceservices"]
  verbs: ["list", "watch", "create", "patch", "delete"]
# Standard mode: the weighted HTTPRoute of each ModelDeployment (server-side apply), and the routes KServe
# wrote before the InferenceService was labelled cluster-local (deleted); all watched by label, so an
# edited or deleted route is restored at once.
- apiGroups: ["gateway.networking.k8s.io"]
  resources: ["httproutes"]
  verbs: ["list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["create", "patch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "list"]
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
