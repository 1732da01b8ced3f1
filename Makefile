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
test: lint cuda-pins $(HELM) $(MODEL) e2e-tools ## Run every check: format, clippy, unit, API, worker and e2e tests, CRD drift, chart
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
bench: bench-worker bench-engine bench-rss bench-gpu-cpu bench-operator ## Run every benchmark (bench-gpu packs the GPU one)

.PHONY: bench-worker
bench-worker: build $(MODEL) ## The inference worker against llama.cpp's server: same file, same threads
	python3 inference-worker/bench/against_llama_cpp.py --worker $(WORKER) \
	  --llama-python "$$(hack/install-tool llama-cpp-server)" --model $(MODEL) \
	  --threads $$(nproc) --concurrency 1,4,10 --max-tokens 128

.PHONY: bench-engine
bench-engine: third-party ## The swarm engine's calls/s and added latency against Python asyncio + openai, same mock server
	OPENAI_PYTHON="$$(hack/install-tool openai-python)" $(CARGO) bench --locked $(SELECT) --bench engine

.PHONY: bench-operator
bench-operator: ## 1,000 SwarmJobs on 100 ModelPools in the e2e bed: apply → first call against the Job controller's apply → Pod, peak RSS, API requests per job
	E2E_ALLOW_LOOPBACK_EXTERNAL=1 $(MAKE) e2e E2E_ARGS=bench_operator

.PHONY: bench-rss
bench-rss: build ## Peak RSS of the caller when an endpoint answers with 1 GiB, against a polite endpoint
	python3 operator/benches/endpoint_rss.py --kubeswarm $(KUBESWARM)

# The GPU benchmark (inference-worker/bench/gpu.py) travels to a GPU machine as bench-gpu/:
# the CUDA worker and kubeswarm, xz-compressed. There, with no Rust and no network, it makes
# a random-weight model of BENCH_SHAPE's shape and drives the worker with the swarm engine.
BENCH_SHAPE ?= qwen3-30b-a3b
BENCH_GPU_ARGS ?= --concurrency 1,10,32,64 --max-tokens 256 --bandwidth-gbs 4800
.PHONY: bench-gpu
bench-gpu: build build-cuda ## Pack the GPU benchmark into bench-gpu/ and print the command to run on a GPU machine
	rm -rf bench-gpu && mkdir bench-gpu
	xz -T2 -6 -c $(CUDA_WORKER) >bench-gpu/inference-worker.xz
	xz -T2 -6 -c $(KUBESWARM) >bench-gpu/kubeswarm.xz
	@echo "bench-gpu: bring bench-gpu/ ($$(du -sm bench-gpu | cut -f1) MiB) with the repository; on the GPU machine run:"
	@echo "  python3 inference-worker/bench/gpu.py --worker bench-gpu/inference-worker.xz" \
	  "--kubeswarm bench-gpu/kubeswarm.xz --shape $(BENCH_SHAPE) $(BENCH_GPU_ARGS) --out \$$OUT"

# The same flow here, on the CPU worker and a tiny random model: what a GPU run will do,
# checked before a GPU's minutes are spent on it.
.PHONY: bench-gpu-cpu
bench-gpu-cpu: build ## Run the GPU benchmark's whole flow here on the CPU, on a tiny random model
	rm -rf bench-gpu-cpu && mkdir bench-gpu-cpu
	xz -T2 -1 -c $(WORKER) >bench-gpu-cpu/inference-worker.xz
	xz -T2 -1 -c $(KUBESWARM) >bench-gpu-cpu/kubeswarm.xz
	python3 inference-worker/bench/gpu.py --worker bench-gpu-cpu/inference-worker.xz \
	  --kubeswarm bench-gpu-cpu/kubeswarm.xz --shape tiny --device cpu --concurrency 1,4 \
	  --max-tokens 64 --bandwidth-gbs 20 --work bench-gpu-cpu/work --out bench-gpu-cpu/out

# Images without a container engine (hack/images): OCI layouts of the operator and the CPU
# worker on a base of pinned Debian packages, tagged with the chart's appVersion.
IMAGES := $(KUBESWARM_CACHE)/images/out
# CUDA workers to image too, by name, e.g. CUDA_WORKERS=$(KUBESWARM_CACHE)/cuda/inference-worker-sm90
# after `make build-cuda`: never picked up on their own, as one may be from an older commit.
CUDA_WORKERS ?=
.PHONY: images
images: build ## Build the operator and CPU-worker images as OCI layouts, no container engine needed
	hack/images --out $(IMAGES) $(foreach w,$(CUDA_WORKERS),--cuda-worker $(w))

# `make push REGISTRY=registry.corp/kubeswarm` pushes REGISTRY/kubeswarm:TAG and
# REGISTRY/inference-worker:TAG with crane (credentials: crane auth login, or docker's config).
.PHONY: push
push: build ## Build the images and push them to REGISTRY (e.g. make push REGISTRY=registry.corp/kubeswarm)
	@[ -n "$(REGISTRY)" ] || { echo "make push: set REGISTRY, e.g. make push REGISTRY=registry.corp/kubeswarm" >&2; exit 2; }
	hack/images --out $(IMAGES) $(foreach w,$(CUDA_WORKERS),--cuda-worker $(w)) --push $(REGISTRY)

# The CUDA worker, compiled on a machine with no GPU: the toolkit comes from NVIDIA's PyPI
# wheels (hack/install-tool cuda, CUDA 13.0). mistral.rs's kernels compile for one GPU
# generation per build: 90 for H100/H200 (sm_90a), 80 for A100 and, binary-compatible,
# A10/A40 (8.6) and L4/L40S (8.9). Its own target directory: the feature set differs, and
# sharing one would rebuild mistral.rs for the CPU build after each CUDA one.
CUDA_COMPUTE_CAP ?= 90
CUDA_WORKER := $(KUBESWARM_CACHE)/cuda/inference-worker-sm$(CUDA_COMPUTE_CAP)
.PHONY: build-cuda
build-cuda: third-party ## Compile the CUDA worker here, no GPU needed (CUDA_COMPUTE_CAP=90 or 80)
	toolkit=$$(hack/install-tool cuda); \
	PATH="$$toolkit/bin:$$PATH" CUDA_HOME="$$toolkit" CUDA_COMPUTE_CAP=$(CUDA_COMPUTE_CAP) \
	  CARGO_TARGET_DIR=$(KUBESWARM_CACHE)/target-cuda \
	  $(CARGO) build --release --locked -p inference-worker --features cuda
	mkdir -p $(dir $(CUDA_WORKER))
	cp $(KUBESWARM_CACHE)/target-cuda/release/inference-worker $(CUDA_WORKER)
	@echo "build-cuda: $(CUDA_WORKER); it needs libcuda.so.1 (driver 580+) and the toolkit's libraries at run time"

# The CUDA build is too long for CI (see the README); what CI checks is that PyPI still
# serves every pinned wheel of its toolkit, from their metadata alone (a few seconds).
.PHONY: cuda-pins
cuda-pins: ## Check that PyPI still serves the CUDA toolkit wheels make build-cuda pins
	python3 -m pip install --dry-run --no-deps --ignore-installed --disable-pip-version-check \
	  --no-cache-dir --quiet --report /dev/null $(subst ",,$(CUDA_WHEELS))

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
