#!/usr/bin/env bash
# Rebuilds benchmarks/wheels/ where pip can reach the package index: the dependencies that the GPU
# image's python3 (3.12, x86_64) lacks, at the versions this project pins. All of them are committed
# (pydantic_core too: compiled, cp312 manylinux x86_64, 2 MB), since the GPU machine cannot download;
# run this only to change a version, then check every wheel's Requires-Dist against what is shipped.
# antlr4-python3-runtime 4.9.3 (omegaconf's pin) exists only as an sdist: its wheel is built.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
pip="${PIP:-python3 -m pip}"
$pip download -q --no-deps --only-binary=:all: -d . hydra-core==1.3.8 omegaconf==2.3.1 pydantic==2.14.4 \
  annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0
$pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d . pydantic_core==2.50.5
$pip wheel -q --no-deps -w . antlr4-python3-runtime==4.9.3
ls -l ./*.whl
