"""Parity with transformers for the vision-language models (Qwen3-VL dense and MoE with DeepStack, Qwen3.5 and
Qwen3.5-MoE on the hybrid text model), fp32, on tiny checkpoints of every `tiny.VL_CONFIGS` entry with all
parameters perturbed. `pixel_values` are random rows of patch values, as the processor would emit them
(no processor needed): the tower sees the same numbers as the reference either way.

Model level, through `ForwardBatch` made by hand: `encode_vision` against the reference's image/video
features (and DeepStack features), a video encoded frame by frame; whole-prompt logits with one image,
two images of different grids, a video (stand-in timestamp tokens before each frame block) and an image
plus a video, alone and two prompts in one flat batch, against the reference forward; positions against
`get_rope_index`; the same prompt prefilled in two chunks split inside an image through paged KV (and
state slots for the hybrid models), then greedy decode steps at L + delta, against the reference's
`generate`. The engine is not involved.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwenrun.layers.forward_batch import ForwardBatch
from qwenrun.layers.visual import VisualEmbeds
from qwenrun.loading.loader import load_model, open_checkpoint
from hand_cache import HandCache
from tiny import VL_CONFIGS, VL_TOKENS, make_vl_checkpoint

TOL = 1e-4  # of the largest reference value
IMAGE, VIDEO, START, END = (VL_TOKENS[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                                   "vision_end_token_id"))
PATCH = 3 * 2 * 16 * 16
DECODE = 6


@pytest.fixture(scope="module", params=sorted(VL_CONFIGS))
def pair(request, tmp_path_factory):
    folder, ref = make_vl_checkpoint(request.param, tmp_path_factory.mktemp(request.param))
    model = load_model(open_checkpoint(folder), torch.float32, torch.device("cpu"))
    return request.param, folder, model, ref


def _rel(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


class Prompt:
    """Token ids with images and videos in the flat layout of the release processor: an image is
    `<|vision_start|> <|image_pad|>×n <|vision_end|>`; a video is, per temporal patch, three stand-in
    timestamp tokens then `<|vision_start|> <|video_pad|>×n <|vision_end|>`."""

    def __init__(self, seed: int, *parts) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids: list[int] = []
        self.images: list[tuple[int, int, int]] = []
        self.videos: list[tuple[int, int, int]] = []
        for kind, arg in parts:
            if kind == "text":
                self.ids += torch.randint(0, IMAGE, (arg,), generator=gen).tolist()
            elif kind == "image":
                self.images.append(arg)
                self.ids += [START] + [IMAGE] * (arg[1] * arg[2] // 4) + [END]
            else:
                self.videos.append(arg)
                for _ in range(arg[0]):
                    self.ids += torch.randint(0, IMAGE, (3,), generator=gen).tolist()
                    self.ids += [START] + [VIDEO] * (arg[1] * arg[2] // 4) + [END]
        self.pixels = torch.randn(sum(t * h * w for t, h, w in self.images), PATCH, generator=gen)
        self.video_pixels = torch.randn(sum(t * h * w for t, h, w in self.videos), PATCH, generator=gen)

    def inputs(self) -> dict:
        """The reference's keyword arguments (TF 5 needs `mm_token_type_ids` to build MRoPE positions)."""
        ids = torch.tensor(self.ids)
        kinds = (ids == IMAGE).long() + 2 * (ids == VIDEO).long()
        out = dict(input_ids=ids[None], mm_token_type_ids=kinds[None])
        if self.images:
            out.update(pixel_values=self.pixels, image_grid_thw=torch.tensor(self.images))
        if self.videos:
            out.update(pixel_values_videos=self.video_pixels, video_grid_thw=torch.tensor(self.videos))
        return out

    def features(self, model) -> torch.Tensor:
        """`[1 + L, T, H]`: each placeholder row's encoder output (zeros at text rows)."""
        items = {}
        if self.images:
            items[IMAGE] = torch.cat(model.encode_vision(self.pixels, torch.tensor(self.images)), dim=1)
        if self.videos:
            items[VIDEO] = torch.cat(model.encode_vision(self.video_pixels, torch.tensor(self.videos)), dim=1)
        first = next(iter(items.values()))
        out = first.new_zeros(first.shape[0], len(self.ids), first.shape[2])
        ids = torch.tensor(self.ids)
        for token, feats in items.items():
            out[:, ids == token] = feats
        return out

    def visual(self, feats: torch.Tensor, lo: int, hi: int) -> VisualEmbeds | None:
        return _placed(self.ids, feats, lo, hi)


def _placed(ids: list[int], feats: torch.Tensor, lo: int, hi: int) -> VisualEmbeds | None:
    """The encoder output (`feats [1 + L, len(ids), H]`) of the placeholders in tokens [lo, hi) of `ids`,
    rows relative to lo, as the runner gives a step."""
    chunk = torch.tensor(ids[lo:hi])
    rows = torch.nonzero((chunk == IMAGE) | (chunk == VIDEO))[:, 0]
    if not len(rows):
        return None
    part = feats[:, lo + rows]
    return VisualEmbeds(rows, part[0], part[1:] if part.shape[0] > 1 else None)


PROMPTS = {
    "one image": Prompt(1, ("text", 6), ("image", (1, 8, 8)), ("text", 9)),
    "two images": Prompt(2, ("text", 4), ("image", (1, 4, 12)), ("text", 5), ("image", (1, 8, 6)), ("text", 7)),
    "video": Prompt(3, ("text", 5), ("video", (2, 8, 8)), ("text", 8)),
    "image and video": Prompt(4, ("text", 3), ("image", (1, 8, 8)), ("text", 2), ("video", (3, 4, 8)),
                              ("text", 6)),
}


def _reference_logits(ref, prompt: Prompt) -> torch.Tensor:
    ref.model.rope_deltas = None  # the reference caches it across calls
    with torch.no_grad():
        return ref(**prompt.inputs()).logits[0]


def test_encode_vision_matches_the_reference_features(pair):
    name, _, model, ref = pair
    grids = torch.tensor([[1, 8, 8], [1, 4, 12], [2, 8, 4]])
    pixels = torch.randn(int(grids.prod(-1).sum()), PATCH, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref.model.get_image_features(pixels, grids, return_dict=True)
        got = model.encode_vision(pixels, grids)
    deepstack = getattr(want, "deepstack_features", None) or []
    assert len(got) == 3 and all(g.shape[0] == 1 + len(deepstack) for g in got), name
    for i, item in enumerate(got):
        assert item.shape[1] == grids[i].prod() // 4
        assert _rel(item[0], want.pooler_output[i]) <= TOL, f"{name}: item {i} merger output"
        for level, feats in enumerate(deepstack):
            assert _rel(item[1 + level], feats[i]) <= TOL, f"{name}: item {i} DeepStack level {level}"


def test_a_video_encodes_frame_by_frame_as_a_whole(pair):
    """Nothing in the tower mixes temporal patches (attention is per frame, positions repeat per frame),
    so a video may be encoded, cached and placed one frame block at a time as grid (1, h, w) items."""
    name, _, model, _ = pair
    grid = (3, 8, 4)
    pixels = torch.randn(3 * 8 * 4, PATCH, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        [whole] = model.encode_vision(pixels, torch.tensor([grid]))
        frames = model.encode_vision(pixels, torch.tensor([(1, 8, 4)] * 3))
    assert _rel(torch.cat(frames, dim=1), whole) <= 1e-6, name


@pytest.mark.parametrize("which", sorted(PROMPTS))
def test_prompt_logits_and_positions_match_transformers(pair, which):
    name, _, model, ref = pair
    prompt = PROMPTS[which]
    want = _reference_logits(ref, prompt)
    inputs = prompt.inputs()
    want_pos, want_delta = ref.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                    inputs.get("image_grid_thw"), inputs.get("video_grid_thw"))
    positions, delta = model.rope_positions(prompt.ids, prompt.images, prompt.videos)
    assert torch.equal(positions, want_pos[:, 0]) and delta == want_delta.item(), f"{name}, {which}: positions"
    with torch.no_grad():
        batch = ForwardBatch.without_cache(torch.tensor(prompt.ids), positions, [len(prompt.ids)])
        batch.visual = prompt.visual(prompt.features(model), 0, len(prompt.ids))
        got = model.compute_logits(model(batch))
    assert _rel(got, want) <= TOL, f"{name}, {which}: logits"


def test_two_prompts_in_one_flat_batch(pair):
    """Placeholder rows of both sequences in one step's `VisualEmbeds` (rows are flat batch rows)."""
    name, _, model, ref = pair
    a, b = PROMPTS["video"], PROMPTS["two images"]
    want_a, want_b = _reference_logits(ref, a), _reference_logits(ref, b)
    (pa, _), (pb, _) = (model.rope_positions(p.ids, p.images, p.videos) for p in (a, b))
    with torch.no_grad():
        feats = torch.cat((a.features(model), b.features(model)), dim=1)
        batch = ForwardBatch.without_cache(torch.tensor(a.ids + b.ids), torch.cat((pa, pb), dim=1),
                                           [len(a.ids), len(b.ids)])
        batch.visual = _placed(a.ids + b.ids, feats, 0, len(a.ids) + len(b.ids))
        got = model.compute_logits(model(batch))
    n = len(a.ids)
    assert _rel(got[:n], want_a) <= TOL and _rel(got[n:], want_b) <= TOL, name


@pytest.mark.parametrize("which", ["two images", "image and video"])
def test_chunked_prefill_through_an_image_then_decode_match_generate(pair, which):
    """Two prefill chunks split inside the first image (each given only its own placeholder rows and
    DeepStack features), then greedy decode at positions L + delta on all three rows, the recurrent
    state ping-ponging between slots: the logits and tokens of transformers' `generate`."""
    name, _, model, ref = pair
    prompt = PROMPTS[which]
    ref.model.rope_deltas = None
    inputs = prompt.inputs()
    n = len(prompt.ids)
    with torch.no_grad():
        out = ref.generate(**inputs, attention_mask=torch.ones_like(inputs["input_ids"]), max_new_tokens=DECODE,
                           min_new_tokens=DECODE, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                           output_logits=True)
    want_tokens = out.sequences[0, n:].tolist()
    want_logits = torch.cat(out.logits)

    positions, delta = model.rope_positions(prompt.ids, prompt.images, prompt.videos)
    split = prompt.ids.index(START) + 5  # inside the first image
    assert prompt.ids[split - 1] == prompt.ids[split] == IMAGE
    with torch.no_grad():
        feats = prompt.features(model)
        kv = HandCache(model.cache_specs(torch.float32))
        model(kv.batch(prompt.ids[:split], 0, 0, 1, positions[:, :split], prompt.visual(feats, 0, split)))
        last = kv.batch(prompt.ids[split:], split, 1, 2, positions[:, split:], prompt.visual(feats, split, n))
        got = [model.compute_logits(model(last))[-1]]
        whole = ForwardBatch.without_cache(torch.tensor(prompt.ids), positions, [n])
        whole.visual = prompt.visual(feats, 0, n)
        assert _rel(got[0], model.compute_logits(model(whole))[-1]) <= TOL, f"{name}: chunked vs whole"
        tokens, slot = [int(got[0].argmax())], 2
        for step in range(DECODE - 1):
            length = n + step
            nxt = 1 if slot == 2 else 2
            step_batch = kv.batch([tokens[-1]], length, slot, nxt, torch.full((3, 1), length + delta))
            got.append(model.compute_logits(model(step_batch))[-1])
            tokens.append(int(got[-1].argmax()))
            slot = nxt
    assert _rel(torch.stack(got), want_logits) <= TOL, f"{name}, {which}: prefill + decode logits"
    assert tokens == want_tokens, f"{name}, {which}: greedy tokens"


def test_text_only_prompt_on_a_vision_model(pair):
    """Without images the VL model is its text model: 1-D positions give the reference's logits."""
    name, _, model, ref = pair
    ids = torch.randint(0, IMAGE, (40,), generator=torch.Generator().manual_seed(9))
    ref.model.rope_deltas = None
    with torch.no_grad():
        want = ref(input_ids=ids[None]).logits[0]
        got = model.compute_logits(model(ForwardBatch.without_cache(ids, torch.arange(40), [40])))
    assert _rel(got, want) <= TOL, name


def test_vl_moe_transposed_experts_load_the_same(tmp_path):
    """Released Qwen3-VL-MoE checkpoints store fused experts as `[E, H, 2I]` / `[E, I, H]`, the transpose
    of what save_pretrained writes; both load to the same model."""
    folder, ref = make_vl_checkpoint("vl_moe-untied", tmp_path / "ckpt")
    tensors = load_file(folder / "model.safetensors")
    fused = [k for k in tensors if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert fused
    dest = tmp_path / "transposed"
    dest.mkdir()
    (dest / "config.json").write_bytes((folder / "config.json").read_bytes())
    save_file({k: v.transpose(1, 2).contiguous() if k in fused else v for k, v in tensors.items()},
              dest / "model.safetensors", metadata={"format": "pt"})
    prompt = PROMPTS["one image"]
    want = _reference_logits(ref, prompt)
    model = load_model(open_checkpoint(dest), torch.float32, torch.device("cpu"))
    positions, _ = model.rope_positions(prompt.ids, prompt.images, prompt.videos)
    with torch.no_grad():
        batch = ForwardBatch.without_cache(torch.tensor(prompt.ids), positions, [len(prompt.ids)])
        batch.visual = prompt.visual(prompt.features(model), 0, len(prompt.ids))
        assert _rel(model.compute_logits(model(batch)), want) <= TOL
