"""The README's CIFAR-10 accuracies are the ones in the committed run summaries (assets/cifar/)."""
import json
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
KINDS = {"softmax": "softmax", "Pure-InfSA": "pure", "Linear-InfSA": "linear"}


def table_after(header_start):
    """Rows (lists of cell strings) of the first README table whose header line starts so."""
    lines = README.splitlines()
    i = next(n for n, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[i + 2:]:  # skip the header and its | --- | line
        if not line.startswith("|"):
            break
        rows.append([c.strip(" *%") for c in line.strip("|").split("|")])
    return rows


def summaries(prefix, kind):
    """{seed: summary.json} of the runs assets/cifar/<prefix>_<kind>_s<seed>/."""
    out = {}
    for f in sorted((ROOT / "assets" / "cifar").glob(f"{prefix}_{kind}_s*/summary.json")):
        out[int(f.parent.name.rsplit("_s", 1)[1])] = json.loads(f.read_text())
    return out


def pct(x):
    return 100 * x


def mean_test_acc(prefix, kind):
    runs = summaries(prefix, kind).values()
    return sum(pct(s["test_acc"]) for s in runs) / len(runs)


def close(shown, value, decimals):
    """The README shows `value` rounded to `decimals` (either way at an exact half)."""
    return abs(float(shown) - value) <= 0.5 * 10 ** -decimals + 1e-4  # summaries hold fp32


def kind_of(label):
    return KINDS[next(k for k in KINDS if label.startswith(k))]


def test_in_short_table_is_the_mean_over_seeds_of_the_summaries():
    recipe = {"`cifar`,": "light", "`cifar_long`,": "long560", "`cifar_10min`,": "min10"}
    rows = table_after("| recipe | softmax |")
    assert len(rows) == 3
    for row in rows:
        prefix = recipe[row[0].split()[0]]
        for kind, cell in zip(("softmax", "pure", "linear"), row[1:]):
            assert len(summaries(prefix, kind)) == 2, (prefix, kind)
            shown = re.match(r"[\d.]+", cell).group()
            assert close(shown, mean_test_acc(prefix, kind), 2), (prefix, kind, shown)


@pytest.mark.parametrize("header, prefix, col, n_runs", [
    ("| attention | seed | val acc (best) | test acc |", "long560", 3, 7),
    ("| attention | seed | test acc |", "min10", 2, 6),
])
def test_per_seed_rows_match_their_summaries(header, prefix, col, n_runs):
    seen = 0
    for row in table_after(header):
        if not row[1]:  # a "mean" row: checked against the seed rows above it
            assert close(row[col], mean_test_acc(prefix, kind_of(row[0])), 2), row
            continue
        run_prefix = "long360" if "--epochs 360" in row[0] else prefix
        run = summaries(run_prefix, kind_of(row[0]))[int(row[1])]
        assert close(row[col], pct(run["test_acc"]), 2), row
        shift, drop = re.match(r"([\d.]+) \(−([\d.]+)\)", row[col + 1]).groups()
        assert close(shift, pct(run["shift"]["mean"]), 1), row
        assert close(drop, pct(run["test_acc"] - run["shift"]["mean"]), 1), row
        assert int(row[-3].replace(",", "")) == round(run["img_s"]), row
        seen += 1
    assert seen == n_runs


def test_75_epoch_rows_match_their_summaries():
    rows = table_after("| attention | test acc, seeds 1337 / 2 |")
    assert len(rows) == 3
    for row in rows:
        runs = summaries("light", kind_of(row[0]))
        for seed, shown in zip((1337, 2), row[1].split(" / ")):
            assert close(shown, pct(runs[seed]["test_acc"]), 2), row
