"""
Speed, memory and energy of the paper's InfViT 4L-64H on one GPU, per attention kind and image
size: two warm-up calls, then --runs or more timed by CUDA events; s = their median. MFU =
matmul FLOP/s (ViT.flops_per_image) / the bf16 matmul rate measured at the start. Energy: NVML's
counter over the timed calls, E joules in t s: J/image = E / images; above idle,
(E - P t) / images, P = the idle GPU's watts measured at the start.
"""
import ctypes
import gc
import json
import math
import os
import statistics
import sys
import time
from contextlib import nullcontext
from unittest import mock

import torch

import infsa
import model
import runtime
from configurator import config_defaults, configure, die, read_config_file

KINDS = ("linear", "softmax", "softmax-mat", "pure", "pure-chunked", "pure-padded",
         "pure-fused")
# -----------------------------------------------------------------------------
out_dir = "bench_out"       # bench.json and bench.md go here; never replaced
kinds = "linear,softmax-mat,softmax,pure"  # inference rows, in this order
sizes = "224,512,1024,2048,4096,9216"
train_kinds = "linear,softmax"  # training-step rows
train_sizes = "1024,4096"
batch = 0                   # images per call; 0 = 8 (1024 / size)^2, from 1 to 64
runs = 5                    # timed calls per row, at least
budget_s = 60.0             # seconds of timed calls per row, at most
compile = False             # torch.compile every model
chunk_gb = 48.0             # pure-chunked: rows of A_hat per block to fit this many GB
cpu = False                 # a smoke run on the CPU: 2 layers, CPU_SIZES unless given
vit = "paper"               # paper: InfViT 4L-64H, d_h 16 (--cpu: 2 small layers) | cifar: 48
# -----------------------------------------------------------------------------
DEFAULTS = config_defaults(globals())
RANGES = dict(vit=("paper", "cifar"), runs=(1, math.inf), budget_s=(0.01, math.inf),
              chunk_gb=(1e-6, math.inf))
CIFAR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config", "cifar.py")
CPU_SIZES, CPU_MAX, MATMUL_N, ENERGY_S, IDLE_S = "32,64", 256, 8192, 5.0, 5.0
COLUMNS = ("mode kind compiled image tokens batch status img_s s runs peak_gb mfu j_img "
           "j_img_above_idle").split()


def chunked_pure_infsa(q, k, v, gamma, hops, chunk, eps=1e-6):
    """pure_infsa holding `chunk` rows of S = ReLU(q k^T / sqrt(d)) at a time: one pass sums
    ||S||_F^2, then each hop z_t = gamma S z_{t-1} / ||S||_F recomputes S block by block."""
    blocks = q.split(chunk, dim=-2)  # each (B, H, chunk, d)
    norm = sum(infsa.frobenius_norm(infsa.relu_scores(qb, k)).square() for qb in blocks).sqrt()
    z, y = v, 0
    for _ in range(hops):
        Sz = torch.cat([infsa.relu_scores(qb, k) @ z for qb in blocks], dim=-2)  # (B, H, N, d)
        z = (gamma * Sz / (norm + eps)).to(v.dtype)
        y = y + z
    return y


def chunk_rows(gb, B, H, N):
    """Rows of S a block for pure-chunked: all N if B H N^2 scores at 10 bytes fit in gb GB, else
    the largest power of two that fits (at least 16)."""
    fit = gb * 1e9 / (10 * B * H * N)
    return N if fit >= N else max(16, 2 ** int(math.log2(fit)))


def timed(fn, n, cuda):
    """Seconds of each of n calls: CUDA events (one sync at the end), or the clock."""
    if not cuda:
        out = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
        return out
    ev = [[torch.cuda.Event(enable_timing=True) for _ in "ab"] for _ in range(n)]
    for a, b in ev:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) / 1e3 for a, b in ev]


def energy_counter(dev):
    """(read, None), read() = (joules, seconds) from NVML and the clock; or (None, why)."""
    if dev.type != "cuda":
        return None, "a CPU run"
    try:
        nv, p = ctypes.CDLL("libnvidia-ml.so.1"), torch.cuda.get_device_properties(dev)
        bus = f"{p.pci_domain_id:08x}:{p.pci_bus_id:02x}:{p.pci_device_id:02x}.0".encode()
    except OSError:
        return None, "no NVML (libnvidia-ml.so.1)"
    except AttributeError:
        return None, f"torch {torch.__version__} gives no PCI bus id to find the GPU in NVML"
    h, mj = ctypes.c_void_p(), ctypes.c_ulonglong()
    nv.nvmlErrorString.restype = ctypes.c_char_p

    def read():
        if nv.nvmlDeviceGetTotalEnergyConsumption(h, ctypes.byref(mj)):  # mJ; 0: no error
            raise RuntimeError("NVML: the energy counter stopped answering")
        return mj.value / 1e3, time.perf_counter()
    rc = (nv.nvmlInit_v2() or nv.nvmlDeviceGetHandleByPciBusId_v2(bus, ctypes.byref(h))
          or nv.nvmlDeviceGetTotalEnergyConsumption(h, ctypes.byref(mj)))
    return (None, f"NVML: {nv.nvmlErrorString(rc).decode()}") if rc else (read, None)


def measure(mode, kind, S, cfg, B, dev, opt, read=None, idle_w=0.0):
    """One row: inference in bf16, or a training step (SGD) in fp32 under bf16 autocast.
    softmax-mat builds P in full; pure-chunked holds chunk_rows of S at a time;
    pure-padded, pure-fused: model.pure_attention's padded products, or its kernels, at any N."""
    cuda, train, N = dev.type == "cuda", mode == "train", cfg.n_tokens
    with torch.device("meta"):
        flops = B * model.ViT(cfg, verbose=False).flops_per_image(train)
    row = dict(mode=mode, kind=kind, image=S, tokens=N, batch=B, compiled=opt["compile"],
               status="ok", flops=flops)
    C = chunk_rows(opt["chunk_gb"], B, cfg.n_head, N)
    swap = {"softmax-mat": mock.patch.object(infsa, "softmax_attention", lambda *qkv:
                                             infsa.softmax_attention_materialized(*qkv)[0]),
            "pure-chunked": mock.patch.object(model, "pure_attention",
                                              lambda *a: chunked_pure_infsa(*a, C)),
            "pure-padded": mock.patch.object(model, "FUSED_MIN_TOKENS", math.inf),
            "pure-fused": mock.patch.object(model, "FUSED_MIN_TOKENS", 0)}
    torch._dynamo.reset()  # each row compiles afresh
    try:
        dt = torch.bfloat16 if cuda and not train else torch.float32
        with torch.device(dev):
            m = model.ViT(cfg, verbose=False).to(dt).train(train)
            x, y = torch.randn(B, 3, S, S, dtype=dt), torch.randint(0, cfg.n_classes, (B,))
        f, sgd = torch.compile(m) if opt["compile"] else m, torch.optim.SGD(m.parameters())

        def call():
            if not train:
                return f(x)[0]
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
                f(x, y)[1].backward()
            sgd.step()
            sgd.zero_grad()

        if cuda:
            torch.cuda.reset_peak_memory_stats()
        out = []
        with swap.get(kind, nullcontext()), torch.inference_mode(not train):
            for _ in range(2):  # warm-up
                t = timed(lambda: out.append(call()), 1, cuda)
                if t[0] >= opt["budget_s"]:
                    break
            row["finite"] = None if train else bool(out[0].isfinite().all())
            n = min(max(opt["runs"], math.ceil((ENERGY_S if read else 0.5) / t[0])),
                    int(opt["budget_s"] / t[0]))
            e0 = read and read()  # after timed's synchronize: an idle queue
            t = timed(call, n, cuda) or t  # n = 0: the first call is the row
            if read and n:
                (j0, s0), (j1, s1) = e0, read()
                row.update(energy_s=s1 - s0, j_img=(j1 - j0) / (n * B),
                           j_img_above_idle=(j1 - j0 - idle_w * (s1 - s0)) / (n * B))
        s = statistics.median(t)
        row.update(runs=n or 1, s=s, img_s=B / s)
        if cuda:
            row["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    except Exception as e:  # one configuration must not end the sweep
        msg = str(e).replace("\n", " ")
        oom = "out of memory" in msg.lower() or "can't allocate memory" in msg
        row["status"] = "oom" if oom else f"error: {msg[:160]}"
    gc.collect()
    torch.cuda.empty_cache()
    return row


def table(res):
    """Markdown: the run's conditions, its rows, ratios between kinds."""
    def line(cells):
        return "| " + " | ".join(f"{c:.4g}" if type(c) is float else str(c) for c in cells) + " |"
    mm, na = res["matmul_tflops"], res["energy_na"]
    t = [" | ".join(f"{k}: {v}" for k, v in res.items() if k != "rows") + "\n", line(COLUMNS),
         line(["---"] * len(COLUMNS))]
    for r in res["rows"]:
        mfu = r.get("s") and mm and r["flops"] / r["s"] / mm / 1e12
        r = {**r, "image": f"{r['image']}²", "mfu": mfu}
        cells = ["-" if r.get(c) is None else r[c] for c in COLUMNS]
        t.append(line(cells[:-2] + ["n/a"] * 2 if na else cells))
    pairs = [(a, b) for a, b in (("linear", "softmax-mat"), ("linear", "softmax"),
                                 ("pure", "pure-chunked"), ("pure-fused", "pure-padded"))
             if {a, b} <= {r["kind"] for r in res["rows"]}]  # the pairs this run measured
    for key in ("img_s", "j_img")[:1 if na else 2] if pairs else ():
        v = {(r["kind"], r["image"]): r.get(key) for r in res["rows"]
             if r["mode"] == "infer" and not r["compiled"]}
        t += [f"\n{key} ratios, inference:\n", line(["image"] + [f"{a} ÷ {b}" for a, b in pairs]),
              line(["---"] * (1 + len(pairs)))]
        t += [line([f"{S}²"] + [f"{v[a, S] / v[b, S]:.3g}×" if v.get((a, S)) and v.get((b, S))
                                else "-" for a, b in pairs]) for S in sorted({S for _, S in v})]
    return "\n".join(t) + "\n"


def vit_config(attn, S, cifar, cpu):
    """The ViT of a row at S x S images: config/cifar.py's shape (cifar, its ViTConfig fields),
    else 2 small layers on the CPU, else the paper's 4L-64H."""
    if cifar:
        return model.ViTConfig(**cifar, image_size=S, attn=attn)
    if cpu:
        return model.ViTConfig(image_size=S, patch_size=8, n_layer=2, n_embd=64, mlp_ratio=4,
                               attn=attn)
    return model.paper_4l64h(attn, S)


def main(argv):
    opt, given = configure(argv, DEFAULTS, __doc__, RANGES)
    cpu, out, plan = opt["cpu"], opt["out_dir"], []
    if not cpu and not torch.cuda.is_available():
        die("no CUDA device: use --cpu true for the smoke run")
    if cpu:
        opt.update({k: CPU_SIZES for k in ("sizes", "train_sizes") if k not in given})
    cifar = opt["vit"] == "cifar" and {  # the shape config/cifar.py trains, on any device
        k: v for k, v in read_config_file(CIFAR) if k in model.ViTConfig.__dataclass_fields__}
    for mode, kk, sk in (("infer", "kinds", "sizes"), ("train", "train_kinds", "train_sizes")):
        ks, Ss = [k for k in opt[kk].split(",") if k], opt[sk].split(",")
        if ks and not all(S.isdigit() and 0 < int(S) <= (CPU_MAX if cpu else 1e9) for S in Ss):
            smoke = f"; --cpu true is a smoke run: images up to {CPU_MAX}²" if cpu else ""
            die(f"--{sk} takes positive integers (else nothing to measure){smoke}; got {opt[sk]} "
                f"in --{sk}")
        for k, S in [(k, int(S)) for k in ks for S in Ss]:
            if k not in KINDS:
                die(f"--{kk}: unknown kind {k!r}; kinds are {', '.join(KINDS)}")
            attn = k.split("-")[0]
            try:
                cfg = vit_config(attn, S, cifar, cpu)
            except ValueError as e:
                die(f"{e}; change --{sk}")
            B = opt["batch"] or (2 if cpu else min(64, max(1, round(8 * (1024 / S) ** 2))))
            plan.append((mode, k, S, cfg, B))

    with runtime.run_folder(out, True, False):
        for f in ("bench.json", "bench.md"):
            if os.path.lexists(f"{out}/{f}"):
                die(f"{out} already holds {f}; pick another --out_dir or delete it")
        dev = torch.device("cpu" if cpu else "cuda")
        read, na = energy_counter(dev)
        res = dict(device="CPU" if cpu else torch.cuda.get_device_name(), torch=torch.__version__,
                   date=time.strftime("%Y-%m-%d"), idle_w=None, matmul_tflops=None,
                   energy_na=na, command="python bench.py " + " ".join(argv), rows=[])
        if read:  # on a GPU that has run nothing yet
            j0, s0 = read()
            time.sleep(IDLE_S)
            j1, s1 = read()
            res["idle_w"] = round((j1 - j0) / (s1 - s0), 1)
        if not cpu:  # 2 n^3 FLOPs / the median of 10 matmuls
            a = torch.randn(MATMUL_N, MATMUL_N, device=dev, dtype=torch.bfloat16)
            s = statistics.median(timed(lambda: a @ a, 13, True)[3:])
            res["matmul_tflops"] = round(2 * MATMUL_N ** 3 / s / 1e12)
        for mode, k, S, cfg, B in plan:
            res["rows"].append(measure(mode, k, S, cfg, B, dev, opt, read, res["idle_w"]))
            try:  # a failed write is one line; files written before it stay whole
                runtime.write_atomic(f"{out}/bench.json", lambda f: json.dump(res, f, indent=1))
                runtime.write_atomic(f"{out}/bench.md", lambda f: f.write(table(res)))
            except runtime.WriteError as e:
                die(str(e))
    print(table(res))
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
