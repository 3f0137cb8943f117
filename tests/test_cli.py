"""The `amused` command called in-process: exit codes, output, one-line errors."""

import importlib.util
import json
import re
import subprocess
import sys
import threading
from http.server import ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from amused.orchestration import cli
from amused.orchestration.cli import main
from amused.pipeline.pretokenize import list_input_shards
from amused.tokenizer.image import ImageTokenizer
from tests.samples import jpeg, write_dataset
from tests.test_cli_units import enumerated_flags
from tests.test_download import Handler


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


RAY_JOB = """
import sys
import ray
from amused.plumbing.raysession import ray_log, ray_session

class Double:  # an actor pool: Ray Data's actors get their constructor arguments from the object store
    def __call__(self, batch):
        return {"id": batch["id"] * 2}

with ray_log(sys.argv[1]), ray_session(None):
    rows = ray.data.range(8).map_batches(Double, compute=ray.data.ActorPoolStrategy(size=1)).take_all()
    print(f"{len(rows)} rows", file=sys.stderr)
"""


def test_ray_messages_go_to_the_log_file_not_the_terminal(tmp_path):
    """Ray's start-up lines and its C++ core's `core_worker.cc ... constructor arguments in the
    object store` error (every Ray Data actor pool prints it) go to the log file; what the job
    writes to stderr itself still reaches the terminal."""
    log = tmp_path / "run" / "logs" / "ray.log"
    done = subprocess.run([sys.executable, "-c", RAY_JOB, str(log)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr == "8 rows\n"
    text = log.read_text()
    assert "core_worker.cc" in text and "constructor arguments in the object store" in text
    assert "Started a local Ray instance" in text


@pytest.fixture
def http_server():
    """tests/test_download.py's image server: /img/N.jpg an image, /missing/N.jpg a 404."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_download_shows_one_bar_and_keeps_img2dataset_output_in_its_log(http_server, tmp_path, capfd):
    """img2dataset's prints, its bare `1it [..]` bar and its processes' stats lines go to
    logs/img2dataset.log; the terminal shows one bar (samples, successes, failures, images/s)
    and the summary."""
    meta = tmp_path / "meta"
    meta.mkdir()
    for i in range(2):
        urls = [f"{http_server}/img/{200 + 10 * i + j}.jpg" for j in range(3)] + [f"{http_server}/missing/{i}.jpg"]
        pq.write_table(pa.table({"url": urls, "caption": ["c"] * 4}), meta / f"{i:05d}.parquet")
    out = tmp_path / "wds"
    assert main(["download", "--input", str(meta), "--output", str(out), "--image-size", "64", "--processes", "1",
                 "--threads", "4", "--timeout", "5", "--allow-hosts", "127.0.0.1", "--samples-per-shard", "10"]) == 0
    captured = capfd.readouterr()
    assert captured.out.startswith("download -> ") and "successes 6" in captured.out
    shown = [line for line in re.split(r"[\r\n]+", captured.err) if line.strip()]
    assert shown and all(line.startswith("download: ") for line in shown), shown
    assert "8/8" in shown[-1] and "ok=6, failed=2, images/s=" in shown[-1]
    log = (out / "logs" / "img2dataset.log").read_text()
    assert "Sharding file number" in log and re.search(r"\d+it \[", log) and "total   - success" in log

    assert main(["--quiet", "download", "--input", str(meta), "--output", str(out), "--processes", "1",
                 "--image-size", "64", "--allow-hosts", "127.0.0.1", "--samples-per-shard", "10"]) == 0
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out.startswith("download -> ")


def test_sample_output_dir_and_export_variant_and_license(tmp_path, tiny_models, trained_checkpoint, capsys):
    """H1's flags as wired: one PNG per image beside the grid (a folder holding an earlier
    sample's refused); fp16 weights beside the fp32 ones and the card's license; the
    combinations that make no sense refused in one line."""
    models = ["--vqgan", str(tiny_models / "vqgan"), "--text-encoder", str(tiny_models)]
    imgs = tmp_path / "imgs"
    assert main(["sample", "--checkpoint", trained_checkpoint, "--prompt", "a", "--prompt", "b", "--steps", "2",
                 "--output-dir", str(imgs), *models]) == 0
    meta = Image.open(imgs / "000-a.png").text
    assert (meta["prompt"], meta["device"]) == ("a", "cpu") and (imgs / "grid.png").is_file()
    assert f"and one PNG each in {imgs}" in capsys.readouterr().out
    written = {p.name: p.read_bytes() for p in imgs.iterdir()}
    # another run into the same folder would replace 000-a.png and leave this run's 001-b.png beside it: refused
    assert main(["sample", "--checkpoint", trained_checkpoint, "--prompt", "c", "--seed", "1", "--steps", "2",
                 "--output-dir", str(imgs), *models]) == 1
    assert "already holds an earlier sample's images (000-a.png, 001-b.png, ...)" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in imgs.iterdir()} == written
    assert main(["sample", "--checkpoint", trained_checkpoint, "--prompt", "a", *models]) == 1
    assert "--output-dir" in capsys.readouterr().err

    out = tmp_path / "pipe"
    assert main(["export", "--checkpoint", trained_checkpoint, "--output", str(out), "--variant", "fp16",
                 "--license", "apache-2.0", "--base-model", "amused/amused-256", *models]) == 0
    assert "variant='fp16'" in capsys.readouterr().out
    assert (out / "transformer" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    card = (out / "README.md").read_text()
    assert "license: apache-2.0" in card and "base_model: amused/amused-256" in card
    for flag in (["--variant", "fp16"], ["--base-model", "amused/amused-256"]):
        assert main(["export", "--lora", *flag, "--checkpoint", trained_checkpoint,
                     "--output", str(tmp_path / "lora")]) == 1
        assert flag[0] in capsys.readouterr().err


def test_ingest_a_captioned_folder(tmp_path, ray_session, capsys):
    """H2's `amused ingest` as wired: a folder of images with sidecar captions -> shards that
    pretokenize lists; a missing folder is a one-line error naming it."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(2):
        (folder / f"{i}.jpg").write_bytes(jpeg(i))
        (folder / f"{i}.txt").write_text(f"photo number {i}")
    out = tmp_path / "wds"
    assert main(["ingest", "--output", str(out), "--images", str(folder), "--no-progress"]) == 0
    assert list_input_shards(str(out)) == [str(out / "00000.tar")]
    capsys.readouterr()
    assert main(["ingest", "--output", str(tmp_path / "x"), "--images", "/no/such"]) == 1
    err = capsys.readouterr().err
    assert "no folder at /no/such" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_pretokenize_terminal_shows_the_bar_and_result_not_ray(tmp_path, tiny_models):
    """`amused pretokenize` as a person runs it (its own Ray): the `core_worker.cc` line and
    Ray's start-up lines are in OUTPUT/logs/ray.log, not on the terminal; --quiet leaves the
    result alone; with --log-level debug they stay on the terminal."""
    assert main(["synth", str(tmp_path / "wds"), "--shards", "1", "--per-shard", "4"]) == 0
    models = ["--vqgan", str(tiny_models / "vqgan"), "--text-encoder", str(tiny_models), "--resolution", "64"]
    amused = [sys.executable, "-m", "amused.orchestration.cli"]
    out = tmp_path / "tokens"
    done = subprocess.run([*amused, "pretokenize", "--input", str(tmp_path / "wds"), "--output", str(out), *models],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(f"pretokenize -> {out}")
    assert "core_worker" not in done.stderr and " -- " not in done.stderr, done.stderr  # Ray's "file:line -- text"
    log = (out / "logs" / "ray.log").read_text()
    assert "core_worker.cc" in log and "Started a local Ray instance" in log

    done = subprocess.run([*amused, "--quiet", "pretokenize", "--input", str(tmp_path / "wds"), "--output", str(out),
                           *models], capture_output=True, text=True, timeout=600)  # a rerun: nothing left to do
    assert done.returncode == 0 and done.stderr == "" and done.stdout.startswith(f"pretokenize -> {out}")

    debug = tmp_path / "debug"
    done = subprocess.run([*amused, "--log-level", "debug", "pretokenize", "--input", str(tmp_path / "wds"),
                           "--output", str(debug), *models], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "core_worker.cc" in done.stderr
    assert not (debug / "logs").exists()
