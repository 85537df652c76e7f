"""
One command line for every script: its config globals, overridden left to right by config files
(Python whose top-level assignments are options) and --key value or --key=value. -h lists them.

    python train.py config/cifar.py --attn pure --lr=5e-4
"""
import ast
import math
import os
import sys
import traceback


def die(msg):
    """The one error path for what a user gets wrong: one line on stderr, exit status 2."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def config_defaults(scope):
    """A script's config: its lower-case globals of type int, float, bool or str."""
    return {k: v for k, v in scope.items()
            if k.islower() and not k.startswith("_") and type(v) in (int, float, bool, str)}


def parse_value(key, value, default):
    """A command-line string as the default's type ('true' / 'false' for booleans)."""
    try:
        if isinstance(default, bool):
            return dict(true=True, yes=True, false=False, no=False)[value.lower()]
        return type(default)(value)
    except (KeyError, ValueError):
        kind = "true or false" if isinstance(default, bool) else f"a {type(default).__name__}"
        die(f"--{key} takes {kind}; got {value!r}")


def read_config_file(path):
    """[(key, value)] of a config file's top-level assignments (not its imports); a failure is one
    line naming the file, the line and the error."""
    if not os.path.isfile(path):
        die(f"config file {path} not found")
    scope = {}
    try:
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        exec(compile(tree, path, "exec"), scope)
    except Exception as e:
        frames = [t.lineno for t in traceback.extract_tb(e.__traceback__) if t.filename == path]
        line = e.lineno if isinstance(e, SyntaxError) else (frames or [None])[-1]
        why = (e.msg if isinstance(e, SyntaxError) else str(e)).strip().splitlines()[:1]
        at = f", line {line}" if line else ""
        die(f"config file {path}{at}: {': '.join([type(e).__name__] + why)}; fix the file")
    names = [t.id for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))
             for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
             if isinstance(t, ast.Name)]
    return [(k, scope[k]) for k in dict.fromkeys(names) if not k.startswith("_")]


def configure(argv, defaults, doc="", allowed=None):
    """(config, the keys argv set): defaults updated by argv, left to right, then checked against
    `allowed`, {key: a tuple of choices, or a range (low, high), high excluded}; any other number
    must be finite and >= 0."""
    allowed = allowed or {}
    choices = {k: v for k, v in allowed.items() if isinstance(v[0], str)}
    if {"-h", "--help"} & set(argv):
        print(doc + "\n".join(f"  --{k} {v!r}" + (f"  ({' | '.join(choices[k])})" if k in choices
                                                  else "") for k, v in defaults.items()))
        sys.exit(0)
    cfg, given, args = dict(defaults), set(), list(argv)
    while args:
        a = args.pop(0)
        if a.endswith(".py") and not a.startswith("--"):
            pairs, where = read_config_file(a), f" in {a}"
        elif a.startswith("--") and ("=" in a or args):
            k, v = a[2:].split("=", 1) if "=" in a else (a[2:], args.pop(0))
            pairs, where = [(k, parse_value(k, v, defaults[k]) if k in defaults else v)], ""
        else:
            die(f"{a} needs a value (see -h)" if a.startswith("--") else
                f"unexpected argument {a!r}; options look like --attn linear")
        for k, v in pairs:
            if k not in defaults:
                die(f"unknown option --{k}{where}; valid options: {', '.join(defaults)}")
            if type(v) is not type(defaults[k]) and (type(v), type(defaults[k])) != (int, float):
                die(f"--{k} takes a {type(defaults[k]).__name__}; got {v!r}{where}")
            cfg[k] = type(defaults[k])(v)
            given.add(k)
    for k, v in cfg.items():
        if k in choices and v not in choices[k]:
            die(f"--{k} must be one of {' | '.join(choices[k])}; got {v!r}")
        low, high = (0, math.inf) if k in choices else allowed.get(k, (0, math.inf))
        if type(v) in (int, float) and not (math.isfinite(v) and low <= v < high):
            within = f"in [{low}, {high})" if math.isfinite(high) else f"at least {low}"
            die(f"--{k} must be {'finite and ' * (v == math.inf)}{within}; got {v}")
    return cfg, given


def resumed(run, config, given, fixed, where):
    """A resumed run's config: its own (`run`) with the keys this command line set (`given`),
    each change printed; a key in `fixed` cannot change."""
    for k in sorted(k for k in given if config[k] != run[k]):
        if k in fixed:
            die(f"the run in {where} has {k}={run[k]!r}; a resumed run cannot change it (drop "
                f"--{k}, or start a new run in another --out_dir)")
        print(f"resume: {k} = {config[k]!r} (the run had {run[k]!r})")
    return {**run, **{k: config[k] for k in given}}


def refuse_unused(config, defaults, applies):
    """applies: {key: a Python condition on the config}. A key set away from its default where its
    condition is false would do nothing, and is refused."""
    for k, condition in applies.items():
        if config[k] != defaults[k] and not eval(condition, {}, dict(config)):
            die(f"--{k} {config[k]} does nothing here (it needs {condition}); drop --{k}")
