"""Generation with trigger interception against a naive reference that recomputes every step from scratch."""

import copy

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.streamers import BaseStreamer

from tiny_models import (
    BOXES, IMAGE_PATCH, TRIGGER, image_block, images, naive_box_embedding, pad_boxes, pad_rows, sam_images, tiny_model,
)


EOS = 2
PROMPT_A = [1, 5] + image_block() + [7, 8, TRIGGER, BOXES, 9, 10]
BOXES_A = [[0.1, 0.2, 0.5, 0.6]]
PROMPT_B = [1, 11, 12, 13, 14, TRIGGER]  # text only, asks for a box at its end
BOXES_B = []
TRIGGER_STEPS = (2, 6)  # generated steps at which the test forces `<at>`


class ForceTriggerAt(LogitsProcessor):
    """Test helper: forces `<at>` at chosen generation steps (the random model would rarely emit it)."""

    def __init__(self, prompt_length, steps):
        self.prompt_length, self.steps = prompt_length, steps

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] - self.prompt_length in self.steps:
            forced = torch.full_like(scores, -float("inf"))
            forced[:, TRIGGER] = scores[:, TRIGGER]
            return forced
        return scores


def _generation_model(**overrides):
    model = tiny_model(sam=True, seed=11, **overrides)
    with torch.no_grad():  # make the box embedding weigh on the logits so that a wrong box shows
        model.model.loc_encoder[2].weight.mul_(30)
    return model


@pytest.fixture(scope="module")
def model():
    return _generation_model()




def naive_reference(model, prompt, row_images, user_boxes, generated):
    """Per row, no cache, no padding: step t's logits come from a full forward over prompt + generated[:t] whose
    embeddings are rebuilt position by position (image features, user boxes, then the box predicted at each
    trigger for the `<boxes>` after it). Returns the logits of each step and the boxes of the answer triggers."""
    embed = model.get_input_embeddings()
    features = None
    if row_images is not None:
        vision = model.model.vision_tower(row_images, output_hidden_states=True)
        features = model.model.mm_projector(vision.hidden_states[-2][:, 1:]).reshape(-1, embed.embedding_dim)
    box_queue = [torch.tensor(b) for b in user_boxes]
    answer_boxes, step_logits = [], []
    for t in range(len(generated)):
        tokens = prompt + generated[:t]
        rows, image_k, box_k = [], 0, 0
        for token in tokens:
            if token == IMAGE_PATCH:
                rows.append(features[image_k])
                image_k += 1
            elif token == BOXES:
                rows.append(naive_box_embedding(model, box_queue[box_k]))  # the user's boxes, then predicted ones
                box_k += 1
            else:
                rows.append(embed(torch.tensor(token)))
        hidden = model.model.language_model(inputs_embeds=torch.stack(rows)[None]).last_hidden_state[0]
        step_logits.append(model.lm_head(hidden[-1]))
        if tokens[-1] == TRIGGER:
            box = model.loc_decoder(hidden[-1])
            box_queue.append(box)
            answer_boxes.append(box)
    if generated and generated[-1] == TRIGGER:  # a trigger as the very last token still gets its box
        tokens = prompt + generated
        rows = []
        image_k = box_k = 0
        for token in tokens:
            if token == IMAGE_PATCH:
                rows.append(features[image_k]); image_k += 1
            elif token == BOXES:
                rows.append(naive_box_embedding(model, box_queue[box_k])); box_k += 1
            else:
                rows.append(embed(torch.tensor(token)))
        hidden = model.model.language_model(inputs_embeds=torch.stack(rows)[None]).last_hidden_state[0]
        answer_boxes.append(model.loc_decoder(hidden[-1]))
    return torch.stack(step_logits), answer_boxes


def batch(prompts, boxes, side="left"):
    ids, mask = pad_rows(prompts, side=side)
    box_inputs, box_mask = pad_boxes(boxes)
    n_images = sum(1 for p in prompts if IMAGE_PATCH in p)
    return dict(input_ids=ids, attention_mask=mask, box_inputs=box_inputs, box_inputs_mask=box_mask,
                pixel_values=images(n_images, seed=5) if n_images else None)


def generated_tokens(sequences, row, prompt_length):
    tokens = sequences[row, prompt_length:].tolist()
    return tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens


def row_images_of(inputs, prompts, row):
    index = sum(1 for p in prompts[:row] if IMAGE_PATCH in p)
    return inputs["pixel_values"][index : index + 1] if IMAGE_PATCH in prompts[row] else None


@pytest.mark.parametrize("do_sample", [False, True])
@torch.no_grad()
def test_greedy_and_sampling_logits_and_boxes_match_naive_reference(model, do_sample):
    prompts, boxes = [PROMPT_A, PROMPT_B], [BOXES_A, BOXES_B]
    inputs = batch(prompts, boxes)
    prompt_length = inputs["input_ids"].shape[1]
    torch.manual_seed(0)
    out = model.generate(
        **inputs, max_new_tokens=10, do_sample=do_sample, top_k=0, top_p=1.0, num_return_sequences=2 if do_sample else 1,
        logits_processor=LogitsProcessorList([ForceTriggerAt(prompt_length, TRIGGER_STEPS)]),
        return_dict_in_generate=True, output_logits=True, pad_token_id=0, eos_token_id=EOS,
    )
    expand = 2 if do_sample else 1
    checked_triggers = 0
    for r in range(out.sequences.shape[0]):
        b = r // expand
        generated = generated_tokens(out.sequences, r, prompt_length)
        for step, token in enumerate(generated[:-1]):
            if token == TRIGGER:
                assert generated[step + 1] == BOXES, "`<boxes>` must follow every generated `<at>`"
        logits, answer_boxes = naive_reference(model, prompts[b], row_images_of(inputs, prompts, b), boxes[b], generated)
        got = torch.stack([out.logits[t][r] for t in range(len(generated))])
        torch.testing.assert_close(got, logits, atol=1e-5, rtol=1e-5)
        assert len(out.pred_boxes[r]) == len(answer_boxes)
        if answer_boxes:
            torch.testing.assert_close(out.pred_boxes[r], torch.stack(answer_boxes), atol=1e-5, rtol=1e-5)
        checked_triggers += len(answer_boxes)
    assert checked_triggers >= 4 * expand


class OfferTriggerAt(LogitsProcessor):
    """Test helper for beam search: at chosen steps `<at>` scores as high as the best token, so that beams split
    between triggering and not, and the beams that carry a pending box get permuted."""

    def __init__(self, prompt_length, steps):
        self.prompt_length, self.steps = prompt_length, steps

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] - self.prompt_length in self.steps:
            scores = scores.clone()
            scores[:, TRIGGER] = scores.max(dim=-1).values
        return scores


BEAM_FORCED_STEPS = (2,)  # every beam triggers here, so returned beams hold boxes
BEAM_OFFERED_STEPS = (4, 5, 6)


def beam_scores_reference(model, prompts, boxes, inputs, out, prompt_length):
    """Largest error of `sequences_scores` (length_penalty 0: the sum of processed log-probs) over the beams."""
    errors, triggers = [], 0
    for r in range(out.sequences.shape[0]):
        b = r // 3
        generated = generated_tokens(out.sequences, r, prompt_length)
        logits, _ = naive_reference(model, prompts[b], row_images_of(inputs, prompts, b), boxes[b], generated)
        offer = OfferTriggerAt(0, BEAM_OFFERED_STEPS)  # forcing keeps the trigger's own log-prob
        total = 0.0
        for t, token in enumerate(generated):
            logprobs = torch.log_softmax(logits[t], dim=-1)[None]
            total += float(offer(torch.zeros((1, t), dtype=torch.long), logprobs)[0, token])
        triggers += generated.count(TRIGGER)
        errors.append(abs(total - float(out.sequences_scores[r])))
    assert triggers >= 4, "the beams must hold triggers for the test to mean anything"
    return max(errors)


def beam_generate(model, inputs, prompt_length):
    return model.generate(
        **inputs, max_new_tokens=9, num_beams=3, num_return_sequences=3, length_penalty=0.0, do_sample=False,
        logits_processor=LogitsProcessorList(
            [ForceTriggerAt(prompt_length, BEAM_FORCED_STEPS), OfferTriggerAt(prompt_length, BEAM_OFFERED_STEPS)]
        ),
        return_dict_in_generate=True, output_scores=True, pad_token_id=0, eos_token_id=EOS, early_stopping=True,
    )


@torch.no_grad()
def test_beam_search_scores_match_naive_reference_and_negative_control_fails(model):
    prompts, boxes = [PROMPT_A, PROMPT_B], [BOXES_A, BOXES_B]
    inputs = batch(prompts, boxes)
    prompt_length = inputs["input_ids"].shape[1]
    out = beam_generate(model, inputs, prompt_length)
    assert beam_scores_reference(model, prompts, boxes, inputs, out, prompt_length) < 1e-4
    # boxes of the returned beams equal a teacher-forced forward over them with those boxes as inputs
    for r in range(out.sequences.shape[0]):
        b = r // 3
        sequence = out.sequences[r : r + 1]
        answer_boxes = out.pred_boxes[r]
        fed = int((sequence[0, prompt_length:] == BOXES).sum())  # `<boxes>` after the first `fed` answer triggers
        all_boxes = torch.cat([torch.tensor(boxes[b]).reshape(-1, 4), answer_boxes[:fed]])
        attention = torch.cat([inputs["attention_mask"][b], torch.ones(sequence.shape[1] - prompt_length)])[None]
        forward = model(input_ids=sequence, attention_mask=attention.long(),
                        pixel_values=row_images_of(inputs, prompts, b),
                        box_inputs=all_boxes[None] if len(all_boxes) else None)
        columns = forward.trigger_positions[:, 1]
        torch.testing.assert_close(forward.pred_boxes[columns >= prompt_length - 1], answer_boxes, atol=1e-5, rtol=1e-5)

    broken = copy.deepcopy(model)

    def reorder_cache_only(cache, beam_idx):  # the original's bug: the trigger state is not reordered
        cache.reorder_cache(beam_idx)
        return cache

    broken._reorder_cache = reorder_cache_only
    out_broken = beam_generate(broken, inputs, prompt_length)
    assert beam_scores_reference(model, prompts, boxes, inputs, out_broken, prompt_length) > 1e-3


@torch.no_grad()
def test_batched_generation_equals_per_row(model):
    prompts, boxes = [PROMPT_A, PROMPT_B], [BOXES_A, BOXES_B]
    inputs = batch(prompts, boxes)
    prompt_length = inputs["input_ids"].shape[1]
    kwargs = dict(max_new_tokens=8, do_sample=False, return_dict_in_generate=True, pad_token_id=0, eos_token_id=EOS)
    out = model.generate(**inputs, logits_processor=LogitsProcessorList([ForceTriggerAt(prompt_length, (3,))]), **kwargs)
    for b, prompt in enumerate(prompts):
        single_inputs = batch([prompt], [boxes[b]])
        single = model.generate(
            **single_inputs, logits_processor=LogitsProcessorList([ForceTriggerAt(len(prompt), (3,))]), **kwargs
        )
        assert generated_tokens(out.sequences, b, prompt_length) == generated_tokens(single.sequences, 0, len(prompt))
        torch.testing.assert_close(out.pred_boxes[b], single.pred_boxes[0], atol=1e-5, rtol=1e-5)


def test_right_padded_batch_generates_like_the_left_padded_one(model):
    """A right-padded batch (a tokenizer with padding_side="right", as transformers' pipelines < 5.25 collate it)
    is left-aligned by `generate`: the same tokens, boxes and masks as the left-padded batch."""
    prompts, boxes = [PROMPT_A, PROMPT_B], [BOXES_A, BOXES_B]
    kwargs = dict(max_new_tokens=8, do_sample=False, return_dict_in_generate=True, pad_token_id=0, eos_token_id=EOS)
    outputs = []
    for side in ("left", "right"):
        inputs = batch(prompts, boxes, side=side)
        length = inputs["input_ids"].shape[1]
        outputs.append(model.generate(**inputs, logits_processor=LogitsProcessorList([ForceTriggerAt(length, (3,))]),
                                      sam_pixel_values=sam_images(2, seed=3), **kwargs))
    left, right = outputs
    assert torch.equal(left.sequences, right.sequences)
    for b in range(len(prompts)):
        torch.testing.assert_close(right.pred_boxes[b], left.pred_boxes[b], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(right.pred_masks[b], left.pred_masks[b], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_static_cache_matches_dynamic_cache(model):
    inputs = batch([PROMPT_A, PROMPT_B], [BOXES_A, BOXES_B])
    prompt_length = inputs["input_ids"].shape[1]
    kwargs = dict(max_new_tokens=8, do_sample=False, return_dict_in_generate=True, output_logits=True,
                  pad_token_id=0, eos_token_id=EOS,
                  logits_processor=LogitsProcessorList([ForceTriggerAt(prompt_length, TRIGGER_STEPS)]))
    dynamic = model.generate(**inputs, **kwargs)
    static = model.generate(**inputs, cache_implementation="static", **kwargs)
    assert torch.equal(dynamic.sequences, static.sequences)
    for a, b in zip(dynamic.logits, static.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip(dynamic.pred_boxes, static.pred_boxes):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("do_sample", [False, True])
@torch.no_grad()
def test_generation_without_cache_matches_the_naive_reference_and_the_cached_run(model, do_sample):
    """`use_cache=False` re-reads the whole sequence at every step: same tokens, logits, boxes and masks as the
    naive reference and as generation with the cache (LLaVA and Kosmos-2 support it too)."""
    prompts, boxes = [PROMPT_A, PROMPT_B], [BOXES_A, BOXES_B]
    inputs = batch(prompts, boxes)
    prompt_length = inputs["input_ids"].shape[1]
    kwargs = dict(max_new_tokens=9, do_sample=do_sample, top_k=0, top_p=1.0, return_dict_in_generate=True,
                  output_logits=True, pad_token_id=0, eos_token_id=EOS, sam_pixel_values=sam_images(2),
                  logits_processor=LogitsProcessorList([ForceTriggerAt(prompt_length, TRIGGER_STEPS)]))
    torch.manual_seed(3)
    cached = model.generate(**inputs, **kwargs)
    torch.manual_seed(3)
    uncached = model.generate(**inputs, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.logits, uncached.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for r in range(2):
        generated = generated_tokens(uncached.sequences, r, prompt_length)
        logits, answer_boxes = naive_reference(model, prompts[r], row_images_of(inputs, prompts, r), boxes[r], generated)
        got = torch.stack([uncached.logits[t][r] for t in range(len(generated))])
        torch.testing.assert_close(got, logits, atol=1e-5, rtol=1e-5)
        assert len(answer_boxes) >= 2
        torch.testing.assert_close(uncached.pred_boxes[r], torch.stack(answer_boxes), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(uncached.pred_masks[r], cached.pred_masks[r], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(uncached.iou_scores[r], cached.iou_scores[r], atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_masks_after_generation_run_sam_once_per_image(model):
    inputs = batch([PROMPT_A, PROMPT_B], [BOXES_A, BOXES_B])
    prompt_length = inputs["input_ids"].shape[1]
    calls = []
    handle = model.sam.image_encoder.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    try:
        out = model.generate(
            **inputs, sam_pixel_values=sam_images(2), max_new_tokens=8, do_sample=False, return_dict_in_generate=True,
            logits_processor=LogitsProcessorList([ForceTriggerAt(prompt_length, TRIGGER_STEPS)]), pad_token_id=0,
        )
    finally:
        handle.remove()
    assert calls == [2], "one encoder run over the two images"
    for r in range(2):
        n = len(out.pred_boxes[r])
        assert out.pred_masks[r].shape == (n, 16, 16) and out.iou_scores[r].shape == (n,)
        sequence = out.sequences[r : r + 1]
        row_inputs = batch([[PROMPT_A, PROMPT_B][r]], [[BOXES_A, BOXES_B][r]])
        fed = int((sequence[0, prompt_length:] == BOXES).sum())
        user = torch.tensor([BOXES_A, BOXES_B][r]).reshape(-1, 4)
        box_inputs = torch.cat([user, out.pred_boxes[r][:fed]])[None]
        keep = sequence[0] != 0
        forward = model(input_ids=sequence[:, keep], pixel_values=row_inputs["pixel_values"], box_inputs=box_inputs,
                        sam_pixel_values=sam_images(2)[r : r + 1])
        answer = forward.trigger_positions[:, 1] >= int(keep[:prompt_length].sum()) - 1
        torch.testing.assert_close(forward.pred_masks[answer], out.pred_masks[r], atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_prompt_ending_with_trigger_and_single_new_token(model):
    inputs = batch([PROMPT_B], [BOXES_B])
    out = model.generate(**inputs, max_new_tokens=1, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    assert out.sequences[0, -1].item() == BOXES
    _, reference = naive_reference(model, PROMPT_B, None, [], [BOXES])
    assert len(out.pred_boxes[0]) == 1
    torch.testing.assert_close(out.pred_boxes[0][0], reference[0], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_trigger_as_the_very_last_generated_token(model):
    inputs = batch([PROMPT_A], [BOXES_A])
    prompt_length = inputs["input_ids"].shape[1]
    out = model.generate(
        **inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True, pad_token_id=0,
        logits_processor=LogitsProcessorList([ForceTriggerAt(prompt_length, (2,))]),
    )
    generated = out.sequences[0, prompt_length:].tolist()
    assert generated[-1] == TRIGGER
    _, reference = naive_reference(model, PROMPT_A, inputs["pixel_values"], BOXES_A, generated)
    torch.testing.assert_close(out.pred_boxes[0], torch.stack(reference), atol=1e-5, rtol=1e-5)


class ForceEosAfterTrigger(LogitsProcessor):
    """Test helper: a model that wants to stop right after `<at>`."""

    def __call__(self, input_ids, scores):
        after = input_ids[:, -1] == TRIGGER
        forced = torch.full_like(scores, -float("inf"))
        forced[:, EOS] = 0.0
        return torch.where(after[:, None], forced, scores)


@torch.no_grad()
def test_eos_right_after_a_trigger_still_gets_its_box_token(model):
    inputs = batch([PROMPT_A], [BOXES_A])
    prompt_length = inputs["input_ids"].shape[1]
    out = model.generate(
        **inputs, max_new_tokens=6, do_sample=False, return_dict_in_generate=True, pad_token_id=0, eos_token_id=EOS,
        logits_processor=LogitsProcessorList([ForceTriggerAt(prompt_length, (1,)), ForceEosAfterTrigger()]),
    )
    generated = out.sequences[0, prompt_length:].tolist()
    assert generated[1:3] == [TRIGGER, BOXES]
    _, reference = naive_reference(model, PROMPT_A, inputs["pixel_values"], BOXES_A, generated_tokens(out.sequences, 0, prompt_length))
    torch.testing.assert_close(out.pred_boxes[0], torch.stack(reference), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_plain_tensor_without_return_dict_and_streaming(model):
    inputs = batch([PROMPT_A], [BOXES_A])

    class Collect(BaseStreamer):
        def __init__(self):
            self.tokens = []

        def put(self, value):
            self.tokens.extend(value.flatten().tolist())

        def end(self):
            pass

    streamer = Collect()
    sequences = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=0, streamer=streamer)
    assert isinstance(sequences, torch.Tensor)
    assert streamer.tokens == sequences[0].tolist()


def test_unsupported_modes_raise(model):
    inputs = batch([PROMPT_A], [BOXES_A])
    with pytest.raises(ValueError, match="assistant_model"):
        model.generate(**inputs, max_new_tokens=2, assistant_model=model)
    with pytest.raises(ValueError, match="prompt_lookup_num_tokens"):
        model.generate(**inputs, max_new_tokens=2, prompt_lookup_num_tokens=2)


@torch.no_grad()
def test_peft_wrapped_model_generates_like_the_merged_model(model):
    peft = pytest.importorskip("peft")
    base = copy.deepcopy(model)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)",
                             init_lora_weights=False)
    wrapped = peft.get_peft_model(base, config)
    assert not any("vision_tower" in name and "lora" in name for name, _ in wrapped.named_parameters())
    inputs = batch([PROMPT_A, PROMPT_B], [BOXES_A, BOXES_B])
    prompt_length = inputs["input_ids"].shape[1]
    kwargs = dict(max_new_tokens=8, num_beams=2, do_sample=False, return_dict_in_generate=True, pad_token_id=0,
                  logits_processor=LogitsProcessorList([ForceTriggerAt(prompt_length, TRIGGER_STEPS)]))
    out = wrapped.generate(**inputs, **kwargs)
    merged = copy.deepcopy(wrapped).merge_and_unload()
    reference = merged.generate(**inputs, **kwargs)
    assert torch.equal(out.sequences, reference.sequences)
    for a, b in zip(out.pred_boxes, reference.pred_boxes):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_peft_causal_lm_wrapper_with_saved_heads_trains_and_generates(model):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)",
                             task_type="CAUSAL_LM", modules_to_save=["loc_encoder", "loc_decoder", "seg_prompt_mlp"])
    wrapped = peft.get_peft_model(copy.deepcopy(model), config)
    row = PROMPT_A + [20, TRIGGER, BOXES, 2]
    labels = torch.tensor([[-100] * len(PROMPT_A) + [20, TRIGGER, -100, 2]])
    out = wrapped(input_ids=torch.tensor([row]), labels=labels, pixel_values=images(1, seed=5),
                  box_inputs=torch.tensor([BOXES_A + [[0.2, 0.3, 0.6, 0.7]]]))
    out.loss.backward()
    saved_head = [p for n, p in wrapped.named_parameters() if "modules_to_save" in n and "loc_decoder" in n]
    assert saved_head and all(p.grad is not None for p in saved_head)
    with torch.no_grad():
        generated = wrapped.generate(**batch([PROMPT_B], [BOXES_B]), max_new_tokens=2, return_dict_in_generate=True,
                                     pad_token_id=0)
    assert len(generated.pred_boxes[0]) == 1
