# Two entry points for a fresh machine: `make demo` (main job) and `make test` (test suite).
# Both create .venv from the pinned requirements once (re-run only when requirements.txt changes).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export GRADIO_ANALYTICS_ENABLED := False

.PHONY: setup browser demo test golden

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) student_model_v2/launch_from_yaml.py --config student_model_v2/train_config_quickstart.yaml
	$(PY) -m student_model_v2.eval_distillation --adapter runs/quickstart/checkpoint-final \
		--output_json runs/quickstart/distillation_eval.json

# The demo's browser test drives Debian's chromium through chromedriver (system packages, not pip); it
# looks for them at these paths and is skipped without them, so check the same paths here.
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else echo "install chromium and chromium-driver (apt) for the browser test" >&2; exit 1; fi

test: setup browser
	$(PY) -m pytest -q tests

golden: setup
	$(PY) -m student_model_v2.anytext2.golden tests/data/golden/*/
