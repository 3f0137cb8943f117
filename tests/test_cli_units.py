"""The `amused` command line as a Python user expects it: --version, help on every option with
its default shown once, enumerations refused at parse time, --quiet and --log-level."""

import argparse
import dataclasses
import importlib.metadata
import logging

import pytest

from amused.orchestration import cli
from amused.orchestration.cli import build_parser, main
from amused.pipeline.pretokenize import PretokenizeConfig
from amused.plumbing.raysession import LOG_ENV
from amused.training.inference.card import DEFAULT_LICENSE

pytestmark = pytest.mark.unit


def _parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, parser) of the top parser and every subcommand's, depth first."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*path, name))


def _options(parser: argparse.ArgumentParser):
    return [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
            and a.help is not argparse.SUPPRESS]


def test_version_is_the_installed_package_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"amused {importlib.metadata.version('amused-pipeline')}"


def test_every_option_has_help_and_its_default_at_most_once():
    parsers = list(_parsers(build_parser()))
    assert len(parsers) > 20  # every subcommand, nested ones included
    missing, doubled, none_shown = [], [], []
    for path, parser in parsers:
        formatter = parser._get_formatter()
        for action in _options(parser):
            name = " ".join((*path, action.option_strings[0] if action.option_strings else action.dest))
            if not (action.help or "").strip():
                missing.append(name)
                continue
            shown = formatter._expand_help(action)
            if shown.count("(default") > 1 or shown.count("default:") > 1:
                doubled.append(f"{name}: {shown}")
            if "(default: None)" in shown or "(default: )" in shown:
                none_shown.append(f"{name}: {shown}")
    assert missing == [] and doubled == [] and none_shown == []


def test_help_shows_a_meaningful_default_and_none_for_required_options():
    pre = dict(_parsers(build_parser()))[("pretokenize",)]
    text = " ".join(pre.format_help().split())
    assert "(default: center)" in text and "(default: 256)" in text
    required = [a for a in _options(pre) if a.required]
    assert required and all("default" not in pre._get_formatter()._expand_help(a) for a in required)


def enumerated_flags() -> list[tuple[list[str], list[str]]]:
    """([command..., flag], its sorted choices) of every option with choices."""
    flags = []
    for path, parser in _parsers(build_parser()):
        for action in _options(parser):
            if action.choices and action.option_strings:
                flags.append(([*path, action.option_strings[0]], sorted(map(str, action.choices))))
    return flags


def test_enumerations_are_choices_wherever_a_config_has_one():
    flags = {" ".join(argv): choices for argv, choices in enumerated_flags()}
    assert flags["pretokenize --crop"] == ["center", "random"]
    assert flags["pretokenize --device"] == ["auto", "cpu", "cuda"]
    assert flags["pretokenize --dtype"] == ["auto", "bf16", "fp32"]
    assert flags["pretokenize --text"] == ["ids", "states"]
    assert flags["download --distributor"] == ["multiprocessing", "ray"]
    assert flags["sample --schedule"] == flags["evaluate --schedule"] == ["cosine", "linear"]
    assert flags["--log-level"] == ["debug", "error", "info", "warning"]


def test_quiet_and_log_level_parse_and_set_logging_and_bars(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    args = build_parser().parse_args(["--quiet", "--log-level", "info", "status", "RUN"])
    assert args.quiet and args.log_level == "info"
    assert build_parser().parse_args(["-q", "status", "RUN"]).log_level is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--log-level", "loud", "status", "RUN"])

    seen = {}

    def probe(args):
        seen.update(level=logging.getLogger().level, tqdm=cli.os.environ.get("TQDM_DISABLE"),
                    progress=args.progress)
        return 0

    parser = build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    pre = dict(_parsers(parser))[("pretokenize",)]
    pre.set_defaults(func=probe)
    base = ["pretokenize", "--input", "i", "--output", "o", "--vqgan", "v", "--text-encoder", "t"]
    saved = logging.getLogger().level
    try:
        assert main(["--quiet", *base]) == 0
        assert seen == {"level": logging.ERROR, "tqdm": "1", "progress": False}
        assert "TQDM_DISABLE" not in cli.os.environ  # restored after the command
        assert main(["--log-level", "debug", *base]) == 0
        assert seen == {"level": logging.DEBUG, "tqdm": None, "progress": True}
        assert main(base) == 0
        assert seen["level"] == logging.WARNING
    finally:
        logging.getLogger().setLevel(saved)


@dataclasses.dataclass
class _Log:
    progress: bool = True
    every: int = 10


@dataclasses.dataclass
class _Run:  # the shape of a run config: stage sections, some holding a `log` section
    pretokenize: PretokenizeConfig
    train: _Log = dataclasses.field(default_factory=_Log)
    absent: _Log | None = None


def test_quiet_turns_off_every_nested_progress_switch():
    cfg = _Run(PretokenizeConfig(input="i", output="o", vqgan="v", text_encoder="t"))
    off = cli._progress_off(cfg)
    assert (off.pretokenize.progress, off.train.progress, off.absent) == (False, False, None)
    assert off.pretokenize.output == "o" and off.train.every == 10
    assert cfg.pretokenize.progress and cfg.train.progress  # a copy: the loaded config is left as it was


def _probe_main(monkeypatch, path: tuple[str, ...], argv: list[str], probe) -> int:
    """main(argv) with the subcommand `path` running `probe(args)` instead of its stage."""
    parser = build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    dict(_parsers(parser))[path].set_defaults(func=probe)
    return main(argv)


def test_ray_log_is_the_checkpoints_run_folder_or_this_users_and_an_error_names_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    monkeypatch.setattr(cli.getpass, "getuser", lambda: "alice")
    logs = []

    def probe(args):
        logs.append(cli.os.environ.get(LOG_ENV))
        return 0

    run = tmp_path / "run"
    evaluate = ["evaluate", "--prompts", "p.txt", "--reference", "r.npz", "--inception", "i.pth"]
    assert _probe_main(monkeypatch, ("evaluate",), [*evaluate, "--checkpoint", f"{run}/checkpoints/step_4/"],
                       probe) == 0
    assert _probe_main(monkeypatch, ("status",), ["status", str(run)], probe) == 0  # no run, output or checkpoint
    assert logs == [str(run / "logs" / "ray.log"), str(tmp_path / "tmp" / "amused-alice" / "logs" / "ray.log")]

    def fails(args, write: bool):
        if write:  # as a Ray session does: its messages go to the log
            path = cli.os.environ[LOG_ENV]
            cli.os.makedirs(cli.os.path.dirname(path), exist_ok=True)
            with open(path, "a") as fh:
                fh.write("error: command 'g++' failed\n")
        raise RuntimeError("the worker died\nRay's traceback ...")

    for write in (False, True):
        assert _probe_main(monkeypatch, ("status",), ["status", str(run)], lambda args: fails(args, write)) == 1
        err = capsys.readouterr().err
        assert err.strip().splitlines() == ["amused: error: RuntimeError: the worker died" + (
            f" (Ray's messages: {logs[1]})" if write else "")]  # named only when Ray wrote to it in this command


def test_export_license_default_is_the_cards_and_its_help_says_whose_it_is():
    export = dict(_parsers(build_parser()))[("export",)]
    action = next(a for a in export._actions if "--license" in a.option_strings)
    assert action.default == DEFAULT_LICENSE == "openrail++"
    shown = " ".join(export._get_formatter()._expand_help(action).split())
    assert "aMUSEd weights' license" in shown and "trained from scratch" in shown
    assert shown.endswith(f"(default: {DEFAULT_LICENSE})")
