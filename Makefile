# The chain, one target per stage. `make help` lists them.
# On a fresh clone: `make test` (and, once serving lands, `make serve`) is all that is needed.

SHELL := /bin/bash
.DEFAULT_GOAL := help
# A step that fails or is interrupted leaves no half-written target that a later `make` would trust.
.DELETE_ON_ERROR:

PYTHON_SYSTEM ?= python3.11
VENV          ?= .venv
PY            := $(VENV)/bin/python
STAMP         := $(VENV)/.installed
DATASET       ?= fashion-mnist
# Looked in first (IDX files, or torchvision's <Name>/raw/ layout), then the system's copy of the data set.
DATA_DIR      ?= data
# Each data set trains into its own folder, so `make train DATASET=mnist` never mistakes Fashion-MNIST files.
CKPT          ?= checkpoints$(if $(filter-out fashion-mnist,$(DATASET)),/$(DATASET))
REPORTS       ?= reports
# The seed every training script of the chain gets (its cards record it).
SEED          ?= 0
# `make study`: the chain once per seed. make train's own chain (SEED) is one of them; the others train into
# $(STUDY_DIR)/seed-N.
STUDY_SEEDS   ?= 0 1 2
STUDY_DIR     ?= $(CKPT)/study
study_run = $(if $(filter $(SEED),$(1)),$(CKPT),$(STUDY_DIR)/seed-$(1))
# `make attempt`: another recipe for the distilled or pruned model over the study's seeds, into
# $(ATTEMPTS_DIR)/NAME/seed-N; `make study` judges each beside its own run (docs/training.md). E.g.
#   make attempt NAME=logits-only ATTEMPT=distill ATTEMPT_FLAGS="--attention-weight 0"
#   make attempt NAME=ensemble ATTEMPT=distill TEACHERS=all      # every study seed's full model teaches, as one
#   make attempt NAME=12-epochs ATTEMPT=distill STUDENT_FLAGS="--epochs 12"   # retrains the twin beside it too
#   make attempt NAME=finetune-3 ATTEMPT=prune ATTEMPT_FLAGS="--finetune-epochs 3"
ATTEMPTS_DIR  ?= $(CKPT)/attempts
ATTEMPT       ?= distill
TEACHERS      ?= own
ATTEMPT_FLAGS ?=

# Every hyperparameter's default lives in the scripts (budgets and augmentation in training/recipes.py), so
# `python -m training.distill` trains the model `make train` trains; the rules below pass only data, paths and
# which model. These are empty hooks for experiments, e.g. `make train DISTILL_FLAGS="--alpha 0.5"`;
# STUDENT_FLAGS goes to the distilled student and to its no-distillation baseline alike, so their budgets stay equal.
STUDENT_FLAGS ?=
TRAIN_FLAGS   ?=
PRUNE_FLAGS   ?=
QUANT_FLAGS   ?=
DISTILL_FLAGS ?=

CORE := fashion_cnn.py training/engine.py training/data.py training/cards.py training/cli.py training/recipes.py
# What make train builds and make serve serves. The distilled student's no-teacher twin (student_baseline.pt) is
# the study's: it measures distillation, and is served by no one.
VARIANTS := $(CKPT)/full.pt $(CKPT)/pruned.pt $(CKPT)/int8.pt $(CKPT)/distilled.pt
TWIN     := $(CKPT)/student_baseline.pt

VERSION       ?= 1.0
RUN_DIR       ?= runs/torchserve
ROUTER_CONFIG ?= router/experiments.yaml
# The soak `make chaos` runs against `make serve`'s stack, at 70 % of its measured saturation.
SOAK_S        ?= 300
# ONNX exports of the trained variants and ONNX Runtime's int8 of the full model (`make onnx`; `make serve`
# builds them).
ONNX_FLAGS ?=
ONNX_MODELS := $(foreach v,full pruned distilled int8,$(CKPT)/$(v)-onnx.onnx)
# Every form serving/models.yaml serves: each variant in PyTorch and in ONNX Runtime.
MARS := $(foreach v,full pruned int8 distilled,model_store/fashion-$(v)-v$(VERSION).mar \
	model_store/fashion-$(v)-onnx-v$(VERSION).mar)

.PHONY: help install data train study study-run attempt onnx report archive serve cluster stop status loadtest bench capacity manifests chaos test lint clean distclean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | sort

install: $(STAMP)  ## Java 17, the data set and the project venv (.venv), installing what is missing

$(STAMP): pyproject.toml scripts/check_system.sh
	bash scripts/check_system.sh
	test -x $(PY) || $(PYTHON_SYSTEM) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m serving.protos
	touch $@

data: $(STAMP)  ## check the data set is readable (DATASET=mnist downloads MNIST into data/)
ifeq ($(DATASET),mnist)
	$(PY) -m training.data --dataset mnist --data-dir $(DATA_DIR) --download
else
	$(PY) -m training.data --dataset $(DATASET) --data-dir $(DATA_DIR)
endif

train: $(VARIANTS) $(REPORTS)/variants.md  ## full, pruned, int8, distilled and the report (SEED=0)

study: | $(STAMP)  ## the chain and the distilled student's no-teacher twin for each of STUDY_SEEDS: reports/study/
	$(foreach seed,$(STUDY_SEEDS),$(MAKE) --no-print-directory study-run CKPT=$(call study_run,$(seed)) SEED=$(seed) &&) true
	$(PY) -m training.study --runs $(foreach seed,$(STUDY_SEEDS),$(call study_run,$(seed))) --output-dir $(REPORTS)/study \
	  --attempts $(ATTEMPTS_DIR)

study-run: $(VARIANTS) $(TWIN)  # one seed's run of the study, into CKPT

study_full = $(call study_run,$(1))/full.pt
attempt_dir = $(ATTEMPTS_DIR)/$(NAME)/seed-$(1)
# One seed's attempt: the distilled student (taught by the seed's full model, or by all of them) or the pruned model,
# and the no-teacher twin beside the student when STUDENT_FLAGS changes the student's budget.
attempt_seed = \
	$(PY) -m training.$(ATTEMPT) --dataset $(DATASET) --data-dir $(DATA_DIR) --seed $(1) \
	  $(if $(filter distill,$(ATTEMPT)),--teacher $(if $(filter all,$(TEACHERS)),$(foreach s,$(STUDY_SEEDS),$(call study_full,$(s))),$(call study_full,$(1))) $(STUDENT_FLAGS),--parent $(call study_full,$(1))) \
	  --output $(call attempt_dir,$(1))/$(if $(filter distill,$(ATTEMPT)),distilled,pruned).pt $(ATTEMPT_FLAGS) \
	$(if $(and $(filter distill,$(ATTEMPT)),$(STUDENT_FLAGS)),&& $(PY) -m training.train --dataset $(DATASET) --data-dir $(DATA_DIR) --seed $(1) \
	  --output $(call attempt_dir,$(1))/student_baseline.pt --arch student --variant student-baseline $(STUDENT_FLAGS))

attempt: | $(STAMP)  ## another distilled or pruned recipe over STUDY_SEEDS, judged by make study: NAME=… ATTEMPT=distill|prune ATTEMPT_FLAGS=…
	@test -n "$(NAME)" || { echo "make attempt needs NAME=… (its folder under $(ATTEMPTS_DIR))" >&2; exit 1; }
	@test "$(ATTEMPT)" = distill || test "$(ATTEMPT)" = prune || { echo "ATTEMPT is distill or prune" >&2; exit 1; }
	@test "$(TEACHERS)" = own || test "$(TEACHERS)" = all || { echo "TEACHERS is own or all" >&2; exit 1; }
	@test "$(ATTEMPT)" = distill || { test "$(TEACHERS)" = own && test -z "$(STUDENT_FLAGS)"; } || \
	  { echo "TEACHERS and STUDENT_FLAGS are for ATTEMPT=distill" >&2; exit 1; }
	@for full in $(foreach seed,$(STUDY_SEEDS),$(call study_full,$(seed))); do \
	  test -f $$full || { echo "no $$full: run make study first" >&2; exit 1; }; done
	$(foreach seed,$(STUDY_SEEDS),$(call attempt_seed,$(seed)) && ) true

$(CKPT)/full.pt: training/train.py $(CORE) | $(STAMP)
	$(PY) -m training.train --dataset $(DATASET) --data-dir $(DATA_DIR) --seed $(SEED) --output $@ $(TRAIN_FLAGS)

$(CKPT)/pruned.pt: $(CKPT)/full.pt training/prune.py training/teaching.py $(CORE)
	$(PY) -m training.prune --dataset $(DATASET) --data-dir $(DATA_DIR) --seed $(SEED) --parent $< --output $@ $(PRUNE_FLAGS)

$(CKPT)/int8.pt: $(CKPT)/full.pt training/quantize.py $(CORE)
	$(PY) -m training.quantize --dataset $(DATASET) --data-dir $(DATA_DIR) --seed $(SEED) --parent $< --output $@ $(QUANT_FLAGS)

$(CKPT)/distilled.pt: $(CKPT)/full.pt training/distill.py training/teaching.py $(CORE)
	$(PY) -m training.distill --dataset $(DATASET) --data-dir $(DATA_DIR) --seed $(SEED) --teacher $< --output $@ $(STUDENT_FLAGS) $(DISTILL_FLAGS)

$(TWIN): training/train.py $(CORE) | $(STAMP)
	$(PY) -m training.train --dataset $(DATASET) --data-dir $(DATA_DIR) --seed $(SEED) --output $@ --arch student --variant student-baseline $(STUDENT_FLAGS)

onnx: $(ONNX_MODELS)  ## ONNX exports of full, pruned, distilled, and ONNX Runtime's static int8 of full (int8-onnx)

# Each checked against its parent on the test set (training/export_onnx.py); the explicit int8 rule wins over the
# pattern, which would otherwise export the FX int8 TorchScript.
$(CKPT)/%-onnx.onnx: $(CKPT)/%.pt training/export_onnx.py $(CORE)
	$(PY) -m training.export_onnx --dataset $(DATASET) --data-dir $(DATA_DIR) --seed $(SEED) --parent $< --output $@ $(ONNX_FLAGS)

$(CKPT)/int8-onnx.onnx: $(CKPT)/full.pt training/export_onnx.py $(CORE)
	$(PY) -m training.export_onnx --dataset $(DATASET) --data-dir $(DATA_DIR) --seed $(SEED) --parent $< --quantize --output $@ \
		$(ONNX_FLAGS)

report: $(REPORTS)/variants.md  ## Markdown table + PNG plot of the variants, from their cards

$(REPORTS)/variants.md: training/report.py $(VARIANTS) | $(STAMP)
	$(PY) -m training.report --checkpoints $(CKPT) --output-dir $(REPORTS)

archive: $(MARS)  ## pack each variant and ONNX form into model_store/fashion-<variant>-v$(VERSION).mar (only missing ones)

# A released version never changes under its number: an existing archive is kept (order-only prerequisite).
# Retrained? Archive it as a new VERSION, or delete the old .mar first.
model_store/fashion-%-v$(VERSION).mar: | $(CKPT)/%.pt
	$(PY) -m serving.archive --version $(VERSION) --variants $* --checkpoints $(CKPT)

# The ONNX forms (make picks the pattern with the shorter stem: this one for fashion-*-onnx).
model_store/fashion-%-onnx-v$(VERSION).mar: | $(CKPT)/%-onnx.onnx
	$(PY) -m serving.archive --version $(VERSION) --variants $*-onnx --checkpoints $(CKPT)

serve: $(STAMP) | $(VARIANTS) $(ONNX_MODELS)  ## install, data, train and export if missing, archive, start TorchServe and the A/B router
	$(MAKE) --no-print-directory archive
	$(PY) -m serving.examples
	$(PY) -m serving --run-dir $(RUN_DIR) start
	$(PY) -m router --config $(ROUTER_CONFIG) start

cluster: $(STAMP) | $(VARIANTS) $(ONNX_MODELS)  ## (root) PostgreSQL, 2 TorchServe hosts in network namespaces, 2 router replicas, Locust master + 2 workers: a fault rehearsal, reports/cluster.md
	$(MAKE) --no-print-directory archive
	$(PY) -m loadtest.rehearsal

stop:  ## stop what `make serve` and `make cluster` started
	@if [ -x $(PY) ]; then $(PY) -m router --config $(ROUTER_CONFIG) stop; $(PY) -m serving --run-dir $(RUN_DIR) stop; \
		if [ -e runs/cluster ]; then $(PY) -m serving.cluster down; fi; fi

status: $(STAMP)  ## models, versions, ready workers; the router's experiments
	$(PY) -m serving --run-dir $(RUN_DIR) status
	$(PY) -m router --config $(ROUTER_CONFIG) status

loadtest: $(STAMP)  ## Locust runs against the stack `make serve` started: reports/loadtest/ (summary.md, plots)
	$(PY) -m loadtest.run

bench: $(STAMP)  ## the performance ratios, measured in one run against `make serve`'s stack: reports/bench.md
	$(PY) -m loadtest.bench

capacity: $(STAMP)  ## after `make bench`: TorchServe and router pods for 1k, 10k and 100k req/s: reports/capacity.md
	$(PY) -m loadtest.capacity

manifests: $(STAMP)  ## render deploy/k8s/base/generated/ from the repo's files; `kubectl kustomize` each overlay
	$(PY) -m serving.manifests
	@for overlay in deploy/k8s/overlays/*/; do kubectl kustomize $$overlay > /dev/null && echo "$$overlay renders"; done

chaos: $(STAMP)  ## after `make serve`: the reliability suite, then a soak of that stack (SOAK_S s): reports/reliability.md
	CHAOS_REPORT=$(REPORTS)/reliability.md $(PY) -m pytest tests/reliability
	$(PY) -m loadtest.soak --duration $(SOAK_S) --run-dir $(RUN_DIR) --router-config $(ROUTER_CONFIG) \
		--output $(REPORTS)/soak --append-to $(REPORTS)/reliability.md

test: $(STAMP)  ## the whole suite (trains only on small subsets)
	$(PY) -m pytest

lint: $(STAMP)  ## ruff and mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean: stop  ## stop TorchServe, remove built artifacts (checkpoints, reports, archives, run directories)
	rm -rf $(CKPT) $(REPORTS) runs model_store/*.mar .pytest_cache serving/_grpc deploy/k8s/base/generated

distclean: clean  ## also the venv
	rm -rf $(VENV) *.egg-info
