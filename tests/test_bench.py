"""bench.py on the CPU: the smoke sweep's rows, its FLOP counts against a hand count, OOM as a row, budgets."""
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import bench
import infsa
from model import Attention, ViT


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    bench.main(["--cpu", "--out_dir", str(out)])
    with open(out / "bench_results.json") as fh:
        return out, json.load(fh)


def rows_of(res, **kv):
    return [r for r in res["rows"] if all(r[k] == v for k, v in kv.items())]


def test_smoke_run_has_a_row_for_every_kind_and_size(smoke):
    out, res = smoke
    assert res["matmul_tflops"] > 0 and res["device"] == "CPU"
    for kind in bench.KINDS:
        for size in (32, 64):
            (r,) = rows_of(res, mode="infer", kind=kind, image=size)
            assert r["status"] == "ok" and r["img_s"] > 0 and r["runs"] >= 1, r
            assert r["tokens"] == (size // 8) ** 2 + 1 and r["mfu_24"] > 0
    for kind in ("linear", "softmax"):
        (r,) = rows_of(res, mode="train", kind=kind, image=64)
        assert r["status"] == "ok" and r["img_s"] > 0
    assert [r["image"] for r in res["ratios"]] == [32, 64]
    assert all(r["linear_over_mat"] > 0 and r["linear_over_sdpa"] > 0 for r in res["ratios"])
    for ext in ("png", "md"):
        assert (out / f"bench_results.{ext}").stat().st_size > 1000
    assert "linear ÷ SDPA" in (out / "bench_results.md").read_text()


def test_flop_counts_agree_with_a_hand_count(smoke, monkeypatch):
    _, res = smoke
    # tiny linear config at 64 px: patch 8 -> 64 patches + CLS = 65 tokens, width 64, 4 heads, 2 layers, MLP 4x
    N, d, L, H, C, P, classes = 65, 64, 2, 4, 3, 8, 10
    embed = 2 * 64 * (C * P * P) * d                      # conv: every patch times a (C P P) x d matrix
    qkv, proj = 2 * N * d * (3 * d), 2 * 1 * d * d          # Linear-InfSA projects one context vector
    mlp = 2 * N * d * (4 * d) + 2 * N * (4 * d) * d
    attn = H * (2 * N * (d // H)) * 3                       # qbar = sum w q, scores qbar . k, context sum a v
    head = 2 * d * classes
    hand = embed + L * (qkv + proj + mlp + attn) + head
    assert hand == 13_355_008
    (r,) = rows_of(res, mode="infer", kind="linear", image=64)
    assert r["flops_model"] == hand
    assert r["flops_24"] == 24 * N * d * d * L == 12_779_520
    (t,) = rows_of(res, mode="train", kind="linear", image=64)
    assert t["flops_model"] == 3 * hand and t["flops_24"] == 3 * r["flops_24"]
    # and against PyTorch's own count of the matmuls the models run (CPU SDPA is not counted, so no softmax)
    # (Pure-InfSA without the zero tokens that pad N to a multiple of 8: they cost but compute nothing)
    monkeypatch.setattr(Attention, "_pure", lambda self, q, k, v, g: infsa.pure_infsa(q, k, v, g, self.cfg.hops))
    for kind in ("linear", "pure-K3", "pure-K1"):
        (r,) = rows_of(res, mode="infer", kind=kind, image=64)
        cfg = bench.make_config(kind, 64, 2, bench.argparse.Namespace(cpu=True, chunk=0, pure_mem_gb=1.0))
        with FlopCounterMode(display=False) as fc:
            ViT(cfg, verbose=False)(torch.randn(2, 3, 64, 64))
        assert fc.get_total_flops() == 2 * r["flops_model"], kind


def test_out_of_memory_becomes_a_row_not_a_crash(tmp_path, monkeypatch):
    def oom(row):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 34.00 GiB")

    def rt(row):
        raise RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate")

    def bad(row):
        raise ValueError("something else")

    assert bench.guarded({}, oom)["status"] == "oom"
    assert bench.guarded({}, rt)["status"] == "oom"
    assert bench.guarded({}, bad)["status"].startswith("error: ValueError")
    # end to end: the materialised softmax runs out of memory inside the model
    sdpa = infsa.softmax_attention
    monkeypatch.setattr(infsa, "softmax_attention_materialized", lambda q, k, v: oom(None))
    res = bench.main(["--cpu", "--out_dir", str(tmp_path), "--kinds", "softmax-mat,linear", "--sizes", "32",
                      "--train_kinds", "", "--runs", "2"])
    assert [(r["kind"], r["status"]) for r in res["rows"]] == [("softmax-mat", "oom"), ("linear", "ok")]
    assert infsa.softmax_attention is sdpa  # the swap is undone after the row, even on an error
    assert res["ratios"][0]["mat_status"] == "oom" and res["ratios"][0]["linear_over_mat"] is None
    assert (tmp_path / "bench_results.png").exists()


def test_rows_over_budget_are_skipped_with_an_estimate(tmp_path):
    res = bench.main(["--cpu", "--out_dir", str(tmp_path), "--kinds", "linear", "--sizes", "32,64",
                      "--train_kinds", "", "--budget_s", "1e-6"])
    first, second = res["rows"]
    assert first["status"] == "skipped: over budget" and first["completed"] and first["img_s_est"] > 0
    assert second["status"] == "skipped: over budget" and not second["completed"] and "predicted" in second["note"]


def test_auto_chunk_fits_the_memory_cap():
    cfg = bench.make_config("pure-K3", 4096, 1, bench.argparse.Namespace(cpu=False, chunk=0, pure_mem_gb=48.0))
    assert cfg.n_tokens == 65537 and cfg.chunk == 1024  # 10 B * 64 heads * 1024 rows * 65537 cols ~ 43 GB
    cfg = bench.make_config("pure-K1", 512, 32, bench.argparse.Namespace(cpu=False, chunk=0, pure_mem_gb=48.0))
    assert cfg.chunk == 0 and cfg.hops == 1  # the whole A_hat fits


@pytest.mark.parametrize("argv, msg", [
    (["--kinds", "linear,pure-K0"], "unknown kind 'pure-K0'"),
    (["--sizes", "32,abc"], "--sizes takes positive integers"),
    (["--sizes", "36"], "image_size (36) must be divisible by patch_size (8)"),
    (["--batch", "64:0"], "--batch takes one batch size (8) or size:batch pairs"),
    (["--runs", "0"], "--runs must be positive"),
    (["--replot", "missing.json"], "not a readable results file (FileNotFoundError)"),
])
def test_bad_options_stop_before_anything_is_measured_or_written(argv, msg, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        bench.main(["--cpu", "--out_dir", "run"] + argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and msg in err and len(err.splitlines()) == 1 and not (tmp_path / "run").exists()
