#!/usr/bin/env python3
"""The CPU's practical fp32 peak as PyTorch sees it: square matrix products (MKL/oneDNN),
2 threads, best of 10 per size. Chapter 5 compares its own matmul against these figures.

    ~/torchvenv/bin/python book/torch_peak.py
"""
import time

import torch

torch.set_num_threads(2)
for n in (512, 1024, 2048):
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(10):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    print(f"n = {n:>4}: PyTorch {2 * n**3 / best / 1e9:6.1f} GFLOP/s (best of 10), torch {torch.__version__}")
