# Every task a person runs on kubeswarm. `make` alone lists them.

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

include hack/versions.env

# One target directory outside the checkout, shared by every command and every clone, so
# dependencies (kube, mistral.rs) compile once per machine.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/kubeswarm/target
export KUBESWARM_CACHE ?= $(HOME)/.cache/kubeswarm

CARGO ?= cargo
# One profile and one feature set for tests, lint, benchmarks and `make run`, so mistral.rs
# compiles once per kind (clippy checks it, everything else builds it) and the tests run
# the worker as it ships. Every cargo command names --workspace: cargo unifies features
# over the packages it selects, and `-p inference-worker` alone would turn off features
# the operator's dependencies turn on (chrono's serde, ...) and rebuild mistral.rs, and
# every command names --all-targets: dev-dependencies add features only to builds that
# include the tests, so `--bins` alone would compile mistral.rs a third time.
PROFILE := --release
SELECT := --workspace
HELM := $(KUBESWARM_CACHE)/tools/helm-$(HELM_VERSION)/helm
MODEL := $(KUBESWARM_CACHE)/models/$(subst ==,-,$(SMOLLM2_WHEEL))/$(SMOLLM2_FILE)
WORKER := $(CARGO_TARGET_DIR)/release/inference-worker
KUBESWARM := $(CARGO_TARGET_DIR)/release/kubeswarm
CHART := charts/kubeswarm
KUBE_VERSION := 1.33.0

.PHONY: help
help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z0-9-]+:.*## / {printf "  make %-13s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

# mistral.rs with our fix applied, generated from the crates registry (third_party/prepare).
.PHONY: third-party
third-party:
	third_party/prepare

.PHONY: build
build: third-party ## Build the kubeswarm and inference-worker binaries (release, in the shared target dir)
	$(CARGO) build $(PROFILE) --locked $(SELECT) --all-targets

# The default model writes about 30 tokens a second on 2 cores: cap each call so the demo
# ends in minutes. `make run RUN_FLAGS=` runs the manifest as written.
RUN_FLAGS ?= --max-tokens 400

# The workers draw on the default model; the gate judges with the stronger one, as a swarm
# is meant to run (cheap subagents, a stronger verifier).
.PHONY: run
run: build $(MODEL) ## Run the gallery SwarmJob locally: SmolLM2-135M subagents, a Qwen2.5-Coder-0.5B gate
	rc=0; $(KUBESWARM) run examples/gallery.yaml $(RUN_FLAGS) --model $(MODEL) \
	  --model gemma-gate="$$($(KUBESWARM) fetch-model qwen2.5-coder-0.5b)" || rc=$$?; \
	if [ $$rc = 3 ]; then echo "make run: the job ran and no picture passed verification:" \
	  "the 135M default model rarely draws one; see what it drew in kubeswarm-out/svg-gallery/subagents/"; \
	elif [ $$rc != 0 ]; then exit $$rc; fi

# The e2e suite (e2e/tests/e2e) is one of the test binaries: it starts its own control plane
# from these tools, built from the Go module proxy once per machine.
.PHONY: test
test: lint $(HELM) $(MODEL) e2e-tools ## Run every check: format, clippy, unit, API, worker and e2e tests, CRD drift, chart
	HELM=$(HELM) KUBESWARM_TEST_MODEL=$(MODEL) $(CARGO) test $(PROFILE) --locked $(SELECT) --all-targets

.PHONY: lint
lint: third-party $(HELM) ## Check formatting, clippy (warnings are errors) and the Helm chart
	$(CARGO) fmt --all --check
	$(CARGO) clippy $(PROFILE) --locked $(SELECT) --all-targets -- -D warnings
	$(HELM) lint --strict $(CHART) --kube-version $(KUBE_VERSION)
	$(HELM) lint --strict $(CHART) --kube-version $(KUBE_VERSION) -f $(CHART)/ci/all-features-values.yaml

.PHONY: crds
crds: build ## Regenerate crds/ and the chart's copy from the Rust API types
	$(CARGO_TARGET_DIR)/release/kubeswarm crdgen --out crds --out $(CHART)/crds

.PHONY: kueue-types
kueue-types: ## Regenerate the Kueue Workload and ResourceFlavor Rust types (kopium, pinned Kueue CRDs)
	operator/src/kueue/generate

.PHONY: bench
bench: bench-worker bench-engine bench-rss ## Run every benchmark

.PHONY: bench-worker
bench-worker: build $(MODEL) ## The inference worker against llama.cpp's server: same file, same threads
	python3 inference-worker/bench/against_llama_cpp.py --worker $(WORKER) \
	  --llama-python "$$(hack/install-tool llama-cpp-server)" --model $(MODEL) \
	  --threads $$(nproc) --concurrency 1,4,10 --max-tokens 128

.PHONY: bench-engine
bench-engine: third-party ## The swarm engine's calls/s and added latency against Python asyncio + openai, same mock server
	OPENAI_PYTHON="$$(hack/install-tool openai-python)" $(CARGO) bench --locked $(SELECT) --bench engine

.PHONY: bench-rss
bench-rss: build ## Peak RSS of the caller when an endpoint answers with 1 GiB, against a polite endpoint
	python3 operator/benches/endpoint_rss.py --kubeswarm $(KUBESWARM)

# Images without a container engine (hack/images): OCI layouts of the operator and the CPU
# worker on a base of pinned Debian packages, tagged with the chart's appVersion.
IMAGES := $(KUBESWARM_CACHE)/images/out
.PHONY: images
images: build ## Build the operator and CPU-worker images as OCI layouts, no container engine needed
	hack/images --out $(IMAGES)

# `make push REGISTRY=registry.corp/kubeswarm` pushes REGISTRY/kubeswarm:TAG and
# REGISTRY/inference-worker:TAG with crane (credentials: crane auth login, or docker's config).
.PHONY: push
push: build ## Build the images and push them to REGISTRY (e.g. make push REGISTRY=registry.corp/kubeswarm)
	@[ -n "$(REGISTRY)" ] || { echo "make push: set REGISTRY, e.g. make push REGISTRY=registry.corp/kubeswarm" >&2; exit 2; }
	hack/images --out $(IMAGES) --push $(REGISTRY)

# Does the swarm help? A benchmark, not a test: every swarm arm runs through `kubeswarm run`
# beside a direct call of the same model, on generated multi-step word problems and on a
# sample of HumanEval (selected by the docstring's examples as a `tests` check, graded by
# HumanEval's held-back tests). About 20 + 20 minutes on 2 cores at the defaults;
# EVAL_LIMIT / EVAL_CODE_LIMIT problems, EVAL_N / EVAL_CODE_N subagent counts, EVAL_SETS
# which sets.
EVAL_LIMIT ?= 10
EVAL_N ?= 1,3
EVAL_CODE_LIMIT ?= 10
EVAL_CODE_N ?= 3
EVAL_SETS ?= arithmetic humaneval
.PHONY: eval
eval: build ## Does the swarm help? Swarm arms against a direct call, Qwen2.5-Coder-0.5B (a benchmark)
	py="$$(hack/install-tool eval-python)"; model="$$($(KUBESWARM) fetch-model qwen2.5-coder-0.5b)"; \
	for set in $(EVAL_SETS); do \
	  case $$set in \
	    arithmetic) limit=$(EVAL_LIMIT); n=$(EVAL_N) ;; \
	    humaneval) limit=$(EVAL_CODE_LIMIT); n=$(EVAL_CODE_N) ;; \
	    *) echo "EVAL_SETS: no set $$set (arithmetic, humaneval)" >&2; exit 2 ;; \
	  esac; \
	  "$$py" eval/$$set.py --kubeswarm $(KUBESWARM) --worker $(WORKER) --model "$$model" \
	    --limit $$limit --n $$n --out eval-out || exit; \
	done

# Only the e2e binary runs; cargo finds it with the same flags as `make test`, so nothing
# is built twice. E2E_ARGS selects tests by name.
E2E_ARGS ?=
.PHONY: e2e
e2e: build $(MODEL) e2e-tools ## Run the end-to-end tests on a local control plane with Kueue and fake GPU nodes
	bin=$$($(CARGO) test $(PROFILE) --locked $(SELECT) --all-targets --no-run --message-format=json \
	  | python3 -c 'import json,sys; print(*[m["executable"] for m in map(json.loads, sys.stdin) if m.get("target",{}).get("name")=="e2e" and m.get("executable")])'); \
	cd e2e && CARGO_MANIFEST_DIR=$$PWD KUBESWARM_TEST_MODEL=$(MODEL) $$bin $(E2E_ARGS)

.PHONY: e2e-tools
e2e-tools: ## Build the e2e control plane's binaries (Kubernetes, etcd, KWOK, Kueue, crane, a registry) into the cache
	for tool in kubernetes etcd kwok kueue crane registry; do hack/install-tool $$tool >/dev/null; done

# A control plane to look at by hand: `make cluster-up`, then the KUBECONFIG it prints.
CLUSTER_DIR ?= $(KUBESWARM_CACHE)/cluster
.PHONY: cluster-up cluster-down
cluster-up: build e2e-tools ## Start the e2e control plane in $(CLUSTER_DIR) and leave it running
	E2E_HOST_PATH=$(dir $(MODEL)) e2e/cluster up $(CLUSTER_DIR)
cluster-down: ## Stop the control plane cluster-up started
	e2e/cluster down $(CLUSTER_DIR)

# Built from the Go module proxy at the version pinned in hack/versions.env, once per machine.
$(HELM): hack/versions.env hack/install-tool
	hack/install-tool helm >/dev/null

# The default model, from its PyPI wheel, checked against the pinned sha256, by the same
# code that fetches it for `kubeswarm run`.
$(MODEL): hack/versions.env | build
	$(KUBESWARM) fetch-model >/dev/null

.PHONY: fmt
fmt: ## Format the Rust code
	$(CARGO) fmt --all
