"""
Speed and memory of the paper's InfViT 4L-64H (width 1024, 64 heads, patch 16) for each attention
kind, from 224^2 to 9216^2 images (197 to 331,777 tokens), on one GPU.

    python bench.py --out_dir bench_out                      # the whole sweep, bounded by --total_s
    python bench.py --kinds linear,softmax --sizes 1024      # a part of it
    python bench.py --cpu --out_dir /tmp/bench               # tiny fp32 smoke run, seconds
    python bench.py --tokens_cpu                             # Linear-InfSA alone at 2^20 tokens, CPU
    python bench.py --replot bench_out/bench_results.json    # tables and figure again

Kinds: softmax (PyTorch SDPA, fused: the strong baseline); softmax-mat (P = softmax(q k^T / sqrt(d_h))
built in full, O(N^2) memory: the kind of baseline the paper's 13.4x is measured against; the model
has no switch for it, so materialized_softmax() swaps the function it calls); pure-K<n> (Pure-InfSA,
n hops, chunked when A_hat would not fit --pure_mem_gb); linear (Linear-InfSA).
Precision: inference casts the weights to bf16 (no autocast, nothing re-cast per call: faster); a
training step keeps fp32 weights under torch.autocast(bf16); --cpu is fp32. Timing: warm-up, then
CUDA events around each of >= --runs calls (fast rows: ~0.5 s of them), median. MFU = achieved FLOP/s
/ the bf16 matmul rate measured at the start of the same run. FLOPs two ways: ViT.flops_per_image (every matmul, attention included)
and the issue's 24 N d^2 L (qkv + proj + MLP); the 50% target is stated in the latter.
Budgets: a row whose timed runs would not fit --budget_s (predicted from the kind's last row, then
from its warm-up) is 'skipped: over budget' with an estimate; compiling counts against --total_s
only; out of memory is a row, status 'oom'. torch.compile (default on CUDA) adds compiled linear and
softmax inference rows at --compile_sizes beside the eager ones, each a fresh static-shape compile.
"""
import argparse, gc, json, math, os, re, resource, signal, statistics, time
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from datetime import datetime

import torch

import infsa
import train
from model import ViT, ViTConfig, paper_4l64h

die = train._die  # prints "error: ..." (one line) and exits with status 2

KINDS = ("linear", "softmax-mat", "pure-K3", "softmax", "pure-K1")  # default run order: claims first
SMOKE = dict(sizes="32,64", train_sizes="64", batch="2", budget_s=10, total_s=60, matmul_n=256, compile=False)
# -----------------------------------------------------------------------------
# what is measured


@contextmanager
def materialized_softmax():
    """Inside the block the model's softmax attention builds P in full (infsa.softmax_attention_materialized)."""
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
    """Rows of A_hat per Pure-InfSA block: 0 (all at once) when B*H*N*N scores at ~10 bytes each (bf16
    scores plus the fp32 copies of the Frobenius norm) fit mem_gb, else the largest power of 2 that fits."""
    N, BH = cfg.n_tokens, batch * cfg.n_head
    if 10 * BH * N * N <= mem_gb * 1e9:
        return 0
    return max(16, 2 ** int(math.log2(max(1.0, mem_gb * 1e9 / (10 * BH * N)))))


def make_config(kind, size, batch, args):
    attn, hops = parse_kind(kind)
    if args.cpu:  # a tiny shape for the smoke run
        cfg = ViTConfig(image_size=size, patch_size=8, n_classes=10, n_layer=2, n_head=4, n_embd=64,
                        mlp_ratio=4.0, attn=attn, hops=hops)
    else:
        cfg = replace(paper_4l64h(attn, size), hops=hops)
    return replace(cfg, chunk=args.chunk or auto_chunk(cfg, batch, args.pure_mem_gb)) if attn == "pure" else cfg


def flops_24(cfg, training=False):
    """The issue's count, 24 N d^2 L: qkv 6, proj 2, MLP 16 N d^2 per layer; x3 for a training step."""
    return 24 * cfg.n_tokens * cfg.n_embd ** 2 * cfg.n_layer * (3 if training else 1)

# -----------------------------------------------------------------------------
# timing


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
    """Measured dense matmul rate in TFLOP/s: 2 n^3 / median time of (n x n) @ (n x n), after 3 warm-ups."""
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    timed(lambda: a @ b, 3, dev)
    return 2 * n ** 3 / statistics.median(timed(lambda: a @ b, runs, dev)) / 1e12


def guarded(row, fn):
    """fn(row) fills row; out of memory becomes status 'oom' and any other error 'error: ...', never a crash."""
    try:
        fn(row)
    except Exception as e:  # noqa: BLE001 -- one configuration must not end the sweep
        msg = str(e)
        oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in msg.lower() or "ALLOC_FAILED" in msg
        row["status"] = "oom" if oom else f"error: {type(e).__name__}: {(msg.splitlines() or [''])[0][:200]}"
    gc.collect()  # the traceback's frames held the row's tensors
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def measure(row, cfg, args, dev, budget):
    """Build the model, warm up, time --runs calls; fills img_s, ms, runs, peak_gb, or a skip with an estimate."""
    cuda, train, B, S = dev.type == "cuda", row["mode"] == "train", row["batch"], row["image"]
    with torch.device(dev):
        m = ViT(cfg, verbose=False).to(torch.bfloat16 if cuda and not train else torch.float32).train(train)
    x = torch.randn(B, cfg.in_chans, S, S, device=dev, dtype=next(m.parameters()).dtype)
    y = torch.randint(0, cfg.n_classes, (B,), device=dev)
    f, opt = m, torch.optim.SGD(m.parameters(), lr=1e-6) if train else None
    if row["compiled"]:
        from torch._dynamo.utils import counters
        torch._dynamo.reset()  # each resolution is a new model: a clean cache, static shapes, no recompiles
        counters.clear()
        f = torch.compile(m, dynamic=False, mode=args.compile_mode)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and train else nullcontext()

    def step():
        if not train:
            return f(x)
        with amp:
            _, loss = f(x, y)
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)

    if cuda:
        torch.cuda.reset_peak_memory_stats()  # peak = weights + input + everything the calls allocate
    with (materialized_softmax() if row["kind"] == "softmax-mat" else nullcontext()), \
         (nullcontext() if train else torch.inference_mode()):
        first = timed(step, 1, dev)[0]  # on the GPU too this spans a compile: it runs between the events
        end = time.perf_counter() + budget - (0 if row["compiled"] else first)  # compiling is not in the row budget
        if row["compiled"]:
            row["compile_s"] = round(first, 2)
            row["graphs"], row["graph_breaks"] = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
        est = None if row["compiled"] else first  # seconds per call
        for _ in range(max(args.warmup - 1, 1 if row["compiled"] else 0)):
            if est is not None and (est > 1.0 or 2 * est > end - time.perf_counter()):
                break  # a slow call needs no more warming up, and the budget is for timed runs
            est = timed(step, 1, dev)[0]
        row["est_s"] = est
        est = max(est, 1e-6)  # fast rows get more runs, for about 0.5 s of timing (at most 100)
        runs = min(max(args.runs, int(0.5 / est)), 100, int((end - time.perf_counter()) / est))
        if runs < 1:
            row.update(status="skipped: over budget", completed=True, img_s_est=B / est, note=f"one call {est:.3g} s")
        else:
            med = statistics.median(timed(step, runs, dev))
            row.update(runs=runs, ms=med * 1e3, img_s=B / med, est_s=med)
    if cuda:
        row["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9


def run_task(task, args, dev, hist, left, rate):
    """One row: (mode, kind, size, compiled) -> dict; skipped without running when predicted over budget."""
    mode, kind, size, compiled = task
    train, B = mode == "train", args.batch_of(size)
    cfg = make_config(kind, size, B, args)
    with torch.device("meta"):  # FLOPs from the model's own count, no memory
        fl = ViT(cfg, verbose=False).flops_per_image(training=train)
    N, d, L, pure = cfg.n_tokens, cfg.n_embd, cfg.n_layer, cfg.attn == "pure"
    row = dict(mode=mode, kind=kind, image=size, tokens=N, batch=B, compiled=compiled,
               dtype="fp32" if dev.type == "cpu" else "bf16 autocast" if train else "bf16",
               hops=cfg.hops if pure else None, chunk=cfg.chunk if pure else None,
               flops_model=fl, flops_24=flops_24(cfg, train), status="ok")
    recompute = 2 * N * N * d * L * cfg.hops * (3 if train else 1) if pure and 0 < cfg.chunk < N else 0
    work, key, budget = B * (fl + recompute), (mode, kind, compiled), min(args.budget_s, left() - 5)
    if left() < 6 or (compiled and left() < args.compile_min_left_s):
        return dict(row, status="skipped: total budget")
    if key in hist:  # one call predicted from this kind's last row, scaled by the work
        pred = hist[key][1] * work / hist[key][0]
        if 2 * pred > budget:  # a warm-up and one timed run
            return dict(row, status="skipped: over budget", completed=False, img_s_est=B / pred,
                        note=f"predicted from {hist[key][2]}^2: {pred:.3g} s per call")
    guarded(row, lambda r: measure(r, cfg, args, dev, budget))
    if compiled:
        torch._dynamo.reset()  # drop the compiled graphs and the model they hold
    if row.get("est_s"):
        hist[key] = (work, row["est_s"], size)
    for c in ("model", "24") if row.get("img_s") else ():
        row[f"tflops_{c}"] = row[f"flops_{c}"] * row["img_s"] / 1e12
        row[f"mfu_{c}"] = row[f"tflops_{c}"] / rate
    return row

# -----------------------------------------------------------------------------
# reporting


def best(rows, kind, size):
    """The fastest measured inference row of a kind at a size, else its first row (for the status)."""
    rs = [r for r in rows if r["mode"] == "infer" and r["kind"] == kind and r["image"] == size]
    ok = [r for r in rs if r.get("img_s")]
    return max(ok, key=lambda r: r["img_s"]) if ok else (rs[0] if rs else None)


def ratios(rows):
    """Per size: Linear img/s over materialised softmax and over SDPA softmax (best row of each)."""
    out = []
    for S in sorted({r["image"] for r in rows if r["mode"] == "infer"}):
        lin, mat, sdpa = (best(rows, k, S) or {} for k in ("linear", "softmax-mat", "softmax"))
        v, w, s = lin.get("img_s"), mat.get("img_s"), sdpa.get("img_s")
        out.append(dict(image=S, tokens=next(r["tokens"] for r in rows if r["image"] == S), linear=v, mat=w, sdpa=s,
                        mat_status=mat.get("status", "-"), sdpa_status=sdpa.get("status", "-"),
                        linear_over_mat=v / w if v and w else None, linear_over_sdpa=v / s if v and s else None))
    return out


def fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def rank(kind):
    return (KINDS + (kind,)).index(kind)


def tables(res):
    """Markdown: every row, then the speed ratios."""
    line = lambda cells: "| " + " | ".join(map(str, cells)) + " |"  # noqa: E731
    cols = ["mode", "kind", "image", "tokens", "batch", "compiled", "chunk", "status", "img/s", "ms", "peak GB",
            "TFLOP/s (model)", "MFU (model)", "TFLOP/s (24Nd²L)", "MFU (24Nd²L)"]
    t = [f"device: {res['device']} | torch {res['torch']} | {res['date']} | "
         f"measured matmul rate {res['matmul_tflops']:.1f} TFLOP/s ({res['matmul']})\n", line(cols), line(["---"] * 15)]
    for r in sorted(res["rows"], key=lambda r: (r["mode"] != "infer", rank(r["kind"]), r["image"], r["compiled"])):
        st = r["status"] + (f" (~{r['img_s_est']:.3g} img/s)" if r.get("img_s_est") else "")
        st += f" ({r['runs']} runs)" if r.get("runs", 5) < 5 else ""
        t.append(line([r["mode"], r["kind"], f"{r['image']}²", r["tokens"], r["batch"], "yes" if r["compiled"] else "no",
                       "-" if r.get("chunk") is None else r["chunk"] or "full", st, fmt(r.get("img_s"), ".4g"),
                       fmt(r.get("ms"), ".4g"), fmt(r.get("peak_gb"), ".2f"), fmt(r.get("tflops_model"), ".4g"),
                       fmt(r.get("mfu_model"), ".1%"), fmt(r.get("tflops_24"), ".4g"), fmt(r.get("mfu_24"), ".1%")]))
    t += ["\nInference speed ratios, best row of each kind (paper: 13.4× at 1024², Linear vs softmax ViT):\n",
          line(["image", "tokens", "linear img/s", "softmax-mat img/s", "softmax (SDPA) img/s", "linear ÷ mat",
                "linear ÷ SDPA"]), line(["---"] * 7)]
    x = lambda v: "-" if v is None else f"{v:.1f}×"  # noqa: E731
    for r in res["ratios"]:
        t.append(line([f"{r['image']}²", r["tokens"], fmt(r["linear"], ".4g"),
                       fmt(r["mat"], ".4g") if r["mat"] else r["mat_status"],
                       fmt(r["sdpa"], ".4g") if r["sdpa"] else r["sdpa_status"],
                       x(r["linear_over_mat"]), x(r["linear_over_sdpa"])]))
    return "\n".join(t) + "\n"


def plot(res, path):
    """Inference, log-log, one line per kind: img/s and peak memory vs tokens. x: out of memory (at the
    panel's floor / at the GPU's memory); open circle: an over-budget estimate."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axs = plt.subplots(1, 2, figsize=(11, 4.2))
    rows = [r for r in res["rows"] if r["mode"] == "infer"]
    kinds = sorted({r["kind"] for r in rows}, key=rank)
    floor = min([r["img_s"] for r in rows if r.get("img_s")] + [1.0]) / 3
    gpu = res.get("gpu_gb")
    for i, k in enumerate(kinds):
        bs = [r for r in (best(rows, k, S) for S in sorted({r["image"] for r in rows})) if r]
        pts = lambda key: ([r["tokens"] for r in bs if r.get(key)], [r[key] for r in bs if r.get(key)])  # noqa: E731
        oom = [r["tokens"] for r in bs if r["status"] == "oom"]
        axs[0].plot(*pts("img_s"), "o-", color=f"C{i}", label=k)
        axs[0].plot(*pts("img_s_est"), "o", mfc="none", color=f"C{i}")
        axs[0].plot(oom, [floor] * len(oom), "x", color=f"C{i}", ms=10, mew=2)
        axs[1].plot(*pts("peak_gb"), "o-", color=f"C{i}", label=k)
        if gpu:
            axs[1].plot(oom, [gpu] * len(oom), "x", color=f"C{i}", ms=10, mew=2)
    if gpu:
        axs[1].axhline(gpu, color="gray", ls="--", lw=1, label="GPU memory")
    for ax, yl in zip(axs, ("images / s (inference)", "peak GPU memory (GB)")):
        ax.set(xlabel="tokens N", ylabel=yl)
        if ax.has_data() and any(y > 0 for ln in ax.get_lines() for y in ln.get_ydata()):
            ax.set(xscale="log", yscale="log")
            ax.legend(fontsize=8, title="x = OOM, o = estimate", title_fontsize=8)
        else:
            ax.text(0.5, 0.5, "not measured on the CPU", ha="center", transform=ax.transAxes)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"InfViT on {res['device']} (matmul {res['matmul_tflops']:.3g} TFLOP/s)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def tokens_cpu(ns=(2 ** 18, 2 ** 19, 2 ** 20), H=64, dh=16):
    """Linear-InfSA alone on the CPU (fp32, batch 1, 64 heads x d_h 16) up to 1,048,576 tokens: time and
    peak RSS. q, k, v are filled in place, one tensor each (3 x 4.3 GB at 2^20); the scores add O(H N)."""
    g = torch.full((H, 1, 1), 0.9)
    print("| tokens N | q,k,v GB | linear_infsa s | peak RSS GB | a softmax P would need (fp32) |\n|" + " --- |" * 5)
    for N in ns:
        q, k, v = (torch.empty(1, H, N, dh).normal_() for _ in range(3))  # each (1, H, N, d_h)
        t = time.perf_counter()
        o = infsa.linear_infsa(q, k, v, g, expand=False)  # (1, H, 1, d_h)
        dt = time.perf_counter() - t
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB -> GB
        print(f"| {N:,} | {3 * q.numel() * 4 / 1e9:.1f} | {dt:.2f} | {rss:.1f} | {H * N * N * 4 / 1e12:,.0f} TB |",
              flush=True)
        del q, k, v, o

# -----------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--out_dir", default="bench_out"); a("--out", default="bench_results.json", help="JSON name; .md, .png beside it")
    a("--cpu", action="store_true", help="tiny fp32 smoke run on the CPU (other defaults: SMOKE)")
    a("--tokens_cpu", action="store_true", help="only Linear-InfSA at 2^18, 2^19, 2^20 tokens on the CPU")
    a("--replot", default="", help="tables and figure again from this JSON")
    a("--kinds", default=",".join(KINDS), help="run in this order"); a("--train_kinds", default="linear,softmax")
    a("--sizes", default="224,512,1024,2048,4096,9216"); a("--train_sizes", default="1024,4096")
    a("--batch", default="", help="an int, or size:batch pairs; default round(8 (1024/size)^2) in [1, 64]")
    a("--compile", action=argparse.BooleanOptionalAction, default=True, help="torch.compile (--cpu: off unless given)")
    a("--compile_sizes", default="1024", help="sizes that also get compiled linear and softmax inference rows")
    a("--compile_mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs (slow to compile)")
    a("--compile_min_left_s", type=float, default=120, help="start a compile only with this much of --total_s left")
    a("--warmup", type=int, default=3); a("--runs", type=int, default=5)
    a("--budget_s", type=float, default=60, help="per row: warm-up and timed runs, compile excluded")
    a("--total_s", type=float, default=400, help="the whole run, compiles included")
    a("--chunk", type=int, default=0, help="Pure-InfSA rows per block (0: from --pure_mem_gb)")
    a("--pure_mem_gb", type=float, default=48.0); a("--matmul_n", type=int, default=8192)
    args = p.parse_args(argv)
    if args.cpu:  # the smoke run's defaults (SMOKE); flags given still win
        p.set_defaults(**SMOKE)
        args = p.parse_args(argv)
    if args.tokens_cpu:
        return tokens_cpu()
    if args.replot:
        try:
            with open(args.replot) as fh:
                res = json.load(fh)
        except (OSError, ValueError) as e:
            die(f"--replot {args.replot}: not a readable results file ({type(e).__name__}); run bench.py first")
        return finish(res, os.path.dirname(args.replot) or ".", os.path.basename(args.replot))
    cpu = args.cpu
    if not cpu and not torch.cuda.is_available():
        die("no CUDA device: use --cpu for the smoke run")
    kinds, train_kinds, sizes, train_sizes, compile_sizes = check_args(args)
    t_end = time.perf_counter() + args.total_s
    left = lambda: t_end - time.perf_counter()  # noqa: E731
    dev, dt = (torch.device("cpu"), torch.float32) if cpu else (torch.device("cuda"), torch.bfloat16)
    threads = torch.get_num_threads()
    if cpu:
        torch.set_num_threads(1)  # smoke timings on a shared CPU stay sane
    else:
        torch.backends.cudnn.benchmark = True
    name, rate = "CPU" if cpu else torch.cuda.get_device_name(), matmul_rate(args.matmul_n, dev, dt)
    res = dict(device=name, torch=torch.__version__, date=datetime.now().isoformat(timespec="seconds"),
               gpu_gb=None if cpu else torch.cuda.get_device_properties(0).total_memory / 1e9,
               matmul=f"{args.matmul_n}^3 {str(dt)[6:]}", matmul_tflops=rate,
               args={k: v for k, v in vars(args).items() if k != "batch_of"}, rows=[])
    print(f"{name} | torch {torch.__version__} | {res['date']} | matmul {res['matmul']}: {rate:.1f} TFLOP/s")
    comp = set(compile_sizes) if args.compile else set()
    tasks = []  # each kind: its inference rows (eager, then compiled where asked), then its training rows
    for k in kinds + [k for k in train_kinds if k not in kinds]:
        tasks += [("infer", k, S, c) for S in sizes if k in kinds
                  for c in (False, True) if not c or (S in comp and k in ("linear", "softmax"))]
        tasks += [("train", k, S, False) for S in train_sizes if k in train_kinds]
    os.makedirs(args.out_dir, exist_ok=True)
    hist, dead = {}, False
    sigterm = signal.signal(signal.SIGTERM, _stop)  # under `timeout`, still write the tables and figure
    try:
        for task in tasks:
            row = run_task(task, args, dev, hist, left, rate) if not dead else \
                dict(mode=task[0], kind=task[1], image=task[2], compiled=task[3], status="skipped: CUDA error",
                     batch=args.batch_of(task[2]), tokens=make_config(task[1], task[2], 1, args).n_tokens)
            if not cpu and row["status"].startswith("error"):
                try:
                    torch.cuda.synchronize()
                except Exception:  # noqa: BLE001 -- a sticky CUDA error: nothing after it can be trusted
                    dead = True
            res["rows"].append(row)
            print(f"[{args.total_s - left():6.1f}s] {task[0]} {task[1]:<11} {task[2]}² B={row['batch']}"
                  f"{' compiled' if task[3] else ''}: {row['status']}, {fmt(row.get('img_s'))} img/s, "
                  f"{fmt(row.get('peak_gb'), '.2f')} GB, MFU(24Nd²L) {fmt(row.get('mfu_24'), '.1%')}", flush=True)
            save(res, args.out_dir, args.out)  # a killed run still leaves its rows
    except KeyboardInterrupt:
        print("interrupted: writing what was measured")
    finally:
        torch.set_num_threads(threads)
        signal.signal(signal.SIGTERM, sigterm)
    return finish(res, args.out_dir, args.out)


def _stop(*_):
    raise KeyboardInterrupt


def ints(s, flag):
    """'224,512' -> [224, 512]; anything but positive integers is a one-line error naming the flag."""
    try:
        vals = [int(v) for v in s.split(",") if v]
    except ValueError:
        vals = [0]
    if not all(v >= 1 for v in vals):
        die(f"{flag} takes positive integers separated by commas, e.g. 224,512; got {s!r}")
    return vals


def check_args(args):
    """Every option checked before the first measurement: a typo fails in a second, not minutes later.
    Sets args.batch_of(size); returns the parsed lists: kinds, train_kinds, sizes, train_sizes, compile_sizes."""
    for flag, lo in (("runs", 1), ("warmup", 0), ("budget_s", 1e-9), ("total_s", 1e-9), ("chunk", 0),
                     ("pure_mem_gb", 1e-9), ("matmul_n", 1)):
        if getattr(args, flag) < lo:
            die(f"--{flag} must be {'at least 0' if lo == 0 else 'positive'}; got {getattr(args, flag)}")
    pos = r"[1-9]\d*"
    if not re.fullmatch(rf"|{pos}|{pos}:{pos}(,{pos}:{pos})*", args.batch):
        die(f"--batch takes one batch size (8) or size:batch pairs (1024:8,4096:1); got {args.batch!r}")
    bmap = dict(tuple(map(int, kv.split(":"))) for kv in args.batch.split(",") if ":" in kv)  # size -> batch
    one = int(args.batch) if args.batch and ":" not in args.batch else None
    args.batch_of = lambda S: bmap.get(S, one or min(64, max(1, round(8 * (1024 / S) ** 2))))
    kinds, train_kinds = [k for k in args.kinds.split(",") if k], [k for k in args.train_kinds.split(",") if k]
    sizes = [ints(getattr(args, f), f"--{f}") for f in ("sizes", "train_sizes", "compile_sizes")]
    for k in kinds + train_kinds:
        try:
            parse_kind(k)
            for S in sum(sizes, []):
                make_config(k, S, 1, args)  # the model's own checks, e.g. size divisible by the patch
        except ValueError as e:
            die(f"{e}; change --kinds or the sizes")
    return (kinds, train_kinds, *sizes)


def save(res, out_dir, name):
    res["ratios"] = ratios(res["rows"])
    train.write_atomic(os.path.join(out_dir, name), lambda fh: json.dump(res, fh, indent=1, default=str))


def finish(res, out_dir, name):
    """JSON, markdown tables and figure; returns the results dict."""
    save(res, out_dir, name)
    stem, md = os.path.join(out_dir, os.path.splitext(name)[0]), tables(res)
    print(md)
    with open(stem + ".md", "w") as fh:
        fh.write(md)
    plot(res, stem + ".png")
    print(f"wrote {stem}.json, {stem}.md, {stem}.png")
    return res


if __name__ == "__main__":
    main()
