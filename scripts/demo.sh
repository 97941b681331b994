#!/usr/bin/env bash
# Install (if needed) and serve the bundled Fashion-MNIST demo profile on http://127.0.0.1:8000
# Extra arguments go to `nacguard serve` (e.g. --port 9000, --device cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec nacguard serve "$@"
