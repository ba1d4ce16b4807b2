# The two set-up commands: `make test` and `make demo`. Both install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Debian packages the real-peer tests drive (installed only when running as root).
DEBS := wireguard-go wireguard-tools iperf3 iputils-ping shadowsocks-libev nftables iproute2 ethtool

.PHONY: test demo bench debs venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

debs:
	@if [ "$$(id -u)" = 0 ]; then \
	  missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then \
	    echo "installing Debian packages:$$missing"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null || \
	    { DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null && \
	      DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null; }; \
	  fi; \
	else echo "not root: skipping Debian packages (real-peer tests will skip)"; fi

test: venv debs
	$(PY) -m pytest -q

demo: venv debs
	$(PY) -m tunnel.demo

# The benchmark suite with charts: bench-results/report.md (root for everything but core and scale).
bench: venv debs
	$(PY) -m bench --out bench-results

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
