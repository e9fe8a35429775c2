"""Data-parallel `nextchat-eval`: 2 CPU processes (torchrun, gloo) write the same `predictions.jsonl` and
`results.json`, byte for byte, as one process, also when a rank dies mid-run and the same command resumes it."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from nextchat.evaluation.cli import main as cli_main
from nextchat.evaluation.runners import PredictionStore, shard_file
from test_evaluation_runners import boxy_model, tiny_model_for
from tiny_models import tiny_processor


SIZES = [(40, 60), (50, 30), (32, 32), (45, 45), (30, 64), (64, 30)]
BATCH = 3  # 11 samples: batches of 3, 3, 3, 2; rank 0 runs batches 0 and 2, rank 1 batches 1 and 3


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The model folder, the data, the CLI arguments, and the single-process reference output."""
    root = tmp_path_factory.mktemp("eval_ddp")
    processor = tiny_processor()
    model = boxy_model(tiny_model_for(processor))
    processor.save_pretrained(root / "model")
    model.save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    rows = []
    for i, (h, w) in enumerate(SIZES):
        PIL.Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
    for k in range(11):
        h, w = SIZES[k % 6]
        rows.append({"id": f"r{k}", "img_path": f"{k % 6}.png", "expression": f"thing {k}",
                     "bbox": [w / 5 + k, h / 6, w / 2 + 3, h / 2 + k]})
    data = root / "REC_refcoco_unc_val.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["rec", "--model", str(root / "model"), "--data", str(data), "--images", str(root / "images"),
            "--fast-rec", "--fast-rec-check", "0", "--batch-size", str(BATCH), "--no-progress", "--device", "cpu"]
    assert cli_main([*args, "--output", str(root / "single")]) == 0
    return {"root": root, "args": args, "single": root / "single"}


def _launch(args, output, launcher="torchrun", timeout=240):
    """`nextchat-eval ARGS --output OUTPUT` in 2 processes, started by torchrun or `accelerate launch`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    if launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
        command += ["--master_port", str(_free_port())]
    else:  # accelerate's multi-GPU launcher is torchrun underneath; on a CPU-only machine it runs gloo on CPUs
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        command += ["--main_process_port", str(_free_port())]
    run = subprocess.run([*command, "-m", "nextchat.evaluation.cli", *args, "--output", str(output)],
                         capture_output=True, text=True, timeout=timeout, env=env)
    if run.returncode == 0:
        assert "data parallel over 2 processes" in run.stderr
    return run


def _assert_same_files(output, single):
    assert _read(output / "predictions.jsonl") == _read(single / "predictions.jsonl")
    assert _read(output / "results.json") == _read(single / "results.json")
    assert sorted(os.listdir(output)) == ["predictions.jsonl", "results.json", "run_config.json"]  # shards merged


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_processes_equal_one_process_byte_for_byte(run, launcher):
    output = run["root"] / launcher
    done = _launch(run["args"], output, launcher)
    assert done.returncode == 0, done.stderr[-4000:]
    _assert_same_files(output, run["single"])
    results = json.loads(_read(output / "results.json"))
    assert results["num_samples"] == 11 and results["complete"]
    ious = [json.loads(line)["iou"] for line in _read(output / "predictions.jsonl").splitlines()]
    assert len(set(ious)) > 5  # real, varied predictions (not all-zero IoUs)
    assert done.stdout.count('"accuracy"') == 1  # rank 0 alone reports


@pytest.mark.slow
@pytest.mark.parametrize("resume_with", ["2 processes", "1 process"])
def test_a_killed_rank_resumes_from_its_shard(run, resume_with):
    output = run["root"] / f"killed, resumed with {resume_with}"
    # rank 1 dies (exit 17, no cleanup) after writing its first batch; torchrun then stops rank 0 too
    killed = _launch([*run["args"], "--debug-exit-after", "1:1"], output)
    assert killed.returncode != 0
    assert not (output / "results.json").exists() and not (output / "predictions.jsonl").exists()
    shard = output / shard_file(1, 2)
    assert list(PredictionStore(str(shard), read_only=True).records) == ["r3", "r4", "r5"]  # batch 1 only
    # Mark one stored record, so that the merged file shows it was taken from the shard rather than recomputed,
    # and leave a torn line as a process killed while writing would.
    lines = _read(shard).splitlines(keepends=True)
    original = lines[1]
    marked = original.replace('"text": null', '"text": "from the shard"')
    assert marked != original
    with open(shard, "w", encoding="utf-8") as f:
        f.writelines([lines[0], marked, *lines[2:], '{"id": "r9", "iou": 0.'])

    if resume_with == "2 processes":
        resumed = _launch(run["args"], output)  # the same command
        assert resumed.returncode == 0, resumed.stderr[-4000:]
    else:  # shards of any world size are read: a run may be finished with fewer processes
        assert cli_main([*run["args"], "--output", str(output)]) == 0
    merged = _read(output / "predictions.jsonl")
    assert marked in merged
    (output / "predictions.jsonl").write_text(merged.replace(marked, original))
    _assert_same_files(output, run["single"])
