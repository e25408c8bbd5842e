# finetune-operator developer entry points. `make help` lists them.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/.tools/bin:$(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: help setup demo test test-unit test-integration test-node test-training test-oldest test-e2e test-scale \
	images e2e verify lint typecheck crds crds-check chart-lint cluster-up cluster-down node-up node-down \
	bench bench-operator bench-trainer bench-scale

# The Kubernetes release the local control plane runs: the newest we pin by default
# (hack/kube-versions.sh). `make test KUBE_VERSION=1.34.4` runs against the oldest we support.
# KUBEBUILDER_ASSETS, when set, wins over both.
KUBE_VERSION_OLDEST := $(shell . hack/kube-versions.sh && echo $$KUBE_VERSION_OLDEST)
export KUBE_VERSION

help: ## List the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

setup: ## Install Debian packages, .venv, kubectl/helm and the control-plane binaries (idempotent)
	@hack/setup.sh

demo: setup ## Local demo: control plane, simulated GPU nodes, the operator, one job per scheme
	$(PY) hack/demo.py

test: setup ## Unit, integration (local control plane), the real node, training (tiny models on CPU); not e2e
	hack/node-binaries.sh >/dev/null
	$(PY) -m pytest

test-unit: setup ## Fast unit tests only
	$(PY) -m pytest -m "not integration and not training"

test-integration: setup ## Tests on the local control plane (the real-node tier apart)
	$(PY) -m pytest -m "integration and not node"

test-node: setup ## A real kubelet with containerd on this machine (root): tests/node
	hack/node-binaries.sh >/dev/null
	$(PY) -m pytest -m node

test-training: setup ## Tiny-model training tests on CPU
	$(PY) -m pytest -m training

test-scale: setup ## KWOK's fake GPU nodes: jobs placed on compatible GPUs or waiting (builds KWOK once)
	hack/kwok-binaries.sh >/dev/null
	$(PY) -m pytest -m scale

# Both images with buildah (root): the first build downloads torch and takes many minutes, an
# unchanged rebuild seconds. Archives in ~/.cache/finetune-operator/images; JSON on the last line.
images: ## Build both images of the Dockerfile with buildah, export them for `ctr images import`
	hack/images.sh

test-e2e: setup images ## The built images: checks inside them, then training in them on a real node (root; marker e2e)
	hack/node-binaries.sh >/dev/null
	$(PY) -m pytest -m e2e

# The user's path on a real node: images built here, helm install, a FineTuneJob trained in
# containerd, a deleted pod resumed, an fp8 job refused by the trainer. Last line: one JSON object.
e2e: setup ## Images, a real node, helm install and real training end to end (root; JSON last line)
	hack/node-binaries.sh >/dev/null
	PYTHONPATH=$(CURDIR)/api:$(CURDIR)/operator:$(CURDIR)/hack $(PY) hack/e2e.py

# The CRD, placement (device plugin and DRA) and lifecycle tests on the oldest supported Kubernetes.
OLDEST_TESTS := tests/integration/test_control_plane.py tests/integration/test_lifecycle.py \
	tests/integration/test_placement.py \
	tests/integration/test_cel_agreement.py tests/integration/test_job_api.py \
	tests/integration/test_faults.py tests/integration/test_dra.py

test-oldest: ## CRD, placement and lifecycle tests on the oldest supported Kubernetes
	KUBE_VERSION=$(KUBE_VERSION_OLDEST) hack/setup.sh
	KUBE_VERSION=$(KUBE_VERSION_OLDEST) $(PY) -m pytest -m integration $(OLDEST_TESTS)

bench: bench-operator bench-trainer ## Benchmarks: the operator's, then the trainer's (table + JSON line)

# The trainer against a plain transformers Trainer + peft script on the CPU (hack/bench_trainer.py;
# BENCH_TRAINER_ARGS passes options, e.g. --pairs 5 --schemes none). Tens of minutes on 2 cores.
bench-trainer: setup ## The trainer against plain transformers + peft: tokens/s, start-up, memory
	PYTHONPATH=$(CURDIR)/api:$(CURDIR)/operator:$(CURDIR)/trainer:$(CURDIR)/hack \
		$(PY) hack/bench_trainer.py $(BENCH_TRAINER_ARGS)

verify: setup lint typecheck crds-check chart-lint ## ruff, ruff format, mypy, CRD diff, helm lint, hadolint

lint:
	ruff check .
	ruff format --check .

typecheck:
	mypy

chart-lint:
	helm lint --strict charts/finetune-operator
	for values in charts/finetune-operator/ci/*.yaml; do helm lint --strict charts/finetune-operator -f $$values; done
	hadolint Dockerfile

CRD := finetunejobs.finetune.dev.yaml

crds: ## Regenerate crds/ (and the chart's copy) from the API models
	$(PY) -m finetune_api.crd

crds-check:
	$(PY) -m finetune_api.crd $(VENV)/crd-check.yaml >/dev/null
	diff -u crds/$(CRD) $(VENV)/crd-check.yaml || { echo "crds/ is stale: run 'make crds'"; exit 1; }
	diff -u charts/finetune-operator/files/$(CRD) $(VENV)/crd-check.yaml || \
		{ echo "the chart's CRD is stale: run 'make crds'"; exit 1; }

bench-operator: setup ## Operator benchmark: apply->Job latency against a bare client, a 1,000-job burst
	$(PY) hack/bench_operator.py

# KWOK plays --nodes fake GPU nodes, the operator gets --jobs FineTuneJobs at once (hack/bench_scale.py;
# BENCH_SCALE_ARGS="--nodes 100 --jobs 500" for a smaller run). Not part of `make bench`: the
# default size takes a long while on 2 cores.
bench-scale: setup ## 1,000 KWOK GPU nodes, 5,000 FineTuneJobs: time to place all, operator CPU/RSS
	PYTHONPATH=$(CURDIR)/api:$(CURDIR)/operator:$(CURDIR)/hack $(PY) hack/bench_scale.py $(BENCH_SCALE_ARGS)

cluster-up: setup ## Start the local control plane (.cluster/kubeconfig)
	$(PY) hack/localcluster.py up .cluster

cluster-down: ## Stop it
	$(PY) hack/localcluster.py down .cluster

# A real node (root): the control plane on this machine's address, a kubelet with containerd
# (hack/realnode.py). `hack/realnode.py import ARCHIVE` loads an image into its containerd.
node-up: setup ## Start the control plane for real kubelets and one real node (.cluster-node/)
	hack/node-binaries.sh >/dev/null
	PYTHONPATH=$(CURDIR)/api:$(CURDIR)/hack $(PY) hack/localcluster.py up .cluster \
		--node-address $$(PYTHONPATH=$(CURDIR)/hack $(PY) -c 'import realnode; print(realnode.default_address())')
	PYTHONPATH=$(CURDIR)/api:$(CURDIR)/hack $(PY) hack/realnode.py up .cluster .cluster-node

node-down: ## Stop the node, then the control plane
	PYTHONPATH=$(CURDIR)/api:$(CURDIR)/hack $(PY) hack/realnode.py down .cluster .cluster-node
	$(PY) hack/localcluster.py down .cluster
