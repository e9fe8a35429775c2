"""save_pretrained / from_pretrained, and remote code loaded where `nextchat` cannot be imported."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

from nextchat import NextChatForConditionalGeneration
from tiny_models import BOXES, TRIGGER, image_block, images, sam_images, tiny_model


ROW = [1, 5] + image_block() + [7, TRIGGER, BOXES, 9, TRIGGER, BOXES, 2]
BOX_INPUTS = [[[0.1, 0.2, 0.5, 0.6], [0.3, 0.3, 0.8, 0.9]]]

# Runs a script with every import of `nextchat` refused, as on a machine where only transformers is installed.
BLOCKER = textwrap.dedent(
    """
    import runpy, sys

    class RefuseNextchat:
        def find_spec(self, name, path=None, target=None):
            if name == "nextchat" or name.startswith("nextchat."):
                raise ModuleNotFoundError(f"No module named {name!r}")
            return None

    sys.meta_path.insert(0, RefuseNextchat())
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
    """
)

REMOTE_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    try:
        import nextchat
        raise SystemExit("nextchat must not be importable here")
    except ImportError:
        pass
    from transformers import AutoModel, AutoModelForCausalLM
    source, resave_dir, result_path = sys.argv[1:4]
    model = AutoModel.from_pretrained(source, trust_remote_code=True).eval()
    assert "transformers_modules" in type(model).__module__, type(model).__module__
    inputs = torch.load(sys.argv[4])
    with torch.no_grad():
        out = model(**inputs)
    model.save_pretrained(resave_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(resave_dir, trust_remote_code=True).eval()
    with torch.no_grad():
        again = reloaded(**inputs)
    torch.save({"logits": out.logits, "pred_boxes": out.pred_boxes, "pred_masks": out.pred_masks,
                "logits_again": again.logits}, result_path)
    """
)


def model_inputs():
    return dict(
        input_ids=torch.tensor([ROW]), pixel_values=images(1), box_inputs=torch.tensor(BOX_INPUTS),
        sam_pixel_values=sam_images(1),
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny_model(sam=True, seed=7)
    folder = tmp_path_factory.mktemp("saved") / "tiny-nextchat"
    model.save_pretrained(folder)
    with torch.no_grad():
        reference = model(**model_inputs())
    return model, folder, reference


def test_saved_folder_holds_config_weights_and_flat_code(saved):
    _, folder, _ = saved
    files = set(os.listdir(folder))
    assert {"config.json", "model.safetensors", "configuration_nextchat.py", "modeling_nextchat.py",
            "sam_nextchat.py", "loss_nextchat.py", "generation_nextchat.py"} <= files
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "nextchat"
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForImageTextToText"}
    for name in files:
        if name.endswith(".py"):
            for line in (folder / name).read_text().splitlines():
                stripped = line.strip()
                if stripped.startswith("from .") and " import " in stripped:
                    module = stripped[len("from .") :].split()[0]
                    assert "." not in module and f"{module}.py" in files, f"{name}: {stripped}"


@pytest.mark.parametrize("auto_class", [NextChatForConditionalGeneration, AutoModel, AutoModelForCausalLM,
                                        AutoModelForImageTextToText])
def test_from_pretrained_gives_identical_outputs(saved, auto_class):
    model, folder, reference = saved
    loaded = auto_class.from_pretrained(folder).eval()
    assert type(loaded) is NextChatForConditionalGeneration
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    with torch.no_grad():
        out = loaded(**model_inputs())
    assert torch.equal(out.logits, reference.logits)
    assert torch.equal(out.pred_boxes, reference.pred_boxes)
    assert torch.equal(out.pred_masks, reference.pred_masks)
    assert AutoConfig.from_pretrained(folder).model_type == "nextchat"


def test_sharded_save_loads_identically(saved, tmp_path):
    model, _, reference = saved
    model.save_pretrained(tmp_path, max_shard_size="200KB")
    assert "model.safetensors.index.json" in os.listdir(tmp_path)
    loaded = NextChatForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**model_inputs()).logits, reference.logits)


def run_without_nextchat(tmp_path, source, env_extra):
    (tmp_path / "blocker.py").write_text(BLOCKER)
    (tmp_path / "remote.py").write_text(REMOTE_SCRIPT)
    torch.save(model_inputs(), tmp_path / "inputs.pt")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "HF_"))}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", **env_extra)
    result = subprocess.run(
        [sys.executable, "-I", str(tmp_path / "blocker.py"), str(tmp_path / "remote.py"), source,
         str(tmp_path / "resaved"), str(tmp_path / "result.pt"), str(tmp_path / "inputs.pt")],
        cwd="/", env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(tmp_path / "result.pt")


def test_remote_code_from_a_plain_folder_without_nextchat(saved, tmp_path):
    _, folder, reference = saved
    result = run_without_nextchat(tmp_path, str(folder), {})
    torch.testing.assert_close(result["logits"], reference.logits, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(result["pred_boxes"], reference.pred_boxes, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(result["pred_masks"], reference.pred_masks, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(result["logits_again"], reference.logits, atol=1e-6, rtol=1e-6)


def test_remote_code_from_an_offline_hub_cache_snapshot(saved, tmp_path):
    _, folder, reference = saved
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--nextchat-tests--tiny-nextchat"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    result = run_without_nextchat(tmp_path, "nextchat-tests/tiny-nextchat", {"HF_HUB_CACHE": str(cache)})
    torch.testing.assert_close(result["logits"], reference.logits, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(result["logits_again"], reference.logits, atol=1e-6, rtol=1e-6)


def test_no_split_modules_name_real_blocks_and_device_map_loading_works(saved):
    model, folder, reference = saved
    from nextchat import NextChatPreTrainedModel

    class_names = {type(module).__name__ for module in model.modules()}
    declared = set(NextChatPreTrainedModel.__dict__["_no_split_modules"])
    assert declared <= class_names, declared - class_names
    loaded = NextChatForConditionalGeneration.from_pretrained(folder, device_map="auto").eval()
    with torch.no_grad():
        assert torch.equal(loaded(**model_inputs()).logits, reference.logits)
