// Pins the real KServe controller (github.com/kserve/kserve, cmd/manager) that hack/placement.sh runs as
// a local process, and the CRD-only APIs it is checked against: the Gateway API (its HTTPRoutes) and
// Knative Serving (its Services), at the versions KServe v0.20.0 itself requires.
//
// Not a `tool` dependency like the others: the module proxy refuses KServe's version list and KServe's
// own go.mod replaces half of Kubernetes, which a dependency's replaces cannot do. So
// hack/build-tool.sh downloads this exact version and builds inside a copy of it, with its own go.mod,
// replaces and go.sum; this file only pins the versions (nothing imports them).
module conveyor.dev/hack/tools/kserve

go 1.26.0

require (
	github.com/kserve/kserve v0.20.0
	knative.dev/serving v0.48.1
	sigs.k8s.io/gateway-api v1.5.1
)
