#!/usr/bin/env bash
# Every benchmark of BENCHMARKS.md, one after another (about 4 hours on 2 cores). Run from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
python benchmarks/bench_lora.py --model minilm --malloc default --processes one --what speed,memory
python benchmarks/bench_lora.py --model minilm --malloc retain --processes one --what speed
python benchmarks/bench_lora.py --model minilm --malloc default --processes separate --rounds 5 --what speed
python benchmarks/bench_lora.py --model smollm2 --malloc default --processes one --rounds 5 --steps 2 --what speed,memory,attach
python benchmarks/bench_lora.py --model smollm2 --malloc retain --processes one --rounds 5 --steps 2 --what speed
python benchmarks/bench_quality.py
python benchmarks/bench_budget.py --what speed --repeats 2
python benchmarks/bench_budget.py --what memory
python benchmarks/bench_budget.py --what sweep
python benchmarks/bench_budget.py --what quality
python benchmarks/bench_sparse.py --what speed --rounds 5 --steps 4
python benchmarks/bench_sparse.py --what memory
python benchmarks/bench_sparse.py --what sweep
python benchmarks/bench_sparse.py --what quality
python benchmarks/bench_sparse.py --what sst2
python benchmarks/bench_modular.py
python benchmarks/bench_combine.py --what all --rounds 3
python benchmarks/diffusion_speed.py --rounds 12 --steps 3 --threads 1 --what speed,memory
python benchmarks/diffusion_speed.py --rounds 12 --steps 3 --threads 2
python benchmarks/bench_diffusion.py --out bench-diffusion-out --threads 1   # about 45 min on 2 cores; the base is cached
python benchmarks/bench_kind.py --threads 1   # KIND vs LoRA / full / scratch on new classes; the KIND pretraining (about 3x a normal step) dominates
