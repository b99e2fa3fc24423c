{{/*
Names, as upstream's chart makes them so that objects keep their names across a switch of chart:
the picker is <release>-epp (release name cut to 40 characters), the pool is <release>.
*/}}
{{- define "inferencepool.eppName" -}}
{{- $base := .Release.Name | default "default-pool" | lower | trim | trunc 40 -}}
{{ $base }}-epp
{{- end -}}

{{- define "inferencepool.clusterRbacName" -}}
{{- $base := .Release.Name | default "default-pool" | lower | trim | trunc 40 -}}
{{- $ns := .Release.Namespace | default "default" | lower | trim | trunc 40 -}}
{{- printf "%s-%s-epp" $base $ns | trunc 84 -}}
{{- end -}}

{{- define "inferencepool.labels" -}}
app.kubernetes.io/name: {{ include "inferencepool.eppName" . }}
app.kubernetes.io/part-of: inferencepool
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
{{- end -}}

{{/* The picker pods' selector: upstream's label, so its Services and monitors find our pods. */}}
{{- define "inferencepool.selectorLabels" -}}
{{- $s := include "inferencepool.settings" . | fromYaml -}}
{{- if $s.createPool -}}
inferencepool: {{ include "inferencepool.eppName" . }}
{{- else -}}
epp: {{ include "inferencepool.eppName" . }}
{{- end -}}
{{- end -}}

{{- define "inferencepool.modeLabels" -}}
{{- $s := include "inferencepool.settings" . | fromYaml -}}
inference.networking.k8s.io/igw-mode: {{ ternary "inferencepool" "standalone" $s.createPool }}
{{- end -}}

{{/*
deepMerge (list DST SRC): SRC's keys into DST, maps merged key by key, anything else replaced.
Unlike sprig's merge, a false, 0 or "" in SRC does replace DST's value.
*/}}
{{- define "inferencepool.deepMerge" -}}
{{- $dst := index . 0 -}}
{{- $src := index . 1 -}}
{{- range $k, $v := $src -}}
{{- if and (kindIs "map" $v) (kindIs "map" (index $dst $k)) -}}
{{- include "inferencepool.deepMerge" (list (index $dst $k) $v) -}}
{{- else -}}
{{- $_ := set $dst $k $v -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* flagsMap: upstream v1.0's list of {name, value} or a map, as a map. */}}
{{- define "inferencepool.flagsMap" -}}
{{- $out := dict -}}
{{- if kindIs "slice" . -}}
{{- range . -}}
{{- if not (and (kindIs "map" .) (hasKey . "name")) -}}
{{- fail "inferenceExtension.flags: each entry of a list must be {name: FLAG, value: VALUE}" -}}
{{- end -}}
{{- $_ := set $out (toString .name) .value -}}
{{- end -}}
{{- else if kindIs "map" . -}}
{{- $out = . -}}
{{- else if . -}}
{{- fail "inferenceExtension.flags must be a map of flag name to value" -}}
{{- end -}}
{{- toYaml $out -}}
{{- end -}}

{{/*
settings: every value the templates use, from upstream GIE's layout with llm-d-router's layout
over it, checked once. Templates read it with `include "inferencepool.settings" . | fromYaml`.
*/}}
{{- define "inferencepool.settings" -}}
{{- $v := .Values -}}
{{- $router := $v.router | default dict -}}
{{- if not (kindIs "map" $router) }}{{ fail "router must be a map (llm-d-router's values layout)" }}{{ end -}}
{{- $ie := deepCopy ($v.inferenceExtension | default dict) -}}
{{- $ip := deepCopy ($v.inferencePool | default dict) -}}
{{- $_ := set $ie "flags" (include "inferencepool.flagsMap" ($ie.flags | default dict) | fromYaml) -}}

{{- /* llm-d-router: router.epp is inferenceExtension; monitoring and friends sit under router. */ -}}
{{- $rEpp := deepCopy ($router.epp | default dict) -}}
{{- if hasKey $rEpp "flags" -}}
{{- $_ := set $rEpp "flags" (include "inferencepool.flagsMap" ($rEpp.flags | default dict) | fromYaml) -}}
{{- end -}}
{{- include "inferencepool.deepMerge" (list $ie $rEpp) -}}
{{- range $k := list "extraServicePorts" "metricsPort" "monitoring" "tracing" "latencyPredictor" -}}
{{- if hasKey $router $k -}}
{{- include "inferencepool.deepMerge" (list $ie (dict $k (index $router $k))) -}}
{{- end -}}
{{- end -}}
{{- $rms := $router.modelServers | default dict -}}
{{- if hasKey $rms "matchLabels" }}{{ $_ := set $ip "modelServers" (dict "matchLabels" $rms.matchLabels) }}{{ end -}}
{{- if hasKey $rms "type" }}{{ $_ := set $ip "modelServerType" $rms.type }}{{ end -}}
{{- if hasKey $rms "protocol" }}{{ $_ := set $ip "modelServerProtocol" $rms.protocol }}{{ end -}}
{{- if hasKey $rms "targetPorts" }}{{ $_ := set $ip "targetPorts" $rms.targetPorts }}{{ end -}}
{{- if hasKey $rms "targetPortNumber" }}{{ $_ := set $ip "targetPortNumber" $rms.targetPortNumber }}{{ end -}}
{{- $rpool := $router.inferencePool | default dict -}}
{{- if hasKey $rpool "failureMode" }}{{ $_ := set $ie "failureMode" $rpool.failureMode }}{{ end -}}

{{- $s := dict "ie" $ie "ip" $ip -}}

{{- /* The pool, or upstream's pool-less mode (--endpoint-selector). */ -}}
{{- $es := $ie.endpointsServer | default dict -}}
{{- $createPool := true -}}
{{- if and (hasKey $es "createInferencePool") (not $es.createInferencePool) }}{{ $createPool = false }}{{ end -}}
{{- if and (hasKey $rpool "create") (not $rpool.create) }}{{ $createPool = false }}{{ end -}}
{{- $_ := set $s "createPool" $createPool -}}

{{- $type := $ip.modelServerType | default "vllm" | lower -}}
{{- if and (not $createPool) $es.modelServerType (not (hasKey $rms "type")) }}{{ $type = $es.modelServerType | lower }}{{ end -}}
{{- if not (has $type (list "vllm" "sglang" "triton-tensorrt-llm" "trtllm-serve")) -}}
{{- fail (printf "inferencePool.modelServerType %q is not supported by epp: use vllm, sglang, triton-tensorrt-llm or trtllm-serve" $type) -}}
{{- end -}}
{{- $_ := set $s "modelServerType" $type -}}
{{- $protocol := $ip.modelServerProtocol | default "http" | lower -}}
{{- if ne $protocol "http" -}}
{{- fail (printf "inferencePool.modelServerProtocol %q is not supported: epp routes OpenAI-style HTTP requests (http)" $protocol) -}}
{{- end -}}
{{- $_ := set $s "protocol" $protocol -}}
{{- $parsers := $rEpp.parsers | default list -}}
{{- if $ip.parser }}{{ $parsers = append $parsers $ip.parser }}{{ end -}}
{{- range $parsers -}}
{{- if not (has . (list "openai-parser" "passthrough-parser")) -}}
{{- fail (printf "parser %q is not supported: epp parses OpenAI-style requests (openai-parser) and passes other requests through (passthrough-parser)" .) -}}
{{- end -}}
{{- end -}}

{{- /* Target ports: targetPorts, or the older single targetPortNumber when targetPorts is the default. */ -}}
{{- $ports := list -}}
{{- range ($ip.targetPorts | default list) -}}
{{- if not (and (kindIs "map" .) (hasKey . "number")) }}{{ fail "inferencePool.targetPorts: each entry must be {number: PORT}" }}{{ end -}}
{{- $ports = append $ports (int .number) -}}
{{- end -}}
{{- if and $ip.targetPortNumber (or (eq (len $ports) 0) (and (eq (len $ports) 1) (eq (index $ports 0) 8000))) -}}
{{- $ports = list (int $ip.targetPortNumber) -}}
{{- end -}}
{{- if and (not $createPool) $es.targetPorts (not (hasKey $rms "targetPorts")) -}}
{{- $ports = list -}}
{{- $raw := $es.targetPorts -}}
{{- if not (kindIs "slice" $raw) }}{{ $raw = splitList "," (toString $raw) }}{{ end -}}
{{- range $raw }}{{ $ports = append $ports (int (trim (toString .))) }}{{ end -}}
{{- end -}}
{{- if eq (len $ports) 0 }}{{ fail "inferencePool.targetPorts must list at least one port" }}{{ end -}}
{{- if gt (len $ports) 8 }}{{ fail "inferencePool.targetPorts: at most 8 ports" }}{{ end -}}
{{- range $ports -}}
{{- if or (lt . 1) (gt . 65535) }}{{ fail (printf "inferencePool.targetPorts: %d is not a port number (1-65535)" .) }}{{ end -}}
{{- end -}}
{{- if ne (len $ports) (len (uniq $ports)) }}{{ fail "inferencePool.targetPorts: port numbers must be unique" }}{{ end -}}
{{- $_ := set $s "targetPorts" $ports -}}

{{- $matchLabels := dict -}}
{{- if and $ip.modelServers $ip.modelServers.matchLabels }}{{ $matchLabels = $ip.modelServers.matchLabels }}{{ end -}}
{{- $_ := set $s "matchLabels" $matchLabels -}}
{{- $selector := "" -}}
{{- if not $createPool -}}
{{- if $es.endpointSelector -}}
{{- $selector = $es.endpointSelector -}}
{{- else -}}
{{- $pairs := list -}}
{{- range $k, $val := $matchLabels }}{{ $pairs = append $pairs (printf "%s=%s" $k $val) }}{{ end -}}
{{- $selector = join "," $pairs -}}
{{- end -}}
{{- if not $selector }}{{ fail "without an InferencePool, inferencePool.modelServers.matchLabels (or inferenceExtension.endpointsServer.endpointSelector) is required" }}{{ end -}}
{{- else if not $matchLabels -}}
{{- fail ".Values.inferencePool.modelServers.matchLabels is required: the labels of the model-server pods (or router.modelServers.matchLabels)" -}}
{{- end -}}
{{- $_ := set $s "endpointSelector" $selector -}}

{{- $apiVersion := $ip.apiVersion | default "inference.networking.k8s.io/v1" -}}
{{- if not (has $apiVersion (list "inference.networking.k8s.io/v1" "inference.networking.x-k8s.io/v1alpha2")) -}}
{{- fail (printf "inferencePool.apiVersion %q: use inference.networking.k8s.io/v1 or inference.networking.x-k8s.io/v1alpha2" $apiVersion) -}}
{{- end -}}
{{- $_ := set $s "poolApiVersion" $apiVersion -}}
{{- $_ := set $s "poolGroup" (first (splitList "/" $apiVersion)) -}}
{{- $_ := set $s "alphaPool" (ne $apiVersion "inference.networking.k8s.io/v1") -}}
{{- if and (gt (len $ports) 1) (ne $apiVersion "inference.networking.k8s.io/v1") -}}
{{- fail "the alpha InferencePool (v1alpha2) has one target port: set a single port" -}}
{{- end -}}

{{- $failureMode := $ie.failureMode | default "FailOpen" -}}
{{- if eq $failureMode "FailClosed" }}{{ $failureMode = "FailClose" }}{{ end -}}
{{- if not (has $failureMode (list "FailOpen" "FailClose")) -}}
{{- fail (printf "failureMode %q: use FailOpen or FailClose" $failureMode) -}}
{{- end -}}
{{- $_ := set $s "failureMode" $failureMode -}}

{{- /* Ports: the container listens where the Service and probes point. */ -}}
{{- $_ := set $s "extProcPort" (int ($ie.extProcPort | default 9002)) -}}
{{- $_ := set $s "healthPort" (int ($ie.grpcHealthPort | default 9003)) -}}
{{- $_ := set $s "metricsPort" (int ($ie.metricsPort | default 9090)) -}}

{{- /* Image: registry/repository:tag; upstream v1.0's hub and name win when given. */ -}}
{{- $img := $ie.image | default dict -}}
{{- $repo := $img.name | default $img.repository | default "epp" -}}
{{- $registry := $img.hub | default $img.registry | default "" -}}
{{- $tag := $img.tag | default .Chart.AppVersion | toString -}}
{{- $ref := printf "%s:%s" $repo $tag -}}
{{- if $registry }}{{ $ref = printf "%s/%s:%s" (trimSuffix "/" $registry) $repo $tag }}{{ end -}}
{{- $_ := set $s "image" $ref -}}
{{- $_ := set $s "pullPolicy" ($img.pullPolicy | default "IfNotPresent") -}}

{{- /* Replicas and HA: more than one replica (or enableLeaderElection) elects a leader, as upstream. */ -}}
{{- $replicas := int ($ie.replicas | default 1) -}}
{{- if lt $replicas 0 }}{{ fail "inferenceExtension.replicas must not be negative" }}{{ end -}}
{{- $_ := set $s "replicas" $replicas -}}
{{- $flags := $ie.flags | default dict -}}
{{- $ha := or (gt $replicas 1) (eq (toString $ie.enableLeaderElection) "true") -}}
{{- if hasKey $flags "ha-enable-leader-election" }}{{ $ha = eq (toString (index $flags "ha-enable-leader-election")) "true" }}{{ end -}}
{{- $_ := set $s "ha" $ha -}}
{{- $_ := set $s "haFlagGiven" (hasKey $flags "ha-enable-leader-election") -}}
{{- /* Probes ask for liveness/readiness whenever a leader may be elected, as upstream's chart. */ -}}
{{- $_ := set $s "probeServices" (or (gt $replicas 1) $ha) -}}

{{- /* Monitoring and metrics auth. */ -}}
{{- $mon := $ie.monitoring | default dict -}}
{{- $prom := $mon.prometheus | default dict -}}
{{- $auth := $prom.auth | default dict -}}
{{- $authOn := ne (toString $auth.enabled) "false" -}}
{{- if hasKey $flags "metrics-endpoint-auth" }}{{ $authOn = eq (toString (index $flags "metrics-endpoint-auth")) "true" }}{{ end -}}
{{- $_ := set $s "metricsAuth" $authOn -}}
{{- $_ := set $s "metricsAuthFlagGiven" (hasKey $flags "metrics-endpoint-auth") -}}
{{- $_ := set $s "monitoring" (eq (toString $prom.enabled) "true") -}}
{{- $_ := set $s "metricsSecretName" ($auth.secretName | default "inference-gateway-sa-metrics-reader-secret") -}}
{{- $_ := set $s "monitoringInterval" ($mon.interval | default "10s") -}}
{{- $_ := set $s "monitoringExtraLabels" ($prom.extraLabels | default dict) -}}
{{- $provider := lower (($v.provider | default dict).name | default "none") -}}
{{- if not (has $provider (list "none" "gke" "istio")) }}{{ fail (printf "provider.name %q: use none, gke or istio" $provider) }}{{ end -}}
{{- $_ := set $s "provider" $provider -}}
{{- $mp := $mon.provider | default dict -}}
{{- $mpName := lower ($mp.name | default (ternary "gmp" "prometheusoperator" (eq $provider "gke"))) -}}
{{- if not (has $mpName (list "gmp" "prometheusoperator")) }}{{ fail (printf "monitoring.provider.name %q: use gmp or prometheusoperator" $mpName) }}{{ end -}}
{{- $_ := set $s "monitoringProvider" $mpName -}}
{{- $gkeValues := ($v.provider | default dict).gke | default dict -}}
{{- $autopilot := or (eq (toString ($mp.gmp | default dict).autopilot) "true") (eq (toString $gkeValues.autopilot) "true") -}}
{{- $_ := set $s "gmpNamespace" (ternary "gke-gmp-system" "gmp-system" $autopilot) -}}

{{- /* TLS on the ext_proc port: on unless --secure-serving=false. */ -}}
{{- $secure := true -}}
{{- if hasKey $flags "secure-serving" }}{{ $secure = eq (toString (index $flags "secure-serving")) "true" }}{{ end -}}
{{- $_ := set $s "secureServing" $secure -}}

{{- /* Objectives: upstream GIE's in inference.networking.x-k8s.io, llm-d's in llm-d.ai. */ -}}
{{- $objectives := list -}}
{{- $objApi := "inference.networking.x-k8s.io/v1alpha2" -}}
{{- if $router.inferenceObjectives -}}
{{- $objectives = $router.inferenceObjectives -}}
{{- $objApi = "llm-d.ai/v1alpha2" -}}
{{- else if $v.inferenceObjectives -}}
{{- $objectives = $v.inferenceObjectives -}}
{{- end -}}
{{- if $v.inferenceObjectivesApiVersion }}{{ $objApi = $v.inferenceObjectivesApiVersion }}{{ end -}}
{{- if not (has $objApi (list "inference.networking.x-k8s.io/v1alpha2" "llm-d.ai/v1alpha2")) -}}
{{- fail (printf "inferenceObjectivesApiVersion %q: use inference.networking.x-k8s.io/v1alpha2 or llm-d.ai/v1alpha2" $objApi) -}}
{{- end -}}
{{- if and $objectives (not $createPool) }}{{ fail "inferenceObjectives need the chart's InferencePool (they name it in poolRef)" }}{{ end -}}
{{- range $objectives -}}
{{- if not (and (kindIs "map" .) .name) }}{{ fail "inferenceObjectives: each entry needs a name (and a priority)" }}{{ end -}}
{{- if and (hasKey . "priority") (not (regexMatch "^-?[0-9]+$" (toString .priority))) }}{{ fail (printf "inferenceObjectives %s: priority must be an integer" .name) }}{{ end -}}
{{- end -}}
{{- $_ := set $s "objectives" $objectives -}}
{{- $_ := set $s "objectivesApiVersion" $objApi -}}

{{- /* HTTPRoute: upstream's experimentalHttpRoute, or llm-d's httpRoute. */ -}}
{{- $route := deepCopy ($v.experimentalHttpRoute | default dict) -}}
{{- $routeOn := eq (toString $route.enabled) "true" -}}
{{- if $v.httpRoute -}}
{{- include "inferencepool.deepMerge" (list $route $v.httpRoute) -}}
{{- if hasKey $v.httpRoute "create" }}{{ $routeOn = eq (toString $v.httpRoute.create) "true" }}{{ end -}}
{{- end -}}
{{- if and $routeOn (not $createPool) }}{{ fail "an HTTPRoute needs the chart's InferencePool" }}{{ end -}}
{{- $_ := set $s "httpRoute" $route -}}
{{- $_ := set $s "httpRouteOn" $routeOn -}}

{{- /* What epp cannot honour fails here, with the reason, instead of being dropped. */ -}}
{{- if eq (toString ($ie.latencyPredictor | default dict).enabled) "true" -}}
{{- fail "latencyPredictor.enabled: the latency-predictor sidecars and their scorers are not supported by epp" -}}
{{- end -}}
{{- if eq (toString ($ie.sidecar | default dict).enabled) "true" -}}
{{- fail "inferenceExtension.sidecar.enabled: this chart runs no proxy sidecar; route through a Gateway (or run `epp gateway`)" -}}
{{- end -}}
{{- if eq (toString ($router.proxy | default dict).enabled) "true" -}}
{{- fail "router.proxy.enabled: this chart runs no proxy; route through a Gateway (or run `epp gateway`)" -}}
{{- end -}}
{{- if eq (toString ($router.tokenizer | default dict).enabled) "true" -}}
{{- fail "router.tokenizer.enabled: epp does not use a tokenizer sidecar" -}}
{{- end -}}
{{- if eq (toString ($gkeValues.preferredBackends | default dict).enabled) "true" -}}
{{- fail "provider.gke.preferredBackends.enabled: not supported by this chart; run replicas > 1 for active-passive HA" -}}
{{- end -}}
{{- if and (ne $provider "none") (not $createPool) -}}
{{- fail (printf "provider.name=%s routes to an InferencePool: it needs the chart's pool" $provider) -}}
{{- end -}}
{{- if and (not $createPool) (ne $apiVersion "inference.networking.k8s.io/v1") }}{{ fail "inferencePool.apiVersion has no meaning without a pool" }}{{ end -}}
{{- $res := $ie.resources | default dict -}}
{{- if not (and $res.requests $res.requests.cpu $res.requests.memory) -}}
{{- fail "inferenceExtension.resources.requests.cpu and .memory are required: epp is on every request's path" -}}
{{- end -}}

{{- /* Autoscaling of the model servers. */ -}}
{{- $hpa := $v.autoscaling | default dict -}}
{{- $hpaOn := eq (toString $hpa.enabled) "true" -}}
{{- $_ := set $s "hpaOn" $hpaOn -}}
{{- if $hpaOn -}}
{{- $target := $hpa.scaleTargetRef | default dict -}}
{{- if not $target.name }}{{ fail "autoscaling.scaleTargetRef.name is required: the model-server Deployment to scale" }}{{ end -}}
{{- if not $createPool }}{{ fail "autoscaling reads the pool's metrics: it needs the chart's InferencePool" }}{{ end -}}
{{- $adapter := $hpa.adapter | default (ternary "gmp" "prometheus-adapter" (eq $provider "gke")) -}}
{{- if not (has $adapter (list "gmp" "prometheus-adapter")) }}{{ fail (printf "autoscaling.adapter %q: use gmp or prometheus-adapter" $adapter) }}{{ end -}}
{{- $_ := set $s "hpaAdapter" $adapter -}}
{{- if and (not $hpa.queueSizeTarget) (not $hpa.kvCacheUtilizationTarget) }}{{ fail "autoscaling: set queueSizeTarget, kvCacheUtilizationTarget or both" }}{{ end -}}
{{- if and $hpa.kvCacheUtilizationTarget (or (le (float64 $hpa.kvCacheUtilizationTarget) 0.0) (gt (float64 $hpa.kvCacheUtilizationTarget) 1.0)) }}{{ fail "autoscaling.kvCacheUtilizationTarget is a fraction in (0, 1]" }}{{ end -}}
{{- if lt (int ($hpa.maxReplicas | default 0)) (int ($hpa.minReplicas | default 1)) }}{{ fail "autoscaling.maxReplicas must be at least minReplicas" }}{{ end -}}
{{- end -}}
{{- toYaml $s -}}
{{- end -}}
