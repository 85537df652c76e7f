"""RESULTS.md §4's energy table and §6's fp16 tables, and the README's energy claim, against the
committed files (assets/bench_energy.json, assets/fp16/)."""
import re

from tests.test_readme import FLAT, README, RESULTS, ROOT, close, load, table_after

NAMES = {"Linear-InfSA": "linear", "softmax, SDPA": "softmax",
         "softmax, materialised": "softmax-mat", "Pure-InfSA, Triton kernels": "pure"}


def energy(kind):
    (row,) = [r for r in load(ROOT / "assets" / "bench_energy.json")["rows"] if r["kind"] == kind]
    return row


def test_energy_table_and_ratios_are_the_counter_readings():
    run = load(ROOT / "assets" / "bench_energy.json")
    assert run["device"] == "NVIDIA H100 80GB HBM3" and f"({run['idle_w']} W" in FLAT
    rows = table_after(RESULTS, "| kind | img/s | J/image |")
    assert [r[0] for r in rows] == list(NAMES)
    for name, ips, joules, above in rows:
        r = energy(NAMES[name])
        for shown, value in ((ips, r["img_s"]), (joules, r["j_img"]),
                             (above, r["j_img_above_idle"])):
            assert close(shown, value, len(shown.split(".")[1]) if "." in shown else 0), name
    lin, sdpa, mat = (energy(k)["j_img"] for k in ("linear", "softmax", "softmax-mat"))
    assert f"here {mat / lin:.0f}× ({lin:.3f} against {mat:.1f})" in FLAT
    assert f"takes {sdpa / lin:.1f}× less energy" in FLAT
    claim = " ".join(README.split())
    assert (f"{lin:.2f} J/image on an H100" in claim and f"{mat / lin:.0f}× less than a "
            f"materialised softmax ({mat:.1f} J/image), {sdpa / lin:.1f}× less than SDPA softmax "
            f"({sdpa:.2f})" in claim)


def fp16_run(name):
    return load(ROOT / "assets" / "fp16" / name / "summary.json")


def test_fp16_tables_are_the_runs():
    rows = table_after(RESULTS, "| attention | bf16, seeds 1337 / 2 | fp16, seeds 1337 / 2 |")
    gaps, spreads = [], []
    for row, kind in zip(rows, ("softmax", "pure", "linear")):
        runs = {d: [100 * fp16_run(f"shapes_{kind}_{d}_s{s}")["test_acc"] for s in (1337, 2)]
                for d in ("bfloat16", "float16")}
        for cell, d in zip(row[1:], runs):
            assert all(close(v, a, 2) for v, a in zip(cell.split(" / "), runs[d])), row
        gaps += [abs(a - b) for a, b in zip(*runs.values())]
        spreads += [abs(a - b) for a, b in runs.values()]
    m = re.search(r"within ([\d.]+) points of its bf16 twin, while two seeds of one dtype differ "
                  r"by up to ([\d.]+)", FLAT)
    assert close(m[1], max(gaps), 2) and close(m[2], max(spreads), 2)
    rows = table_after(RESULTS, "| attention | fp16, seed 1337 | bf16, seeds 1337 / 2 |")
    outside = []  # how far each fp16 run lies outside the range of its two bf16 seeds
    for row, kind in zip(rows, ("softmax", "pure", "linear"), strict=True):
        fp16 = 100 * fp16_run(f"light_{kind}_float16")["test_acc"]
        assert close(row[1], fp16, 2) and fp16_run(f"light_{kind}_float16")["dtype"] == "float16"
        bf16 = [100 * load(ROOT / "assets" / "cifar" / f"light_{kind}_s{s}" / "summary.json")
                ["test_acc"] for s in (1337, 2)]
        assert all(close(v, a, 2) for v, a in zip(row[2].split(" / "), bf16)), row
        outside.append(max(min(bf16) - fp16, fp16 - max(bf16), 0))
    m = re.search(r"each fp16 run lies between its two bf16 seeds or at most ([\d.]+) points",
                  FLAT)
    assert m and close(m[1], max(outside), 2)
    assert "the loss became nan by step 1180" in (ROOT / "assets" / "fp16" /
                                                   "light_pure_float16.txt").read_text()
