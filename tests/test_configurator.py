"""configurator.py: what a user gets wrong in a config file or an option is one line on stderr,
exit status 2."""
import pytest

from configurator import configure

DEFAULTS = dict(epochs=10, lr=1e-3, attn="linear", compile=True)


def one_line_error(capsys, argv, words):
    with pytest.raises(SystemExit) as e:
        configure(argv, DEFAULTS)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error:") and "\n" not in err and words in err, err


@pytest.mark.parametrize("text, words", [
    ("epochs = 3\nlr = 1e-3 +\n", "line 2: SyntaxError: invalid syntax; fix the file"),
    ("epochs = 3\ndef f():\n    return {}['missing']\nlr = f()\n", "line 3: KeyError: 'missing'"),
    ("import nonexistent_module_xyz\n",
     "line 1: ModuleNotFoundError: No module named 'nonexistent_module_xyz'"),
    ("raise ValueError\n", "line 1: ValueError; fix the file"),
    (b"lr = '\xff'\n", "UnicodeDecodeError"),
])
def test_a_config_file_that_fails_names_the_file_the_line_and_the_error(tmp_path, capsys, text,
                                                                         words):
    path = tmp_path / "x.py"
    path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    one_line_error(capsys, [str(path)], f"config file {path}")
    one_line_error(capsys, [str(path)], words)


def test_imports_in_a_config_file_are_not_options(tmp_path):
    (tmp_path / "x.py").write_text("import math\nfrom math import pi\nlr = math.sqrt(4) * 1e-3\n"
                                   "epochs = int(pi)\n")
    cfg, given = configure([str(tmp_path / "x.py")], DEFAULTS)
    assert cfg["lr"] == 2e-3 and cfg["epochs"] == 3 and given == {"lr", "epochs"}


@pytest.mark.parametrize("value, words", [("inf", "--lr must be finite and at least 0; got inf"),
                                          ("nan", "--lr must be at least 0; got nan")])
def test_numbers_must_be_finite(capsys, value, words):
    one_line_error(capsys, ["--lr", value], words)
