"""
Speed and memory of the paper's InfViT 4L-64H (width 1024, 64 heads, patch 16) on one GPU, for each
attention kind, from 224^2 to 9216^2 images (197 to 331,777 tokens).

    python bench.py                                                  # the whole sweep
    python bench.py --kinds pure,pure-chunked --sizes 1024,4096 --train_kinds pure --train_sizes 4096
    python bench.py --kinds linear,softmax --sizes 1024 --compile true   # torch.compile'd models
    python bench.py --cpu true --out_dir /tmp/bench                  # a smoke run on the CPU: seconds, tiny images

Kinds: linear (Linear-InfSA); softmax (PyTorch's fused SDPA: the strong baseline); softmax-mat
(softmax(q k^T / sqrt(d_h)) built in full, O(N^2) memory: the kind of baseline the paper's 13.4x is
measured against); pure (Pure-InfSA, K = 3, as the model runs it: on CUDA from model.FUSED_MIN_TOKENS
on, each hop one Triton kernel of relu_hop.py); pure-chunked (the same sum by a loop over blocks of rows of
A_hat, recomputed every hop: the baseline of the fused hops). Inference: bf16 weights under
inference_mode; a training step (forward, backward, SGD): fp32 weights under bf16 autocast.
Each row: two warm-up calls (the first compiles, where anything does), then the median of --runs
calls timed by CUDA events (fast rows: about 0.5 s of calls; never past --budget_s; a row whose first
call alone exceeds it reports that call). Out of memory is a row. MFU = the model's matmul FLOPs
per second / the bf16 matmul rate measured at the start of the run. The model's FLOPs count attention as
its formula: pure (2 + 2K) N^2 d per layer (S once, then K products A_hat z). The kernel does more: K
passes over the N^2 scores, each computing S again and ReLU(S) z (4 N^2 d; the first also gives the
norm), 4K N^2 d in all, so its own rate is 4K / (2 + 2K) = 1.5x the MFU's at K = 3. On the CPU (--cpu
true: fp32, a 2-layer model, images of CPU_SIZES unless --sizes says otherwise, at most CPU_MAX pixels a
side) nothing is compared with a matmul rate: no MFU.
"""
import gc
import json
import math
import os
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from datetime import datetime
from types import SimpleNamespace
from unittest import mock

import torch

import data
import infsa
import model
from configurator import config_defaults, configure, die
from model import ViT, ViTConfig, paper_4l64h

KINDS = ("linear", "softmax", "softmax-mat", "pure", "pure-chunked")
# -----------------------------------------------------------------------------
out_dir = "bench_out"       # bench.json, bench.md and bench.png go here
kinds = "linear,softmax-mat,softmax,pure"  # inference rows, in this order
sizes = "224,512,1024,2048,4096,9216"
train_kinds = "linear,softmax"  # training-step rows
train_sizes = "1024,4096"
batch = 0                   # images per call; 0 = round(8 (1024 / size)^2), between 1 and 64
runs = 5                    # timed calls per row (fast rows: about 0.5 s of calls, at most 100)
budget_s = 60.0             # seconds of timed calls per row, at most (the warm-up call aside)
compile = False             # torch.compile every model of this run
chunk_gb = 48.0             # pure-chunked: rows of A_hat per block chosen to fit this much
matmul_n = 8192             # the size of the matmul whose rate MFU is measured against
cpu = False                 # tiny shapes in fp32 on the CPU: a smoke run
# -----------------------------------------------------------------------------
DEFAULTS = config_defaults(globals())
CPU_SIZES, CPU_MAX = "32,64", 256  # the CPU smoke run's default sizes, and its largest (seconds on 2 cores)


def chunked_pure_infsa(q, k, v, gamma, hops, chunk, eps=1e-6):
    """pure_infsa holding at most `chunk` rows of S = ReLU(q k^T / sqrt(d)) at a time: one pass sums
    ||S||_F^2 over row blocks, then each hop z_t = gamma S z_{t-1} / ||S||_F recomputes S block by block.
    O(N chunk) memory, S computed hops + 1 times."""
    blocks = q.split(chunk, dim=-2)  # each (B, H, chunk, d)
    norm = sum(infsa.frobenius_norm(infsa.relu_scores(qb, k)).square() for qb in blocks).sqrt()  # (B, H, 1, 1)
    z, y = v, 0
    for _ in range(hops):
        Sz = torch.cat([infsa.relu_scores(qb, k) @ z for qb in blocks], dim=-2)  # (B, H, N, d)
        z = (gamma * Sz / (norm + eps)).to(v.dtype)
        y = y + z
    return y


def baseline(kind, cfg, B, mem_gb):
    """What a baseline swaps into the model while its row runs: softmax-mat builds P in full;
    pure-chunked runs chunked_pure_infsa."""
    if kind == "softmax-mat":
        return mock.patch.object(infsa, "softmax_attention", lambda q, k, v: infsa.softmax_attention_materialized(q, k, v)[0])
    if kind == "pure-chunked":
        N = cfg.n_tokens  # rows per block: S's block in bf16 plus its fp32 norm copy, ~10 bytes a score
        C = N if 10 * B * cfg.n_head * N * N <= mem_gb * 1e9 else 2 ** int(math.log2(mem_gb * 1e9 / (10 * B * cfg.n_head * N)))
        return mock.patch.object(model, "pure_attention", lambda q, k, v, g, hops: chunked_pure_infsa(q, k, v, g, hops, max(C, 16)))
    return nullcontext()


def timed(fn, n, cuda):
    """Seconds of each of n calls: CUDA events on the GPU (one sync at the end), else the wall clock."""
    if not cuda:
        out = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
        return out
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for a, b in ev:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) / 1e3 for a, b in ev]


def matmul_rate(n, dev, dtype):
    """Dense matmul rate in TFLOP/s: 2 n^3 / the median of 10 timed (n x n) @ (n x n), after 3 warm-ups."""
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    timed(lambda: a @ b, 3, dev.type == "cuda")
    return 2 * n ** 3 / statistics.median(timed(lambda: a @ b, 10, dev.type == "cuda")) / 1e12


def measure(mode, kind, S, cfg, B, dev, opt):
    """One row: build the model, one warm-up call, then timed calls (opt: runs, budget_s, compile, chunk_gb).
    Out of memory is a status, not a crash."""
    cuda, training = dev.type == "cuda", mode == "train"
    with torch.device("meta"):
        flops = B * ViT(cfg, verbose=False).flops_per_image(training)
    row = dict(mode=mode, kind=kind, image=S, tokens=cfg.n_tokens, batch=B, compiled=opt.compile, status="ok", flops=flops)
    torch._dynamo.reset()  # every row compiles afresh: no recompile limits carried between rows
    try:
        with torch.device(dev):
            m = ViT(cfg, verbose=False).to(torch.bfloat16 if cuda and not training else torch.float32).train(training)
        x = torch.randn(B, cfg.in_chans, S, S, device=dev, dtype=next(m.parameters()).dtype)
        y = torch.randint(0, cfg.n_classes, (B,), device=dev)
        f, sgd = torch.compile(m) if opt.compile else m, torch.optim.SGD(m.parameters(), lr=1e-6)
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and training else nullcontext()

        def call():
            if not training:
                return f(x)[0]
            with amp:
                loss = f(x, y)[1]
            loss.backward()
            sgd.step()
            sgd.zero_grad(set_to_none=True)

        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with baseline(kind, cfg, B, opt.chunk_gb), (nullcontext() if training else torch.inference_mode()):
            out = []
            t = timed(lambda: out.append(call()), 1, cuda)  # the warm-up call (compiles, where anything does)
            row["finite"] = None if training else bool(torch.isfinite(out.pop()).all())  # no NaN in the logits
            if t[0] < opt.budget_s:
                t = timed(call, 1, cuda)  # a second warm-up: the cost of a call without the compile
            n = min(max(opt.runs, int(0.5 / t[0])), 100, int(opt.budget_s / t[0]))  # fast rows: ~0.5 s of calls
            if n >= 1:
                t = timed(call, n, cuda)
            else:
                row["status"] = "ok (the warm-up call only)"
        row.update(runs=max(n, 1), s=statistics.median(t), img_s=B / statistics.median(t))
        if cuda:
            row["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    except Exception as e:  # noqa: BLE001 -- one configuration must not end the sweep
        oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()
        row["status"] = "oom" if oom else f"error: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row

# -----------------------------------------------------------------------------
# reporting


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def table(res):
    """Markdown: every row, then the speed ratios of each size (inference)."""
    line = lambda cells: "| " + " | ".join(map(str, cells)) + " |"  # noqa: E731
    mm = res["matmul_tflops"]
    t = [f"{res['device']} | torch {res['torch']} | {res['date']} | " + (f"measured bf16 matmul rate {mm:.0f} TFLOP/s"
         if mm else "no matmul rate, no MFU (CPU)") + " | " + " ; ".join(f"`{c}`" for c in res["commands"]) + "\n",
         line(["mode", "kind", "image", "tokens", "batch", "status", "img/s", "s per call", "runs", "peak GB", "TFLOP/s", "MFU"]),
         line(["---"] * 12)]
    for r in sorted(res["rows"], key=lambda r: (r["mode"] != "infer", KINDS.index(r["kind"]), r["compiled"], r["image"])):
        tf = r["flops"] / r["s"] / 1e12 if r.get("s") else None
        t.append(line([r["mode"], r["kind"] + (" (compiled)" if r["compiled"] else ""), f"{r['image']}²", f"{r['tokens']:,}", r["batch"], r["status"],
                       fmt(r.get("img_s"), ",.4g"), fmt(r.get("s"), ".4g"), r.get("runs", "-"), fmt(r.get("peak_gb"), ".2f"),
                       fmt(tf, ".4g"), fmt(tf and mm and tf / mm, ".1%")]))
    t += ["\nInference, img/s ratios between kinds measured in this run:\n",
          line(["image", "linear ÷ softmax-mat", "linear ÷ softmax (SDPA)", "pure ÷ pure-chunked"]), line(["---"] * 4)]
    speed = {(r["kind"], r["image"]): r.get("img_s") for r in res["rows"] if r["mode"] == "infer" and not r["compiled"]}
    ratio = lambda a, b, S: f"{speed[a, S] / speed[b, S]:.3g}×" if speed.get((a, S)) and speed.get((b, S)) else "-"  # noqa: E731
    for S in sorted({S for _, S in speed}):
        t.append(line([f"{S}²", ratio("linear", "softmax-mat", S), ratio("linear", "softmax", S), ratio("pure", "pure-chunked", S)]))
    return "\n".join(t) + "\n"


def plot(res, path):
    """Inference without compile, log-log, one line per kind: img/s and peak memory against tokens; x: out of memory
    (at the bottom of the speed panel, at the GPU's memory in the other)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axs = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    rows = [r for r in res["rows"] if r["mode"] == "infer" and not r["compiled"]]
    floor = min([r["img_s"] for r in rows if r.get("img_s")] + [1.0]) / 3
    for i, k in enumerate(sorted({r["kind"] for r in rows}, key=KINDS.index)):
        rs = sorted((r for r in rows if r["kind"] == k), key=lambda r: r["tokens"])
        oom = [r["tokens"] for r in rs if r["status"] == "oom"]
        for ax, key, at in ((axs[0], "img_s", floor), (axs[1], "peak_gb", res["gpu_gb"])):
            ax.plot([r["tokens"] for r in rs if r.get(key)], [r[key] for r in rs if r.get(key)], "o-", color=f"C{i}", label=k)
            if at:
                ax.plot(oom, [at] * len(oom), "x", color=f"C{i}", ms=10, mew=2)
    for ax, label in zip(axs, ("images / s (inference)", "peak GPU memory (GB)")):
        ax.set(xlabel="tokens N", ylabel=label)
        if any(len(line.get_ydata()) for line in ax.get_lines()):
            ax.set(xscale="log", yscale="log")
            ax.legend(fontsize=8, title="x: out of memory", title_fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"InfViT 4L-64H on {res['device']}, torch {res['torch']}, bf16, not compiled", fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def finish(res, folder):
    """bench.json (atomically, after every row), bench.md and bench.png."""
    os.makedirs(folder, exist_ok=True)
    data.write_atomic(os.path.join(folder, "bench.json"), lambda f: json.dump(res, f, indent=1))
    md = table(res)
    data.write_atomic(os.path.join(folder, "bench.md"), lambda f: f.write(md))
    plot(res, os.path.join(folder, "bench.png"))
    return md

# -----------------------------------------------------------------------------


def ints(key, value):
    try:
        vals = [int(v) for v in value.split(",") if v]
    except ValueError:
        vals = [0]
    if not all(v > 0 for v in vals):
        die(f"--{key} takes positive integers separated by commas, e.g. 224,512; got {value!r}")
    if not vals:
        die(f"--{key} {value!r} names no size: nothing to measure")
    return vals


def main(argv):
    cfg, given = configure(argv, DEFAULTS, __doc__, dict(runs=(1, math.inf), matmul_n=(1, math.inf)))
    opt = SimpleNamespace(**cfg)
    cpu = opt.cpu
    if not cpu and not torch.cuda.is_available():
        die("no CUDA device: use --cpu true for the smoke run")
    if cpu:  # a smoke run: the GPU sweep's default sizes would take hours and terabytes here
        opt.sizes, opt.train_sizes = (cfg[k] if k in given else CPU_SIZES for k in ("sizes", "train_sizes"))
    plan = [("infer", k, S) for k in opt.kinds.split(",") if k for S in ints("sizes", opt.sizes)]
    plan += [("train", k, S) for k in opt.train_kinds.split(",") if k for S in ints("train_sizes", opt.train_sizes)]
    if not plan:
        die("nothing to measure: give --kinds and --sizes (or --train_kinds and --train_sizes)")
    configs = {}
    for mode, k, S in plan:
        if k not in KINDS:
            die(f"unknown kind {k!r}; kinds are {', '.join(KINDS)}")
        if cpu and S > CPU_MAX:
            die(f"--cpu true is a smoke run: images up to {CPU_MAX}² (a 2-layer model, fp32); got {S}")
        try:
            base = ViTConfig(image_size=S, patch_size=8, n_layer=2, n_head=4, n_embd=64, mlp_ratio=4.0) if cpu \
                else paper_4l64h(image_size=S)
            configs[k, S] = replace(base, attn=k.split("-")[0], hops=3, n_classes=10 if cpu else 1000)
        except ValueError as e:
            die(f"{e}; change --sizes")
    dev, dt = (torch.device("cpu"), torch.float32) if cpu else (torch.device("cuda"), torch.bfloat16)
    rate = None if cpu else matmul_rate(opt.matmul_n, dev, dt)  # a CPU's rate at tiny shapes means nothing: no MFU
    res = dict(device="CPU" if cpu else torch.cuda.get_device_name(), torch=torch.__version__,
               commands=["python bench.py " + " ".join(argv)],
               date=datetime.now().isoformat(timespec="seconds"), matmul_tflops=rate, rows=[],
               gpu_gb=None if cpu else torch.cuda.get_device_properties(0).total_memory / 1e9)
    torch._dynamo.config.fail_on_recompile_limit_hit = True  # an unfused fallback would time the wrong thing
    print(f"{res['device']} | torch {res['torch']} | matmul {fmt(rate, '.1f')} TFLOP/s", flush=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if cpu else threads)  # tiny shapes: a second thread only waits (100x slower on a busy CPU)
    try:
        for mode, k, S in plan:
            B = opt.batch or (2 if cpu else min(64, max(1, round(8 * (1024 / S) ** 2))))
            row = measure(mode, k, S, configs[k, S], B, dev, opt)
            res["rows"].append(row)
            print(f"{mode} {k:<12} {S}² B={row['batch']}: {row['status']}, {fmt(row.get('img_s'), ',.4g')} img/s, "
                  f"{fmt(row.get('peak_gb'), '.2f')} GB", flush=True)
            finish(res, opt.out_dir)  # a run killed by a timeout still leaves every row it measured
    finally:
        torch.set_num_threads(threads)
    print(finish(res, opt.out_dir))
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
