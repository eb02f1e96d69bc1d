"""LLaVA-NeXT (anyres) in the engine, against transformers on tiny random weights (tests/vlm_builders.py: 42-pixel
tiles, llava-v1.6's pinpoints at 1/8 scale), with a CLIP tower ("default": class token dropped) and a SigLIP tower
("full"; the other pairings are refused at load): greedy tokens identical and logprobs within 1e-3 with 1 image, 2
images of different aspect ratios and an image inside a long prompt that chunked prefill splits (a 12-token budget);
image-token counts equal the HF processor's for several sizes, adjacent images included; the prefix cache hits on the
same image and never shares a different one; the openai SDK with two data: URIs on a real server."""
from __future__ import annotations

import pytest
import torch
from conftest import API_SERVER_ARGS, start_api_server
from test_vlm_models import (assert_matches_hf, assert_prefix_cache_keys_images, make_engine, noise_image, png_uri,
                             sdk_chat_with_images)
from vlm_builders import make_random_llava_next

from lmserve.model.llava_next import unpad

LONG_TEXT = " ".join(f"word{i}" for i in range(40))
CASES = {
    "one_image": ("Describe <image> briefly.", [(80, 60)]),
    "two_images_of_different_aspect_ratios": ("Compare <image> with <image> please.", [(80, 60), (40, 130)]),
    "image_in_long_text": (f"{LONG_TEXT} <image> and then {LONG_TEXT}", [(150, 70)]),
}


@pytest.fixture(scope="module", params=("clip", "siglip"))
def llava_next(request, tmp_path_factory):
    import transformers
    path = make_random_llava_next(str(tmp_path_factory.mktemp("llava_next") / request.param), request.param)
    hf = transformers.AutoModelForImageTextToText.from_pretrained(path).eval()
    return path, hf, transformers.AutoProcessor.from_pretrained(path)


@pytest.fixture(scope="module")
def engine(llava_next):
    return make_engine(llava_next[0])     # 12-token steps: every image (24 to 60 tokens) spans several chunks


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_and_logprobs_match_transformers(case, llava_next, engine):
    _, hf, proc = llava_next
    prompt, sizes = CASES[case]
    images = [noise_image(i, size) for i, size in enumerate(sizes)]
    assert_matches_hf(engine, hf, proc, prompt, images)


def test_image_token_counts_equal_the_processor(llava_next, engine):
    """Sizes that pick each pinpoint (wide, tall, square, very wide / tall), tiny and large images, and two images
    with no text between them (one run of image tokens that the items must split)."""
    _, _, proc = llava_next
    image_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    sizes = [(300, 200), (20, 40), (84, 84), (500, 90), (90, 500), (13, 13), (1000, 999), (61, 59)]
    lengths = []
    for size in sizes:
        prompt, images = "a <image> b", [noise_image(3, size)]
        mm = engine.images.process(prompt, images)
        ref = proc(text=prompt, images=images, return_tensors="pt")["input_ids"][0].tolist()
        assert mm.token_ids == ref and len(mm.items) == 1
        assert ref[mm.items[0].offset:mm.items[0].end] == [image_id] * ref.count(image_id)
        lengths.append(mm.items[0].length)
    assert len(set(lengths)) >= 4           # the count follows the image's size
    images = [noise_image(4, (300, 200)), noise_image(5, (40, 130))]
    mm = engine.images.process("x <image><image> y", images)
    ref = proc(text="x <image><image> y", images=images, return_tensors="pt")["input_ids"][0].tolist()
    assert mm.token_ids == ref
    assert [m.length for m in mm.items] == [lengths[0], engine.images.process("<image>", images[1:]).items[0].length]
    assert mm.items[1].offset == mm.items[0].end


def test_adjacent_images_match_transformers(llava_next, engine):
    _, hf, proc = llava_next
    assert_matches_hf(engine, hf, proc, "Two: <image><image> done", [noise_image(6, (70, 50)),
                                                                     noise_image(7, (50, 120))], max_new=4)


def test_unpad_keeps_the_rows_or_columns_of_the_image():
    grid = torch.arange(6 * 6).view(6, 6, 1)
    assert unpad(grid, (60, 80)).shape[:2] == (4, 6)     # wide: 4.5 rows of 6 -> 4, one padded row cut each side
    assert unpad(grid, (130, 40)).shape[:2] == (6, 2)    # tall
    assert unpad(grid, (50, 50)).shape[:2] == (6, 6)     # same aspect: nothing cut
    assert torch.equal(unpad(grid, (60, 80)), grid[1:5])


def test_prefix_cache_same_image_hits_different_image_does_not(llava_next):
    assert_prefix_cache_keys_images(llava_next[0])


def test_openai_sdk_with_two_data_uris(tmp_path_factory):
    import transformers
    path = make_random_llava_next(str(tmp_path_factory.mktemp("llava_next_http") / "clip"))
    images = [noise_image(1, (80, 60)), noise_image(2, (40, 130))]
    server = start_api_server(tmp_path_factory.mktemp("llava_next_server"), path, *API_SERVER_ARGS,
                              "--kernels", "torch")
    try:
        text_only, two = sdk_chat_with_images(server.url, [png_uri((80, 60), 1), png_uri((40, 130), 2)])
        # each image's tokens as the HF processor counts them (its size decides its grid)
        proc = transformers.AutoProcessor.from_pretrained(path)
        image_tokens = proc(text="<image><image>", images=images, return_tensors="pt")["input_ids"][0].tolist()
        assert two.usage.prompt_tokens - text_only.usage.prompt_tokens >= image_tokens.count(proc.image_token_id)
    finally:
        server.stop()


def test_a_strategy_that_cuts_the_tiles_is_refused(llava_next, tmp_path):
    """CLIP with "full" keeps the class token in every tile (SigLIP with "default" drops a patch): transformers'
    packing cannot reshape such tiles, so loading says why instead of failing at the first image."""
    import json
    import shutil
    path = shutil.copytree(llava_next[0], tmp_path / "model")
    config = json.loads((path / "config.json").read_text())
    config["vision_feature_select_strategy"] = "full" if config["vision_feature_select_strategy"] == "default" \
        else "default"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(NotImplementedError, match="vision_feature_select_strategy"):
        make_engine(str(path))


def test_hub_config_layout_is_read(tmp_path):
    """llava-hf's files keep only the decoder fields that differ from transformers' defaults (a Mistral-7B decoder
    with no hidden_size): the rest are transformers' defaults, derived fields from the file's own."""
    import json

    from lmserve.model.hf_checkpoint import hf_arch_config
    text = dict(architectures=["MistralForCausalLM"], intermediate_size=14336, max_position_embeddings=32768,
                model_type="mistral", num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None,
                vocab_size=32064)
    vision = dict(hidden_size=1024, image_size=336, intermediate_size=4096, model_type="clip_vision_model",
                  num_attention_heads=16, num_hidden_layers=24, patch_size=14, projection_dim=768)
    cfg = dict(architectures=["LlavaNextForConditionalGeneration"], model_type="llava_next", image_token_index=32000,
               image_grid_pinpoints=[[336, 672], [672, 336]], text_config=text, vision_config=vision,
               vision_feature_layer=-2, vision_feature_select_strategy="default", use_image_newline_parameter=True)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    arch = hf_arch_config(str(tmp_path))
    assert (arch.architecture, arch.hidden_size, arch.num_hidden_layers, arch.num_attention_heads) == \
        ("llava_next", 4096, 32, 32)
    assert (arch.num_key_value_heads, arch.head_dim, arch.intermediate_size, arch.vocab_size) == (8, 128, 14336, 32064)
    assert arch.rope_theta == 1e6 and arch.sliding_window is None and arch.max_position_embeddings == 32768
    assert arch.vision["image_grid_pinpoints"] == [[336, 672], [672, 336]]
    text.update(model_type="llama", num_attention_heads=40, hidden_size=5120)     # vicuna-13b: derived kv heads
    del text["num_key_value_heads"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    arch = hf_arch_config(str(tmp_path))
    assert (arch.num_attention_heads, arch.num_key_value_heads, arch.head_dim) == (40, 40, 128)
