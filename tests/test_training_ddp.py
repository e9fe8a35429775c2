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


# The two runs below train a tiny regression in 2 gloo processes with the trainer pieces under test; each script
# is this prelude (the model, 64 seeded samples, this process's `rank`), its own body, and the common teardown.
REGRESSION_PRELUDE = textwrap.dedent(
    """
    import json, os, sys, time, types
    import torch
    torch.set_num_threads(1)
    from transformers import Trainer, TrainingArguments

    class Regression(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 1)

        def forward(self, x, y):
            return {"loss": ((self.linear(x)[:, 0] - y) ** 2).mean()}

    torch.manual_seed(0)
    data = [{"x": torch.randn(4), "y": torch.randn(())} for _ in range(64)]
    rank = int(os.environ.get("RANK", "0"))
    """
)

GLOO_TEARDOWN = textwrap.dedent(
    """
    import torch.distributed as dist
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)
    """
)


def _run_regression_in_two_processes(body: str, tmp_path):
    """Run prelude + `body` + teardown under torchrun with 2 processes; `sys.argv[1]` is `tmp_path`."""
    script = tmp_path / "two_process_run.py"
    script.write_text(REGRESSION_PRELUDE + textwrap.dedent(body) + GLOO_TEARDOWN)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         str(script), str(tmp_path)],
        capture_output=True, text=True, timeout=180, env=env,
    )
    assert run.returncode == 0, run.stderr[-4000:]


def test_time_budget_stops_every_process_after_the_same_step(tmp_path):
    # Each process has its own clock; if one stopped a step before the other, the other would wait forever in its
    # next all-reduce. Here rank 1 believes the budget is spent from the first step: both must still run to the
    # step rank 0 decides (max_steps, as rank 0's budget never runs out), and the run must end.
    _run_regression_in_two_processes(
        """
        from nextchat.training.trainer import TimeBudgetCallback

        # rank 1's clock says the budget is spent at once; rank 0's never does: rank 0 must decide for both
        budget = TimeBudgetCallback(0.0 if rank == 1 else 1e9)
        args = TrainingArguments(output_dir=sys.argv[1], per_device_train_batch_size=4, max_steps=6, use_cpu=True,
                                 ddp_backend="gloo", save_strategy="no", report_to="none", disable_tqdm=True,
                                 dataloader_num_workers=0)
        trainer = Trainer(model=Regression(), args=args, train_dataset=data, callbacks=[budget])
        trainer.train()
        with open(os.path.join(sys.argv[1], f"steps_{rank}.json"), "w") as f:
            json.dump(trainer.state.global_step, f)
        """,
        tmp_path,
    )
    steps = [json.load(open(tmp_path / f"steps_{rank}.json")) for rank in (0, 1)]
    assert steps == [6, 6]


def test_wall_clock_schedule_keeps_replicas_identical(tmp_path):
    # The learning rate of a time-budget run follows the clock. If each process read its own, the replicas would
    # step with different learning rates and their weights would drift apart (DDP syncs gradients, not weights).
    # Rank 1's clock is skewed by half the budget here: the weights must still be bit-identical, with rank 0's rate.
    _run_regression_in_two_processes(
        """
        import nextchat.training.trainer as trainer_module

        if rank == 1:  # rank 1's clock runs half a budget ahead of rank 0's
            trainer_module.time = types.SimpleNamespace(time=lambda: time.time() + 50.0)
        args = TrainingArguments(output_dir=sys.argv[1], per_device_train_batch_size=4, max_steps=6, use_cpu=True,
                                 ddp_backend="gloo", save_strategy="no", report_to="none", disable_tqdm=True,
                                 dataloader_num_workers=0, optim="sgd", learning_rate=0.1,
                                 lr_scheduler_type="cosine", warmup_steps=0, max_grad_norm=0.0, weight_decay=0.0)
        model = Regression()
        trainer = trainer_module.NextChatTrainer(model=model, args=args, train_dataset=data, time_budget_s=100.0)
        trainer.train()
        torch.save({"state": model.state_dict(), "lr": trainer.lr_scheduler.get_last_lr()[0]},
                   os.path.join(sys.argv[1], f"rank_{rank}.pt"))
        """,
        tmp_path,
    )
    ranks = [torch.load(tmp_path / f"rank_{rank}.pt", weights_only=True) for rank in (0, 1)]
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), name
    # rank 0's clock: a few seconds of a 100 s cosine leave the rate near its peak (rank 1's own would be ~half)
    assert ranks[0]["lr"] == ranks[1]["lr"] and ranks[0]["lr"] > 0.09
