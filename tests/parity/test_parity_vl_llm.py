"""Vision-language models through `LLM` and the engine, against transformers (fp32, tiny perturbed
checkpoints): real images (PIL, odd sizes) go through qwenrun's processor and the encoder cache;
transformers gets the same `pixel_values` (qwenrun's processor is bit-identical to its own,
tests/unit/test_image_processing.py) and the expanded prompt. Greedy tokens must be identical and
logprobs within 1e-3, for one image and two of different sizes, alone and batched, chunked through
the image tokens; a second prompt with the same image hits the prefix cache, a different image never does.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from qwenrun import LLM, SamplingParams
from tiny import VL_TOKENS, make_vl_checkpoint

START, IMAGE, END = VL_TOKENS["vision_start_token_id"], VL_TOKENS["image_token_id"], VL_TOKENS["vision_end_token_id"]
VIDEO = VL_TOKENS["video_token_id"]
NEW = 12


def _image(seed: int, w: int, h: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=["vl-untied", "vl_moe-untied", "qwen3_5_vl-untied"])
def pair(request, tmp_path_factory):
    folder, ref = make_vl_checkpoint(request.param, tmp_path_factory.mktemp(request.param))
    return folder, ref


def _reference(ref, llm: LLM, ids: list[int], images: list[Image.Image]):
    """Greedy tokens and their logprobs from transformers on qwenrun's preprocessed inputs."""
    expanded, items = llm.process_media(ids, {"image": images})
    pixels = torch.cat([it.pixel_values for it in items])
    grids = torch.tensor([it.grid_thw for it in items])
    ids_t = torch.tensor([expanded])
    out = ref.generate(ids_t, pixel_values=pixels, image_grid_thw=grids, max_new_tokens=NEW,
                       mm_token_type_ids=(ids_t == IMAGE).long(),  # transformers 5 builds MRoPE from these
                       min_new_tokens=NEW, do_sample=False, pad_token_id=0, output_scores=True,
                       return_dict_in_generate=True)
    tokens = out.sequences[0, len(expanded):].tolist()
    logprobs = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, tokens)]
    return tokens, logprobs


def _prompt(*parts) -> list[int]:
    ids: list[int] = []
    for p in parts:
        ids += [START, IMAGE, END] if p == "image" else list(p)
    return ids


def _ours(llm: LLM, prompts):
    params = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True, logprobs=0)
    outs = llm.generate([{"prompt_token_ids": ids, "multi_modal_data": {"image": imgs}} for ids, imgs in prompts],
                        params)
    return [(o.outputs[0].token_ids, [lp[t] for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)])
            for o in outs]


def _assert_same(ours, theirs) -> None:
    assert ours[0] == theirs[0]
    assert max(abs(a - b) for a, b in zip(ours[1], theirs[1])) < 1e-3


def _idle(llm: LLM) -> None:
    cache = llm.engine.cache
    cache.check_integrity()
    assert cache.pool.num_free == cache.pool.num_blocks and cache.encoder.pins == {}


def test_images_alone_batched_and_chunked_match_transformers(pair):
    folder, ref = pair
    cat, dog = _image(0, 70, 45), _image(1, 33, 100)
    prompts = [(_prompt([1, 2, 3], "image", [7, 8, 9, 10]), [cat]),
               (_prompt([4], "image", [5, 6], "image", [11, 12, 13]), [dog, cat])]
    whole = LLM(folder, dtype="float32", kv_cache_memory=16 << 20, enable_prefix_caching=False)
    expected = [_reference(ref, whole, ids, imgs) for ids, imgs in prompts]
    for prompt, want in zip(prompts, expected):
        _assert_same(_ours(whole, [prompt])[0], want)
    for got, want in zip(_ours(whole, prompts), expected):  # batched
        _assert_same(got, want)
    _idle(whole)
    chunked = LLM(folder, dtype="float32", kv_cache_memory=16 << 20, max_num_batched_tokens=5)
    for got, want in zip(_ours(chunked, prompts), expected):  # chunks cut through every image
        _assert_same(got, want)
    assert chunked.engine.cache.encoder.num_entries == 2  # cat encoded once for both prompts
    _idle(chunked)


def test_prefix_cache_shares_the_same_image_and_never_a_different_one(pair):
    folder, ref = pair
    llm = LLM(folder, dtype="float32", kv_cache_memory=16 << 20, block_size=4)
    stats = llm.engine.scheduler.stats
    cat, other = _image(2, 64, 64), _image(3, 64, 64)  # same size: identical placeholder token ids
    head = list(range(1, 9))
    first = _prompt(head, "image", [20, 21, 22])
    _ours(llm, [(first, [cat])])
    hits = stats.prefix_hit_tokens
    second = first + [30, 31, 32]
    _ours(llm, [(second, [cat])])
    # every full block of the first prompt, the image's included (a hybrid model checkpointed its state there)
    assert stats.prefix_hit_tokens - hits == len(llm.process_media(first, {"image": [cat]})[0]) // 4 * 4
    hits = stats.prefix_hit_tokens
    got = _ours(llm, [(second, [other])])[0]
    assert stats.prefix_hit_tokens - hits <= len(head)  # the text before the image at most
    _assert_same(got, _reference(ref, llm, second, [other]))
    _idle(llm)


def test_text_only_prompts_on_a_vl_model_match_transformers(pair):
    folder, ref = pair
    llm = LLM(folder, dtype="float32", kv_cache_memory=16 << 20)
    ids = list(range(3, 40))
    [out] = llm.generate([ids], SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True))
    want = ref.generate(torch.tensor([ids]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    assert out.outputs[0].token_ids == want[0, len(ids):].tolist()


class _CharTokenizer:
    """Timestamp text ("<1.0 seconds>") to ids inside the tiny vocabulary, one per character: the tiny
    checkpoints have no tokenizer, and the reference only needs the same ids qwenrun puts in."""

    def encode(self, text: str) -> list[int]:
        return [100 + ord(c) % 300 for c in text]


def test_a_video_and_an_image_match_transformers(pair):
    folder, ref = pair
    llm = LLM(folder, dtype="float32", kv_cache_memory=16 << 20, max_num_batched_tokens=16)
    llm.tokenizer = _CharTokenizer()  # only process_media reads it here (token-id prompts)
    frames = np.stack([np.asarray(_image(10 + i, 64, 48)) for i in range(6)])  # pre-sampled frames
    cat = _image(4, 40, 40)
    ids = [1, 2] + [START, VIDEO, END] + [3, 4] + [START, IMAGE, END] + [5]
    expanded, items = llm.process_media(ids, {"video": [frames], "image": [cat]})
    assert [it.kind for it in items] == ["video", "image"] and len(items[0].runs) == 3  # 6 frames, 3 temporal patches
    video, image = items
    t = torch.tensor([expanded])
    out = ref.generate(t, pixel_values=image.pixel_values, image_grid_thw=torch.tensor([image.grid_thw]),
                       pixel_values_videos=video.pixel_values, video_grid_thw=torch.tensor([video.grid_thw]),
                       mm_token_type_ids=(t == IMAGE).long() + 2 * (t == VIDEO).long(), max_new_tokens=NEW,
                       min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    [ours] = llm.generate([{"prompt_token_ids": ids, "multi_modal_data": {"video": [frames], "image": [cat]}}],
                          SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True))
    assert ours.outputs[0].token_ids == out[0, len(expanded):].tolist()
    _idle(llm)
