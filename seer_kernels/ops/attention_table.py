"""Selector evidence for seer_kernels.attention (written by bench/attention_table.py; do not edit by hand).

Regenerate after a GPU check:

    bash bench/gpu_check.sh OUT && python -m bench.attention_table OUT/bench.json

TABLE maps a GPU slug (e.g. "nvidia-h100-80gb-hbm3") to benchmark rows: head_dim, n_q, n_kv, batch, heads,
dtype, fwd and fwd_bwd (speed-up of the Triton kernel over the best SDPA backend, same run), best_sdpa,
bwd_scheme ("atomic" or "deterministic", whichever was faster) and the best tiles per kernel.
"""

# Last written from: {"device": "nvidia-h200", "gpu": "NVIDIA H200", "torch": "2.11.0+cu130", "triton": "3.6.0", "cuda": "13.0", "git": "7989638", "date": "2026-11-26 03:34:05", "json": "bench/results/nvidia-h200-attention.json"}
SOURCE = {'cuda': '13.0',
 'date': '2026-11-26 03:34:05',
 'device': 'nvidia-h200',
 'git': '7989638',
 'gpu': 'NVIDIA H200',
 'json': 'bench/results/nvidia-h200-attention.json',
 'torch': '2.11.0+cu130',
 'triton': '3.6.0'}
TABLE: dict = {'nvidia-h200': [{'batch': 192,
                  'best_sdpa': 'efficient',
                  'best_sdpa_fwd': 'efficient',
                  'bwd_scheme': 'deterministic',
                  'case': 'local-B192H16N37D64',
                  'dtype': 'bfloat16',
                  'fwd': 0.184,
                  'fwd_bwd': 0.232,
                  'fwd_bwd_atomic': 0.194,
                  'fwd_bwd_atomic_graph': 1.275,
                  'fwd_bwd_det': 0.232,
                  'fwd_bwd_det_graph': 1.43,
                  'fwd_graph': 1.358,
                  'head_dim': 64,
                  'heads': 16,
                  'n_kv': 37,
                  'n_q': 37,
                  'tiles': {'dkdv': [16, 64, 4, 2], 'dq': [64, 16, 4, 3], 'fwd': [64, 32, 4, 3]}},
                 {'batch': 32,
                  'best_sdpa': 'cudnn',
                  'best_sdpa_fwd': 'cudnn',
                  'bwd_scheme': 'atomic',
                  'case': 'vit10b-tp4-B32H8N257D128',
                  'dtype': 'bfloat16',
                  'fwd': 0.259,
                  'fwd_bwd': 0.328,
                  'fwd_bwd_atomic': 0.328,
                  'fwd_bwd_atomic_graph': 0.746,
                  'fwd_bwd_det': 0.327,
                  'fwd_bwd_det_graph': 0.795,
                  'fwd_graph': 0.805,
                  'head_dim': 128,
                  'heads': 8,
                  'n_kv': 257,
                  'n_q': 257,
                  'tiles': {'dkdv': [32, 64, 4, 2], 'dq': [64, 32, 4, 3], 'fwd': [64, 32, 4, 3]}}]}
