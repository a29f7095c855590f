# conveyor's vocabulary. Everything a target needs, it installs (hack/install-deps.sh, the venv,
# the control plane binaries built from pinned Go modules and cached under ~/.cache/conveyor).
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST := $(VENV)/bin/pytest
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# Where `make demo` keeps the model registry: file (a folder) or s3 (the local S3 server, hack/s3.sh).
REGISTRY ?= file

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml hack/devstack/pyproject.toml
	hack/install-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[runtime,dev,s3]'
	$(PY) -m pip install -q -e hack/devstack
	touch $@

venv: $(STAMP) ## the Python environment (torch, ray, kserve, kopf, test tools)

tools: ## build (once, cached) kube-apiserver, etcd, kube-controller-manager, kubectl, helm, the S3 server, the placement tier's (kube-scheduler, kwok, KubeRay, Kueue, the KServe controller); fetch third-party CRDs
	hack/install-deps.sh
	hack/local-cluster.sh build
	hack/build-tool.sh helm >/dev/null
	hack/build-tool.sh versitygw >/dev/null
	hack/placement.sh build

helm: ## build (once, cached) the pinned helm and print its path
	hack/build-tool.sh helm

chart-crds: ## copy crds/ into the chart and re-render the kustomize base (run after editing crds/)
	hack/sync-chart.sh

cluster-up: tools ## start the local control plane (or reuse a running one) and print its kubeconfig
	hack/local-cluster.sh up

cluster-down: ## stop what cluster-up started
	hack/local-cluster.sh down

cluster-status: ## what runs and whether it is healthy
	hack/local-cluster.sh status

demo: venv tools ## the main job: bring up the control plane and run the sample (REGISTRY=s3: in the local S3 server)
	REGISTRY=$(REGISTRY) hack/demo.sh

test: venv tools ## the whole suite except benchmarks (unit, integration on the real apiserver, placement, e2e)
	$(PYTEST) -m "not bench" $(PYTEST_ARGS)

test-fast: venv tools ## unit and integration only (no real training or serving)
	$(PYTEST) -m "not bench and not slow" $(PYTEST_ARGS)

bench: venv tools ## benchmarks; JSON results in tests/bench/results/
	mkdir -p tests/bench/results
	$(PYTEST) tests/bench -m bench -s $(PYTEST_ARGS)

lint: venv tools ## ruff, shellcheck, hadolint, helm lint, and the chart's copies of crds/ in step
	$(VENV)/bin/ruff check .
	$(VENV)/bin/shellcheck -x hack/*.sh .ci/run
	$(VENV)/bin/hadolint docker/*.Dockerfile
	"$$(hack/build-tool.sh helm)" lint --strict charts/conveyor
	hack/sync-chart.sh --check

clean: ## remove the venv and test caches (not the cached binaries in ~/.cache/conveyor)
	rm -rf $(VENV) .pytest_cache .ruff_cache tests/bench/results

.PHONY: help venv tools helm chart-crds cluster-up cluster-down cluster-status demo test test-fast bench lint clean
