"""The numbers in README.md and RESULTS.md are the ones in the committed run summaries (assets/)."""
import json
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README, RESULTS = (ROOT / "README.md").read_text(), (ROOT / "RESULTS.md").read_text()
KINDS = {"softmax": "softmax", "Pure-InfSA": "pure", "Linear-InfSA": "linear"}


def table_after(text, header_start):
    """Rows (lists of cell strings) of the first table in text whose header line starts so."""
    lines = text.splitlines()
    i = next(n for n, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[i + 2:]:  # skip the header and its | --- | line
        if not line.startswith("|"):
            break
        rows.append([c.strip(" *%") for c in line.strip("|").split("|")])
    return rows


def summaries(folder, prefix, kind):
    """{seed: summary.json} of the runs assets/<folder>/<prefix>_<kind>_s<seed>/."""
    return {int(f.parent.name.rsplit("_s", 1)[1]): json.loads(f.read_text())
            for f in sorted((ROOT / "assets" / folder).glob(f"{prefix}_{kind}_s*/summary.json"))}


def mean_test_acc(prefix, kind):
    runs = summaries("cifar", prefix, kind).values()
    return sum(100 * s["test_acc"] for s in runs) / len(runs)


def close(shown, value, decimals):
    """The text shows `value` rounded to `decimals` (either way at an exact half)."""
    return abs(float(shown.replace(",", "")) - value) <= 0.5 * 10 ** -decimals + 1e-4  # summaries hold fp32


def kind_of(label):
    return KINDS[next(k for k in KINDS if label.startswith(k))]


def test_cifar_means_in_the_readme_are_the_means_of_the_summaries():
    recipe = {"`config/cifar.py`": "light", "`config/cifar_long.py`": "long560", "`config/cifar_long.py --epochs 640`": "long640",
              "`config/cifar_10min.py` with patches apart (RESULTS.md's `min10`)": "min10", "`config/cifar_10min.py`": "min10ovl"}
    rows = table_after(README, "| recipe | softmax |")
    assert len(rows) == 5
    for row in rows:
        prefix = recipe[row[0].split(",")[0]]
        for kind, cell in zip(("softmax", "pure", "linear"), row[1:]):
            assert len(summaries("cifar", prefix, kind)) == 2, (prefix, kind)
            assert close(re.match(r"[\d.]+", cell).group(), mean_test_acc(prefix, kind), 2), (prefix, kind, cell)
            span = re.search(r"\(([\d.]+)(?:–([\d.]+))? min\)", cell)  # minutes of training: the seeds' range
            wall = sorted(s["wall_s"] / 60 for s in summaries("cifar", prefix, kind).values())
            assert not span or close(span[1], wall[0], 1) and close(span[2] or span[1], wall[-1], 1), (prefix, kind, cell)


@pytest.mark.parametrize("header, prefix, col, n_runs", [
    ("| attention | seed | val acc (best) | test acc |", "long560", 3, 7),
    ("| attention | seed | test acc |", "long640", 2, 6),
    ("| attention | seed | val acc, flip (best) |", "min10", 3, 6),
    ("| attention | seed | test acc, 10 views |", "min10ovl", 2, 6),
])
def test_per_seed_cifar_rows_match_their_summaries(header, prefix, col, n_runs):
    seen = 0
    for row in table_after(RESULTS, header):
        if not row[1]:  # a mean row: checked against the seed rows' summaries
            assert close(row[col], mean_test_acc(prefix, kind_of(row[0])), 2), row
            continue
        run = summaries("cifar", "long360" if "--epochs 360" in row[0] else prefix, kind_of(row[0]))[int(row[1])]
        assert close(row[col], 100 * run["test_acc"], 2), row
        shift, drop = re.match(r"([\d.]+) \(−([\d.]+)\)", row[col + 1]).groups()
        assert close(shift, 100 * run["shift"]["mean"], 1) and close(drop, 100 * (run["test_acc"] - run["shift"]["mean"]), 1), row
        assert int(row[-3].replace(",", "")) == round(run["img_s"]) and close(row[-2].rstrip("%"), 100 * run["mfu"], 1), row
        assert close(row[-1], run["wall_s"] / 60, 1), row
        if col == 3:  # a validation column: final (best)
            val, best = re.match(r"([\d.]+) \(([\d.]+)\)", row[2]).groups()
            assert close(val, 100 * run["val_acc"], 2) and close(best, 100 * run["best_val_acc"], 2), row
        seen += 1
    assert seen == n_runs


def test_the_gaps_at_the_10_minute_recipe_are_the_summaries():
    """The verdict's gaps to softmax at config/cifar_10min.py, and Pure-InfSA's seconds (within 600), in README and RESULTS."""
    runs = {k: summaries("cifar", "min10ovl", k) for k in ("softmax", "pure", "linear")}
    soft, pure, lin = (mean_test_acc("min10ovl", k) for k in runs)
    m = re.search(r"reaches\s+([\d.]+)%, ([\d.]+) points behind", README)
    assert close(m[1], pure, 2) and close(m[2], soft - pure, 2)
    m = re.search(r"Pure-InfSA \(K = 2\) is ([\d.]+) points behind \(([\d.]+)% against\s+([\d.]+)%; ([\d.]+) and ([\d.]+) "
                  r"seed for seed, in (\d+) and (\d+) s\) and Linear-InfSA ([\d.]+) \(([\d.]+)%\)", RESULTS)
    assert close(m[1], soft - pure, 2) and close(m[2], pure, 2) and close(m[3], soft, 2)
    for shown, seed in zip(m.group(4, 5), (1337, 2)):
        assert close(shown, 100 * (runs["softmax"][seed]["test_acc"] - runs["pure"][seed]["test_acc"]), 2)
    walls = sorted(s["wall_s"] for s in runs["pure"].values())
    assert close(m[6], walls[0], 0) and close(m[7], walls[1], 0) and close(m[8], soft - lin, 2) and close(m[9], lin, 2)
    assert walls[1] <= 600 and all(s["wall_s"] <= 600 for s in runs["softmax"].values())


def test_75_epoch_rows_match_their_summaries():
    rows = table_after(RESULTS, "| attention | test acc, seeds 1337 / 2 |")
    assert len(rows) == 3
    for row in rows:
        runs = summaries("cifar", "light", kind_of(row[0]))
        for seed, shown in zip((1337, 2), row[1].split(" / ")):
            assert close(shown, 100 * runs[seed]["test_acc"], 2), row


def bench_speed(kind, image, mode="infer", compiled=False):
    rows = json.loads((ROOT / "assets" / "bench.json").read_text())["rows"]
    (r,) = [r for r in rows if (r["kind"], r["image"], r["mode"], r["compiled"]) == (kind, image, mode, compiled)]
    return r.get("img_s"), r["status"]


@pytest.mark.parametrize("name", ["README.md", "RESULTS.md"])
def test_scaling_tables_match_the_benchmark(name):
    text = (ROOT / name).read_text()
    columns = ["linear", "softmax", "softmax-mat", "pure", "pure-chunked"]
    rows = table_after(text, "| image | tokens | Linear-InfSA |")
    assert len(rows) >= 3
    for row in rows:
        image = int(row[0].rstrip("²"))
        for kind, cell in zip(columns, row[2:]):
            if not cell or cell.startswith("not run"):
                continue
            speed, status = bench_speed(kind, image)
            if cell.startswith("out of memory"):
                assert status == "oom", (image, kind)
            else:
                shown = cell.split()[0]
                assert abs(float(shown.replace(",", "")) / speed - 1) < 0.005 + 0.5 * 10 ** -(len(shown.replace(",", "").replace(".", "").lstrip("0")) - 1), (image, kind, cell)


def test_kernel_table_matches_its_benchmark():
    """RESULTS §4's Triton-kernel table: each figure (img/s, seconds, GB) is its row of assets/bench_kernel.json."""
    rows = json.loads((ROOT / "assets" / "bench_kernel.json").read_text())["rows"]
    checked = 0
    for row in table_after(RESULTS, "| row | Triton kernel |"):
        mode, image = ("train" if row[0].startswith("training") else "infer"), int(re.search(r"(\d+)²", row[0])[1])
        for kind, cell in (("pure", row[1]), ("pure-chunked", row[2])):
            found = [r for r in rows if (r["mode"], r["kind"], r["image"]) == (mode, kind, image)]
            for value, unit in re.findall(r"([\d.]+) (img/s|s|GB)\b", cell) if found else ():
                want = {"img/s": found[0]["img_s"], "s": found[0]["s"], "GB": found[0]["peak_gb"]}[unit]
                assert close(value, want, len(value.split(".")[1]) if "." in value else 0), (row[0], kind, cell)
                checked += 1
    assert checked >= 10


def test_recipe_search_rows_match_their_summaries():
    """RESULTS §5's recipe search: val acc, flip, img/s and minutes of every finished run are its summary's
    (assets/cifar/search/<run>.json, or a final run's assets/cifar/<run>/summary.json); a run evaluated with
    --flip_eval throughout shows only the flip column, its val_acc."""
    rows, cifar = [r for r in table_after(RESULTS, "| run | change from") if r[0]], ROOT / "assets" / "cifar"
    found = {r[0]: f for r in rows for f in (cifar / "search" / f"{r[0]}.json", cifar / r[0] / "summary.json") if f.exists()}
    for run, _, epochs, val, flip, ips, minutes in (r for r in rows if r[0] in found):
        s = json.loads(found[run].read_text())
        assert int(epochs) == s["epochs"] and close(flip, 100 * s["val_acc_flip" if val else "val_acc"], 2), run
        assert (not val or close(val, 100 * s["val_acc"], 2)) and close(ips, s["img_s"], 0), run
        assert close(minutes, s["wall_s"] / 60, 1), run
    assert len(found) == 21 and len(rows) == 27
    best = re.search(r"takes\s+softmax to ([\d.]+)% test in ([\d.]+) minutes", README)  # README's best within 10 min
    s = json.loads((cifar / "min10ovl_softmax_s1337" / "summary.json").read_text())
    assert close(best[1], 100 * s["test_acc"], 2) and close(best[2], s["wall_s"] / 60, 1) and s["wall_s"] <= 600
    moves = re.search(r"gives s2e670's final weights ([\d.]+)%, ([\d.]+)% and ([\d.]+)% validation", RESULTS)
    assert [close(v, 100 * json.loads(found["s2e670"].read_text())[f"val_acc_move{m}"], 2) for m, v in
            zip((1, 2, 3), moves.groups())] == [True] * 3
    ema = re.search(r"decay 0.998: (.+?);\s+decay 0.9995: (.+?), for (.+?)\)", RESULTS)  # EMA minus final, in points
    for i, decay in enumerate(("0.998", "0.9995")):
        for run, gain in zip(ema[3].split(", "), ema[i + 1].split(", "), strict=True):
            s = json.loads(found[run].read_text())
            assert close(gain.replace("−", "-"), 100 * (s[f"val_acc_ema{decay}"] - s["val_acc"]), 2), (run, decay)
    lines = (cifar / "search" / "step_cost.txt").read_text().splitlines()[2:]  # run, img/s, change: tab-separated
    cost = {change: ips for _, ips, change in (line.split("\t") for line in lines)}
    for change, ips in (("(none)", "61,859"), ("--mixup 0 --cutmix 0", "67,010"), ("--grad_clip 0", "64,926")):
        assert cost[change] == ips.replace(",", "") + " img/s" and ips in RESULTS, change
    hops = re.findall(r"--hops (\d):.*\| ([\d,]+) img/s", (cifar / "search" / "pure_hops.txt").read_text())
    assert re.search(rf"{hops[0][1]} img/s with\s+K = {hops[0][0]} and {hops[1][1]} with K = {hops[1][0]}", RESULTS), hops
    mixed = [line.split() for line in (cifar / "search" / "mixed_loss.txt").read_text().splitlines()[2:]]
    for code in ("train", "train_old"):
        assert " and ".join(f"{int(r[2]):,}" for r in mixed if r[0] == code) in RESULTS, code


def cpu_run(name):
    runs = json.loads((ROOT / "assets" / "cpu" / "runs.json").read_text())["runs"]
    return json.loads((ROOT / "assets" / "cpu" / name / "summary.json").read_text()), runs[name]


def minutes(text):
    """'3 min 29 s' or '3:29' -> seconds."""
    m, s = re.match(r"(\d+)(?: min |:)(\d+)", text).groups()
    return 60 * int(m) + int(s)


def test_cpu_tables_match_their_runs():
    rows = table_after(RESULTS, "| attention | seed | test accuracy | wall time |")
    assert len(rows) == 5
    for row in rows:
        s, r = cpu_run(f"{row[0].split()[0]}_s{row[1]}")
        assert close(row[2], 100 * s["test_acc"], 2) and int(row[4].replace(",", "")) == round(s["img_s"]), row
        assert minutes(row[3]) == round(r["command_wall_s"]) and close(row[5].split()[0], r["peak_rss_gb"], 2), row
    rows = table_after(README, "| attention | test accuracy | wall time |")
    for row, names in zip(rows, (["softmax_s1337"], ["pure_s1337"], ["linear_s1337", "linear_s1", "linear_s2"])):
        for name, acc, wall in zip(names, row[1].split(" / "), row[2].split(" / ")):
            s, r = cpu_run(name)
            assert close(acc.strip("%"), 100 * s["test_acc"], 2) and minutes(wall) == round(r["command_wall_s"]), (row, name)


def test_cpu_runs_are_the_readme_commands_with_todays_defaults():
    """Every committed CPU run used train.py's defaults but for attn and seed: the table is what the command gives."""
    import train
    for name in ("softmax_s1337", "pure_s1337", "linear_s1337", "linear_s1", "linear_s2"):
        s, r = cpu_run(name)
        assert s["epochs"] == train.epochs and s["steps"] == train.epochs * (train.n_train // train.batch_size), name
        assert r["command"] == "python train.py --attn " + s["attn"] + ("" if name.endswith("1337") else f" --seed {name[-1]}")
