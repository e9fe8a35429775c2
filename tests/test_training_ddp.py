"""Multi-process data parallel: 2 CPU processes (torchrun, gloo) reach the same losses and weights as one process
with the same global batch, through `NextChatTrainer` (whose loss normalisers are summed across processes)."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import torch


SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    from transformers import TrainingArguments
    from nextchat import NextChatForConditionalGeneration
    from nextchat.training.data import NextChatDataCollator, NextChatJsonlDataset
    from nextchat.training.synthetic import build_shapes_processor
    from nextchat.training.train import scratch_config
    from nextchat.training.trainer import NextChatTrainer

    data, out, per_device = sys.argv[1], sys.argv[2], int(sys.argv[3])
    spec = {
        "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                        "num_key_value_heads": 2, "max_position_embeddings": 512},
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                          "num_attention_heads": 2, "patch_size": 8},
        "sam_config": {"patch_size": 8, "encoder_embed_dim": 16, "encoder_depth": 2, "encoder_num_heads": 2,
                       "encoder_global_attn_indexes": [1], "window_size": 2, "prompt_embed_dim": 16},
    }
    processor = build_shapes_processor(image_size=32, patch_size=8, sam_image_size=32)
    torch.manual_seed(0)
    model = NextChatForConditionalGeneration(scratch_config(processor, spec))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))

    class Ordered(NextChatTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    args = TrainingArguments(
        output_dir=out + ".run", per_device_train_batch_size=per_device, max_steps=2, learning_rate=0.5,
        optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, logging_steps=1,
        save_strategy="no", report_to="none", remove_unused_columns=False, use_cpu=True,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        ddp_find_unused_parameters=True, dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = Ordered(model=model, args=args, train_dataset=NextChatJsonlDataset(data, processor),
                      data_collator=NextChatDataCollator.from_processor(processor))
    trainer.train()
    if trainer.is_world_process_zero():
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        torch.save({"losses": losses, "world_size": trainer.args.world_size,
                    "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}, out)
    # Leave together, tear gloo down, and skip the interpreter's C++ teardown: on this torch, a gloo process
    # sometimes aborts in its static destructors AFTER all work is done ("terminate called without an active
    # exception"), which is not what this test is about. The results are already saved above.
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
    """
)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one_process(tmp_path):
    from nextchat.training.synthetic import write_dataset

    data = write_dataset(str(tmp_path / "data"), range(8), height=32, width=32, min_size=6, max_size=12,
                         max_objects=3)
    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("LOCAL_RANK", None)
    single = subprocess.run([sys.executable, str(script), data, str(tmp_path / "single.pt"), "4"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert single.returncode == 0, single.stderr[-4000:]
    double = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         str(script), data, str(tmp_path / "double.pt"), "2"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert double.returncode == 0, double.stderr[-4000:]
    one = torch.load(tmp_path / "single.pt", weights_only=True)
    two = torch.load(tmp_path / "double.pt", weights_only=True)
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert len(one["losses"]) == len(two["losses"]) == 2
    for a, b in zip(one["losses"], two["losses"]):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (one["losses"], two["losses"])
    for name, value in one["state"].items():
        torch.testing.assert_close(two["state"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    # the first SGD step changed the weights (the comparison is not vacuous)
    assert one["losses"][0] != one["losses"][1]


def test_entry_point_sets_up_cpu_data_parallelism(monkeypatch, tmp_path):
    # Without `use_cpu`, accelerate on a CPU-only machine does not wrap the model in DDP: each torchrun process would
    # train alone on its shard (found the hard way). The entry point sets it, with gloo, when WORLD_SIZE > 1.
    from nextchat.training.train import build_training_args

    if torch.cuda.is_available():
        return
    monkeypatch.setenv("WORLD_SIZE", "2")
    captured = {}

    import transformers

    class Capture:
        def __init__(self, **kwargs):
            captured.update(kwargs)

    monkeypatch.setattr(transformers, "TrainingArguments", Capture)
    build_training_args({"output_dir": "out"}, str(tmp_path))
    assert captured["use_cpu"] is True and captured["ddp_backend"] == "gloo"
    monkeypatch.setenv("WORLD_SIZE", "1")
    captured.clear()
    build_training_args({"output_dir": "out", "ddp_backend": "gloo"}, str(tmp_path))
    assert "ddp_backend" not in captured
