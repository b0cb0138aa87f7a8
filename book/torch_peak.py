#!/usr/bin/env python3
"""The CPU's practical fp32 peak as PyTorch sees it: square matrix products (MKL/oneDNN),
2 threads, best of 10 per size. Chapter 5 compares its own matmul against these figures.

    ~/torchvenv/bin/python book/torch_peak.py            # n = 512, 1024, 2048
    ~/torchvenv/bin/python book/torch_peak.py 2048       # one size (book/speed.py --peak-each-run)
"""
import sys
import time

import torch

torch.set_num_threads(2)
for n in [int(x) for x in sys.argv[1:]] or (512, 1024, 2048):
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(10):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    print(f"n = {n:>4}: PyTorch {2 * n**3 / best / 1e9:6.1f} GFLOP/s (best of 10), torch {torch.__version__}")
