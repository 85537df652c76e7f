"""
Speed and memory of the paper's InfViT 4L-64H (width 1024, 64 heads, patch 16) with each
attention kind, from 224^2 to 9216^2 images (197 to 331,777 tokens), on one GPU.

    python bench.py --out_dir bench_out            # whole GPU sweep, bounded by --total_s
    python bench.py --kinds linear --sizes 1024    # narrow it
    python bench.py --cpu --out_dir /tmp/bench     # tiny fp32 smoke run, seconds
    python bench.py --tokens_cpu                   # Linear-InfSA alone at 1,048,576 tokens, CPU
    python bench.py --replot bench_out/bench_results.json   # tables + figure again

Kinds: softmax      softmax through PyTorch SDPA (fused; never builds N x N): the strong baseline
       softmax-mat  P = softmax(q k^T / sqrt(d_h)) built in full, then P v (unfused, O(N^2) memory):
                    the kind of baseline the paper's 13.4x is measured against. The model has no
                    switch for it: materialized_softmax() swaps the function the model calls.
       pure-K<n>    Pure-InfSA with n hops; chunked when the whole A_hat would not fit --pure_mem_gb
       linear       Linear-InfSA
Precision: inference casts the weights to bf16 (no autocast: nothing is re-cast on each call, so it
is faster); training steps keep fp32 weights under torch.autocast(bf16). --cpu runs fp32.
Timing: warm-up calls, then CUDA events around each of --runs calls and their median (wall clock
on the CPU). MFU = achieved FLOP/s / the bf16 matmul rate measured at the start of the same run
(--matmul_n cubed), so it travels between machines. Two FLOP counts: ViT.flops_per_image (every
matmul, attention included) and the issue's 24 N d^2 L (qkv + proj + MLP); the 50% target uses the latter.
Budgets: a row whose timed runs would not fit --budget_s (predicted from the same kind's last row,
then from its warm-up) is 'skipped: over budget' with an estimate; compile time counts against
--total_s only; an out-of-memory error is a row with status 'oom'. torch.compile (default on CUDA)
applies to linear and softmax inference at --compile_sizes only, next to their eager rows.
"""
import argparse, gc, json, math, os, resource, signal, statistics, time
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from datetime import datetime

import torch

import infsa
from model import ViT, ViTConfig, paper_4l64h

KIND_ORDER = ("linear", "softmax", "softmax-mat", "pure-K3", "pure-K1")  # plots and tables


@contextmanager
def materialized_softmax():
    """Within the block, the model's softmax attention builds P in full (infsa.softmax_attention_materialized)."""
    sdpa = infsa.softmax_attention
    infsa.softmax_attention = lambda q, k, v: infsa.softmax_attention_materialized(q, k, v)[0]
    try:
        yield
    finally:
        infsa.softmax_attention = sdpa


def parse_kind(kind):
    """'linear' | 'softmax' | 'softmax-mat' | 'pure-K<n>' -> (attn, hops)."""
    if kind in ("linear", "softmax", "softmax-mat"):
        return kind.split("-")[0], 3
    if kind.startswith("pure-K") and kind[6:].isdigit() and int(kind[6:]) >= 1:
        return "pure", int(kind[6:])
    raise ValueError(f"unknown kind {kind!r}: use linear, softmax, softmax-mat or pure-K<hops>")


def auto_chunk(cfg, batch, mem_gb):
    """Rows of A_hat per Pure-InfSA block: 0 (whole matrix) when ~10 bytes per score (bf16 scores plus
    the fp32 copies of the Frobenius norm) for B*H*N*N scores fit mem_gb, else the largest power of 2 that does."""
    N, BH = cfg.n_tokens, batch * cfg.n_head
    if 10 * BH * N * N <= mem_gb * 1e9:
        return 0
    return max(16, 2 ** int(math.log2(max(1.0, mem_gb * 1e9 / (10 * BH * N)))))


def make_config(kind, size, batch, args):
    attn, hops = parse_kind(kind)
    if args.cpu:  # tiny shape for the smoke run
        cfg = ViTConfig(image_size=size, patch_size=8, n_classes=10, n_layer=2, n_head=4, n_embd=64,
                        mlp_ratio=4.0, attn=attn, hops=hops)
    else:
        cfg = replace(paper_4l64h(attn, size), hops=hops)
    if attn == "pure":
        cfg = replace(cfg, chunk=args.chunk or auto_chunk(cfg, batch, args.pure_mem_gb))
    return cfg


def flops_24(cfg, training=False):
    """The issue's count: 24 N d^2 L (qkv 6, proj 2, MLP 16 N d^2 per layer), x3 for a training step."""
    return 24 * cfg.n_tokens * cfg.n_embd ** 2 * cfg.n_layer * (3 if training else 1)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, runs, dev):
    """Seconds of each of `runs` calls: CUDA events on the GPU (one sync at the end), else wall clock."""
    if dev.type == "cuda":
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(runs)]
        for a, b in ev:
            a.record(); fn(); b.record()
        torch.cuda.synchronize()
        return [a.elapsed_time(b) / 1e3 for a, b in ev]
    out = []
    for _ in range(runs):
        t = time.perf_counter(); fn(); out.append(time.perf_counter() - t)
    return out


def matmul_rate(n, dev, dtype, runs=10):
    """Measured dense matmul rate, TFLOP/s: 2 n^3 / median time of an (n x n) @ (n x n) product."""
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(dev)
    return 2 * n ** 3 / statistics.median(timed(lambda: a @ b, runs, dev)) / 1e12


def guarded(row, fn):
    """fn(row) fills row; an out-of-memory error becomes status 'oom', any other error 'error: ...'."""
    try:
        fn(row)
    except Exception as e:  # noqa: BLE001 -- one bad configuration must not end the sweep
        msg = str(e)
        oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in msg.lower() or "ALLOC_FAILED" in msg
        row["status"] = "oom" if oom else f"error: {type(e).__name__}: {(msg.splitlines() or [''])[0][:200]}"
    gc.collect()  # the traceback's frames held the row's tensors
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def measure(row, cfg, args, dev, row_budget):
    """Build the model, warm up, time; fills img_s, ms, runs, peak_gb (or a skip with an estimate)."""
    cuda, train, B, S = dev.type == "cuda", row["mode"] == "train", row["batch"], row["image"]
    with torch.device(dev):
        m = ViT(cfg, verbose=False)
    if cuda and not train:
        m = m.to(torch.bfloat16)
    m.train(train)
    x = torch.randn(B, cfg.in_chans, S, S, device=dev, dtype=next(m.parameters()).dtype)
    y = torch.randint(0, cfg.n_classes, (B,), device=dev)
    f = m
    if row["compiled"]:
        from torch._dynamo.utils import counters
        torch._dynamo.reset()  # every resolution is a new model: start from a clean cache, static shapes
        counters.clear()
        f = torch.compile(m, dynamic=False)
    opt = torch.optim.SGD(m.parameters(), lr=1e-6) if train else None
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and train else nullcontext()

    def step():
        if train:
            with amp:
                _, loss = f(x, y)
            loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        else:
            f(x)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with (materialized_softmax() if row["kind"] == "softmax-mat" else nullcontext()), \
         (nullcontext() if train else torch.inference_mode()):
        t0 = time.perf_counter(); step(); sync(dev); first = time.perf_counter() - t0
        end = time.perf_counter() + row_budget  # compile time (the first call) is not in the row budget
        if row["compiled"]:
            row["compile_s"] = round(first, 2)
            row["graphs"], row["graph_breaks"] = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
        else:
            end -= first
        est = None if row["compiled"] else first
        for _ in range(max(args.warmup - 1, 1 if row["compiled"] else 0)):
            if est is not None and (est > 1.0 or est * (1 + args.min_runs) > end - time.perf_counter()):
                break  # a slow call needs no more warming, and the budget is for timed runs
            est = timed(step, 1, dev)[0]
        row["est_s"] = est
        runs = min(args.runs, int((end - time.perf_counter()) / max(est, 1e-9)))
        if runs < args.min_runs:
            row.update(status="skipped: over budget", completed=True, img_s_est=B / est,
                       note=f"one call takes {est:.3g} s")
        else:
            med = statistics.median(timed(step, runs, dev))
            row.update(runs=runs, ms=med * 1e3, img_s=B / med, est_s=med)
    if cuda:
        row["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9


def run_task(task, args, dev, hist, left_total, rate):
    mode, kind, size, compiled = task
    train = mode == "train"
    B = args.batch_of(size)
    cfg = make_config(kind, size, B, args)
    with torch.device("meta"):
        fl = ViT(cfg, verbose=False).flops_per_image(training=train)
    N, d, L = cfg.n_tokens, cfg.n_embd, cfg.n_layer
    row = dict(mode=mode, kind=kind, image=size, tokens=N, batch=B, compiled=compiled,
               dtype="fp32" if dev.type == "cpu" else ("bf16 autocast" if train else "bf16"),
               hops=cfg.hops if cfg.attn == "pure" else None, chunk=cfg.chunk if cfg.attn == "pure" else None,
               flops_model=fl, flops_24=flops_24(cfg, train), status="ok")
    rechunk = cfg.attn == "pure" and 0 < cfg.chunk < N  # chunked Pure recomputes the scores every hop
    work = B * (fl + (2 * N * N * d * L * cfg.hops * (3 if train else 1) if rechunk else 0))
    budget = min(args.budget_s, left_total() - 5)
    key = (mode, kind, compiled)
    if budget <= 1 or (compiled and left_total() < args.compile_min_left_s):
        return dict(row, status="skipped: total budget")
    if key in hist:  # predict one call from this kind's last row, scaled by the work
        pred = hist[key][1] * work / hist[key][0]
        if pred * (1 + args.min_runs) > budget:
            return dict(row, status="skipped: over budget", completed=False, img_s_est=B / pred,
                        note=f"predicted from {hist[key][2]}^2: {pred:.3g} s per call")
    guarded(row, lambda r: measure(r, cfg, args, dev, budget))
    if compiled:
        torch._dynamo.reset()  # drop the compiled graphs and the model they hold
    if row.get("est_s"):
        hist[key] = (work, row["est_s"], size)
    if row.get("img_s"):
        for c in ("model", "24"):
            row[f"tflops_{c}"] = row[f"flops_{c}"] * row["img_s"] / 1e12
            row[f"mfu_{c}"] = row[f"tflops_{c}"] / rate
    return row


def best(rows, kind, size):
    """The fastest measured inference row of a kind at a size, else the first row (for its status)."""
    rs = [r for r in rows if r["mode"] == "infer" and r["kind"] == kind and r["image"] == size]
    ok = [r for r in rs if r.get("img_s")]
    return max(ok, key=lambda r: r["img_s"]) if ok else (rs[0] if rs else None)


def ratios(rows):
    out = []
    for S in sorted({r["image"] for r in rows if r["mode"] == "infer"}):
        lin, mat, sdpa = (best(rows, k, S) for k in ("linear", "softmax-mat", "softmax"))
        v = lambda r: r.get("img_s") if r else None  # noqa: E731
        out.append(dict(image=S, tokens=next(r["tokens"] for r in rows if r["image"] == S),
                        linear=v(lin), mat=v(mat), sdpa=v(sdpa),
                        mat_status=mat["status"] if mat else "-", sdpa_status=sdpa["status"] if sdpa else "-",
                        linear_over_mat=v(lin) / v(mat) if v(lin) and v(mat) else None,
                        linear_over_sdpa=v(lin) / v(sdpa) if v(lin) and v(sdpa) else None))
    return out


def fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def tables(res):
    """Markdown: one table of every row, then the speed ratios."""
    hd = (f"device: {res['device']} | torch {res['torch']} | {res['date']}\n"
          f"measured matmul rate: {res['matmul_tflops']:.1f} TFLOP/s ({res['matmul']})\n\n")
    t = ["| mode | kind | image | tokens | batch | compiled | chunk | status | img/s | ms | peak GB "
         "| TFLOP/s (model) | MFU (model) | TFLOP/s (24Nd²L) | MFU (24Nd²L) |", "|" + " --- |" * 15]
    for r in res["rows"]:
        st = r["status"] + (f" (~{r['img_s_est']:.3g} img/s)" if r.get("img_s_est") else "")
        st += f" ({r['runs']} runs)" if r.get("runs") and r["runs"] < 5 else ""
        t.append(f"| {r['mode']} | {r['kind']} | {r['image']}² | {r['tokens']} | {r['batch']} | "
                 f"{'yes' if r['compiled'] else 'no'} | {r.get('chunk') or '-'} | {st} | {fmt(r.get('img_s'))} | "
                 f"{fmt(r.get('ms'))} | {fmt(r.get('peak_gb'), '.2f')} | {fmt(r.get('tflops_model'))} | "
                 f"{fmt(r.get('mfu_model'), '.1%')} | {fmt(r.get('tflops_24'))} | {fmt(r.get('mfu_24'), '.1%')} |")
    q = ["| image | tokens | linear img/s | softmax-mat img/s | softmax (SDPA) img/s | linear ÷ mat | linear ÷ SDPA |",
         "|" + " --- |" * 7]
    x = lambda v: "-" if v is None else f"{v:.1f}×"  # noqa: E731
    for r in res["ratios"]:
        q.append(f"| {r['image']}² | {r['tokens']} | {fmt(r['linear'])} | {fmt(r['mat']) if r['mat'] else r['mat_status']} | "
                 f"{fmt(r['sdpa']) if r['sdpa'] else r['sdpa_status']} | {x(r['linear_over_mat'])} | {x(r['linear_over_sdpa'])} |")
    return hd + "\n".join(t) + "\n\nInference speed ratios (paper: 13.4× at 1024², Linear vs softmax ViT):\n\n" + "\n".join(q) + "\n"


def plot(res, path):
    """Two log-log panels, inference only, one line per kind: img/s and peak memory vs tokens;
    x = out of memory (drawn at the panel's floor / at the GPU's memory), o = an estimate over budget."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axs = plt.subplots(1, 2, figsize=(11, 4.2))
    rows = [r for r in res["rows"] if r["mode"] == "infer"]
    kinds = [k for k in KIND_ORDER if any(r["kind"] == k for r in rows)] + \
        sorted({r["kind"] for r in rows} - set(KIND_ORDER))
    sizes = sorted({r["image"] for r in rows})
    floor = min([r["img_s"] for r in rows if r.get("img_s")] + [1.0]) / 3
    for i, k in enumerate(kinds):
        bs = [best(rows, k, S) for S in sizes]
        c = f"C{i}"
        ok = [r for r in bs if r and r.get("img_s")]
        axs[0].plot([r["tokens"] for r in ok], [r["img_s"] for r in ok], "o-", color=c, label=k)
        mem = [r for r in bs if r and r.get("peak_gb")]
        axs[1].plot([r["tokens"] for r in mem], [r["peak_gb"] for r in mem], "o-", color=c, label=k)
        oom = [r["tokens"] for r in bs if r and r["status"] == "oom"]
        axs[0].plot(oom, [floor] * len(oom), "x", color=c, ms=10, mew=2)
        if res.get("gpu_gb"):
            axs[1].plot(oom, [res["gpu_gb"]] * len(oom), "x", color=c, ms=10, mew=2)
        est = [r for r in bs if r and r.get("img_s_est")]
        axs[0].plot([r["tokens"] for r in est], [r["img_s_est"] for r in est], "o", mfc="none", color=c)
    if res.get("gpu_gb"):
        axs[1].axhline(res["gpu_gb"], color="gray", ls="--", lw=1, label="GPU memory")
    for ax, yl in zip(axs, ("images / s (inference)", "peak memory (GB)")):
        ax.set(xscale="log", yscale="log", xlabel="tokens N", ylabel=yl)
        ax.grid(True, which="both", alpha=0.3)
    axs[0].legend(fontsize=8, title="x = OOM, o = estimate", title_fontsize=8)
    fig.suptitle(f"InfViT shape on {res['device']} ({res['matmul_tflops']:.0f} TFLOP/s matmul)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def tokens_cpu(ns=(2 ** 18, 2 ** 19, 2 ** 20), H=64, dh=16):
    """Linear-InfSA alone on the CPU (fp32, batch 1, 64 heads x d_h 16) at up to 1,048,576 tokens:
    time and peak RSS. q, k, v are made in place (one tensor each, no copies); at 2^20 tokens they
    take 3 x 4.3 GB, and the scores add O(N H) more, so memory grows linearly in N."""
    g = torch.full((H, 1, 1), 0.9)
    print(f"| tokens N | q,k,v GB | time s | peak RSS GB | softmax P would need (fp32) |\n|" + " --- |" * 5)
    for N in ns:
        q, k, v = (torch.empty(1, H, N, dh).normal_() for _ in range(3))  # (1, H, N, d_h)
        t = time.perf_counter()
        o = infsa.linear_infsa(q, k, v, g, expand=False)  # (1, H, 1, d_h)
        dt = time.perf_counter() - t
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB -> GB (Linux)
        print(f"| {N:,} | {3 * q.numel() * 4 / 1e9:.1f} | {dt:.2f} | {rss:.1f} | {H * N * N * 4 / 1e12:,.0f} TB |")
        del q, k, v, o


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--out_dir", default="bench_out"); a("--out", default="bench_results.json", help="JSON name in out_dir")
    a("--cpu", action="store_true", help="tiny fp32 smoke run on the CPU")
    a("--tokens_cpu", action="store_true", help="only Linear-InfSA at 2^18..2^20 tokens on the CPU")
    a("--replot", default="", help="redo tables and figure from this JSON, then exit")
    a("--kinds", default=",".join(KIND_ORDER[:1] + ("softmax-mat", "pure-K3", "softmax", "pure-K1")),
      help="comma list, run in this order (default: by importance to the claims)")
    a("--sizes", default=None, help="image sizes (default 224,...,9216; --cpu 32,64)")
    a("--batch", default=None, help="one int, or size:batch pairs (default 8*(1024/size)^2 in [1, 64]; --cpu 2)")
    a("--train_sizes", default=None, help="training-step sizes (default 1024,4096; --cpu 64)")
    a("--train_kinds", default="linear,softmax")
    a("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile (default on for CUDA)")
    a("--compile_sizes", default="1024", help="sizes that also get compiled linear/softmax inference rows")
    a("--compile_min_left_s", type=float, default=120.0, help="start a compile only with this much --total_s left")
    a("--warmup", type=int, default=None); a("--runs", type=int, default=5); a("--min_runs", type=int, default=1)
    a("--budget_s", type=float, default=None, help="per row, timed runs (default 45; --cpu 10)")
    a("--total_s", type=float, default=None, help="whole run (default 420; --cpu 60)")
    a("--chunk", type=int, default=0, help="Pure-InfSA rows per block (0 = auto from --pure_mem_gb)")
    a("--pure_mem_gb", type=float, default=48.0)
    a("--matmul_n", type=int, default=None, help="matmul size for the rate (default 8192; --cpu 256)")
    args = p.parse_args(argv)
    if args.tokens_cpu:
        return tokens_cpu()
    if args.replot:
        with open(args.replot) as fh:
            res = json.load(fh)
        return finish(res, os.path.dirname(args.replot) or ".", os.path.basename(args.replot))
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --cpu for the smoke run")
    cpu = args.cpu
    ints = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
    sizes = ints(args.sizes or ("32,64" if cpu else "224,512,1024,2048,4096,9216"))
    train_sizes = ints(args.train_sizes or ("64" if cpu else "1024,4096"))
    bmap = dict(kv.split(":") for kv in (args.batch or "").split(",") if ":" in kv)
    args.batch_of = lambda S: int(bmap.get(str(S), args.batch if args.batch and ":" not in args.batch else
                                           (2 if cpu else min(64, max(1, round(8 * (1024 / S) ** 2))))))
    args.compile = (not cpu) if args.compile is None else args.compile
    args.warmup = args.warmup or (1 if cpu else 3)
    args.budget_s, args.total_s = args.budget_s or (10 if cpu else 45), args.total_s or (60 if cpu else 420)
    kinds = [k for k in args.kinds.split(",") if k]
    for k in kinds + args.train_kinds.split(","):
        parse_kind(k)  # fail early on a typo
    t_end = time.perf_counter() + args.total_s
    left_total = lambda: t_end - time.perf_counter()  # noqa: E731
    dev = torch.device("cpu" if cpu else "cuda")
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU"
    n = args.matmul_n or (256 if cpu else 8192)
    dt = torch.float32 if cpu else torch.bfloat16
    rate = matmul_rate(n, dev, dt)
    res = dict(device=name, torch=torch.__version__, date=datetime.now().isoformat(timespec="seconds"),
               gpu_gb=torch.cuda.get_device_properties(0).total_memory / 1e9 if dev.type == "cuda" else None,
               matmul=f"{n}^3 {str(dt)[6:]}", matmul_tflops=rate,
               args={k: v for k, v in vars(args).items() if k != "batch_of"}, rows=[])
    print(f"{name} | torch {torch.__version__} | {res['date']} | matmul {n}^3 {str(dt)[6:]}: {rate:.1f} TFLOP/s")
    comp = set(ints(args.compile_sizes)) if args.compile else set()
    tasks = []
    for k in kinds:
        tasks += [t for S in sizes for t in [("infer", k, S, False)] +
                  ([("infer", k, S, True)] if S in comp and k in ("linear", "softmax") else [])]
        tasks += [("train", k, S, False) for S in train_sizes if k in args.train_kinds.split(",")]
    tasks += [("train", k, S, False) for k in args.train_kinds.split(",") if k not in kinds for S in train_sizes]
    os.makedirs(args.out_dir, exist_ok=True)
    hist, dead = {}, False
    signal.signal(signal.SIGTERM, _stop)  # `timeout` still gets the tables and the figure
    try:
        for task in tasks:
            if dead:
                B = args.batch_of(task[2])
                row = dict(mode=task[0], kind=task[1], image=task[2], compiled=task[3], status="skipped: CUDA error",
                           tokens=make_config(task[1], task[2], B, args).n_tokens, batch=B)
            else:
                row = run_task(task, args, dev, hist, left_total, rate)
            if dev.type == "cuda" and row["status"].startswith("error"):
                try:
                    torch.cuda.synchronize()
                except Exception:  # noqa: BLE001 -- a sticky CUDA error: nothing after it can be trusted
                    dead = True
            res["rows"].append(row)
            print(f"[{args.total_s - left_total():6.1f}s] {task[0]} {task[1]:<11} {task[2]}² B={row['batch']}"
                  f"{' compiled' if task[3] else ''}: {row['status']}, {fmt(row.get('img_s'))} img/s, "
                  f"{fmt(row.get('peak_gb'), '.2f')} GB, MFU(24) {fmt(row.get('mfu_24'), '.1%')}", flush=True)
            save(res, args.out_dir, args.out)
    except KeyboardInterrupt:
        print("interrupted: writing what was measured")
    return finish(res, args.out_dir, args.out)


def _stop(*_):
    raise KeyboardInterrupt


def save(res, out_dir, name):
    res["ratios"] = ratios(res["rows"])
    tmp = os.path.join(out_dir, name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(res, fh, indent=1, default=str)
    os.replace(tmp, os.path.join(out_dir, name))


def finish(res, out_dir, name):
    save(res, out_dir, name)
    md = tables(res)
    print(md)
    stem = os.path.join(out_dir, os.path.splitext(name)[0])
    with open(stem + ".md", "w") as fh:
        fh.write(md)
    plot(res, stem + ".png")
    print(f"wrote {stem}.json, .md, .png")
    return res


if __name__ == "__main__":
    main()
