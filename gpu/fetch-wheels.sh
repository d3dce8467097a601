#!/usr/bin/env bash
# Here (a machine that reaches PyPI): what the lent GPU machine lacks, as wheels for its Python
# 3.12, packed into parts that each fit one device call (64 MiB with the working tree).
#   bash gpu/fetch-wheels.sh        -> .gpu-wheels/part-00 ... part-NN (git-ignored)
# Then on the GPU machine, one call per part: gpu/check.sh receive (all but the last part),
# gpu/check.sh run (the last part): see gpu/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .gpu-wheels && mkdir -p .gpu-wheels/wheels
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu-wheels/wheels max==26.7.0 max-core==26.7.0 max-mojo-libs==26.7.0 \
  max-shmem-libs==26.7.0 mojo-compiler==1.2.0 mojo-compiler-mojo-libs==1.2.0 orjson
tar -C .gpu-wheels -cf .gpu-wheels/wheels.tar wheels
rm -r .gpu-wheels/wheels
split -b 55M -d .gpu-wheels/wheels.tar .gpu-wheels/wheels.tar.part-
rm .gpu-wheels/wheels.tar
for part in .gpu-wheels/wheels.tar.part-*; do
  folder=".gpu-wheels/part-${part##*-}"
  mkdir -p "$folder" && mv "$part" "$folder/"
done
ls -d .gpu-wheels/part-* | sed 's/^/carry: /'
