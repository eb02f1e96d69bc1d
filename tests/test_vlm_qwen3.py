"""Qwen3-VL (dense) in the engine, against transformers on tiny random weights built here: greedy tokens identical
and logprobs within 1e-3 with 1 image, 2 images of different sizes and an image inside a long prompt that chunked
prefill splits (a 12-token budget, so DeepStack rows arrive in pieces too); image-token counts equal the HF
processor's (16-pixel patches, 2x2 merge: sides are multiples of 32); the interleaved M-RoPE layout equals
transformers'; the prefix cache hits on the same image and never shares a different image of the same size; one
openai SDK request with a data: URI on a real server."""
from __future__ import annotations

import os

import openai
import pytest
import torch
from conftest import API_SERVER_ARGS, start_api_server
from test_vlm_models import assert_matches_hf, hf_reference, make_engine, noise_image
from test_vlm_qwen import png_uri
from vlm_builders import QWEN_VL_TOKENS, _randomize, _tokenizer

from lmserve.engine.mm_qwen import QWEN_PLACEHOLDER as IMG
from lmserve.engine.mm_qwen import load_qwen_processor
from lmserve.model.qwen2_vl import MRotaryEmbedding
from lmserve.sampling_params import SamplingParams

pytestmark = pytest.mark.timeout(600)
LONG_TEXT = " ".join(f"word{i}" for i in range(30))
CASES = {
    "one_image": (f"Describe {IMG} briefly.", [(80, 60)]),
    "two_images_of_different_sizes": (f"Compare {IMG} with {IMG} please.", [(80, 60), (130, 100)]),
    "image_in_long_text": (f"{LONG_TEXT} {IMG} and then {LONG_TEXT}", [(120, 70)]),
}


def make_random_qwen3_vl(path: str, seed: int = 0, max_pixels: int = 32 * 32 * 20) -> str:
    """Qwen3-VL: the Qwen3 decoder (3 layers, head_dim 16, interleaved mrope_section [2, 3, 3]) and a 3-block ViT
    with 16-pixel patches, a 4x4 learned position table (resampled up and down) and DeepStack from blocks 0 and 2,
    saved with transformers' Qwen3-VL processor (min / max pixels small: a few dozen patches per image)."""
    import transformers
    tok = _tokenizer(*QWEN_VL_TOKENS)
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                rms_norm_eps=1e-5, initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                 "mrope_interleaved": True})
    vision = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=64, patch_size=16,
                  num_position_embeddings=16, deepstack_visual_indexes=[0, 2], initializer_range=0.1)
    ids = {f"{k}_token_id": tok.convert_tokens_to_ids(t) for k, t in
           (("image", "<|image_pad|>"), ("video", "<|video_pad|>"), ("vision_start", "<|vision_start|>"),
            ("vision_end", "<|vision_end|>"))}
    torch.manual_seed(seed)
    model = transformers.Qwen3VLForConditionalGeneration(
        transformers.Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids))
    model = model.to(torch.float32)
    _randomize(model)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    transformers.Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, min_pixels=64 * 64, max_pixels=max_pixels,
                                          image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    import transformers
    path = make_random_qwen3_vl(str(tmp_path_factory.mktemp("qwen3_vl") / "qwen3_vl"))
    hf = transformers.AutoModelForImageTextToText.from_pretrained(path).eval()
    return path, hf, load_qwen_processor(path, "qwen3_vl")


@pytest.fixture(scope="module")
def engine(qwen3):
    return make_engine(qwen3[0])     # 12-token steps: images and long prompts are prefilled over several chunks


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_and_logprobs_match_transformers(case, qwen3, engine):
    _, hf, proc = qwen3
    prompt, sizes = CASES[case]
    images = [noise_image(i, size) for i, size in enumerate(sizes)]
    assert_matches_hf(engine, hf, proc, prompt, images)


def test_batched_sequences_with_different_position_deltas(qwen3, engine):
    _, hf, proc = qwen3
    prompts = [f"A {IMG} b", f"Two: {IMG} and {IMG}"]
    images = [[noise_image(5, (160, 64))], [noise_image(6, (64, 160)), noise_image(7, (96, 96))]]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    outs = engine.generate(prompts, params, images=images)
    for prompt, ims, out in zip(prompts, images, outs):
        assert out.outputs[0].token_ids == hf_reference(hf, proc, prompt, ims, 6)[1]


def test_vision_tower_equals_transformers(qwen3, engine):
    """The tower alone, tighter than logprobs can tell: the merged embeddings and both DeepStack levels of two
    images (grids unlike the 4x4 position table, so it is resampled both ways) equal HF's get_image_features."""
    _, hf, proc = qwen3
    images = [noise_image(3, (160, 96)), noise_image(4, (64, 224))]
    inp = proc(text=f"x {IMG} y {IMG}", images=images, return_tensors="pt")
    with torch.no_grad():
        ref = hf.model.get_image_features(inp["pixel_values"], inp["image_grid_thw"])
    items = engine.images.process(f"x {IMG} y {IMG}", images).items
    ours = engine.runner.model.encode_images([m.data for m in items])
    assert len(ref.deepstack_features) == 2
    for i, got in enumerate(ours):
        want = torch.cat([ref.pooler_output[i], *[f[i] for f in ref.deepstack_features]], dim=-1)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert all(f[i].abs().mean() > 0.05 for f in ref.deepstack_features)   # DeepStack adds something


def test_image_token_counts_equal_the_processor(qwen3, engine):
    _, _, proc = qwen3
    images = [noise_image(7, (300, 200)), noise_image(8, (40, 150)), noise_image(9, (96, 64))]
    prompt = f"a {IMG} b {IMG} c {IMG}"
    mm = engine.images.process(prompt, images)
    ref = proc(text=prompt, images=images, return_tensors="pt")
    ids = ref["input_ids"][0].tolist()
    assert mm.token_ids == ids
    pad = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    grids = ref["image_grid_thw"].tolist()
    assert [m.length for m in mm.items] == [t * h * w // 4 for t, h, w in grids]
    assert sum(m.length for m in mm.items) == ids.count(pad)
    assert all(ids[m.offset:m.end] == [pad] * m.length for m in mm.items)
    # 16-pixel patches, merged 2x2: 96x64 is already a multiple of 32 (6x4 patches -> 6 tokens); 300x200 is capped
    # by max_pixels (32*32*20), so it has at most 20 tokens
    assert mm.items[2].length == 6 and mm.items[0].length <= 20 and len({m.length for m in mm.items}) == 3
    assert mm.items[2].data["pixel_values"].shape == (24, 3 * 2 * 16 * 16)


def test_interleaved_mrope_equals_transformers(qwen3):
    """Distinct positions on the three streams: our cos/sin rows equal HF's rotary embedding's."""
    _, hf, _ = qwen3
    rope = hf.model.language_model.rotary_emb
    pos = torch.tensor([[3, 9, 40], [5, 17, 2], [11, 0, 33]])                  # [3 streams, tokens]
    cos, sin = rope(torch.zeros(1, dtype=torch.float32), pos[:, None, :])     # [1, tokens, head_dim]
    ours = MRotaryEmbedding(16, 2048, 10000.0, None, [2, 3, 3], interleaved=True)
    c, s = ours.lookup(pos, torch.float32)                                    # [tokens, 1, head_dim / 2]
    torch.testing.assert_close(c[:, 0], cos[0, :, :8])
    torch.testing.assert_close(s[:, 0], sin[0, :, :8])
    contiguous = MRotaryEmbedding(16, 2048, 10000.0, None, [2, 3, 3]).lookup(pos, torch.float32)[0]
    assert not torch.allclose(contiguous, c)       # the layouts differ: the test can tell them apart


def test_prefix_cache_same_image_hits_different_image_does_not(qwen3, engine):
    _, hf, proc = qwen3
    prompt = f"Look: {IMG} What is it?"
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    a, b = noise_image(1, (128, 128)), noise_image(2, (128, 128))     # equal sizes: equal image tokens
    first = engine.generate(prompt, params, images=[a])[0]
    hits = engine.get_stats().prefix_cache_hits
    again = engine.generate(prompt, params, images=[a.copy()])[0]     # the same content, another object
    assert again.num_cached_tokens >= 8 and engine.get_stats().prefix_cache_hits > hits
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    other = engine.generate(prompt, params, images=[b])[0]
    image_start = engine.images.process(prompt, [b]).items[0].offset
    assert other.num_cached_tokens <= image_start      # only the text before the image can be shared
    assert other.outputs[0].token_ids == hf_reference(hf, proc, prompt, [b], 6)[1] != first.outputs[0].token_ids


@pytest.mark.slow      # a server start
def test_openai_sdk_with_a_data_uri(tmp_path_factory):
    path = make_random_qwen3_vl(str(tmp_path_factory.mktemp("qwen3_http") / "qwen3_vl"))
    server = start_api_server(tmp_path_factory.mktemp("qwen3_server"), path, *API_SERVER_ARGS, "--kernels", "torch")
    try:
        sdk = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", timeout=120, max_retries=0)
        model = sdk.models.list().data[0].id
        text = [{"type": "text", "text": "What is in the picture?"}]
        text_only = sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                                max_tokens=3, temperature=0)
        content = [{"type": "image_url", "image_url": {"url": png_uri((96, 64), 3)}}, *text]
        one = sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                          max_tokens=5, temperature=0, logprobs=True)
        assert one.usage.completion_tokens == 5 or one.choices[0].finish_reason == "stop"
        # the 96x64 image is 6x4 patches of 16 pixels -> 6 image tokens, inside <|vision_start|> ... <|vision_end|>
        assert one.usage.prompt_tokens - text_only.usage.prompt_tokens >= 6
        assert all(lp.logprob <= 0 for lp in one.choices[0].logprobs.content)
    finally:
        server.stop()
