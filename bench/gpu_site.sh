#!/usr/bin/env bash
# Build .gpu_site: the pure-Python (and cp312 manylinux) packages the card's image lacks, unzipped, to carry with a
# device call (`carry: [".gpu_site"]`, `PYTHONPATH=.:.gpu_site`). The card runs Python 3.12 (shared/gpu.md); this
# machine may not, so the wheels are downloaded for 3.12 and never imported here.
#   tests/gpu: pytest-asyncio; structured output: xgrammar (+ pydantic, tvm-ffi); the OpenAI server and bench.serve's
#   HTTP rows: fastapi (+ opentelemetry-api), starlette, uvicorn, h11, httptools, click, prometheus_client, httpx,
#   httpcore, certifi, idna.
set -eu
dir=$(mktemp -d)
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
    --platform manylinux_2_28_x86_64 -d "$dir" \
    pytest-asyncio==1.5.0 xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2 pydantic==2.14.4 pydantic-core==2.50.5 \
    annotated-types==0.8.0 typing-extensions==4.16.0 typing-inspection==0.4.5 \
    fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 h11==0.16.0 click==8.5.1 annotated-doc==0.0.7 \
    opentelemetry-api==1.45.2 httptools==0.9.0 prometheus_client==0.26.0 httpx==0.28.1 httpcore==1.0.9 \
    certifi==2026.10.19.post1 idna==3.20
mkdir -p .gpu_site
for w in "$dir"/*.whl; do python -m zipfile -e "$w" .gpu_site/; done
du -sh .gpu_site
