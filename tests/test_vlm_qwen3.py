"""Qwen3-VL (dense) in the engine, against transformers on tiny random weights built here (the engine-level cases
of tests/test_vlm_qwen.py run again on it, below): greedy tokens identical and logprobs within 1e-3; the vision tower
alone (merged embeddings and DeepStack features) equal to HF's; image-token counts equal the HF processor's
(16-pixel patches, 2x2 merge: sides are multiples of 32); the interleaved M-RoPE tables equal transformers'; the
prefix cache hits on the same image and never shares a different image of the same size; the hub config layout;
one openai SDK request with a data: URI on a real server."""
from __future__ import annotations

import os

import pytest
import torch
from conftest import API_SERVER_ARGS, start_api_server
from test_vlm_models import assert_prefix_cache_keys_images, make_engine, noise_image
from test_vlm_qwen import assert_qwen_token_counts, assert_sdk_chat_with_an_image
# tests/test_vlm_qwen.py's engine-level tests, collected here again with this module's `qwen` and `engine` fixtures:
# greedy tokens and logprobs against transformers (1 image, 2 images of different sizes, an image inside a long
# prompt split by 12-token chunks, so DeepStack rows arrive in pieces too), a batch of sequences with different
# position deltas, preemption recomputes, and a text-only request
from test_vlm_qwen import (test_batched_sequences_with_different_position_deltas,  # noqa: F401
                           test_greedy_and_logprobs_match_transformers, test_placeholder_is_qwens_vision_block,
                           test_preempted_sequences_recompute_with_their_positions)
from vlm_builders import QWEN_VL_TOKENS, _randomize, _tokenizer

from lmserve.engine.mm_qwen import QWEN_PLACEHOLDER as IMG
from lmserve.engine.mm_qwen import load_qwen_processor
from lmserve.model.qwen2_vl import MRotaryEmbedding

pytestmark = pytest.mark.timeout(600)


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


# NOTE: named as tests/test_vlm_qwen.py's fixtures, so its engine-level tests imported above run here on Qwen3-VL
@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    import transformers
    path = make_random_qwen3_vl(str(tmp_path_factory.mktemp("qwen3_vl") / "qwen3_vl"))
    hf = transformers.AutoModelForImageTextToText.from_pretrained(path).eval()
    return path, hf, load_qwen_processor(path, "qwen3_vl")


@pytest.fixture(scope="module")
def engine(qwen):
    return make_engine(qwen[0])     # 12-token steps: images and long prompts are prefilled over several chunks


def test_vision_tower_equals_transformers(qwen, engine):
    """The tower alone, tighter than logprobs can tell: the merged embeddings and both DeepStack levels of two
    images (grids unlike the 4x4 position table, so it is resampled both ways) equal HF's get_image_features."""
    _, hf, proc = qwen
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


def test_image_token_counts_equal_the_processor(qwen, engine):
    # 16-pixel patches, merged 2x2: 96x64 is already a multiple of 32 (6x4 patches -> 6 tokens); 300x200 is capped
    # by max_pixels (32*32*20), so it has at most 20 tokens
    assert_qwen_token_counts(engine, qwen[2], (96, 64), 6, 20)
    item = engine.images.process(f"x {IMG}", [noise_image(9, (96, 64))]).items[0]
    assert item.data["pixel_values"].shape == (24, 3 * 2 * 16 * 16)


def test_interleaved_mrope_equals_transformers(qwen):
    """Distinct positions on the three streams: our cos/sin rows equal HF's rotary embedding's."""
    _, hf, _ = qwen
    rope = hf.model.language_model.rotary_emb
    pos = torch.tensor([[3, 9, 40], [5, 17, 2], [11, 0, 33]])                  # [3 streams, tokens]
    cos, sin = rope(torch.zeros(1, dtype=torch.float32), pos[:, None, :])     # [1, tokens, head_dim]
    ours = MRotaryEmbedding(16, 2048, 10000.0, None, [2, 3, 3], interleaved=True)
    c, s = ours.lookup(pos, torch.float32)                                    # [tokens, 1, head_dim / 2]
    torch.testing.assert_close(c[:, 0], cos[0, :, :8])
    torch.testing.assert_close(s[:, 0], sin[0, :, :8])
    contiguous = MRotaryEmbedding(16, 2048, 10000.0, None, [2, 3, 3]).lookup(pos, torch.float32)[0]
    assert not torch.allclose(contiguous, c)       # the layouts differ: the test can tell them apart


def test_prefix_cache_same_image_hits_different_image_does_not(qwen):
    assert_prefix_cache_keys_images(qwen[0], IMG)


@pytest.mark.slow      # a server start
def test_openai_sdk_with_a_data_uri(tmp_path_factory):
    path = make_random_qwen3_vl(str(tmp_path_factory.mktemp("qwen3_http") / "qwen3_vl"))
    server = start_api_server(tmp_path_factory.mktemp("qwen3_server"), path, *API_SERVER_ARGS, "--kernels", "torch")
    try:
        # the 96x64 image is 6x4 patches of 16 pixels -> 6 image tokens, inside <|vision_start|> ... <|vision_end|>
        assert_sdk_chat_with_an_image(server.url, (96, 64), 6)
    finally:
        server.stop()


def test_hub_config_layout_is_read(tmp_path):
    """Qwen3-VL-2B-Instruct's config.json (shapes shrunk): rope_scaling with mrope_interleaved, rope_theta beside it,
    the vision config's model_type "qwen3_vl"; the model builds (on the meta device) with the DeepStack mergers."""
    import json

    from lmserve.model.hf_checkpoint import hf_arch_config
    from lmserve.model.qwen3_vl import Qwen3VLForCausalLM
    text = dict(attention_bias=False, head_dim=16, hidden_act="silu", hidden_size=64, intermediate_size=96,
                max_position_embeddings=4096, model_type="qwen3_vl_text", num_attention_heads=4, num_hidden_layers=4,
                num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=5000000, tie_word_embeddings=True,
                rope_scaling={"mrope_interleaved": True, "mrope_section": [2, 3, 3], "rope_type": "default"},
                vocab_size=100)
    vision = dict(deepstack_visual_indexes=[0, 1, 2], depth=3, hidden_act="gelu_pytorch_tanh", hidden_size=32,
                  in_channels=3, intermediate_size=48, model_type="qwen3_vl", num_heads=4, num_position_embeddings=64,
                  out_hidden_size=64, patch_size=16, spatial_merge_size=2, temporal_patch_size=2)
    cfg = dict(architectures=["Qwen3VLForConditionalGeneration"], model_type="qwen3_vl", image_token_id=7,
               text_config=text, tie_word_embeddings=True, vision_config=vision)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    arch = hf_arch_config(str(tmp_path))
    assert arch.architecture == "qwen3_vl" and arch.qk_norm and arch.rope_scaling is None
    assert arch.rope_theta == 5e6 and arch.head_dim == 16 and arch.vision["mrope_section"] == [2, 3, 3]
    with torch.device("meta"):
        model = Qwen3VLForCausalLM(arch)
    assert len(model.visual.deepstack_mergers) == 3 and model.visual.side == 8 and model.lm_head is None
