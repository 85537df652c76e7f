"""The numbers in README.md and RESULTS.md are the ones in the committed run summaries (assets/).
Here: the README, RESULTS.md's CPU runs (§1, §2), its commands and scaling table (§4), and the
helpers that test_results.py (the kernels, CIFAR-10, several processes) imports."""
import json
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README, RESULTS = (ROOT / "README.md").read_text(), (ROOT / "RESULTS.md").read_text()
FLAT = " ".join(RESULTS.split())  # prose with its line breaks as spaces, for sentence patterns
CIFAR, SEARCH = ROOT / "assets" / "cifar", ROOT / "assets" / "cifar" / "search"
KINDS = {"softmax": "softmax", "Pure-InfSA": "pure", "Linear-InfSA": "linear"}


def table_after(text, header_start):
    """Rows (lists of cell strings) of the first table in text whose header line starts so."""
    lines = text.splitlines()
    i = next(n for n, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[i + 2:]:  # skip the header and its |---| line
        if not line.startswith("|"):
            break
        rows.append([c.strip(" *%") for c in line.strip("|").split("|")])
    return rows


def load(path):
    return json.loads(path.read_text())


def summaries(folder, prefix, kind):
    """{seed: summary.json} of the runs assets/<folder>/<prefix>_<kind>_s<seed>/."""
    return {int(f.parent.name.rsplit("_s", 1)[1]): load(f)
            for f in sorted((ROOT / "assets" / folder).glob(f"{prefix}_{kind}_s*/summary.json"))}


def mean(values):
    values = list(values)
    return sum(values) / len(values)


def mean_test_acc(prefix, kind):
    return mean(100 * s["test_acc"] for s in summaries("cifar", prefix, kind).values())


def mean_shift(prefix, kind, corruption="mean"):
    return mean(100 * s["shift"][corruption] for s in summaries("cifar", prefix, kind).values())


def close(shown, value, decimals):
    """The text shows `value` rounded to `decimals` (either way at an exact half)."""
    shown = float(shown.replace(",", "").replace("−", "-"))
    return abs(shown - value) <= 0.5 * 10 ** -decimals + 1e-4  # summaries hold fp32


def decimals(shown):
    return len(shown.split(".")[1]) if "." in shown else 0


def close_as_shown(shown, value):
    return close(shown, value, decimals(shown))


def kind_of(label):
    return KINDS[next(k for k in KINDS if label.startswith(k))]


# ---- README.md (skipped while the lead rewrites it)

def test_cifar_means_in_the_readme_are_the_means_of_the_summaries():
    recipe = {"`config/cifar.py`": "light", "`config/cifar_long.py`": "long560",
              "`config/cifar_long.py --epochs 640`": "long640",
              "`config/cifar_10min.py` with patches apart (RESULTS.md's `min10`)": "min10",
              "`config/cifar_10min.py`": "min10ovl"}
    rows = table_after(README, "| recipe | softmax |")
    assert len(rows) == 5
    for row in rows:
        prefix = recipe[row[0].split(",")[0]]
        for kind, cell in zip(("softmax", "pure", "linear"), row[1:]):
            runs = summaries("cifar", prefix, kind)
            assert len(runs) == 2, (prefix, kind)
            shown = re.match(r"[\d.]+", cell).group()
            assert close(shown, mean_test_acc(prefix, kind), 2), (prefix, kind, cell)
            span = re.search(r"\(([\d.]+)(?:–([\d.]+))? min\)", cell)  # the seeds' minutes
            wall = sorted(s["wall_s"] / 60 for s in runs.values())
            assert not span or (close(span[1], wall[0], 1)
                                and close(span[2] or span[1], wall[-1], 1)), (prefix, kind, cell)


def test_the_gap_at_the_10_minute_recipe_in_the_readme():
    soft, pure = mean_test_acc("min10ovl", "softmax"), mean_test_acc("min10ovl", "pure")
    m = re.search(r"reaches\s+([\d.]+)%, ([\d.]+) points behind", README)
    assert close(m[1], pure, 2) and close(m[2], soft - pure, 2)


def test_the_best_within_10_minutes_in_the_readme():
    best = re.search(r"takes\s+softmax to ([\d.]+)% test in ([\d.]+) minutes", README)
    s = load(CIFAR / "min10ovl_softmax_s1337" / "summary.json")
    assert close(best[1], 100 * s["test_acc"], 2) and close(best[2], s["wall_s"] / 60, 1)
    assert s["wall_s"] <= 600


def test_the_scaling_table_in_the_readme():
    check_scaling_table(README)


def test_the_cpu_table_in_the_readme():
    rows = table_after(README, "| attention | test accuracy | wall time |")
    names = (["softmax_s1337"], ["pure_s1337"], ["linear_s1337", "linear_s1", "linear_s2"])
    for row, runs in zip(rows, names):
        for name, acc, wall in zip(runs, row[1].split(" / "), row[2].split(" / ")):
            s, r = cpu_run(name)
            assert close(acc.strip("%"), 100 * s["test_acc"], 2), (row, name)
            assert minutes(wall) == round(r["command_wall_s"]), (row, name)


# ---- RESULTS.md §1: the built-in dataset on a CPU

def cpu_run(name):
    runs = load(ROOT / "assets" / "cpu" / "runs.json")["runs"]
    return load(ROOT / "assets" / "cpu" / name / "summary.json"), runs[name]


def minutes(text):
    """'3 min 29 s' or '3:29' -> seconds."""
    m, s = re.match(r"(\d+)(?: min |:)(\d+)", text).groups()
    return 60 * int(m) + int(s)


def test_cpu_table_matches_its_runs():
    rows = table_after(RESULTS, "| attention | seed | test accuracy | wall time |")
    assert len(rows) == 5
    speed = {}
    for row in rows:
        s, r = cpu_run(f"{row[0].split()[0]}_s{row[1]}")
        assert close(row[2], 100 * s["test_acc"], 2), row
        assert int(row[4].replace(",", "")) == round(s["img_s"]), row
        assert minutes(row[3]) == round(r["command_wall_s"]), row
        assert close(row[5].split()[0], r["peak_rss_gb"], 2), row
        speed.setdefault(s["attn"], []).append(s["img_s"])
    assert "Linear-InfSA trains fastest and Pure-InfSA (three hops) slowest" in FLAT
    assert min(speed["linear"]) > max(speed["softmax"]) > max(speed["pure"])
    accs = [100 * cpu_run(f"linear_s{s}")[0]["test_acc"] for s in (1337, 1, 2)]
    span = re.search(r"three seeds of Linear-InfSA span ([\d.]+) points", FLAT)[1]
    assert close(span, max(accs) - min(accs), 2)


def test_attention_quality_tables_are_the_printed_ones():
    """RESULTS §2: each cell of the last-layer table and the first-layer figures are
    sample_attention.py's printed tables (assets/cpu/quality.md)."""
    printed = {}
    for line in (ROOT / "assets" / "cpu" / "quality.md").read_text().splitlines():
        if line.startswith("| ") and "@" in line:
            cells = [c.strip() for c in line.strip("|").split("|")]
            printed[cells[1]] = cells[2:]
    rows = table_after(RESULTS, "| attention | MoRF-AOC | LeRF-AUC |")
    for row, kind in zip(rows, ("cls@4", "katz@4", "a@4")):
        assert [c.replace("**", "") for c in row[1:5]] == printed[kind]
    for kind, label in (("katz@1", "pure"), ("cls@1", "softmax"), ("a@1", "linear")):
        roc, pr = printed[kind][2].split()[0], printed[kind][3].split()[0]
        assert f"{roc} / {pr} ({label})" in FLAT, kind


def test_cpu_runs_are_the_commands_with_todays_defaults():
    """Every committed CPU run used train.py's defaults but for attn and seed."""
    import train
    for name in ("softmax_s1337", "pure_s1337", "linear_s1337", "linear_s1", "linear_s2"):
        s, r = cpu_run(name)
        assert s["epochs"] == train.epochs, name
        assert s["steps"] == train.epochs * (train.n_train // train.batch_size), name
        seed = "" if name.endswith("1337") else f" --seed {name[-1]}"
        assert r["command"] == "python train.py --attn " + s["attn"] + seed
    assert f"{train.n_train:,} training and {train.n_test:,} test images" in FLAT
    assert f"{train.n_layer} layers, width {train.n_embd}, 65 tokens, {train.epochs} epochs" in FLAT
    assert (train.image_size // train.patch_size) ** 2 + 1 == 65


def test_commands_use_todays_options():
    """Every option in RESULTS.md's commands and code spans is one its script has; the full
    commands parse (choices and types) as the script would parse them."""
    import bench
    import configurator
    import sample_attention
    import toy
    import train
    scripts = {"train.py": (train.DEFAULTS, train.ALLOWED), "bench.py": (bench.DEFAULTS, None),
               "sample_attention.py": (sample_attention.DEFAULTS, None),
               "toy.py": (toy.DEFAULTS, None)}
    blocks = re.findall(r"```bash\n(.*?)```", RESULTS, re.S)
    commands = [line for b in blocks for line in b.replace("\\\n", " ").splitlines()]
    prose = re.sub(r"```.*?```", "", FLAT, flags=re.S)
    assert prose.count("`") % 2 == 0
    shell_c = re.search(r"`C='([^']*)'`", prose)[1]  # a shell variable the commands use
    spans = [s.replace("$C", shell_c) for s in prose.split("`")[1::2] if "--" in s]
    parsed = 0
    for text in commands + spans:
        if text.startswith("torchrun"):
            text = text.split("train.py", 1)[1] if "train.py" in text else ""
        script = next((s for s in scripts if f"python {s}" in text), None)
        if script is None:  # options alone: train.py's if they parse as such, else some script's
            keys = re.findall(r"--(\w+)", text)
            if "=" not in text and all(k in train.DEFAULTS for k in keys):
                configurator.configure(text.split(), train.DEFAULTS, allowed=train.ALLOWED)
            assert all(any(k in d for d, _ in scripts.values()) for k in keys), text
            continue
        defaults, allowed = scripts[script]
        argv = re.sub(r"\[.*?\]", "", text.split(f"python {script}", 1)[1])
        argv = re.sub(r"\{([^,}]*)[^}]*\}", r"\1", argv)  # {softmax,pure,linear}: softmax
        argv = [a.strip("'\"") for a in argv.split()]
        assert all(not a.endswith(".py") or (ROOT / a).exists() for a in argv), text
        configurator.configure(argv, defaults, allowed=allowed)
        parsed += 1
    assert parsed >= 15 and "min_steps" not in train.DEFAULTS


# ---- §4: scaling and the Triton kernels

def bench_rows(name="bench.json"):
    return load(ROOT / "assets" / name)["rows"]


def bench_row(kind, image, mode="infer", compiled=False, name="bench.json"):
    (r,) = [r for r in bench_rows(name)
            if (r["kind"], r["image"], r["mode"], r["compiled"]) == (kind, image, mode, compiled)]
    return r


def as_shown(shown, value):
    """shown is value rounded to its last shown digit (an integer's trailing zeros not shown)."""
    plain = shown.replace(",", "")
    zeros = len(plain) - len(plain.rstrip("0"))
    unit = 10.0 ** -decimals(plain) if "." in plain else 10.0 ** zeros
    return abs(float(plain) - value) <= unit / 2 * (1 + 1e-6)


def check_scaling_table(text):
    columns = ["linear", "softmax", "softmax-mat"]
    rows = table_after(text, "| image | tokens | Linear-InfSA |")
    assert len(rows) >= 3
    for row in rows:
        image = int(row[0].rstrip("²"))
        assert int(row[1].replace(",", "")) == bench_row("linear", image)["tokens"], row
        for kind, cell in zip(columns, row[2:]):
            if not cell or cell.startswith("not run"):
                continue
            r = bench_row(kind, image)
            if cell.startswith("out of memory"):
                assert r["status"] == "oom", (image, kind)
                continue
            assert as_shown(cell.split()[0], r["img_s"]), (image, kind, cell)
            for gb in re.findall(r"([\d.]+) GB", cell):
                assert close_as_shown(gb, r["peak_gb"]), (image, kind, cell)
            for s in re.findall(r"([\d.]+) s\b", cell):
                assert close_as_shown(s, r["s"]), (image, kind, cell)
            for fast in re.findall(r"([\d,]+) compiled", cell):
                assert as_shown(fast, bench_row(kind, image, compiled=True)["img_s"])


def test_scaling_table_matches_the_benchmark():
    check_scaling_table(RESULTS)


def test_scaling_claims_are_ratios_of_the_benchmark():
    def speed(kind, image, compiled=False):
        return bench_row(kind, image, compiled=compiled)["img_s"]

    m = re.search(r"Training step at 4096², batch 1: Linear-InfSA ([\d.]+) img/s in ([\d.]+) GB, "
                  r"softmax \(SDPA\) ([\d.]+) img/s in ([\d.]+) GB", FLAT)
    for (ips, gb), kind in zip((m.group(1, 2), m.group(3, 4)), ("linear", "softmax")):
        r = bench_row(kind, 4096, "train")
        assert as_shown(ips, r["img_s"]) and close_as_shown(gb, r["peak_gb"]), kind
    m = re.search(r"here (\d+)×\. Against fused SDPA it is ([\d.]+)× eager and ([\d.]+)× "
                  r"compiled, (\d+)× at 4096² and (\d+)× at 9216², where both fit in "
                  r"([\d.]+) GB", FLAT)
    ratios = (speed("linear", 1024) / speed("softmax-mat", 1024),
              speed("linear", 1024) / speed("softmax", 1024),
              speed("linear", 1024, compiled=True) / speed("softmax", 1024, compiled=True),
              speed("linear", 4096) / speed("softmax", 4096),
              speed("linear", 9216) / speed("softmax", 9216))
    for shown, ratio in zip(m.groups(), ratios):
        assert close_as_shown(shown, ratio), (shown, ratio)
    for kind in ("linear", "softmax"):
        assert close_as_shown(m[6], bench_row(kind, 9216)["peak_gb"]), kind
    assert ("at 224² SDPA softmax is faster" in FLAT
            and speed("softmax", 224) > speed("linear", 224))
