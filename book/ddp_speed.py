#!/usr/bin/env python3
"""Chapter 11's PyTorch reference: the same GPT (book/reference/torch_gpt.py) trained with
PyTorch's DistributedDataParallel on `--ranks` processes (gloo, over loopback), each with
`--threads` threads and `batch / ranks` samples of every global batch. Prints chapter 4's
benchmark line ("median of N: X ms/step", so that book/turns.py can time it in turns with
ch11_distributed), then one JSON line with the all-reduce time of a gradient-sized buffer.

    ~/torchvenv/bin/python book/ddp_speed.py --ranks 2 --threads 1 --preset baby --steps 40
"""
import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REFERENCE = os.path.join(HERE, "reference")
sys.path.insert(0, os.environ.get("TORCH_REFERENCE", REFERENCE))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch_gpt import DEFAULT_DATA, CharGPT, make_optimizer  # noqa: E402

# Chapter 4's presets (layers, heads, width, block, global batch, dropout).
PRESETS = {
    "tiny": (2, 2, 64, 32, 16, 0.0),
    "baby": (4, 4, 128, 64, 12, 0.0),
    "medium": (6, 6, 192, 128, 32, 0.1),
    "lecture": (6, 6, 384, 256, 64, 0.2),
}


def rank_main(rank, args, port, results):
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=args.ranks)
    n_layer, n_head, n_embd, block, batch, dropout = PRESETS[args.preset]
    if batch % args.ranks:
        sys.exit(f"the global batch {batch} is not a multiple of {args.ranks} ranks")
    with open(args.data, encoding="utf-8") as f:
        text = f.read()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text[: int(0.9 * len(text))]], dtype=torch.long)
    torch.manual_seed(1337)
    model = CharGPT(len(chars), block, n_layer, n_head, n_embd, dropout, False)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if args.ranks > 1 else model
    opt_args = argparse.Namespace(weight_decay=0.1, lr=1e-3, beta1=0.9, beta2=0.99,
                                  fused_adamw=False)
    optimizer = make_optimizer(model, opt_args)
    local = batch // args.ranks
    gen = torch.Generator().manual_seed(1000 + rank)

    def step():
        ix = torch.randint(len(data) - block, (local,), generator=gen).tolist()
        x = torch.stack([data[i:i + block] for i in ix])
        y = torch.stack([data[i + 1:i + 1 + block] for i in ix])
        _, loss = ddp(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    for _ in range(3):
        step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    # The all-reduce alone, on a buffer the size of the gradients.
    buf = torch.ones(sum(p.numel() for p in model.parameters()))
    reduce_ms = 0.0
    if args.ranks > 1:
        dist.all_reduce(buf)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(10):
            dist.all_reduce(buf)
        reduce_ms = (time.perf_counter() - t0) / 10 * 1e3
    if rank == 0:
        results.put((times, reduce_ms, buf.numel()))
    dist.barrier()
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--preset", choices=sorted(PRESETS), default="baby")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--port", type=int, default=29517)
    p.add_argument("--data", default=DEFAULT_DATA)
    args = p.parse_args()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=rank_main, args=(r, args, args.port, results))
             for r in range(args.ranks)]
    for proc in procs:
        proc.start()
    times, reduce_ms, values = results.get()
    for proc in procs:
        proc.join()
        if proc.exitcode != 0:
            sys.exit(f"a rank failed with exit code {proc.exitcode}")
    _, _, _, block, batch, _ = PRESETS[args.preset]
    med = statistics.median(times)
    print(f"median of {len(times)}: {med * 1e3:.1f} ms/step")
    print(json.dumps({
        "ranks": args.ranks, "threads": args.threads, "preset": args.preset,
        "torch": torch.__version__, "median_ms_per_step": round(med * 1e3, 2),
        "tokens_per_s": round(batch * block / med, 1),
        "all_reduce_ms": round(reduce_ms, 3), "all_reduce_values": values,
    }))


if __name__ == "__main__":
    main()
