# Every task a person runs on kubeswarm. `make` alone lists them.

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

include e2e/versions.env

# One target directory outside the checkout, shared by every command and every clone, so
# dependencies (kube, and later mistral.rs) compile once per machine.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/kubeswarm/target
export KUBESWARM_CACHE ?= $(HOME)/.cache/kubeswarm

CARGO ?= cargo
HELM := $(KUBESWARM_CACHE)/tools/helm-$(HELM_VERSION)/helm
CHART := charts/kubeswarm
KUBE_VERSION := 1.33.0

.PHONY: help
help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z0-9-]+:.*## / {printf "  make %-8s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

.PHONY: build
build: ## Build the kubeswarm binary (release build, in the shared target dir)
	$(CARGO) build --release --locked --bin kubeswarm

.PHONY: run
run: ## Run the gallery SwarmJob locally on the embedded default model
	@echo "make run: local mode (kubeswarm run) is not built yet: it arrives with issue #5 (the swarm engine) on top of the inference worker (issue #3)." >&2
	@exit 2

.PHONY: test
test: lint $(HELM) ## Run every check: format, clippy, unit and API tests, CRD drift, chart
	HELM=$(HELM) $(CARGO) test --locked --workspace --all-targets

.PHONY: lint
lint: $(HELM) ## Check formatting, clippy (warnings are errors) and the Helm chart
	$(CARGO) fmt --all --check
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings
	$(HELM) lint --strict $(CHART) --kube-version $(KUBE_VERSION)
	$(HELM) lint --strict $(CHART) --kube-version $(KUBE_VERSION) -f $(CHART)/ci/all-features-values.yaml

.PHONY: crds
crds: ## Regenerate crds/ and the chart's copy from the Rust API types
	$(CARGO) run --locked --quiet --bin kubeswarm -- crdgen --out crds --out $(CHART)/crds

.PHONY: bench
bench: ## Run the benchmarks (worker against llama.cpp, engine against Python asyncio)
	@echo "make bench: the benchmarks arrive with the inference worker (issue #3) and the swarm engine (issue #5)." >&2
	@exit 2

.PHONY: e2e
e2e: ## Run the end-to-end tests on a local control plane with Kueue and fake GPU nodes
	@echo "make e2e: the end-to-end test bed arrives with issue #6." >&2
	@exit 2

# Built from the Go module proxy at the version pinned in e2e/versions.env, once per machine.
$(HELM): e2e/versions.env e2e/install-tool
	e2e/install-tool helm >/dev/null

.PHONY: fmt
fmt: ## Format the Rust code
	$(CARGO) fmt --all
