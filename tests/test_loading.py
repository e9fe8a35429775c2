"""nextchat.loading.load_pretrained: full folders and PEFT (LoRA) adapter folders, and the tools that use it
(nextchat-chat, nextchat-eval, the web demo's loader), plus what nextchat-eval records about its prompts."""

import copy
import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from nextchat import NextChatForConditionalGeneration, NextChatProcessor
from nextchat.loading import LoadingError, describe_source, load_pretrained


peft = pytest.importorskip("peft")

SHIPPED = Path(__file__).resolve().parent.parent / "examples" / "tiny-nextchat-shapes"
MODULES_TO_SAVE = ["lm_head", "embed_tokens", "loc_decoder.0", "loc_decoder.2"]


def _base_model_and_processor():
    """The shipped tiny shapes model when present (it answers with boxes), else a tiny random one."""
    if (SHIPPED / "config.json").is_file():
        return (NextChatForConditionalGeneration.from_pretrained(str(SHIPPED)).eval(),
                NextChatProcessor.from_pretrained(str(SHIPPED)))
    from tiny_models import tiny_model_and_processor

    return tiny_model_and_processor(seed=3)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """base/ (full model + processor), adapter/ (LoRA + modules_to_save + processor), adapter-bare/ (adapter
    weights only), merged/ (the same model merged and saved in full), and the in-memory PeftModel."""
    root = tmp_path_factory.mktemp("loading")
    model, processor = _base_model_and_processor()
    base = root / "base"
    model.save_pretrained(str(base))
    processor.save_pretrained(str(base))
    base_model = NextChatForConditionalGeneration.from_pretrained(str(base)).eval()  # name_or_path = base/
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=r".*language_model.*\.(q_proj|v_proj)",
                             modules_to_save=MODULES_TO_SAVE)
    peft_model = peft.get_peft_model(base_model, config)
    torch.manual_seed(0)
    with torch.no_grad():  # a non-trivial adapter: LoRA B is zero at init, the saved heads equal the base
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                parameter.add_(0.01 * torch.randn_like(parameter))
    peft_model.eval()
    adapter = root / "adapter"
    peft_model.save_pretrained(str(adapter))
    processor.save_pretrained(str(adapter))
    bare = root / "adapter-bare"
    peft_model.save_pretrained(str(bare))
    merged = root / "merged"
    copy.deepcopy(peft_model).merge_and_unload().save_pretrained(str(merged))
    processor.save_pretrained(str(merged))
    with open(adapter / "adapter_config.json") as f:
        assert json.load(f)["base_model_name_or_path"] == str(base)
    return {"root": root, "base": str(base), "adapter": str(adapter), "bare": str(bare), "merged": str(merged),
            "peft": peft_model, "processor": processor}


def _inputs(processor):
    from tiny_models import shapes_scene

    image, _ = shapes_scene()
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": "<image> Where is the red circle?"}], add_generation_prompt=True)
    inputs = processor(images=image, text=prompt + " The red circle", append_trigger=True,
                       return_sam_pixel_values=False)
    inputs.pop("image_sizes")
    return dict(inputs)


def test_adapter_folder_loads_merged_and_equals_the_peft_model(folders):
    model, processor = load_pretrained(folders["adapter"], device="cpu", dtype=torch.float32)
    assert type(model) is NextChatForConditionalGeneration and not model.training
    assert not any("lora" in n or "modules_to_save" in n for n, _ in model.named_parameters())
    reference = folders["peft"]
    # the modules_to_save copies come back exactly (lm_head, embed_tokens, loc_decoder)
    saved = {n.replace("base_model.model.", "").replace(".modules_to_save.default", ""): p
             for n, p in reference.named_parameters() if "modules_to_save.default" in n}
    assert {n.split(".")[0] for n in saved} >= {"lm_head", "loc_decoder", "model"}
    assert any("embed_tokens" in n for n in saved)
    params = dict(model.named_parameters())
    for name, value in saved.items():
        assert torch.equal(params[name], value), name
    # the same logits and boxes as the in-memory adapter
    inputs = _inputs(processor)
    with torch.no_grad():
        ours = model(**inputs)
        theirs = reference(**inputs)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.pred_boxes, theirs.pred_boxes, atol=1e-5, rtol=1e-5)
    # and the adapter changed the model: the base gives other logits
    base, _ = load_pretrained(folders["base"])
    with torch.no_grad():
        assert not torch.allclose(base(**inputs).logits, ours.logits, atol=1e-4)
    # merge=False returns the PeftModel itself
    unmerged, _ = load_pretrained(folders["adapter"], merge=False)
    assert isinstance(unmerged, peft.PeftModel)
    assert describe_source(folders["adapter"])["kind"] == "adapter"
    assert describe_source(folders["merged"])["kind"] == "model"


def test_processor_from_adapter_else_base_and_base_model_override(folders, tmp_path):
    _, processor = load_pretrained(folders["bare"])  # no processor files: the base's
    assert processor.special_token_ids == folders["processor"].special_token_ids
    # an adapter whose recorded base is gone: the error names --base-model; base_model= fixes it
    moved = tmp_path / "moved"
    shutil.copytree(folders["adapter"], moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (moved / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(LoadingError, match="base_model"):
        load_pretrained(str(moved))
    config["base_model_name_or_path"] = None
    (moved / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(LoadingError, match="base_model"):
        load_pretrained(str(moved))
    model, _ = load_pretrained(str(moved), base_model=folders["base"])
    reference, _ = load_pretrained(folders["adapter"])
    for (n, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), n


def test_loading_errors_name_the_argument(folders, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LoadingError, match=r"`path`.*neither a NExT-Chat model folder nor a PEFT adapter folder"):
        load_pretrained(str(empty))
    with pytest.raises(LoadingError, match=r"`path`.*does not exist"):
        load_pretrained(str(tmp_path / "missing"))
    some_file = tmp_path / "x.safetensors"
    some_file.write_text("x")
    with pytest.raises(LoadingError, match=r"`path`.*is a file"):
        load_pretrained(str(some_file))
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(os.path.join(folders["adapter"], "adapter_config.json"), no_weights)
    with pytest.raises(LoadingError, match="no adapter weights"):
        load_pretrained(str(no_weights))
    with pytest.raises(LoadingError, match=r"`base_model` was given but .* is a full model folder"):
        load_pretrained(folders["merged"], base_model=folders["base"])
    with pytest.raises(LoadingError, match=r"`base_model`.*not a full NExT-Chat model folder"):
        load_pretrained(folders["adapter"], base_model=str(empty))
    with pytest.raises(LoadingError, match=r"`processor`.*no processor files"):
        load_pretrained(folders["merged"], processor=str(empty))
    with pytest.raises(LoadingError, match="`dtype`"):
        load_pretrained(folders["merged"], dtype="float99")


def test_chat_cli_answers_the_same_on_the_adapter_and_the_merged_folder(folders, tmp_path, capsys):
    from nextchat.demo import chat_cli
    from nextchat.demo.core import DemoError, load_model
    from tiny_models import shapes_scene

    image, question = shapes_scene()
    image_path = tmp_path / "scene.png"
    image.save(image_path)
    answers = []
    runs = ((folders["adapter"], []), (folders["merged"], []), (folders["bare"], ["--base-model", folders["base"]]))
    for model_dir, extra in runs:
        rc = chat_cli.main([str(image_path), question, "--model", model_dir, "--json", "--device", "cpu",
                            "--output", str(tmp_path / "out.png"), *extra])
        assert rc == 0
        record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        answers.append((record["answer"], [(e["text"], e["box"]) for e in record["entities"]]))
    assert answers[0] == answers[1] == answers[2]
    if (SHIPPED / "config.json").is_file():
        assert answers[0][1], "the shipped model grounds something in its scene"
    # the web demo takes the same options and uses the same loader
    from nextchat.demo import web

    parsed = web.build_parser().parse_args(["--model", folders["bare"], "--base-model", folders["base"]])
    assert parsed.base_model == folders["base"]
    model, processor = load_model(folders["adapter"], device="cpu", progress=lambda m: None)
    assert type(model) is NextChatForConditionalGeneration
    with pytest.raises(DemoError, match="neither config.json nor adapter_config.json"):
        load_model(str(tmp_path), device="cpu", progress=lambda m: None)
    assert chat_cli.main([str(image_path), "hi", "--model", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ nextchat-eval


@pytest.fixture(scope="module")
def rec_files(folders):
    """A synthetic REC split (its lines carry answer_prefix) and the same lines written as a plain REC JSONL with a
    per-line `question` and no `answer_prefix`."""
    from nextchat.evaluation import load_samples
    from nextchat.training import synthetic

    root = folders["root"] / "eval"
    path = synthetic.write_dataset(str(root / "shapes"), range(1_000_000, 1_000_030))
    samples = load_samples("rec", path)
    plain = root / "rec_plain.jsonl"
    images = os.path.dirname(path)
    with open(plain, "w") as f:
        for s in samples:
            f.write(json.dumps({"id": s.id, "img_path": os.path.join(images, s.image), "expression": s.expression,
                                "bbox": s.bbox, "question": s.question}) + "\n")
    return {"synthetic": path, "plain": str(plain), "samples": samples}


def _eval(args, capsys):
    from nextchat.evaluation.cli import main

    rc = main(args)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return captured


def _predictions(folder):
    with open(os.path.join(folder, "predictions.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_eval_cli_on_the_adapter_equals_the_merged_folder(folders, rec_files, tmp_path, capsys):
    common = ["rec", "--data", rec_files["synthetic"], "--no-progress", "--device", "cpu", "--batch-size", "4"]
    _eval([*common, "--model", folders["adapter"], "--output", str(tmp_path / "a")], capsys)
    _eval([*common, "--model", folders["merged"], "--output", str(tmp_path / "m")], capsys)
    a, m = _predictions(tmp_path / "a"), _predictions(tmp_path / "m")
    assert len(a) == len(rec_files["samples"]) > 0
    assert a == m
    # the adapter's base overridden on the command line
    _eval([*common, "--model", folders["bare"], "--base-model", folders["base"], "--output", str(tmp_path / "b")],
          capsys)
    assert _predictions(tmp_path / "b") == m
    from nextchat.evaluation.cli import main

    assert main([*common, "--model", str(tmp_path), "--output", str(tmp_path / "x")]) == 2
    assert "neither a NExT-Chat model folder nor a PEFT adapter folder" in capsys.readouterr().err


def test_predictions_and_results_record_the_prompts(folders, rec_files, tmp_path, capsys):
    samples = rec_files["samples"]
    out = tmp_path / "plain"
    _eval(["rec", "--model", folders["merged"], "--data", rec_files["plain"], "--output", str(out), "--no-progress",
           "--device", "cpu", "--max-new-tokens", "8"], capsys)
    records = _predictions(out)
    for record, sample in zip(records, samples):
        assert record["prompt_source"] == "question"
        assert record["user_prompt"] == sample.question
        assert sample.question.replace("<image>", "").strip() in record["prompt"]
        assert record["prompt"].endswith("ASSISTANT:")
    results = json.loads((out / "results.json").read_text())
    prompts = results["settings"]["prompts"]
    assert results["settings"]["templates"] == []  # not the default template: no sample used it
    assert prompts["source"].startswith("per-sample questions from the data file")
    assert prompts["from_data_question"] == len(samples) and prompts["from_template"] == 0
    assert sum(prompts["questions"].values()) == len(samples)
    assert set(prompts["questions"]) == {s.question for s in samples}
    # lines without a question: the template, filled in, is recorded
    no_question = tmp_path / "REC_template.jsonl"
    no_question.write_text("".join(
        json.dumps({k: v for k, v in json.loads(line).items() if k != "question"}) + "\n"
        for line in open(rec_files["plain"])))
    _eval(["rec", "--model", folders["merged"], "--data", str(no_question), "--output", str(tmp_path / "t"),
           "--no-progress", "--device", "cpu", "--fast-rec", "--fast-rec-check", "0"], capsys)
    records = _predictions(tmp_path / "t")
    for record, sample in zip(records, samples):
        assert record["prompt_source"] == "template"
        assert record["user_prompt"] == f"<image> Where is {sample.expression} in the image?"
        assert record["prompt"].endswith("ASSISTANT: Answer:") and record["answer_prefix"] == "Answer:"
    settings = json.loads((tmp_path / "t" / "results.json").read_text())["settings"]
    assert settings["templates"] == ["<image> Where is <expr> in the image?"]
    assert settings["prompts"]["templates_used"] == {"<image> Where is <expr> in the image?": len(samples)}


def test_fast_rec_warns_when_it_disagrees_with_generation(folders, rec_files, tmp_path, capsys):
    if not (SHIPPED / "config.json").is_file():
        pytest.skip("needs the shipped tiny model, which answers 'The <phrase> <at> ...'")
    from nextchat.evaluation import evaluate
    from nextchat.evaluation.runners import FastRecWarning

    # the lines carry no answer_prefix: 'Answer: <at>' is forced, which this model never writes
    captured = _eval(["rec", "--model", folders["base"], "--data", rec_files["plain"], "--output",
                      str(tmp_path / "fast"), "--no-progress", "--device", "cpu", "--fast-rec"], capsys)
    assert "nextchat-eval: warning: --fast-rec does not match how this model answers" in captured.err
    assert "--answer-prefix" in captured.err and "WARNING:" in captured.out
    results = json.loads((tmp_path / "fast" / "results.json").read_text())
    assert results["warnings"] and not results["settings"]["fast_rec_check"]["agree"]
    assert all(p.startswith("The ") for p in results["settings"]["fast_rec_check"]["generated_prefixes"])
    # with the prefix the model uses (the synthetic lines' own answer_prefix), fast and generation agree
    model, processor = load_pretrained(folders["base"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastRecWarning)
        agreed = evaluate("rec", model, processor, rec_files["synthetic"], str(tmp_path / "own"), fast_rec=True,
                          progress=False)
    assert agreed["warnings"] == [] and agreed["settings"]["fast_rec_check"]["agree"]
    assert agreed["metrics"]["accuracy"] > results["metrics"]["accuracy"]
    with pytest.warns(FastRecWarning, match="disagrees with free generation"):
        evaluate("rec", model, processor, rec_files["plain"], str(tmp_path / "api"), fast_rec=True, progress=False)
    # --answer-prefix is recorded and used; without --fast-rec it is refused
    _eval(["rec", "--model", folders["base"], "--data", rec_files["plain"], "--output", str(tmp_path / "prefix"),
           "--no-progress", "--device", "cpu", "--fast-rec", "--answer-prefix", "", "--fast-rec-check", "2"], capsys)
    records = _predictions(tmp_path / "prefix")
    assert all(r["answer_prefix"] == "" and r["prompt"].endswith("ASSISTANT:") for r in records)
    from nextchat.evaluation.cli import main

    with pytest.raises(SystemExit):
        main(["rec", "--model", folders["base"], "--data", rec_files["plain"], "--output", str(tmp_path / "n"),
              "--answer-prefix", "Answer:"])


def test_readme_documents_the_evaluation_data_format(tmp_path):
    """Every example line of the README's evaluation data format reads with the task it is given for."""
    import re

    from nextchat.evaluation import load_samples

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Evaluation data format", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```json\n(.*?)```", section, re.S)
    assert len(blocks) == 3
    tasks = (lambda r: "res" if "mask" in r else "rec", lambda r: "pope", lambda r: "reg")
    for block, task_of in zip(blocks, tasks):
        for k, line in enumerate(block.strip().splitlines()):
            record = json.loads(line)
            path = tmp_path / f"{k}.jsonl"
            path.write_text(line + "\n")
            task = task_of(record)
            (sample,) = load_samples(task, str(path))
            assert sample.image == record.get("img_path", record.get("image"))
            if task in ("rec", "reg"):
                assert len(sample.bbox) == 4
            if "question" in record and task != "pope":
                assert sample.question == record["question"]
    evaluation = readme.split("## Evaluation", 1)[1]
    for needle in ("--answer-prefix", "--base-model", "adapter", "user_prompt", "settings.prompts", "--fast-rec-check"):
        assert needle in evaluation, needle
    chat = readme.split("## Chat", 1)[1].split("\n## ", 1)[0]
    assert "adapter" in chat and "--base-model" in chat


def test_adapter_trained_after_adding_tokens_loads(tmp_path):
    """An adapter whose saved embed_tokens / lm_head have more rows than the base (tokens added before LoRA): the
    base is resized first and the saved tables come back exactly."""
    from tiny_models import tiny_model_and_processor

    model, processor = tiny_model_and_processor(seed=3)
    base = tmp_path / "base"
    model.save_pretrained(str(base))
    processor.save_pretrained(str(base))
    resized = NextChatForConditionalGeneration.from_pretrained(str(base)).eval()
    n = resized.get_input_embeddings().weight.shape[0]
    resized.resize_token_embeddings(n + 3, mean_resizing=False)
    peft_model = peft.get_peft_model(resized, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)",
        modules_to_save=["lm_head", "embed_tokens"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                parameter.add_(0.05 * torch.randn_like(parameter))
    peft_model.eval().save_pretrained(str(tmp_path / "adapter"))
    loaded, _ = load_pretrained(str(tmp_path / "adapter"))
    assert loaded.get_input_embeddings().weight.shape[0] == n + 3
    ids = torch.tensor([[1, 5, 7, n + 1, 9]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, peft_model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
