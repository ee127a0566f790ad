#!/usr/bin/env bash
# Quick-start command 2: install what is needed into ./.venv and run the whole test suite (CPU, gloo).
source "$(dirname "$0")/venv.sh"
python -m pytest -q tests "$@"
