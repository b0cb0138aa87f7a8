#!/usr/bin/env python3
"""Character-level GPT (nanoGPT-equivalent) in PyTorch, for CPU baselines.

Reference baseline for the Rust/Burn char-GPT project. Written from the
architecture description (pre-LN transformer, tied lm head, AdamW with
warmup+cosine), not copied from any repository.

Examples
  # nanoGPT "baby" CPU config, full run
  torch_gpt.py --threads 2 --n-layer 4 --n-head 4 --n-embd 128 --block-size 64 \
      --batch-size 12 --dropout 0.0 --lr 1e-3 --min-lr 1e-4 --warmup-iters 100 \
      --max-iters 2000 --lr-decay-iters 2000 --eval-iters 20 --eval-interval 250
  # time 10 training steps only
  torch_gpt.py ... --bench-steps 10
  # bigram baseline
  torch_gpt.py --model bigram --batch-size 32 --block-size 8 --lr 1e-2 ...

The last line printed is always one JSON object (machine readable).
"""
import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# The corpus where the course's binaries download it (data/ at the top of the crate), or
# $GPT_DATA as for them.
DEFAULT_DATA = os.environ.get("GPT_DATA") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "data", "tinyshakespeare.txt")


# ----------------------------------------------------------------------------
# model

class SelfAttention(nn.Module):
    """Causal multi-head self-attention using the fused SDPA kernel."""

    def __init__(self, n_embd, n_head, dropout, bias):
        super().__init__()
        if n_embd % n_head != 0:
            raise ValueError(f"n_embd {n_embd} not divisible by n_head {n_head}")
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.out = nn.Linear(n_embd, n_embd, bias=bias)
        self.out.is_residual_proj = True
        self.p_drop = dropout
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x):
        b, t, c = x.shape
        hs = c // self.n_head
        q, k, v = self.qkv(x).split(c, dim=2)
        # (b, t, c) -> (b, nh, t, hs)
        q = q.view(b, t, self.n_head, hs).transpose(1, 2)
        k = k.view(b, t, self.n_head, hs).transpose(1, 2)
        v = v.view(b, t, self.n_head, hs).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None,
            dropout_p=self.p_drop if self.training else 0.0,
            is_causal=True)
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.resid_drop(self.out(y))


class FeedForward(nn.Module):
    def __init__(self, n_embd, dropout, bias):
        super().__init__()
        self.up = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.down = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.down.is_residual_proj = True
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.down(F.gelu(self.up(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), x + mlp(ln(x))."""

    def __init__(self, n_embd, n_head, dropout, bias):
        super().__init__()
        self.ln_attn = nn.LayerNorm(n_embd, bias=bias)
        self.attn = SelfAttention(n_embd, n_head, dropout, bias)
        self.ln_mlp = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = FeedForward(n_embd, dropout, bias)

    def forward(self, x):
        x = x + self.attn(self.ln_attn(x))
        x = x + self.mlp(self.ln_mlp(x))
        return x


class CharGPT(nn.Module):
    def __init__(self, vocab_size, block_size, n_layer, n_head, n_embd, dropout, bias):
        super().__init__()
        self.block_size = block_size
        self.n_layer = n_layer
        self.n_embd = n_embd
        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            [Block(n_embd, n_head, dropout, bias) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        # weight tying: the output projection shares the token embedding matrix
        self.head.weight = self.tok_emb.weight
        self._init_weights()

    def _init_weights(self):
        resid_std = 0.02 / math.sqrt(2 * self.n_layer)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                std = resid_std if getattr(m, "is_residual_proj", False) else 0.02
                nn.init.normal_(m.weight, mean=0.0, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
        # note: head.weight is tok_emb.weight; the Embedding init runs after
        # (or before) the Linear init, either way std 0.02.

    def forward(self, idx, targets=None):
        b, t = idx.shape
        if t > self.block_size:
            raise ValueError(f"sequence length {t} > block_size {self.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for blk in self.blocks:
            x = blk(x)
        logits = self.head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


class Bigram(nn.Module):
    """Lookup table of next-char logits (vocab x vocab)."""

    def __init__(self, vocab_size, block_size):
        super().__init__()
        self.block_size = block_size
        self.table = nn.Embedding(vocab_size, vocab_size)  # default N(0,1) init

    def forward(self, idx, targets=None):
        logits = self.table(idx)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


@torch.no_grad()
def generate(model, idx, n_new, temperature, top_k):
    for _ in range(n_new):
        ctx = idx[:, -model.block_size:]
        logits, _ = model(ctx)
        logits = logits[:, -1, :] / max(temperature, 1e-8)
        if top_k and top_k > 0:
            kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        nxt = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
        idx = torch.cat([idx, nxt], dim=1)
    return idx


# ----------------------------------------------------------------------------
# accounting

def param_counts(model):
    total = sum(p.numel() for p in model.parameters())  # tied weights counted once
    non_emb = total
    if isinstance(model, CharGPT):
        non_emb -= model.pos_emb.weight.numel()  # position lookup does no matmul
    return total, non_emb


def flops_per_token(model, args):
    """Training FLOPs per token: 6*N (fwd+bwd matmuls) + attention term.

    Attention term: per layer, QK^T and att@V are each 2*T*d FLOPs per token in
    the forward pass, x3 for fwd+bwd -> 12*L*T*d (full T, i.e. not halved for
    the causal mask; same convention as the PaLM/nanoGPT MFU estimate).
    N excludes the position embedding (a lookup); the tied token embedding is
    counted once, since it is used as the lm-head matmul.
    """
    if not isinstance(model, CharGPT):
        return 0, 0, 0  # bigram: a table lookup, no matmul FLOPs to speak of
    _, n = param_counts(model)
    attn = 12 * args.n_layer * args.block_size * args.n_embd
    return 6 * n + attn, 6 * n, attn


# ----------------------------------------------------------------------------
# training helpers

def lr_at(it, args):
    if not args.decay_lr:
        return args.lr
    if args.warmup_iters > 0 and it < args.warmup_iters:
        return args.lr * (it + 1) / args.warmup_iters
    if it >= args.lr_decay_iters:
        return args.min_lr
    span = max(1, args.lr_decay_iters - args.warmup_iters)
    frac = (it - args.warmup_iters) / span
    cosine = 0.5 * (1.0 + math.cos(math.pi * frac))
    return args.min_lr + cosine * (args.lr - args.min_lr)


def make_optimizer(model, args):
    decay, no_decay = [], []
    seen = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    kw = {}
    if args.fused_adamw:
        kw["fused"] = True
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), **kw)


def loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--model", choices=["gpt", "bigram"], default="gpt")
    p.add_argument("--name", default="", help="label copied into the JSON line")
    # architecture
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--bias", action="store_true",
                   help="biases in Linear/LayerNorm (default off, like nanoGPT's train.py)")
    # optimisation
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr", type=float, default=1e-4)
    p.add_argument("--warmup-iters", type=int, default=100)
    p.add_argument("--lr-decay-iters", type=int, default=None,
                   help="default: max-iters")
    p.add_argument("--no-decay-lr", dest="decay_lr", action="store_false",
                   help="constant learning rate")
    p.add_argument("--max-iters", type=int, default=2000)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.99)
    p.add_argument("--grad-clip", type=float, default=1.0, help="0 disables")
    p.add_argument("--fused-adamw", action="store_true")
    # evaluation / logging
    p.add_argument("--eval-interval", type=int, default=250)
    p.add_argument("--eval-iters", type=int, default=20)
    p.add_argument("--log-interval", type=int, default=0,
                   help="print train loss every N steps (0: only at evals)")
    # runtime
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--bench-steps", type=int, default=0,
                   help="time N training steps after warm-up, print, exit")
    p.add_argument("--bench-warmup", type=int, default=3)
    # sampling
    p.add_argument("--sample", type=int, default=0, help="generate N chars at the end")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=200)
    args = p.parse_args(argv)
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.max_iters
    return args


def main(argv=None):
    args = parse_args(argv)
    t_start = time.perf_counter()
    load_start = loadavg()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    with open(args.data, "r", encoding="utf-8") as f:
        text = f.read()
    chars = sorted(set(text))
    vocab_size = len(chars)
    stoi = {ch: i for i, ch in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n_train = int(0.9 * len(data))
    splits = {"train": data[:n_train], "val": data[n_train:]}
    print(f"data: {len(text):,} chars, vocab {vocab_size}, "
          f"train {n_train:,} / val {len(data) - n_train:,}")

    def get_batch(split):
        d = splits[split]
        ix = torch.randint(len(d) - args.block_size, (args.batch_size,))
        x = torch.stack([d[i:i + args.block_size] for i in ix.tolist()])
        y = torch.stack([d[i + 1:i + 1 + args.block_size] for i in ix.tolist()])
        return x, y

    if args.model == "gpt":
        model = CharGPT(vocab_size, args.block_size, args.n_layer, args.n_head,
                        args.n_embd, args.dropout, args.bias)
    else:
        model = Bigram(vocab_size, args.block_size)
    n_params, n_params_ne = param_counts(model)
    fpt, fpt_dense, fpt_attn = flops_per_token(model, args)
    tokens_per_step = args.batch_size * args.block_size
    print(f"model {args.model}: {n_params:,} params ({n_params_ne:,} excl. pos emb), "
          f"{fpt / 1e6:.3f} MFLOP/token train, {tokens_per_step} tokens/step, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    optimizer = make_optimizer(model, args)
    fwd = torch.compile(model) if args.compile else model

    @torch.no_grad()
    def estimate_loss():
        out = {}
        model.eval()
        for split in ("train", "val"):
            losses = torch.zeros(args.eval_iters)
            for k in range(args.eval_iters):
                x, y = get_batch(split)
                _, loss = fwd(x, y)
                losses[k] = loss.item()
            out[split] = losses.mean().item()
        model.train()
        return out

    def train_step(it):
        lr = lr_at(it, args)
        for g in optimizer.param_groups:
            g["lr"] = lr
        x, y = get_batch("train")
        _, loss = fwd(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        return loss.item(), lr

    config = {k: v for k, v in vars(args).items() if k != "data"}
    config["vocab_size"] = vocab_size
    base = {
        "name": args.name, "torch": torch.__version__, "python": platform.python_version(),
        "threads": torch.get_num_threads(), "config": config,
        "params": n_params, "params_non_embedding": n_params_ne,
        "flops_per_token": fpt, "flops_per_token_6N": fpt_dense,
        "flops_per_token_attn": fpt_attn, "tokens_per_step": tokens_per_step,
    }

    def rates(step_times):
        med = statistics.median(step_times)
        tps = tokens_per_step / med
        return {"median_ms_per_step": round(med * 1e3, 3),
                "mean_ms_per_step": round(statistics.fmean(step_times) * 1e3, 3),
                "min_ms_per_step": round(min(step_times) * 1e3, 3),
                "tokens_per_s": round(tps, 1),
                "achieved_gflops": round(fpt * tps / 1e9, 3) if fpt else None}

    model.train()
    if args.bench_steps > 0:
        for it in range(args.bench_warmup):
            train_step(it)
        times = []
        for it in range(args.bench_warmup, args.bench_warmup + args.bench_steps):
            t0 = time.perf_counter()
            train_step(it)
            times.append(time.perf_counter() - t0)
        r = rates(times)
        print(f"bench: {args.bench_steps} steps after {args.bench_warmup} warm-up: "
              f"median {r['median_ms_per_step']:.2f} ms/step, "
              f"{r['tokens_per_s']:.0f} tokens/s, {r['achieved_gflops']} GFLOP/s")
        res = dict(base, mode="bench", bench_steps=args.bench_steps,
                   bench_warmup=args.bench_warmup,
                   step_ms=[round(t * 1e3, 2) for t in times], **r,
                   wall_time_s=round(time.perf_counter() - t_start, 2),
                   loadavg_start=load_start, loadavg_end=loadavg())
        print(json.dumps(res))
        return 0

    step_times = []
    history = []
    t_train = time.perf_counter()
    eval_time = 0.0
    last_loss = float("nan")
    for it in range(args.max_iters):
        if args.eval_interval > 0 and it % args.eval_interval == 0:
            te = time.perf_counter()
            ev = estimate_loss()
            eval_time += time.perf_counter() - te
            history.append({"iter": it, **{k: round(v, 4) for k, v in ev.items()}})
            print(f"step {it}: train {ev['train']:.4f}, val {ev['val']:.4f}, "
                  f"lr {lr_at(it, args):.2e}, {time.perf_counter() - t_train:.1f}s", flush=True)
        t0 = time.perf_counter()
        last_loss, lr = train_step(it)
        step_times.append(time.perf_counter() - t0)
        if args.log_interval and it % args.log_interval == 0:
            print(f"iter {it}: loss {last_loss:.4f}, {step_times[-1] * 1e3:.1f} ms", flush=True)
    te = time.perf_counter()
    ev = estimate_loss()
    eval_time += time.perf_counter() - te
    history.append({"iter": args.max_iters, **{k: round(v, 4) for k, v in ev.items()}})
    train_wall = time.perf_counter() - t_train
    print(f"step {args.max_iters}: train {ev['train']:.4f}, val {ev['val']:.4f}, "
          f"{train_wall:.1f}s", flush=True)

    sample_text = None
    if args.sample > 0:
        torch.manual_seed(args.seed)
        model.eval()
        start = torch.tensor([[stoi.get("\n", 0)]], dtype=torch.long)
        out = generate(model, start, args.sample, args.temperature, args.top_k)
        sample_text = "".join(chars[i] for i in out[0].tolist())
        print("---- sample ----")
        print(sample_text)
        print("---- end sample ----")

    r = rates(step_times)
    res = dict(base, mode="train", iters=args.max_iters,
               final_train_loss=round(ev["train"], 4), final_val_loss=round(ev["val"], 4),
               last_batch_loss=round(last_loss, 4), evals=history, **r,
               train_loop_s=round(train_wall, 2), eval_s=round(eval_time, 2),
               wall_time_s=round(time.perf_counter() - t_start, 2),
               loadavg_start=load_start, loadavg_end=loadavg())
    if sample_text is not None:
        res["sample_chars"] = args.sample
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
