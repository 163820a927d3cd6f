"""The engine's side of images and videos, without a vision model: the encoder cache (pins, LRU
eviction past its budget, integrity), block names that carry image content, the runner's rows of
encoder output for chunks that cut through an image (each item encoded once), and 3-row positions."""

from __future__ import annotations

import types

import pytest
import torch

from qwenrun.engine.cache import CacheManager
from qwenrun.engine.encoder_cache import EncoderCache, MultimodalItem
from qwenrun.engine.request import Request, ScheduledBatch, Thinking
from qwenrun.engine.runner import ModelRunner, _mrope_rows
from qwenrun.layers.attention import KVCacheSpec
from qwenrun.sampling.params import SamplingParams

BS, PAD, H = 4, 9, 6
CPU = torch.device("cpu")


def _item(seed: int, offset: int, n: int) -> MultimodalItem:
    pixels = torch.randn(4 * n, 8, generator=torch.Generator().manual_seed(seed))
    grid = (1, 2, 2 * n)
    return MultimodalItem("image", pixels, grid, b"image %d" % seed, ((offset, n),))  # the features' hash


def _request(tokens, items=(), rid="r", mrope=None) -> Request:
    return Request(rid, list(tokens), SamplingParams(max_tokens=4), 4, frozenset(), Thinking(None, None, (), None, None),
                   None, None, None, tuple(items), mrope)  # type: ignore[arg-type]


def test_encoder_cache_pins_and_evicts_least_recently_used_unpinned_entries():
    cache = EncoderCache(budget_bytes=3 * 4 * 10)  # three [10] fp32 entries
    keys = [bytes([i]) for i in range(5)]
    cache.acquire([keys[0]])
    for k in keys[:4]:
        cache.put(k, torch.zeros(10))
    assert keys[0] in cache and keys[1] not in cache  # the pinned one stays, the oldest unpinned goes
    cache.get(keys[2])
    cache.put(keys[4], torch.zeros(10))
    assert keys[2] in cache and keys[3] not in cache and keys[4] in cache
    cache.check_integrity()
    cache.release([keys[0]])
    assert cache.pins == {}
    cache.check_integrity()


def test_block_names_carry_image_content():
    cm = CacheManager([KVCacheSpec(1, 4, torch.float32)], 32, BS, CPU, encoder_cache_bytes=1 << 20)
    ids = [1, 2, PAD, PAD, PAD, PAD, PAD, PAD, 3, 4, 5, 6, 7]
    a = _request(ids, [_item(0, 2, 6)], "a")
    same = _request(ids, [_item(0, 2, 6)], "b")
    other = _request(ids, [_item(1, 2, 6)], "c")
    for r in (a, same, other):
        cm.match(r)
    assert a.cache.block_hashes == same.cache.block_hashes
    assert a.cache.block_hashes[0] != other.cache.block_hashes[0]  # the image starts in block 0
    assert all(x != y for x, y in zip(a.cache.block_hashes, other.cache.block_hashes))  # and the chain carries it
    text = _request([1, 2, 3, 4, 5], rid="t")
    cm.match(text)
    from qwenrun.engine.kv_cache import block_hash
    assert text.cache.block_hashes[0] == block_hash(None, [1, 2, 3, 4])  # text-only names are unchanged


class _FakeVL(torch.nn.Module):
    """encode_vision: each item's output row j is (sum of its pixels, j), with one DeepStack level."""

    def __init__(self) -> None:
        super().__init__()
        self.model = types.SimpleNamespace(embed_tokens=torch.nn.Embedding(16, H))
        self.calls: list[int] = []

    def encode_vision(self, pixels: torch.Tensor, grids: torch.Tensor) -> list[torch.Tensor]:
        self.calls.append(len(grids))
        out, start = [], 0
        for t, h, w in grids.tolist():
            n = t * h * w // 4
            base = pixels[start : start + t * h * w].sum()
            rows = torch.stack([torch.full((H,), float(base)) + j for j in range(n)])
            out.append(torch.stack([rows, -rows]))
            start += t * h * w
        return out


def test_runner_gives_each_chunk_its_rows_and_encodes_each_item_once():
    model = _FakeVL()
    cm = CacheManager([KVCacheSpec(1, 4, torch.float32)], 32, BS, CPU, encoder_cache_bytes=1 << 20)
    runner = ModelRunner(model, types.SimpleNamespace(vocab_size=16), cm.layers, BS, False, cm.encoder, 16, (), CPU)
    item = _item(0, 2, 6)
    req = _request([1, 2] + [PAD] * 6 + [3, 4], [item])
    other = _request([5, PAD, PAD, PAD, 6], [_item(7, 1, 3)], "o")
    for r in (req, other):
        cm.take(r, cm.match(r))
    cm.allocate(req, 10)
    cm.allocate(other, 5)
    first = runner._visual(ScheduledBatch([other, req], [5, 5]))  # req's chunk stops mid-image
    assert model.calls == [2]  # both items in one call
    assert first.rows.tolist() == [1, 2, 3, 7, 8, 9]
    want = _FakeVL().encode_vision(item.pixel_values, torch.tensor([item.grid_thw]))[0]
    torch.testing.assert_close(first.embeds[3:], want[0, :3])
    torch.testing.assert_close(first.deepstack[0, 3:], want[1, :3])
    req.num_computed_tokens = 5
    second = runner._visual(ScheduledBatch([req], [5]))
    assert second.rows.tolist() == [0, 1, 2] and model.calls == [2]  # taken from the cache, not encoded again
    torch.testing.assert_close(second.embeds, want[0, 3:])
    assert runner._visual(ScheduledBatch([_request([1, 2, 3])], [3])) is None
    cm.free(req)
    cm.free(other)
    cm.check_integrity()


def test_a_video_s_runs_map_to_consecutive_encoder_rows():
    pixels = torch.randn(16, 8)
    video = MultimodalItem("video", pixels, (2, 2, 4), b"v", ((3, 2), (8, 2)))  # timestamp text between runs
    assert video.num_tokens == 4 and video.end == 10
    assert video.rows_in(0, 20) == [(3, 0, 2), (8, 2, 2)]
    assert video.rows_in(4, 9) == [(4, 1, 1), (8, 2, 1)]
    assert not video.overlaps(5, 8) and video.overlaps(9, 12)


def test_mrope_rows_continue_the_prompt_positions_with_its_delta():
    prompt_pos = torch.tensor([[0, 1, 2, 2, 4], [0, 1, 2, 3, 4], [0, 1, 2, 3, 4]])
    req = _request([1] * 5, mrope=(prompt_pos, -1))
    assert _mrope_rows(req, 0, 5).tolist() == prompt_pos.tolist()
    assert _mrope_rows(req, 3, 4).tolist() == [[2, 4, 4, 5], [3, 4, 4, 5], [3, 4, 4, 5]]
    plain = _request([1] * 5)
    assert _mrope_rows(plain, 2, 2).tolist() == [[2, 3]] * 3
    assert _mrope_rows(req, 1, 2).tolist() == [[1, 2], [1, 2], [1, 2]]  # inside the prompt


def test_text_only_models_refuse_images(tmp_path):
    from qwenrun import LLM
    from qwenrun.errors import InvalidRequestError
    from tiny import make_checkpoint

    folder, _ = make_checkpoint("dense-tied-mha", tmp_path)
    llm = LLM(folder, dtype="float32", kv_cache_memory=4 << 20)
    with pytest.raises(InvalidRequestError, match="text-only model"):
        llm.engine.make_request([1, PAD, PAD, 2], SamplingParams(max_tokens=2), mm_items=[_item(0, 1, 2)])
