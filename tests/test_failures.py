"""Bad input never hangs a job, never destroys data, and is reported in one line, once.

Three kinds of test, cheapest first:
  * the checks every rank runs before the process group, called in-process; the exit code and
    message are what `errors.exit_for` (the entry points' exit path) makes of the exception;
  * entry points run as the user runs them, failing before any model loads (one process);
  * real 2-rank DeepSpeed runs on CPU with loader workers, for the failures that used to hang: an
    error on one rank in training, in evaluation, before the process group, and Ctrl-C. Each
    asserts the exit codes, the exit reports, one message, and that no process of the job is left.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import psutil
import pytest
from fake_flickr8k import write_original
from launch_helpers import REPO, command, cpu_env, explain, run, wait_for

from blip2_dist.checks import check_model, check_training
from blip2_dist.config import parse_config
from blip2_dist.data.pack_cli import main as pack_main
from blip2_dist.data.shards import MANIFEST, read_manifest
from blip2_dist.data.staging import PACK_CONFIG
from blip2_dist.data.synthetic import write_synthetic
from blip2_dist.errors import EXIT_ERROR, EXIT_PEER_LOST, EXIT_USAGE, UserError, exit_for

RUN = [
    "--deepspeed",
    "ds_configs/zero2.json",
    "--model",
    "tiny-t5",
    "--micro-batch",
    "4",
    "--num-workers",
    "1",
    "--lora-r",
    "4",
    "--num-beams",
    "1",
    "--max-new-tokens",
    "5",
    "--min-length",
    "1",
    "--eval-batch",
    "4",
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "good"
    write_synthetic(out, n_train=64, n_val=8, n_test=8, seed=0, samples_per_shard=16)
    return out


def rewrite_member(shard: Path, change) -> None:
    """Rewrite a tar with `change(name, data) -> data` applied to every member."""
    members = []
    with tarfile.open(shard) as tar:
        for m in tar:
            members.append((m, change(m.name, tar.extractfile(m).read())))
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m, data in members:
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))


def variant(shards: Path, dest: Path) -> Path:
    shutil.copytree(shards, dest)
    return dest


def outcome(exc: BaseException) -> tuple[int, str]:
    code, message = exit_for(exc)
    return code, message or ""


def train_check(shards, tmp_path, *extra, world_size=2):
    """(exit code, message) of the trainer's checks before the process group, as rank 0 of 2."""
    argv = [
        "--model",
        "tiny-t5",
        "--data",
        str(shards),
        "--output-dir",
        str(tmp_path / "run"),
        "--micro-batch",
        "4",
        "--num-workers",
        "1",
        *extra,
    ]
    try:
        check_training(parse_config(argv, "t"), world_size)
    except BaseException as exc:  # noqa: BLE001 - whatever it is, the entry point's exit path gets it
        return outcome(exc)
    return 0, ""


# ---- checks before the process group -----------------------------------------------------------

RANGES = [
    (["--save-steps", "0"], "--save-steps must be >= 1, got 0"),
    (["--lr", "-1"], "--lr must be > 0.0, got -1.0"),
    (["--max-steps", "-5"], "--max-steps must be >= 0, got -5"),
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--keep-last", "0"], "--keep-last must be >= 1, got 0"),
    (["--eval-steps", "-1"], "--eval-steps must be >= 0, got -1"),
    (["--grad-accum", "0"], "--grad-accum must be >= 1, got 0"),
    (["--micro-batch", "0"], "--micro-batch must be >= 1, got 0"),
    (["--num-workers", "-1"], "--num-workers must be >= 0, got -1"),
    (["--lora-dropout", "1"], "--lora-dropout must be < 1.0, got 1.0"),
    (["--adam-betas", "0.9", "1"], "--adam-betas must be < 1.0, got 1.0"),
    (["--num-beams", "0"], "--num-beams must be >= 1, got 0"),
    (["--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
]


@pytest.mark.parametrize("args,message", RANGES, ids=[" ".join(a) for a, _ in RANGES])
def test_flag_out_of_range(shards, tmp_path, args, message):
    code, got = train_check(shards, tmp_path, *args)
    assert code == EXIT_USAGE and (got == message or got.startswith(message + " (usage: ")), got
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_lora_fields_that_clash_are_refused_before_the_process_group(shards, tmp_path):
    code, got = train_check(shards, tmp_path, "--train-qformer", "--qformer-lora-targets", "query")
    assert code == 1 and got.startswith("--train-qformer trains the whole Q-Former"), got
    assert not (tmp_path / "run").exists()


def test_config_file_values_are_checked_too(shards, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("optim:\n  lr: 1e-4\n")  # YAML 1.1 reads 1e-4 (no dot) as a string
    assert train_check(shards, tmp_path, "--config", str(cfg)) == (EXIT_USAGE, "--lr must be a number, got '1e-4'")
    cfg.write_text("train:\n  save_steps: 0\n")
    assert train_check(shards, tmp_path, "--config", str(cfg)) == (EXIT_USAGE, "--save-steps must be >= 1, got 0")


def test_missing_eval_split_fails_before_training(tmp_path):
    no_val = tmp_path / "noval"
    write_synthetic(no_val, n_train=32, n_val=0, n_test=4, seed=0, samples_per_shard=16)
    code, message = train_check(no_val, tmp_path)
    assert code == EXIT_ERROR
    assert (
        message == f"--eval-split val: {no_val / MANIFEST}: no split 'val' (has ['test', 'train']); or pass --skip-eval"
    )
    assert train_check(no_val, tmp_path, "--skip-eval") == (0, "")
    assert train_check(no_val, tmp_path, "--train-split", "tr")[1].startswith("--train-split tr: ")


def test_deleted_or_empty_shard_is_named(shards, tmp_path):
    data = variant(shards, tmp_path / "data")
    (data / "train-000002.tar").unlink()
    assert train_check(data, tmp_path) == (
        EXIT_ERROR,
        f"--data {data}: shard {data / 'train-000002.tar'} is listed in {data / MANIFEST} but missing",
    )
    (data / "train-000002.tar").write_bytes(b"")
    assert train_check(data, tmp_path)[1].endswith("train-000002.tar is empty (0 bytes)")


def test_data_folder_problems(tmp_path):
    code, message = train_check(tmp_path / "nowhere", tmp_path)
    assert code == EXIT_ERROR and message.startswith(f"--data: {tmp_path / 'nowhere'}: not found")
    (tmp_path / "empty").mkdir()
    assert "no manifest" in train_check(tmp_path / "empty", tmp_path)[1]


def test_split_too_small_for_the_launch_shape(shards, tmp_path):
    code, message = train_check(shards, tmp_path, "--micro-batch", "200")
    assert code == EXIT_ERROR and "needs at least" in message and "micro-batch 200" in message
    code, message = train_check(shards, tmp_path, "--grad-accum", "100")
    assert code == EXIT_ERROR and "fewer than --grad-accum 100" in message


def test_output_dir_problems(shards, tmp_path):
    (tmp_path / "file").write_text("x")
    assert train_check(shards, tmp_path, "--output-dir", str(tmp_path / "file")) == (
        EXIT_ERROR,
        f"--output-dir {tmp_path / 'file'} is a file, not a folder",
    )
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("x")
    assert train_check(shards, tmp_path)[1].endswith("checkpoints is a file, where the run keeps a folder")


def test_model_problems(shards, tmp_path):
    assert train_check(shards, tmp_path, "--model", "./nowhere") == (EXIT_ERROR, "--model ./nowhere: no such folder")
    (tmp_path / "m").mkdir()
    assert "no config.json" in train_check(shards, tmp_path, "--model", str(tmp_path / "m"))[1]
    code, message = train_check(shards, tmp_path, "--model", "Salesforce/blip2-no-such-model")
    assert code == EXIT_ERROR and "not in the Hugging Face cache, and HF_HUB_OFFLINE is set" in message
    assert (
        "--deepspeed nope.json: DeepSpeed config nope.json not found"
        in train_check(shards, tmp_path, "--deepspeed", "nope.json")[1]
    )


def test_fake_hub_id_online_fails_in_one_request(monkeypatch):
    """With the hub switched on and no network here, one metadata request fails at once (no 25 s of
    retries); where the hub is reachable the id is reported unknown instead."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(UserError, match=r"--model Salesforce/blip2-no-such-model: (no such model|not a local)"):
        check_model("Salesforce/blip2-no-such-model")


def test_resume_step_that_does_not_exist(shards, tmp_path):
    code, message = train_check(shards, tmp_path, "--resume", "99")
    assert code == EXIT_ERROR and message.startswith("--resume 99: checkpoint ")
    assert "step_00000099 does not exist" in message


# ---- the entry points, one process, as the user runs them ---------------------------------------


def test_one_line_once_then_traceback_with_debug(shards, tmp_path):
    args = ["--model", "tiny-t5", "--data", str(shards), "--output-dir", str(tmp_path / "o"), "--save-steps", "0"]
    proc = run("launch/train.py", args, nproc=1, timeout=120, BLIP2_EXIT_DIR=str(tmp_path / "exits"))
    assert proc.returncode == EXIT_USAGE, explain(proc)
    assert proc.stderr.strip().splitlines() == ["error: --save-steps must be >= 1, got 0"]
    assert json.loads((tmp_path / "exits" / "rank-0.json").read_text())["message"] == "--save-steps must be >= 1, got 0"
    proc = run("launch/train.py", [*args, "--debug"], nproc=1, timeout=120)
    assert proc.returncode == EXIT_USAGE and "Traceback" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: --save-steps must be >= 1, got 0"


def test_read_only_output_dir(shards, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    proc = subprocess.run(
        [
            *plain_user(),
            *command(
                "launch/train.py", ["--model", "tiny-t5", "--data", str(shards), "--output-dir", str(locked / "run")], 1
            ),
        ],
        cwd=REPO,
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == EXIT_ERROR, explain(proc)
    assert proc.stderr.strip().splitlines() == [
        f"error: --output-dir {locked / 'run'}: cannot create it (Permission denied)"
    ]


def plain_user() -> list[str]:
    """A prefix that runs a command without root's right to write anywhere."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("root without setpriv: cannot drop the right to write read-only folders")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]


def load_script(name: str):
    """A launch/ script as a module, to call its main() in this process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"launch_{name}", REPO / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def script_outcome(name: str, argv: list[str]) -> tuple[int, str]:
    try:
        return load_script(name).main(argv), ""
    except BaseException as exc:  # noqa: BLE001
        return outcome(exc)


def test_caption_and_evaluate_checks(shards, tmp_path):
    empty = tmp_path / "empty_adapter"
    empty.mkdir()
    (tmp_path / "a.jpg").write_bytes(b"")
    assert script_outcome("caption", ["--batch-size", "0", str(tmp_path / "a.jpg")]) == (
        EXIT_USAGE,
        "--batch-size must be >= 1, got 0",
    )
    assert script_outcome("caption", ["--adapter", str(tmp_path / "nope"), "x.jpg"]) == (
        EXIT_ERROR,
        f"--adapter {tmp_path / 'nope'}: no such folder",
    )
    assert script_outcome("caption", ["--adapter", str(empty), "x.jpg"])[1].startswith(
        f"--adapter {empty}: not an adapter folder (no adapter_config.json)"
    )
    base = ["--model", "tiny-t5", "--data", str(shards), "--output-dir", str(tmp_path / "ev")]
    assert script_outcome("evaluate", [*base, "--adapter", str(tmp_path / "nope")]) == (
        EXIT_ERROR,
        f"--adapter {tmp_path / 'nope'}: no such folder",
    )
    assert script_outcome("evaluate", [*base, "--split", "dev"])[1].startswith("--split dev: ")
    assert script_outcome("evaluate", [*base, "--eval-batch", "0"]) == (EXIT_USAGE, "--eval-batch must be >= 1, got 0")


def test_caption_on_a_folder_without_images(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "notes.txt").write_text("x")
    proc = run("launch/caption.py", ["--model", "tiny-t5", str(tmp_path / "photos")], nproc=1, timeout=120)
    assert proc.returncode == EXIT_USAGE, explain(proc)
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith(f"warning: {tmp_path / 'photos'}: no image files in this folder")
    assert lines[-1] == f"error: no image to caption in {tmp_path / 'photos'}"


# ---- the packer: nothing destroyed --------------------------------------------------------------


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture
def packed(tmp_path):
    out = tmp_path / "pack"
    assert (
        pack_main(
            [
                "synthetic",
                "--out",
                str(out),
                "--n-train",
                "8",
                "--n-val",
                "2",
                "--n-test",
                "2",
                "--samples-per-shard",
                "4",
            ]
        )
        == 0
    )
    return out


def test_mistyped_source_leaves_a_good_pack_alone(packed, tmp_path, capsys):
    before = digests(packed)
    assert pack_main(["flickr8k", str(tmp_path / "flikr8k"), "--out", str(packed)]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'flikr8k'}: not a folder" in err and f"{packed} is as it was" in err
    assert digests(packed) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pack"]  # no temporary folder left


def test_repack_replaces_only_its_own_pack(packed, capsys):
    assert pack_main(["synthetic", "--out", str(packed), "--n-train", "4", "--n-val", "2", "--n-test", "2"]) == 0
    assert sorted(p.name for p in packed.iterdir()) == [
        MANIFEST,
        PACK_CONFIG,
        "test-000000.tar",
        "train-000000.tar",
        "val-000000.tar",
    ]
    assert json.loads((packed / PACK_CONFIG).read_text())["synthetic"]["n_train"] == 4  # this pack's options
    assert read_manifest(packed)["splits"]["train"]["images"] == 4


def test_folder_not_written_by_the_packer_is_refused_then_kept(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    (out / "train-000000.tar").write_bytes(b"someone else's shard")
    (out / "train-000007.tar").write_bytes(b"another")
    before = digests(out)
    args = ["synthetic", "--out", str(out), "--n-train", "4", "--n-val", "2", "--n-test", "2"]
    assert pack_main(args) == 1
    assert (
        "holds files this packer did not write (notes.txt, train-000000.tar, train-000007.tar)"
        in capsys.readouterr().err
    )
    assert digests(out) == before
    assert pack_main([*args, "--overwrite"]) == 0
    assert "train-000007.tar, not written by this packer: left in place" in capsys.readouterr().err
    after = digests(out)
    assert after["notes.txt"] == before["notes.txt"] and after["train-000007.tar"] == before["train-000007.tar"]
    assert read_manifest(out)["splits"]["train"]["images"] == 4


def test_out_is_a_file_or_read_only(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert pack_main(["synthetic", "--out", str(tmp_path / "f")]) == 1
    assert f"--out {tmp_path / 'f'} is a file, not a folder" in capsys.readouterr().err
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    proc = subprocess.run(
        [
            *plain_user(),
            sys.executable,
            "-m",
            "blip2_dist.data.pack_cli",
            "synthetic",
            "--out",
            str(locked / "p"),
            "--n-train",
            "4",
        ],
        cwd=REPO,
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == EXIT_ERROR, explain(proc)
    assert f"--out {locked / 'p'}: cannot write in {locked} (Permission denied)" in proc.stderr
    assert "Traceback" not in proc.stderr and list(locked.iterdir()) == []


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--quality", "-5", "--quality must be in 1..100"),
        ("--quality", "0", "--quality must be in 1..100"),
        ("--samples-per-shard", "0", "--samples-per-shard must be >= 1, got 0"),
        ("--workers", "0", "--workers must be >= 1"),
        ("--max-side", "0", "--max-side must be >= 1, got 0"),
    ],
)
def test_pack_flag_ranges(tmp_path, capsys, flag, value, message):
    write_original(tmp_path / "src")
    assert pack_main(["flickr8k", str(tmp_path / "src"), "--out", str(tmp_path / "out"), flag, value]) == 1
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_zero_byte_image_is_named(tmp_path, capsys):
    fake = write_original(tmp_path / "src")
    empty = fake.files[fake.order["train"][2]]
    empty.write_bytes(b"")
    assert pack_main(["flickr8k", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--workers", "1"]) == 1
    err = capsys.readouterr().err
    assert f"{empty}: empty image file (0 bytes)" in err and "BytesIO" not in err


# ---- loader workers never outlive their rank ----------------------------------------------------

WORKERS_OF_A_KILLED_RANK = r"""
import os, signal, sys, time
from torch.utils.data import IterableDataset
from blip2_dist.data.stages import worker_loader

class Slow(IterableDataset):
    def __iter__(self):
        while True:
            time.sleep(0.05)
            yield {"pid": os.getpid()}

pids = set()
for item in worker_loader(Slow(), num_workers=2):
    pids.add(item["pid"])
    if len(pids) == 2:
        break_here = True
        print(" ".join(map(str, sorted(pids))), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would: no cleanup of any kind
"""


def test_workers_die_with_their_rank(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(WORKERS_OF_A_KILLED_RANK)
    proc = subprocess.run([sys.executable, str(script)], env=cpu_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    workers = [int(p) for p in proc.stdout.split()]
    assert len(workers) == 2
    deadline = time.time() + 30
    while time.time() < deadline and any(alive(p) for p in workers):
        time.sleep(0.2)
    left = [p for p in workers if alive(p)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, "loader workers outlived their SIGKILLed rank"


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# ---- 2 ranks under the deepspeed launcher: every process ends, once --------------------------------


def job_processes(marker: str) -> list[psutil.Process]:
    """Processes whose command line names `marker` (a run's unique output folder): ranks and workers."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in p.info["cmdline"] or []):
                found.append(p)
        except psutil.Error:
            continue
    return found


def assert_nothing_left(marker: str) -> None:
    deadline = time.time() + 15  # the launcher reaps its ranks a moment after it returns
    while time.time() < deadline and job_processes(marker):
        time.sleep(0.5)
    left = job_processes(marker)
    for p in left:
        p.kill()
    assert not left, f"processes left: {[(p.pid, p.name()) for p in left]}"


def reports(folder: Path) -> dict[int, dict]:
    return {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in folder.glob("rank-*.json")}


@pytest.mark.slow
def test_two_ranks_error_before_the_process_group(shards, tmp_path):
    out = tmp_path / "run"
    proc = run(
        "launch/train.py",
        [*RUN, "--data", str(shards), "--output-dir", str(out), "--save-steps", "0"],
        nproc=2,
        timeout=300,
        BLIP2_EXIT_DIR=str(tmp_path / "exits"),
    )
    assert proc.returncode == EXIT_USAGE, explain(proc)
    both = proc.stdout + proc.stderr
    assert both.count("--save-steps must be >= 1, got 0") == 1 and "Traceback" not in both
    assert {r: (v["exit_code"], v["message"]) for r, v in reports(tmp_path / "exits").items()} == {
        0: (EXIT_USAGE, "--save-steps must be >= 1, got 0"),
        1: (EXIT_USAGE, "--save-steps must be >= 1, got 0"),
    }
    assert_nothing_left(str(out))


def corrupt_all_images(shard: Path) -> None:
    rewrite_member(shard, lambda name, data: b"not a jpeg" * 20 if name.endswith(".jpg") else data)


@pytest.mark.slow
def test_two_ranks_loader_error_on_one_rank_ends_the_job(shards, tmp_path):
    """Every JPEG of one train shard is corrupt: the loader worker of the rank whose slot it is
    raises; that rank exits 1 with the message, the other 76, and no process is left."""
    data = variant(shards, tmp_path / "data")
    corrupt_all_images(data / "train-000003.tar")
    out = tmp_path / "run"
    # 2 ranks x 2 workers = 4 slots of 16 images, one shard each: the bad shard is one worker's slot.
    proc = run(
        "launch/train.py",
        [*RUN, "--data", str(data), "--output-dir", str(out), "--max-steps", "3", "--num-workers", "2"],
        nproc=2,
        timeout=400,
        BLIP2_EXIT_DIR=str(tmp_path / "exits"),
    )
    ended = time.time()
    assert proc.returncode == EXIT_ERROR, explain(proc)
    got = reports(tmp_path / "exits")
    failed = [r for r, v in got.items() if v["exit_code"] == EXIT_ERROR]
    assert len(got) == 2 and len(failed) == 1, got
    other = 1 - failed[0]
    assert "no readable sample in this slot's shards" in got[failed[0]]["message"]
    assert got[other]["exit_code"] == EXIT_PEER_LOST
    both = proc.stdout + proc.stderr
    assert both.count("no readable sample in this slot's shards") == 1 and "Traceback" not in both
    assert f"error: rank {failed[0]}: rank {failed[0]} worker" in both
    assert f"error: rank {other}: a collective failed (" in both and "another rank or its node is lost" in both
    first_exit = min(p.stat().st_mtime for p in (tmp_path / "exits").iterdir())
    assert ended - first_exit < 60, "the job took over a minute to end after the first rank failed"
    assert_nothing_left(str(out))


@pytest.mark.slow
def test_two_ranks_evaluation_error_ends_the_job(shards, tmp_path):
    """A val image with a good header and truncated pixels: rank 0's exactly-once check names it
    after the gather, and tells rank 1, waiting for the metrics: both exit 1, one line each."""
    data = variant(shards, tmp_path / "data")
    rewrite_member(
        data / "val-000000.tar", lambda name, data: data[: len(data) // 3] if name == "syn-val-000005.jpg" else data
    )
    out = tmp_path / "run"
    proc = run(
        "launch/train.py",
        [*RUN, "--data", str(data), "--output-dir", str(out), "--max-steps", "2", "--eval-steps", "1"],
        nproc=2,
        timeout=400,
        BLIP2_EXIT_DIR=str(tmp_path / "exits"),
    )
    assert proc.returncode == EXIT_ERROR, explain(proc)
    got = reports(tmp_path / "exits")
    assert got[0]["exit_code"] == EXIT_ERROR and "1 missing: 'syn-val-000005'" in got[0]["message"]
    assert got[1]["exit_code"] == EXIT_ERROR and "evaluation at step 1 failed on rank 0" in got[1]["message"]
    both = proc.stdout + proc.stderr
    assert (
        both.count("error: rank 0: evaluation did not see every image exactly once: 1 missing: 'syn-val-000005'") == 1
        and "Traceback" not in both
    )
    assert both.count("error: rank 1: evaluation at step 1 failed on rank 0") == 1
    assert_nothing_left(str(out))


def small_disk(folder: Path, size: str) -> list[str]:
    """A prefix that runs a command with a `size` tmpfs mounted on `folder`, in a mount namespace of
    its own (nothing changes for the rest of the machine)."""
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {folder}"],
        capture_output=True,
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {probe.stderr.decode()[:200]}")
    return [
        "unshare",
        "-m",
        "--propagation",
        "private",
        "sh",
        "-c",
        f'mount -t tmpfs -o size={size} tmpfs "$0" && exec "$@"',
        str(folder),
    ]


@pytest.mark.slow
def test_two_ranks_disk_full_while_saving_ends_the_job(shards, tmp_path):
    """The run folder fills up while rank 0 exports the adapter of the first checkpoint (the
    tiny base alone is ~850 KB): rank 0 exits 1 naming the error, rank 1, waiting at the save's
    barrier, exits 76, and no process is left."""
    out = tmp_path / "run"
    out.mkdir()
    proc = subprocess.run(
        [
            *small_disk(out, "600k"),
            *command(
                "launch/train.py",
                [
                    *RUN,
                    "--data",
                    str(shards),
                    "--output-dir",
                    str(out),
                    "--max-steps",
                    "4",
                    "--save-steps",
                    "2",
                    "--skip-eval",
                ],
                2,
            ),
        ],
        cwd=REPO,
        env=cpu_env(BLIP2_EXIT_DIR=str(tmp_path / "exits")),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == EXIT_ERROR, explain(proc)
    got = reports(tmp_path / "exits")
    assert got[0]["exit_code"] == EXIT_ERROR and "No space left on device" in got[0]["message"], got
    assert got[1]["exit_code"] == EXIT_PEER_LOST, got
    both = proc.stdout + proc.stderr
    assert both.count("error: rank 0: ") == 1 and "No space left on device" in both
    assert_nothing_left(str(out))


@pytest.mark.slow
def test_two_ranks_ctrl_c_ends_every_process(shards, tmp_path):
    """Ctrl-C in a terminal sends SIGINT to the launcher, both ranks and their loader workers."""
    out = tmp_path / "run"
    log = tmp_path / "log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            command(
                "launch/train.py",
                [
                    *RUN,
                    "--data",
                    str(shards),
                    "--output-dir",
                    str(out),
                    "--max-steps",
                    "100000",
                    "--save-steps",
                    "2",
                    "--skip-eval",
                ],
                2,
            ),
            cwd=REPO,
            env=cpu_env(),
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for(out / "checkpoints" / "step_00000002" / "COMPLETE", timeout=300, proc=proc)
        ranks = [p for p in job_processes(str(out)) if "--local_rank" in " ".join(p.cmdline())]
        assert len(ranks) >= 3  # 2 ranks + their loader workers (one each, between two epochs maybe one)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text()
    assert "interrupted (Ctrl-C); exiting with 130" in text, text[-3000:]
    assert f'File "{REPO / "launch"}' not in text  # no traceback from our ranks (the launcher prints its own)
    assert_nothing_left(str(out))
