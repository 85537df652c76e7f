"""bench.py on the CPU: the smoke sweep's rows, FLOP counts against a hand count, the chunked
baseline against the plain sum, out of memory as a row, energy from a faked NVML counter, the
output folder and its writes, bad options."""
import ctypes
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import bench
import infsa
import model
from model import ViT


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny CPU shapes: a second thread only waits, and on a busy machine far longer (58 s for this
    file on 2 shared cores, against 12 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    res = bench.main(["--cpu", "true", "--out_dir", str(out), "--kinds", ",".join(bench.KINDS),
                      "--sizes", "32,64", "--train_kinds", "linear,pure", "--train_sizes", "64",
                      "--chunk_gb", "1e-4", "--budget_s", "0.2"])
    return out, res


def rows_of(res, **kv):
    return [r for r in res["rows"] if all(r[k] == v for k, v in kv.items())]


def run_fails(argv, capsys):
    """bench.main(argv) ends in one line on stderr and exit status 2: that line."""
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    return err


def test_smoke_run_has_a_row_for_every_kind_and_size(smoke):
    out, res = smoke
    assert res["matmul_tflops"] is None and res["device"] == "CPU"  # no MFU on the CPU
    assert json.loads((out / "bench.json").read_text())["rows"] == res["rows"]
    for kind in bench.KINDS:
        for size in (32, 64):
            (r,) = rows_of(res, mode="infer", kind=kind, image=size)
            assert r["status"] == "ok" and r["img_s"] > 0 and r["runs"] >= 1, r
            assert r["tokens"] == (size // 8) ** 2 + 1 and r["finite"] is True, r
    for kind in ("linear", "pure"):
        (r,) = rows_of(res, mode="train", kind=kind, image=64)
        assert r["status"] == "ok" and r["img_s"] > 0
    md = (out / "bench.md").read_text()
    assert "| 64² |" in md and "pure ÷ pure-chunked" in md and "pure-fused ÷ pure-padded" in md
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "bench.md"]  # md: all of it
    assert "matmul_tflops: None" in md and "%" not in md  # no MFU on the CPU
    # no energy counter on the CPU: said once, n/a in every row, no J/image anywhere
    assert res["energy_na"] == "a CPU run" and res["idle_w"] is None
    assert "energy_na: a CPU run" in md
    assert all("j_img" not in r for r in res["rows"]) and "j_img ratios" not in md
    assert all(line.endswith("| n/a | n/a |") for line in md.splitlines() if "| ok |" in line)


def test_cpu_smoke_run_defaults_to_tiny_sizes(tmp_path, monkeypatch):
    """--cpu true alone measures tiny images only (it once swept the GPU's sizes up to 9216²)."""
    planned = []

    def measure(mode, k, S, cfg, B, dev, opt, *energy):
        planned.append((mode, k, S))
        return dict(mode=mode, kind=k, image=S, tokens=cfg.n_tokens, batch=B, compiled=False,
                    status="ok", flops=1)
    monkeypatch.setattr(bench, "measure", measure)
    res = bench.main(["--cpu", "true", "--out_dir", str(tmp_path)])
    assert planned and {S for _, _, S in planned} == {32, 64} and res["matmul_tflops"] is None


def test_pure_padded_and_fused_move_the_kernels_threshold_and_cifar_is_its_shape(tmp_path,
                                                                                 monkeypatch):
    """pure-padded runs model.pure_attention with no token count large enough for the kernels,
    pure-fused with every count large enough, pure with the model's threshold;
    --vit cifar measures the ViT that config/cifar.py trains (d_h = 48), at each size, on any
    device."""
    thresholds, shapes, pure_attention = [], [], model.pure_attention
    threshold = model.FUSED_MIN_TOKENS

    def spy(*a):
        thresholds.append(model.FUSED_MIN_TOKENS)
        return pure_attention(*a)
    monkeypatch.setattr(model, "pure_attention", spy)
    bench.main(["--cpu", "true", "--out_dir", str(tmp_path / "a"), "--kinds",
                "pure,pure-padded,pure-fused",
                "--sizes", "32", "--train_kinds", "", "--runs", "1", "--budget_s", "0.05"])
    assert list(dict.fromkeys(thresholds)) == [threshold, float("inf"), 0]  # row by row
    assert model.FUSED_MIN_TOKENS == threshold

    def measure(mode, k, S, cfg, B, dev, opt, *energy):
        shapes.append((cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.patch_size, cfg.n_tokens, B))
        return dict(mode=mode, kind=k, image=S, tokens=cfg.n_tokens, batch=B, compiled=False,
                    status="ok", flops=1)
    monkeypatch.setattr(bench, "measure", measure)
    bench.main(["--cpu", "true", "--vit", "cifar", "--out_dir", str(tmp_path / "b"), "--kinds",
                "pure", "--sizes", "32,64", "--train_kinds", "", "--batch", "512"])
    assert shapes == [(6, 8, 384, 4, 65, 512), (6, 8, 384, 4, 257, 512)]


def test_flop_counts_agree_with_a_hand_count_and_with_pytorch(smoke, monkeypatch):
    _, res = smoke
    # tiny linear config at 64 px: patch 8 -> 64 patches + CLS = 65 tokens, width 64, 4 heads,
    # 2 layers, MLP 4x
    N, d, L, H, C, P, classes = 65, 64, 2, 4, 3, 8, 10
    embed = 2 * 64 * (C * P * P) * d                       # every patch times a (C P P) x d matrix
    qkv, proj = 2 * N * d * (3 * d), 2 * 1 * d * d          # Linear-InfSA projects one context
    mlp = 2 * N * d * (4 * d) + 2 * N * (4 * d) * d
    attn = H * (2 * N * (d // H)) * 3                       # qbar = sum w q, qbar . k, sum a v
    hand = embed + L * (qkv + proj + mlp + attn) + 2 * d * classes
    assert hand == 13_355_008
    (r,) = rows_of(res, mode="infer", kind="linear", image=64)
    assert r["flops"] == 2 * hand  # batch 2
    (t,) = rows_of(res, mode="train", kind="linear", image=64)
    assert t["flops"] == 3 * r["flops"]
    # PyTorch's own count of the matrix products the model runs (CPU SDPA is not counted, so no
    # softmax; nor are Linear-InfSA's three sums over tokens, products and sums), Pure-InfSA
    # without the zero tokens that pad N to a multiple of 8 (they cost but compute nothing)
    monkeypatch.setattr(model, "pure_attention",
                        lambda q, k, v, g, hops: infsa.pure_infsa(q, k, v, g, hops))
    for kind, uncounted in (("linear", 2 * L * attn), ("pure", 0)):
        (r,) = rows_of(res, mode="infer", kind=kind, image=64)
        cfg = model.ViTConfig(image_size=64, patch_size=8, n_layer=2, n_head=4, n_embd=64,
                              mlp_ratio=4.0, attn=kind)
        with FlopCounterMode(display=False) as fc:
            ViT(cfg, verbose=False)(torch.randn(2, 3, 64, 64))
        assert fc.get_total_flops() == r["flops"] - uncounted, kind


def test_chunked_baseline_equals_the_plain_sum():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 37, 8, generator=g, dtype=torch.float64) for _ in range(3))
    gamma = torch.tensor([0.5, 0.7, 0.9], dtype=torch.float64).view(3, 1, 1)
    for chunk in (1, 5, 16, 37):
        torch.testing.assert_close(bench.chunked_pure_infsa(q, k, v, gamma, 3, chunk),
                                   infsa.pure_infsa(q, k, v, gamma, 3))


def test_out_of_memory_becomes_a_row_not_a_crash(tmp_path, monkeypatch):
    def oom(q, k, v):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 34.00 GiB")

    sdpa = infsa.softmax_attention
    monkeypatch.setattr(infsa, "softmax_attention_materialized", oom)
    # and a GPU whose NVML has no energy counter: n/a with NVML's reason, nothing fails
    monkeypatch.setattr(bench, "energy_counter", lambda dev: (None, "NVML: Not Supported"))
    res = bench.main(["--cpu", "true", "--out_dir", str(tmp_path), "--kinds", "softmax-mat,linear",
                      "--sizes", "32", "--train_kinds", "", "--runs", "2"])
    statuses = [(r["kind"], r["status"]) for r in res["rows"]]
    assert statuses == [("softmax-mat", "oom"), ("linear", "ok")]
    assert infsa.softmax_attention is sdpa  # the swap is undone after the row, even on an error
    md = (tmp_path / "bench.md").read_text()
    assert "energy_na: NVML: Not Supported" in md and "| oom |" in md and "| ok |" in md
    assert md.count("| n/a | n/a |") == 2


def test_a_batch_too_large_for_the_cpu_is_an_oom_row(tmp_path):
    res = bench.main(["--cpu", "true", "--out_dir", str(tmp_path), "--kinds", "linear",
                      "--sizes", "32", "--train_kinds", "", "--batch", str(10 ** 12)])
    assert [r["status"] for r in res["rows"]] == ["oom"]


def test_energy_per_image_from_the_counter(tmp_path, monkeypatch):
    """A faked counter (J, s): idle 150 J in 3 s = 50 W; then each row's window. J/image = E /
    images and above idle (E - 50 t) / images, checked against the readings by hand."""
    readings = iter([(100.0, 10.0), (250.0, 13.0),        # idle: 150 J in 3 s
                     (1000.0, 20.0), (1600.0, 22.0),      # linear: 600 J in 2 s
                     (2000.0, 30.0), (2300.0, 32.5)])     # softmax: 300 J in 2.5 s
    monkeypatch.setattr(bench, "energy_counter", lambda dev: (lambda: next(readings), None))
    monkeypatch.setattr(bench, "IDLE_S", 0.0)
    monkeypatch.setattr(bench, "ENERGY_S", 0.05)  # the timed window (5 s on a GPU), for speed
    res = bench.main(["--cpu", "true", "--out_dir", str(tmp_path), "--kinds", "linear,softmax",
                      "--sizes", "32", "--train_kinds", ""])
    assert res["idle_w"] == 50.0 and res["energy_na"] is None
    (lin,), (soft,) = rows_of(res, kind="linear"), rows_of(res, kind="softmax")
    for r, E, t in ((lin, 600.0, 2.0), (soft, 300.0, 2.5)):
        images = r["runs"] * r["batch"]
        assert r["runs"] >= 5 and r["energy_s"] == t
        assert r["j_img"] == pytest.approx(E / images)
        assert r["j_img_above_idle"] == pytest.approx((E - 50.0 * t) / images)
    md = (tmp_path / "bench.md").read_text()
    assert "idle_w: 50.0" in md
    assert f"| {lin['j_img']:.4g} | {lin['j_img_above_idle']:.4g} |" in md
    energy_ratios = md.split("j_img ratios")[1]
    assert f"| 32² | {lin['j_img'] / soft['j_img']:.3g}× |" in energy_ratios, md
    assert "softmax-mat" not in md and "pure" not in md  # ratios of the kinds this run measured
    assert json.loads((tmp_path / "bench.json").read_text())["rows"][0]["j_img"] == lin["j_img"]


class FakeNVML:
    """libnvidia-ml.so.1 as bench.energy_counter calls it; energy answers rc (0 = success)."""

    def __init__(self, rc, mj=123_456):
        self.bus, self.rc = [], rc
        self.nvmlInit_v2 = lambda: 0
        self.nvmlDeviceGetHandleByPciBusId_v2 = lambda bus, h: self.bus.append(bus) or 0
        self.nvmlErrorString = lambda rc: {3: b"Not Supported"}[rc]

        def energy(h, p):
            p._obj.value = mj  # the counter: millijoules since the driver loaded
            return self.rc
        self.nvmlDeviceGetTotalEnergyConsumption = energy


def test_energy_counter_reads_nvml_or_says_why_not(monkeypatch):
    gpu = torch.device("cuda")
    assert bench.energy_counter(torch.device("cpu")) == (None, "a CPU run")
    pci = SimpleNamespace(pci_domain_id=0, pci_bus_id=0x3B, pci_device_id=0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: pci)

    def no_library(name):
        raise OSError(f"{name}: cannot open shared object file")
    monkeypatch.setattr(ctypes, "CDLL", no_library)
    assert bench.energy_counter(gpu) == (None, "no NVML (libnvidia-ml.so.1)")
    nv = FakeNVML(rc=3)  # NVML_ERROR_NOT_SUPPORTED: a GPU without the counter
    monkeypatch.setattr(ctypes, "CDLL", lambda name: nv)
    assert bench.energy_counter(gpu) == (None, "NVML: Not Supported")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: SimpleNamespace())
    assert "gives no PCI bus id" in bench.energy_counter(gpu)[1]
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: pci)
    nv = FakeNVML(rc=0)
    monkeypatch.setattr(ctypes, "CDLL", lambda name: nv)
    read, why = bench.energy_counter(gpu)
    assert why is None and read()[0] == 123.456 and nv.bus == [b"00000000:3b:00.0"]
    nv.rc = 3  # a counter that stops answering mid-run: an error (a row's status), never 0 J
    with pytest.raises(RuntimeError, match="stopped answering"):
        read()


def test_out_dir_that_is_a_file_is_refused_before_measuring(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "measure", lambda *a: pytest.fail("measured a row"))
    (tmp_path / "f").write_text("mine")
    err = run_fails(["--cpu", "true", "--out_dir", str(tmp_path / "f")], capsys)
    assert "--out_dir" in err and (tmp_path / "f").read_text() == "mine"


@pytest.mark.parametrize("name", ["bench.json", "bench.md"])
def test_out_dir_holding_a_benchmark_is_never_replaced(name, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "measure", lambda *a: pytest.fail("measured a row"))
    (tmp_path / name).write_text("earlier")
    err = run_fails(["--cpu", "true", "--out_dir", str(tmp_path)], capsys)
    assert f"{tmp_path} already holds {name}; pick another --out_dir or delete it" in err
    assert (tmp_path / name).read_text() == "earlier"
    assert sorted(tmp_path.iterdir()) == [tmp_path / name]


def test_a_failed_write_is_one_line_and_earlier_files_stay_whole(tmp_path, capsys, monkeypatch):
    """bench.md cannot be written after the last row (a folder took its name): one line naming
    it, exit 2; bench.json holds every row, bench.md held every row before, no temporary file."""
    rows = []

    def measure(mode, k, S, cfg, B, dev, opt, *energy):
        rows.append(S)
        if len(rows) == 8:  # the last row: bench.md as written after the 7th, then a folder
            assert (tmp_path / "bench.md").read_text().count("| ok |") == 7
            (tmp_path / "bench.md").unlink()
            (tmp_path / "bench.md").mkdir()
        return dict(mode=mode, kind=k, image=S, tokens=cfg.n_tokens, batch=B, compiled=False,
                    status="ok", flops=1, s=0.5, img_s=4.0, runs=5)
    monkeypatch.setattr(bench, "measure", measure)
    err = run_fails(["--cpu", "true", "--out_dir", str(tmp_path), "--train_kinds", ""], capsys)
    assert f"cannot write {tmp_path / 'bench.md'} (" in err and len(rows) == 8
    assert len(json.loads((tmp_path / "bench.json").read_text())["rows"]) == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json", "bench.md"]


@pytest.mark.parametrize("argv, msg", [
    (["--kinds", "linear,pure-K0"], "--kinds: unknown kind 'pure-K0'"),
    (["--train_kinds", "softmax,x"], "--train_kinds: unknown kind 'x'"),
    (["--sizes", "32,abc"], "--sizes takes positive integers"),
    (["--sizes", "32,-64"], "--sizes takes positive integers"),
    (["--sizes", ","], "nothing to measure"),
    (["--kinds", "linear", "--sizes", "512"], "--cpu true is a smoke run: images up to 256²"),
    (["--sizes", "36"], "image_size (36) must be divisible by patch_size (8); change --sizes"),
    (["--train_kinds", "linear", "--train_sizes", "36"], "; change --train_sizes"),
    (["--train_kinds", "linear", "--train_sizes", "512"], "got 512 in --train_sizes"),
    (["--train_kinds", "linear", "--train_sizes", "0"], "--train_sizes takes positive integers"),
    (["--runs", "0"], "--runs must be at least 1"),
    (["--chunk_gb", "0"], "--chunk_gb must be at least"),
    (["--chunk_gb", "-1"], "--chunk_gb must be at least"),
    (["--budget_s", "0"], "--budget_s must be at least"),
    (["--batch", "-1"], "--batch must be at least 0"),
])
def test_bad_options_stop_before_anything_is_measured_or_written(argv, msg, tmp_path, capsys,
                                                                 monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = run_fails(["--cpu", "true", "--out_dir", "run", "--train_kinds", ""] + argv, capsys)
    assert msg in err and not (tmp_path / "run").exists()
    bad = argv[-2]  # the option at fault is the one the line names, not a neighbour
    assert bad in err, err
    assert not ("train_" in bad and re.search(r"--(sizes|kinds)\b", err)), err


def test_every_option_a_message_names_exists():
    """Each --name in bench.py (messages, docstring, comments) is one of its options."""
    named = set(re.findall(r"--([a-z_]+)", Path(bench.__file__).read_text()))
    assert named and named <= set(bench.DEFAULTS), named - set(bench.DEFAULTS)


def test_empty_sizes_say_nothing_to_measure_even_with_the_default_training_rows(tmp_path, capsys,
                                                                                monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench, "measure", lambda *a: pytest.fail("measured a row"))
    err = run_fails(["--cpu", "true", "--sizes", ","], capsys)
    assert "nothing to measure" in err and not (tmp_path / "bench_out").exists()
