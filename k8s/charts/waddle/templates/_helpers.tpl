{{/*
Names, labels and the values every template derives from the same place:
service addresses, the shard list, generated credentials and the pod-level
settings shared by the Waddle containers.
*/}}

{{- define "waddle.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-scoped base name; component suffixes keep every name under 63 characters. */}}
{{- define "waddle.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "waddle.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of one component: call with (dict "ctx" $ "component" "edge"). */}}
{{- define "waddle.selectorLabels" -}}
app.kubernetes.io/name: {{ include "waddle.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "waddle.labels" -}}
helm.sh/chart: {{ include "waddle.chart" .ctx }}
{{ include "waddle.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: waddle
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- end }}

{{- define "waddle.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "waddle.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "waddle.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* ---- addresses ------------------------------------------------------- */}}

{{- define "waddle.svcDomain" -}}
{{- printf "%s.svc.%s" .Release.Namespace .Values.clusterDomain }}
{{- end }}

{{- define "waddle.channel.headless" -}}
{{- printf "%s-channel" (include "waddle.fullname" .) }}
{{- end }}

{{/*
Every channel shard's address, in pod order: the StatefulSet's stable DNS
names <pod>.<headless service>.<namespace>.svc.<domain>:<port>. Edges hash
channels over exactly this list (rendezvous hashing), so it is derived from
the replica count here and nowhere else.
*/}}
{{- define "waddle.channel.shards" -}}
{{- $fullname := include "waddle.fullname" . }}
{{- $headless := include "waddle.channel.headless" . }}
{{- $domain := include "waddle.svcDomain" . }}
{{- $shards := list }}
{{- /* With DNS membership this is only the edges' list until DNS answers: pod 0
alone, so that scaling the StatefulSet changes no ConfigMap and rolls no edge. */}}
{{- $count := ternary 1 (int .Values.channel.replicas) (eq .Values.channel.membership "dns") }}
{{- range $i := until $count }}
{{- $shards = append $shards (printf "%s-channel-%d.%s.%s:%d" $fullname $i $headless $domain (int $.Values.channel.port)) }}
{{- end }}
{{- join "," $shards }}
{{- end }}

{{- define "waddle.store.address" -}}
{{- printf "%s-store.%s:%d" (include "waddle.fullname" .) (include "waddle.svcDomain" .) (int .Values.store.port) }}
{{- end }}

{{- define "waddle.postgresql.host" -}}
{{- printf "%s-postgresql.%s" (include "waddle.fullname" .) (include "waddle.svcDomain" .) }}
{{- end }}

{{/* ---- credentials ------------------------------------------------------
Generated values are memoised in .Values so that every template of one
render sees the same string, and read back from the live Secret on upgrade
(lookup) so that they survive `helm upgrade`.
*/}}

{{- define "waddle.secretValue" -}}
{{- $ctx := .ctx }}
{{- if not (index .holder .field) }}
{{- $existing := lookup "v1" "Secret" $ctx.Release.Namespace .secret }}
{{- $value := "" }}
{{- if and $existing $existing.data (hasKey $existing.data .key) }}
{{- $value = index $existing.data .key | b64dec }}
{{- else }}
{{- $value = randAlphaNum (int .length) }}
{{- end }}
{{- $_ := set .holder .field $value }}
{{- end }}
{{- index .holder .field }}
{{- end }}

{{- define "waddle.jwtSecret" -}}
{{- include "waddle.secretValue" (dict "ctx" . "holder" .Values.jwt "field" "secret" "secret" (include "waddle.fullname" .) "key" "jwt-secret" "length" 48) }}
{{- end }}

{{- define "waddle.postgresql.password" -}}
{{- include "waddle.secretValue" (dict "ctx" . "holder" .Values.postgresql.auth "field" "password" "secret" (printf "%s-postgresql" (include "waddle.fullname" .)) "key" "password" "length" 32) }}
{{- end }}

{{- define "waddle.grafana.password" -}}
{{- include "waddle.secretValue" (dict "ctx" . "holder" .Values.monitoring.grafana "field" "adminPassword" "secret" (printf "%s-grafana" (include "waddle.fullname" .)) "key" "admin-password" "length" 24) }}
{{- end }}

{{/* The SQLAlchemy URL the store and the migration use, when the chart owns it. */}}
{{- define "waddle.databaseUrl" -}}
{{- if .Values.postgresql.enabled }}
{{- $auth := .Values.postgresql.auth }}
{{- printf "postgresql+psycopg://%s:%s@%s:5432/%s" (urlquery $auth.username) (urlquery (include "waddle.postgresql.password" .)) (include "waddle.postgresql.host" .) $auth.database }}
{{- else }}
{{- .Values.database.url }}
{{- end }}
{{- end }}

{{/* Which Secret and key hold WADDLE_DATABASE_URL for the store. */}}
{{- define "waddle.databaseUrlRef" -}}
{{- if .Values.database.existingSecret -}}
name: {{ .Values.database.existingSecret }}
key: {{ .Values.database.existingSecretKey }}
{{- else -}}
name: {{ include "waddle.fullname" . }}
key: database-url
{{- end }}
{{- end }}

{{- define "waddle.jwtSecretRef" -}}
{{- if .Values.jwt.existingSecret -}}
name: {{ .Values.jwt.existingSecret }}
key: {{ .Values.jwt.existingSecretKey }}
{{- else -}}
name: {{ include "waddle.fullname" . }}
key: jwt-secret
{{- end }}
{{- end }}

{{/* Refuse value combinations the schema cannot express. */}}
{{- define "waddle.validate" -}}
{{- $external := or .Values.database.url .Values.database.existingSecret }}
{{- if and .Values.postgresql.enabled $external }}
{{- fail "choose one database: postgresql.enabled=true (in the chart) or database.url / database.existingSecret (external), not both" }}
{{- end }}
{{- if not (or .Values.postgresql.enabled $external) }}
{{- fail "the store needs a database: set postgresql.enabled=true, database.url or database.existingSecret" }}
{{- end }}
{{- if and .Values.database.url (not (hasPrefix "postgresql" .Values.database.url)) }}
{{- fail "database.url must be a PostgreSQL SQLAlchemy URL (postgresql+psycopg://user:password@host:5432/db): every store replica and the migration Job share it" }}
{{- end }}
{{- if and .Values.edge.autoscaling.enabled (gt (int .Values.edge.autoscaling.minReplicas) (int .Values.edge.autoscaling.maxReplicas)) }}
{{- fail "edge.autoscaling.minReplicas must not exceed edge.autoscaling.maxReplicas" }}
{{- end }}
{{- end }}

{{/* ---- pods -------------------------------------------------------------- */}}

{{/*
Drain budget: the preStop pause (endpoints stop sending new connections),
then WADDLE_SHUTDOWN_GRACE_SECONDS of draining, then a margin before SIGKILL.
*/}}
{{- define "waddle.terminationGrace" -}}
{{- $drain := ceil .Values.config.shutdownGraceSeconds | int }}
{{- add (int .preStop) $drain (int .Values.terminationGraceMarginSeconds) }}
{{- end }}

{{/* Annotations that roll pods when their configuration changes. */}}
{{- define "waddle.configChecksums" -}}
checksum/config: {{ include (print .Template.BasePath "/config.yaml") . | sha256sum }}
{{- end }}

{{- define "waddle.scrapeAnnotations" -}}
{{- if .ctx.Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end }}

{{/* Pod-level fields shared by the Waddle workloads. */}}
{{- define "waddle.podCommon" -}}
serviceAccountName: {{ include "waddle.serviceAccountName" . }}
automountServiceAccountToken: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end }}

{{/* The writable scratch space a read-only root filesystem leaves the services. */}}
{{- define "waddle.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
{{- end }}

{{- define "waddle.tmpMount" -}}
- name: tmp
  mountPath: /tmp
{{- end }}

{{/* Environment shared by the Waddle containers: the ConfigMap, plus per-pod identity. */}}
{{- define "waddle.envFrom" -}}
- configMapRef:
    name: {{ include "waddle.fullname" . }}
{{- end }}

{{- define "waddle.podAffinity" -}}
{{- with .values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end }}

{{/* ---- credentials as files ---------------------------------------------
Credentials reach the containers as files, never as environment variables
(which leak into crash dumps, child processes and `kubectl describe`): a
projected volume with one file per WADDLE_ variable, read by the services
through WADDLE_SECRETS_DIR. Call with
(dict "files" (list (dict "var" "WADDLE_JWT_SECRET" "name" <Secret> "key" <key>) ...)).
*/}}
{{- define "waddle.secretsDir" -}}
/run/secrets/waddle
{{- end }}

{{- define "waddle.secretsVolume" -}}
- name: secrets
  projected:
    defaultMode: 0440
    sources:
      {{- range .files }}
      - secret:
          name: {{ .name }}
          items:
            - key: {{ .key }}
              path: {{ .var }}
      {{- end }}
{{- end }}

{{- define "waddle.secretsMount" -}}
- name: secrets
  mountPath: {{ include "waddle.secretsDir" . }}
  readOnly: true
{{- end }}

{{- define "waddle.secretsEnv" -}}
- name: WADDLE_SECRETS_DIR
  value: {{ include "waddle.secretsDir" . }}
{{- end }}

{{/* The database URL file of the store (and its init container). */}}
{{- define "waddle.databaseUrlFile" -}}
{{- $ref := include "waddle.databaseUrlRef" . | fromYaml }}
{{- dict "var" "WADDLE_DATABASE_URL" "name" $ref.name "key" $ref.key | toJson }}
{{- end }}

{{- define "waddle.jwtSecretFile" -}}
{{- $ref := include "waddle.jwtSecretRef" . | fromYaml }}
{{- dict "var" "WADDLE_JWT_SECRET" "name" $ref.name "key" $ref.key | toJson }}
{{- end }}

{{/* ---- security scanning --------------------------------------------------
checkov (the infrastructure-as-code scanner `make test` runs on the rendered
chart) findings this chart declines, each with its reason, as
checkov.io/skipN annotations. Call with a list of check IDs.
*/}}
{{- define "waddle.checkovSkips" -}}
{{- $reasons := dict }}
{{- $_ := set $reasons "CKV_K8S_11" "no CPU limit on purpose: CFS throttling of an event loop shows up as fan-out latency; CPU requests size the pods (<component>.resources)" }}
{{- $_ := set $reasons "CKV_K8S_15" "the pull policy is the value image.pullPolicy (IfNotPresent): release tags are not rewritten, and kind or minikube run images no registry serves" }}
{{- $_ := set $reasons "CKV_K8S_43" "images are named by tag so that locally built images work too; pin a digest by setting the tag value to <tag>@sha256:<digest>" }}
{{- $_ := set $reasons "CKV_K8S_38" "Prometheus discovers the release's pods through the API server (a Role limited to get/list/watch in this namespace)" }}
{{- $_ := set $reasons "CKV_K8S_40" "the image's files and data directory belong to its built-in user; another UID would lose access to an existing volume" }}
{{- $_ := set $reasons "CKV2_K8S_6" "networkPolicy.enabled is false: this release installs no NetworkPolicy" }}
{{- $lines := list }}
{{- range $i, $id := . }}
{{- $lines = append $lines (printf "checkov.io/skip%d: %s" (add1 $i) (printf "%s=%s" $id (index $reasons $id) | quote)) }}
{{- end }}
{{- join "\n" $lines }}
{{- end }}

{{/* What the Waddle workloads decline (the same for edge, channel, store and the migration). */}}
{{- define "waddle.checkovSkips.waddle" -}}
{{- include "waddle.checkovSkips" (list "CKV_K8S_11" "CKV_K8S_15" "CKV_K8S_43") }}
{{- end }}
