"""bench.py on the CPU: the smoke sweep's rows, FLOP counts against a hand count, the chunked baseline against
the plain sum, out of memory as a row, bad options."""
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import bench
import infsa
import model
from model import ViT


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    res = bench.main(["--cpu", "true", "--out_dir", str(out), "--kinds", ",".join(bench.KINDS), "--sizes", "32,64",
                      "--train_kinds", "linear,pure", "--train_sizes", "64", "--chunk_gb", "1e-4"])
    return out, res


def rows_of(res, **kv):
    return [r for r in res["rows"] if all(r[k] == v for k, v in kv.items())]


def test_smoke_run_has_a_row_for_every_kind_and_size(smoke):
    out, res = smoke
    assert res["matmul_tflops"] is None and res["device"] == "CPU"  # no MFU on the CPU
    assert json.load(open(out / "bench.json"))["rows"] == res["rows"]
    for kind in bench.KINDS:
        for size in (32, 64):
            (r,) = rows_of(res, mode="infer", kind=kind, image=size)
            assert r["status"] == "ok" and r["img_s"] > 0 and r["runs"] >= 1 and r["tokens"] == (size // 8) ** 2 + 1, r
    for kind in ("linear", "pure"):
        (r,) = rows_of(res, mode="train", kind=kind, image=64)
        assert r["status"] == "ok" and r["img_s"] > 0
    md = (out / "bench.md").read_text()
    assert "| 64² |" in md and "pure ÷ pure-chunked" in md and (out / "bench.png").stat().st_size > 10_000
    assert "no MFU" in md and "%" not in md


def test_cpu_smoke_run_defaults_to_tiny_sizes(tmp_path, monkeypatch):
    """--cpu true alone measures tiny images only (it once swept the GPU's sizes up to 9216² on the CPU)."""
    planned = []
    monkeypatch.setattr(bench, "measure", lambda mode, k, S, cfg, B, dev, opt: planned.append((mode, k, S)) or
                        dict(mode=mode, kind=k, image=S, tokens=cfg.n_tokens, batch=B, compiled=False, status="ok", flops=1))
    res = bench.main(["--cpu", "true", "--out_dir", str(tmp_path)])
    assert planned and {S for _, _, S in planned} == {32, 64} and res["matmul_tflops"] is None


def test_flop_counts_agree_with_a_hand_count_and_with_pytorch(smoke, monkeypatch):
    _, res = smoke
    # tiny linear config at 64 px: patch 8 -> 64 patches + CLS = 65 tokens, width 64, 4 heads, 2 layers, MLP 4x
    N, d, L, H, C, P, classes = 65, 64, 2, 4, 3, 8, 10
    embed = 2 * 64 * (C * P * P) * d                       # every patch times a (C P P) x d matrix
    qkv, proj = 2 * N * d * (3 * d), 2 * 1 * d * d          # Linear-InfSA projects one context vector
    mlp = 2 * N * d * (4 * d) + 2 * N * (4 * d) * d
    attn = H * (2 * N * (d // H)) * 3                       # qbar = sum w q, scores qbar . k, context sum a v
    hand = embed + L * (qkv + proj + mlp + attn) + 2 * d * classes
    assert hand == 13_355_008
    (r,) = rows_of(res, mode="infer", kind="linear", image=64)
    assert r["flops"] == 2 * hand  # batch 2
    (t,) = rows_of(res, mode="train", kind="linear", image=64)
    assert t["flops"] == 3 * r["flops"]
    # PyTorch's own count of the matrix products the model runs (CPU SDPA is not counted, so no softmax; nor are
    # Linear-InfSA's three sums over tokens, products and sums), Pure-InfSA without the zero tokens that pad N
    # to a multiple of 8 (they cost but compute nothing)
    monkeypatch.setattr(model, "pure_attention", lambda q, k, v, g, hops: infsa.pure_infsa(q, k, v, g, hops))
    for kind, uncounted in (("linear", 2 * L * attn), ("pure", 0)):
        (r,) = rows_of(res, mode="infer", kind=kind, image=64)
        cfg = model.ViTConfig(image_size=64, patch_size=8, n_layer=2, n_head=4, n_embd=64, mlp_ratio=4.0, attn=kind)
        with FlopCounterMode(display=False) as fc:
            ViT(cfg, verbose=False)(torch.randn(2, 3, 64, 64))
        assert fc.get_total_flops() == r["flops"] - uncounted, kind


def test_chunked_baseline_equals_the_plain_sum():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 37, 8, generator=g, dtype=torch.float64) for _ in range(3))
    gamma = torch.tensor([0.5, 0.7, 0.9], dtype=torch.float64).view(3, 1, 1)
    for chunk in (1, 5, 16, 37):
        torch.testing.assert_close(bench.chunked_pure_infsa(q, k, v, gamma, 3, chunk), infsa.pure_infsa(q, k, v, gamma, 3))


def test_out_of_memory_becomes_a_row_not_a_crash(tmp_path, monkeypatch):
    def oom(q, k, v):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 34.00 GiB")

    sdpa = infsa.softmax_attention
    monkeypatch.setattr(infsa, "softmax_attention_materialized", oom)
    res = bench.main(["--cpu", "true", "--out_dir", str(tmp_path), "--kinds", "softmax-mat,linear", "--sizes", "32",
                      "--train_kinds", "", "--runs", "2"])
    assert [(r["kind"], r["status"]) for r in res["rows"]] == [("softmax-mat", "oom"), ("linear", "ok")]
    assert infsa.softmax_attention is sdpa  # the swap is undone after the row, even on an error
    assert (tmp_path / "bench.png").exists()


@pytest.mark.parametrize("argv, msg", [
    (["--kinds", "linear,pure-K0"], "unknown kind 'pure-K0'"),
    (["--sizes", "32,abc"], "--sizes takes positive integers"),
    (["--sizes", ","], "nothing to measure"),
    (["--kinds", "linear", "--sizes", "512"], "--cpu true is a smoke run: images up to 256²"),
    (["--sizes", "36"], "image_size (36) must be divisible by patch_size (8)"),
    (["--runs", "0"], "--runs must be at least 1"),
])
def test_bad_options_stop_before_anything_is_measured_or_written(argv, msg, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        bench.main(["--cpu", "true", "--out_dir", "run", "--train_kinds", ""] + argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and msg in err and len(err.splitlines()) == 1 and not (tmp_path / "run").exists()


def test_empty_sizes_say_nothing_to_measure_even_with_the_default_training_rows(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench, "measure", lambda *a: pytest.fail("measured a row"))
    with pytest.raises(SystemExit) as e:
        bench.main(["--cpu", "true", "--sizes", ","])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "nothing to measure" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "bench_out").exists()
