# Two entry points for a fresh machine: `make demo` (main job) and `make test` (test suite).
# Both create .venv from the pinned requirements once (re-run only when requirements.txt changes).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export GRADIO_ANALYTICS_ENABLED := False

.PHONY: setup system-deps demo test golden

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) student_model_v2/launch_from_yaml.py --config student_model_v2/train_config_quickstart.yaml
	$(PY) -m student_model_v2.eval_distillation --adapter runs/quickstart/checkpoint-final \
		--output_json runs/quickstart/distillation_eval.json

# System packages the tests use (Debian, not pip): chromium + chromedriver for the demo's browser test,
# DejaVu Sans as the second font of the font-folder tests, and fribidi, which Pillow's RAQM text layout
# loads at run time. Installed with apt when missing and run as root.
SYSTEM_FILES := /usr/bin/chromium /usr/bin/chromedriver /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf \
	/usr/lib/x86_64-linux-gnu/libfribidi.so.0
system-deps:
	@missing=0; for f in $(SYSTEM_FILES); do [ -e $$f ] || missing=1; done; \
	if [ $$missing = 0 ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		chromium chromium-driver fonts-dejavu-core libfribidi0 >/dev/null; \
	else echo "install chromium chromium-driver fonts-dejavu-core libfribidi0 (apt) for the tests" >&2; exit 1; fi

test: setup system-deps
	$(PY) -m pytest -q --durations=20 tests

golden: setup
	$(PY) -m student_model_v2.anytext2.golden tests/data/golden/*/
