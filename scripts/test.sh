#!/usr/bin/env bash
# The test command: sets up (or reuses) an environment that can run the tests, then runs pytest.
#   bash scripts/test.sh                 the default suite (CPU, tiny in-process models, no downloads)
#   bash scripts/test.sh -m slow         the long end-to-end runs (several DeepSpeed processes, long streams)
#   bash scripts/test.sh -m gpu          the GPU tests (skip without CUDA)
# Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh dev
export TOKENIZERS_PARALLELISM=false
exec "$PYTHON" -m pytest -q "$@"
