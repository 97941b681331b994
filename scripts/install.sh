#!/usr/bin/env bash
# Install everything nacguard's tests and demo need on a fresh Debian machine (idempotent).
#   apt: redis-server, prometheus (+promtool), dataset-fashion-mnist (the demo's data),
#        chromium + chromium-driver (the operator page's browser tests; no browser download),
#        wrk (loadtest/gil_probe.py's load generator)
#   pip: torch/torchvision (pinned: an unpinned torch can pull a different multi-GB build),
#        then nacguard itself with its dev extras and every model kind (the tests cover them).
# Set NACGUARD_SKIP_APT=1 to skip the apt part (e.g. without root).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${NACGUARD_SKIP_APT:-0}" != "1" ]; then
  need=()
  command -v redis-server >/dev/null || need+=(redis-server)
  command -v promtool >/dev/null || need+=(prometheus)
  [ -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || need+=(dataset-fashion-mnist)
  command -v chromium >/dev/null || need+=(chromium)
  command -v chromedriver >/dev/null || need+=(chromium-driver)
  command -v wrk >/dev/null || need+=(wrk)
  if [ ${#need[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
fi

python -m pip install -q torch==2.14.1 torchvision==0.29.1
python -m pip install -q -e ".[dev,all-models,bench,otel]"

# The kserve package (its InferRequest/InferResponse talk to /v2 in tests/e2e). Not a dev extra:
# kserve 0.21.0 pins psutil<6 and asks for newer pydantic/orjson/cryptography, so resolving it
# would downgrade psutil 7 and change packages nacguard runs on. Only its protocol types are used,
# so kserve goes in without its dependencies, plus the few its `import kserve` needs, held to the
# versions already installed (constraints from pip freeze) so nothing installed changes.
constraints="$(mktemp)"
python -m pip freeze --exclude-editable | grep -v -e ' @ ' -e '^kserve==' >"$constraints"
python -m pip install -q -c "$constraints" "cloudevents>=1.6.2,<2" "pandas>=2.2,<3" \
  "grpc-interceptor>=0.15.4,<1" "timing-asgi>=0.3,<1" "tabulate>=0.9,<1" "kubernetes>=23.3"
python -m pip install -q --no-deps kserve==0.21.0
rm -f "$constraints"
