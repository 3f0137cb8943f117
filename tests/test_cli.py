"""The `amused` command called in-process: exit codes, output, one-line errors."""

import importlib.util
import json
import subprocess
import sys

from amused.orchestration import cli
from amused.orchestration.cli import main
from amused.pipeline.pretokenize import list_input_shards
from amused.tokenizer.image import ImageTokenizer
from tests.samples import write_dataset
from tests.test_cli_units import enumerated_flags


def test_models_tiny_and_synth_write_what_the_loaders_read(tmp_path, capsys):
    assert main(["models", "tiny", str(tmp_path / "m")]) == 0
    assert ImageTokenizer.from_pretrained(str(tmp_path / "m" / "vqgan")).grid(64) == (8, 8)
    assert main(["synth", str(tmp_path / "wds"), "--shards", "3", "--per-shard", "2"]) == 0
    assert [s.rsplit("/", 1)[-1] for s in list_input_shards(str(tmp_path / "wds"))] == \
        ["00000.tar", "00001.tar", "00002.tar"]
    assert "3 webdataset shards" in capsys.readouterr().out


def test_verify_and_inspect_exit_codes(tmp_path, capsys):
    url = str(tmp_path / "tokens")
    write_dataset(url, sizes=(4, 3))
    assert main(["shards", "verify", url]) == 0
    assert capsys.readouterr().out.startswith("OK")

    assert main(["shards", "inspect", url, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rows"] == 7 and info["shards"] == 2

    shard = tmp_path / "tokens" / "00001.parquet"
    shard.write_bytes(shard.read_bytes()[:-10])
    assert main(["shards", "verify", url]) == 1
    captured = capsys.readouterr()
    assert "00001.parquet" in captured.out
    assert captured.err.strip().splitlines() == [captured.err.strip()]
    assert captured.err.startswith("amused: error:")


def test_errors_are_one_line_without_traceback(tmp_path, capsys):
    assert main(["shards", "inspect", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("amused: error:") and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_help_loads_no_model_stack_and_every_lazy_module_exists():
    code = ("import sys; from amused.orchestration.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'ray', 'deepspeed', 'diffusers', 'transformers') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
    lazy = [v.__name__ for v in vars(cli).values() if isinstance(v, cli.LazyModule)]
    assert lazy and [name for name in lazy if importlib.util.find_spec(name) is None] == []


def test_a_bad_choice_exits_2_naming_it_before_torch_is_imported():
    """Every enumerated flag, in one fresh interpreter: each bad value is a usage error (exit
    status 2, argparse's one-line message naming the flag), and nothing imported torch."""
    cases = [(argv, "centre" if argv[-1] == "--crop" else "cosin") for argv, _ in enumerated_flags()]
    code = f"""
import contextlib, io, json, sys
from amused.orchestration.cli import main
out = []
for argv, bad in {cases!r}:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            main(argv + [bad])
            status = 0
        except SystemExit as exc:
            status = exc.code
    out.append([argv, status, err.getvalue().strip().splitlines()[-1]])
print(json.dumps({{"results": out, "torch": "torch" in sys.modules}}))
"""
    result = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                       check=True).stdout)
    assert not result["torch"]
    assert len(result["results"]) == len(cases) >= 9
    for argv, status, last in result["results"]:
        assert status == 2, argv
        assert "invalid choice" in last and argv[-1] in last, (argv, last)
