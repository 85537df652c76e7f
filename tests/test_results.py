"""RESULTS.md's GPU numbers are the ones in the committed run summaries (assets/): the Triton
kernels (§4), CIFAR-10 and its recipe search (§5), several processes and streaming (§7).
The README, the CPU runs, the commands and the scaling table: test_readme.py."""
import math
import re

import pytest

import model
from tests.test_readme import (
    CIFAR,
    FLAT,
    KINDS,
    RESULTS,
    ROOT,
    SEARCH,
    bench_row,
    close,
    close_as_shown,
    kind_of,
    load,
    mean,
    mean_shift,
    mean_test_acc,
    summaries,
    table_after,
)


def test_the_img_s_caveat_is_the_measured_one():
    assert "about 5% of the steps' time" in (SEARCH / "overheads.txt").read_text()
    assert "read up to about 5% high" in FLAT


# ---- RESULTS.md §4: the Triton kernels

def test_kernel_table_matches_its_benchmark():
    """The Triton-kernel table: each figure (img/s, seconds, GB) is its row of bench_kernel.json."""
    checked = 0
    for row in table_after(RESULTS, "| row | Triton kernel |"):
        mode = "train" if row[0].startswith("training") else "infer"
        image = int(re.search(r"(\d+)²", row[0])[1])
        for kind, cell in (("pure", row[1]), ("pure-chunked", row[2])):
            if cell == "not run":
                continue
            r = bench_row(kind, image, mode, name="bench_kernel.json")
            for value, unit in re.findall(r"([\d.]+) (img/s|s|GB)\b", cell):
                want = {"img/s": r["img_s"], "s": r["s"], "GB": r["peak_gb"]}
                assert close_as_shown(value, want[unit]), (row[0], kind, cell)
                checked += 1
    assert checked >= 10


def test_kernel_speedup_is_the_ratio_of_the_benchmarks():
    def kernel(kind="pure"):
        return bench_row(kind, 4096, "infer", name="bench_kernel.json")

    m = re.search(r"run (\d+)× the chunked loop at 4096², at (\d+) TFLOP/s", FLAT)
    assert close(m[1], kernel()["img_s"] / kernel("pure-chunked")["img_s"], 0)
    assert close(m[2], kernel()["flops"] / kernel()["s"] / 1e12, 0)


def test_kernels_against_padded_products_are_the_benchmarks():
    """Each ratio is img/s of pure-fused (the kernels) ÷ pure-padded in its row of a
    bench_fused_*.json, whose command RESULTS shows; with heads of 16 the kernels lose in the
    last row below model.FUSED_MIN_TOKENS and win in every row from it, in both modes."""
    runs = [load(p) for p in sorted((ROOT / "assets").glob("bench_fused_*.json"))]
    for run in runs:  # the command as shown, less its --out_dir
        assert run["command"].split(" --out_dir")[0] + "\n" in RESULTS
    rows, faster = table_after(RESULTS, "| tokens | `config/cifar.py`"), {}
    for tokens, cifar, paper_image_batch, paper in rows:
        tokens = int(tokens.replace(",", ""))
        image, batch = (int(x) for x in paper_image_batch.replace("²", "").split(", "))
        cifar_image = 4 * math.isqrt(tokens - 1)  # patch 4, and CLS
        for vit, cell, S, B in (("cifar", cifar, cifar_image, 512), ("paper", paper, image, batch)):
            if not cell:
                continue
            (run,) = [r for r in runs if ("--vit cifar" in r["command"]) == (vit == "cifar")
                      and any(x["image"] == S for x in r["rows"])]
            for mode, shown in zip(("infer", "train"), cell.split(" / ")):
                r = {x["kind"]: x for x in run["rows"] if (x["mode"], x["image"]) == (mode, S)}
                assert (r["pure-fused"]["tokens"], r["pure-fused"]["batch"]) == (tokens, B)
                ratio = r["pure-fused"]["img_s"] / r["pure-padded"]["img_s"]
                assert close(shown.rstrip("×"), ratio, 2), (vit, tokens, mode)
                if vit == "paper":
                    faster[tokens, mode] = ratio > 1
    below = max(t for t, _ in faster if t < model.FUSED_MIN_TOKENS)
    assert not all(faster[below, m] for m in ("infer", "train"))
    assert all(ok for (t, _), ok in faster.items() if t >= model.FUSED_MIN_TOKENS)
    assert len(rows) == 6


# ---- §5: CIFAR-10

@pytest.mark.parametrize("header, prefix, col", [
    ("| attention | seed | val acc (best) | test acc |", "long560", 3),
    ("| attention | seed | test acc | shift", "long640", 2),
    ("| attention | seed | val acc, flip (best) |", "min10", 3),
    ("| attention | seed | test acc, 10 views |", "min10ovl", 2),
])
def test_per_seed_cifar_rows_match_their_summaries(header, prefix, col):
    """Test acc, shift (drop), img/s and minutes of each seed; a validation column: final
    (best); a mean row: the mean of the seeds' test acc, shift and drop."""
    seen = 0
    for row in table_after(RESULTS, header):
        kind = kind_of(row[0])
        shift, drop = re.match(r"([\d.]+) \(−([\d.]+)\)", row[col + 1]).groups()
        if not row[1]:
            test = mean_test_acc(prefix, kind)
            assert close(row[col], test, 2) and close(shift, mean_shift(prefix, kind), 1), row
            assert close(drop, test - mean_shift(prefix, kind), 1), row
            continue
        run = summaries("cifar", prefix, kind)[int(row[1])]
        assert close(row[col], 100 * run["test_acc"], 2), row
        assert close(shift, 100 * run["shift"]["mean"], 1), row
        assert close(drop, 100 * (run["test_acc"] - run["shift"]["mean"]), 1), row
        assert int(row[-2].replace(",", "")) == round(run["img_s"]), row
        assert close(row[-1], run["wall_s"] / 60, 1), row
        if col == 3:  # a validation column: final (best)
            val, best = re.match(r"([\d.]+) \(([\d.]+)\)", row[2]).groups()
            assert close(val, 100 * run["val_acc"], 2), row
            assert close(best, 100 * run["best_val_acc"], 2), row
        seen += 1
    assert seen == 6


def test_75_epoch_rows_match_their_summaries():
    rows = table_after(RESULTS, "| attention | test acc, seeds 1337 / 2 |")
    solo = load(CIFAR / "solo_throughput.json")
    assert len(rows) == 3
    for row in rows:
        kind = kind_of(row[0])
        runs = summaries("cifar", "light", kind)
        for seed, shown in zip((1337, 2), row[1].split(" / ")):
            assert close(shown, 100 * runs[seed]["test_acc"], 2), row
        test, shift = mean_test_acc("light", kind), mean_shift("light", kind)
        assert close(row[2], test, 2), row
        m = re.match(r"([\d.]+)% \(−([\d.]+)\)", row[3])
        assert close(m[1], shift, 1) and close(m[2], test - shift, 1), row
        kind_key = {"softmax": "s_plain", "pure": "s_pure", "linear": "s_linear"}[kind]
        assert int(row[4].replace(",", "")) == round(solo[kind_key]["summary"]["img_s"]), row
    m = re.search(r"`light` beat `--augment strong` on validation \(mean of the three kinds, seed "
                  r"1337\): ([\d.]+)% against ([\d.]+)%", FLAT)
    for shown, prefix in zip(m.groups(), ("light", "strong")):
        val = mean(100 * summaries("cifar", prefix, k)[1337]["val_acc"] for k in KINDS.values())
        assert close(shown, val, 1), prefix


def test_parameter_counts_and_learned_gammas():
    for shown, prefix in (("7,152,058", "light"), ("7,207,354", "min10ovl")):
        assert f"{shown} parameters" in FLAT
        for kind in KINDS.values():
            assert all(s["params"] == int(shown.replace(",", ""))
                       for s in summaries("cifar", prefix, kind).values()), (prefix, kind)
    gammas = re.findall(r"Mean learned γ[^:]*: ([\d.]+) \(pure\), ([\d.]+) \(linear\)", FLAT)
    assert len(gammas) == 4
    for (pure, linear), prefix in zip(gammas, ("long560", "long640", "min10ovl", "min10")):
        for shown, kind in ((pure, "pure"), (linear, "linear")):
            want = mean(s["gamma_mean"] for s in summaries("cifar", prefix, kind).values())
            assert close(shown, want, 2), (prefix, kind)


def search_summary(run):
    """A search row's summary: assets/cifar/search/<run>.json, a final run's summary.json, or
    (long360, long560, min10) the softmax seed-1337 run of that recipe."""
    for f in (SEARCH / f"{run}.json", CIFAR / run / "summary.json",
              CIFAR / f"{run}_softmax_s1337" / "summary.json"):
        if f.exists():
            return load(f)
    return None


def val_at(run, epoch):
    """Validation accuracies (%) at the end of `epoch` of a run: its search log, or the curve.json
    of each run folder that run (a glob; long560, min10: the softmax seed-1337 run) names."""
    log = SEARCH / f"{run}.log"
    if log.exists():
        return [100 * float(re.search(rf"epoch {epoch}/\d+: val acc ([\d.]+)", log.read_text())[1])]
    folders = sorted(CIFAR.glob(run)) or [CIFAR / f"{run}_softmax_s1337"]
    return [100 * next(e["val_acc"] for e in load(f / "curve.json")["eval"]
                       if e["epoch"] + 1 == epoch) for f in folders]


def lead(cell):
    return float(re.match(r"[\d.]+", cell).group())


def test_recipe_search_rows_match_their_summaries():
    """The search table: epochs, val acc, flip, img/s and minutes of every finished run are its
    summary's; a run evaluated with the mirror throughout shows only the flip column, its val_acc;
    "X at epoch E" is its log's; "±d on x" is the difference of the two rows; "x at epoch E: v" is
    x's validation accuracy then; "(test t)" the run's test accuracy."""
    rows = table_after(RESULTS, "| run | change |")
    by_run = {row[0]: row for row in rows}
    assert len(rows) == 29 and len(by_run) == 29
    finished = 0
    for run, _, epochs, val, flip, ips, mins, gave in rows:
        s = search_summary(run)
        if s:
            assert int(epochs) == s.get("epochs", s["steps"] // (45_000 // 512)), run
            assert close(flip, 100 * s["val_acc_flip" if val else "val_acc"], 2) if flip else \
                "val_acc_flip" not in s, run
            assert not val or close(val, 100 * s["val_acc"], 2), run
            assert close(ips, s["img_s"], 0) and close(mins, s["wall_s"] / 60, 1), run
            for test in re.findall(r"\(test ([\d.]+)\)", gave):
                assert close(test, 100 * s["test_acc"], 2), run
            finished += 1
        else:
            shown, epoch = re.match(r"([\d.]+) at epoch (\d+)$", val or flip).groups()
            assert val_at(run, int(epoch)) == pytest.approx([float(shown)], abs=5e-3), run
        for delta, ref in re.findall(r"([+−][\d.]+) on (\w+)", gave):
            other = by_run[ref]
            both_val = bool(val) and bool(other[3])
            a, b = (lead(val), lead(other[3])) if both_val else (lead(flip), lead(other[4]))
            assert close(delta.replace("+", ""), a - b, 2), (run, delta, ref)
        for ref, epoch, values in re.findall(r"(\S+) at epoch (\d+): ([\d.]+(?: / [\d.]+)*)", gave):
            want = val_at(ref, int(epoch))
            assert [float(v) for v in values.split(" / ")] == pytest.approx(want, abs=5e-3), run
    assert finished == 23


def test_recipe_search_notes_match_their_files():
    found = {r[0]: search_summary(r[0]) for r in table_after(RESULTS, "| run | change |")}
    seeds = summaries("cifar", "long560", "softmax")
    m = re.search(r"two seeds of `config/cifar_long.py` differ by (\d+\.\d+)", FLAT)
    assert close(m[1], 100 * (seeds[1337]["val_acc"] - seeds[2]["val_acc"]), 2)
    gains = [100 * (s["val_acc_flip"] - s["val_acc"]) for run, s in found.items()
             if s and "val_acc_flip" in s and s["val_acc_flip"] != s["val_acc"]]
    m = re.search(r"The mirror added ([\d.]+)–([\d.]+) points in all ten runs with both", FLAT)
    assert len(gains) == 10 and close(m[1], min(gains), 2) and close(m[2], max(gains), 2)
    ema = re.search(r"decay 0\.998: (.+?); decay 0\.9995: (.+?), for (.+?)\)", FLAT)
    for i, decay in enumerate(("0.998", "0.9995")):
        for run, gain in zip(ema[3].split(", "), ema[i + 1].split(", "), strict=True):
            s = found[run]
            assert close(gain, 100 * (s[f"val_acc_ema{decay}"] - s["val_acc"]), 2), (run, decay)
    moves = re.search(r"gives s2e670's final weights ([\d.]+)%, ([\d.]+)% and ([\d.]+)% validation",
                      FLAT)
    for m_px, shown in zip((1, 2, 3), moves.groups()):
        assert close(shown, 100 * found["s2e670"][f"val_acc_move{m_px}"], 2)
    lines = (SEARCH / "step_cost.txt").read_text().splitlines()[2:]  # run, img/s, change
    cost = {change: ips for _, ips, change in (line.split("\t") for line in lines)}
    for change, ips in (("(none)", "61,859"), ("--mixup 0 --cutmix 0", "67,010"),
                        ("--grad_clip 0", "64,926")):
        assert cost[change] == ips.replace(",", "") + " img/s" and ips in FLAT, change
    hops = re.findall(r"--hops (\d):.*\| ([\d,]+) img/s", (SEARCH / "pure_hops.txt").read_text())
    assert f"{hops[0][1]} img/s with K = {hops[0][0]} and {hops[1][1]} with K = {hops[1][0]}" \
        in FLAT, hops
    mixed = [line.split() for line in (SEARCH / "mixed_loss.txt").read_text().splitlines()[2:]]
    for code in ("train", "train_old"):
        assert " and ".join(f"{int(r[2]):,}" for r in mixed if r[0] == code) in FLAT, code
    probe = load(CIFAR / "throughput_long.json")["probe_training_step"]["runs"]
    m = re.search(r"CUDA graphs took a softmax step from ([\d.]+) to ([\d.]+) ms", FLAT)
    assert close(m[1], probe["softmax/default/384"]["ms_step"], 1)
    assert close(m[2], probe["softmax/reduce-overhead/384"]["ms_step"], 1)
    step = (SEARCH / "pure_step.txt").read_text()
    m = re.search(r"never forming Â, a Pure-InfSA step from ([\d.]+) to ([\d.]+) ms", FLAT)
    assert m[1] == re.search(r"A_hat materialised:.*median ([\d.]+)", step)[1]
    assert m[2] == re.search(r"c S, never A_hat:.*median ([\d.]+)", step)[1]


def test_the_10_minute_recipe_notes_match_their_summaries():
    s = load(SEARCH / "all50k.json")
    m = re.search(r"Softmax seed 1337: ([\d.]+)% with the mirror alone, ([\d.]+)%, ([\d.]+)%, "
                  r"([\d.]+)% with moves of 1, 2, 3 pixels", FLAT)
    for shown, key in zip(m.groups(), ("test_acc", "test_acc_move1", "test_acc_move2",
                                       "test_acc_move3")):
        assert close(shown, 100 * s[key], 2), key
    final = load(CIFAR / "min10ovl_softmax_s1337" / "summary.json")
    assert s["test_acc_move2"] == final["test_acc"]  # the table's run, evaluated with m = 2
    m = re.search(r"img/s differs by up to (\d+)% within a kind", FLAT)
    spread = max(max(r) / min(r) - 1 for r in (
        [s["img_s"] for s in summaries("cifar", "min10", k).values()] for k in KINDS.values()))
    assert close(m[1], 100 * spread, 0)


def test_the_gaps_at_the_10_minute_recipe_are_the_summaries():
    """The 10-minute gaps to softmax and Pure-InfSA's seconds (within 600)."""
    runs = {k: summaries("cifar", "min10ovl", k) for k in ("softmax", "pure", "linear")}
    soft, pure, lin = (mean_test_acc("min10ovl", k) for k in runs)
    m = re.search(r"Pure-InfSA \(K = 2\) is ([\d.]+) points behind \(([\d.]+)% against ([\d.]+)%; "
                  r"([\d.]+) and ([\d.]+) seed for seed, in (\d+) and (\d+) s\) and Linear-InfSA "
                  r"([\d.]+) \(([\d.]+)%\)", FLAT)
    assert close(m[1], soft - pure, 2) and close(m[2], pure, 2) and close(m[3], soft, 2)
    for shown, seed in zip(m.group(4, 5), (1337, 2)):
        gap = runs["softmax"][seed]["test_acc"] - runs["pure"][seed]["test_acc"]
        assert close(shown, 100 * gap, 2)
    walls = sorted(s["wall_s"] for s in runs["pure"].values())
    assert close(m[6], walls[0], 0) and close(m[7], walls[1], 0)
    assert close(m[8], soft - lin, 2) and close(m[9], lin, 2)
    assert walls[1] <= 600 and all(s["wall_s"] <= 600 for s in runs["softmax"].values())


def test_the_claims_about_the_paper_are_the_summaries():
    lengths = ("light", "long560", "long640", "min10", "min10ovl")
    for prefix in lengths:  # softmax > Pure-InfSA > Linear-InfSA, seed for seed
        soft, pure, lin = (summaries("cifar", prefix, k) for k in ("softmax", "pure", "linear"))
        assert all(soft[i]["test_acc"] > pure[i]["test_acc"] > lin[i]["test_acc"] for i in soft)
    light = {k: [100 * r["test_acc"] for r in summaries("cifar", "light", k).values()]
             for k in ("softmax", "pure")}
    spread = max(max(v) - min(v) for v in light.values())
    assert abs(mean(light["softmax"]) - mean(light["pure"])) < spread  # within seed spread
    m = re.search(r"it is ([\d.]+)–([\d.]+) points behind, and Linear-InfSA "
                  r"([\d.]+)–([\d.]+)\.", FLAT)
    for (lo, hi), kind in ((m.group(1, 2), "pure"), (m.group(3, 4), "linear")):
        gaps = [mean_test_acc(p, "softmax") - mean_test_acc(p, kind)
                for p in ("long560", "long640", "min10")]
        assert close(lo, min(gaps), 1) and close(hi, max(gaps), 1), kind

    def drop(prefix, kind):
        return mean_test_acc(prefix, kind) - mean_shift(prefix, kind)

    assert "Pure-InfSA drops more than softmax at every length, Linear-InfSA more at 560 and 640" \
        " epochs;" in FLAT
    assert all(drop(p, "pure") > drop(p, "softmax") for p in lengths)
    assert [drop(p, "linear") > drop(p, "softmax") for p in lengths] == [False, True, True, False,
                                                                         False]
    assert "softmax has the highest shift accuracy at every length, and from 560 epochs on under" \
        " each corruption" in FLAT
    for p in lengths:
        assert mean_shift(p, "softmax") > max(mean_shift(p, k) for k in ("pure", "linear")), p
        for c in ("noise", "blur", "contrast", "jpeg") if p != "light" else ():
            others = max(mean_shift(p, k, c) for k in ("pure", "linear"))
            assert mean_shift(p, "softmax", c) > others, (p, c)


# ---- §7: several processes and streaming

def test_several_processes_table_and_streaming_match_their_summaries():
    rows = table_after(RESULTS, "| run (`assets/cifar/`) |")
    assert len(rows) == 4
    for row in rows:
        name = row[0].split(" (")[0]
        names = [name] if " / " not in name else [name.split(" / ")[0],
                                                  name.split(" / ")[0].rsplit("_s", 1)[0] + "_s2"]
        runs = [load(CIFAR / n / "summary.json") for n in names]
        assert all(s["world"] == int(row[1]) for s in runs), row
        if row[3]:
            assert int(row[3].split()[0].replace(",", "")) == round(runs[0]["img_s"]), row
        if row[4]:
            for shown, s in zip(row[4].split(" / "), runs, strict=True):
                assert close(shown, 100 * s["test_acc"], 2), row
    one, two = (load(CIFAR / f"dp{n}gpu_linear_s1337" / "summary.json") for n in (1, 2))
    assert close(re.search(r"150,225 \(([\d.]+)×\)", RESULTS)[1], two["img_s"] / one["img_s"], 2)
    assert "dp2gpu trained 21 epochs" in FLAT and two["epochs"] == 21
    runs = load(CIFAR / "ddp_stream.json")
    m = re.search(r"images in GPU memory ([\d,]+) img/s \(([\d.]+)%\), "
                  r"`torchrun --nproc_per_node=1` ([\d,]+) img/s \(([\d.]+)%\), "
                  r"`--stream true --workers 12` ([\d,]+) img/s \(([\d.]+)%\)", FLAT)
    for (ips, acc), key in zip((m.group(1, 2), m.group(3, 4), m.group(5, 6)),
                               ("s_plain", "s_ddp1", "s_stream")):
        s = runs[key]["summary"]
        assert int(ips.replace(",", "")) == round(s["img_s"]), key
        assert close(acc, 100 * s["test_acc"], 2), key
