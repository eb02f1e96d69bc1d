"""Gemma 3 with vision in the engine, against transformers on tiny random weights (tests/vlm_builders.py: a SigLIP
tower pooled to 4 tokens per image, a decoder with sliding and global layers): greedy tokens identical and logprobs
within 1e-3 with 1 image, 2 images and an image inside a long prompt that chunked prefill splits (12-token steps),
which holds only if each image's tokens attend to each other both ways as in transformers' mask (the same prompt
under a plain causal mask scores differently); an image larger than the step budget runs whole; image-token counts
and spans equal the HF processor's; chunks and prefix-cache hits never end inside an image; the prefix cache hits on
the same image and never shares a different one; the openai SDK with a data: URI on a real server."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import API_SERVER_ARGS, start_api_server
from test_vlm_models import (assert_matches_hf, assert_prefix_cache_keys_images, make_engine, noise_image, png_uri,
                             sdk_chat_with_images)
from vlm_builders import make_random_gemma3_vl

from lmserve.engine.mm_items import MMItem, fit_budget, whole_image_prefix

IMG = "<start_of_image>"
LONG_TEXT = " ".join(f"word{i}" for i in range(40))
CASES = {
    "one_image": (f"Describe {IMG} briefly.", 1),
    "two_images": (f"Compare {IMG} with {IMG} please.", 2),
    "image_in_long_text": (f"{LONG_TEXT} {IMG} and then {LONG_TEXT}", 1),
}


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    import transformers
    path = make_random_gemma3_vl(str(tmp_path_factory.mktemp("gemma3_vl") / "m"))
    hf = transformers.AutoModelForImageTextToText.from_pretrained(path).eval()
    return path, hf, transformers.AutoProcessor.from_pretrained(path)


@pytest.fixture(scope="module")
def engine(gemma3):
    return make_engine(gemma3[0])     # 12-token steps: the long prompt's chunks fall around the image


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_and_logprobs_match_transformers(case, gemma3, engine):
    _, hf, proc = gemma3
    prompt, num_images = CASES[case]
    assert_matches_hf(engine, hf, proc, prompt, [noise_image(i, (80 + 10 * i, 60)) for i in range(num_images)])


def test_the_bidirectional_image_mask_matters(gemma3):
    """transformers' mask with token_type_ids (image tokens see each other) vs a causal one: the tiny model tells
    them apart, so the greedy test above would catch an engine that kept the image causal."""
    _, hf, proc = gemma3
    inp = proc(text=CASES["one_image"][0], images=[noise_image(0)], return_tensors="pt")
    with torch.no_grad():
        both = hf(**inp).logits[0, -1]
        causal = hf(**{k: v for k, v in inp.items() if k != "token_type_ids"}).logits[0, -1]
    assert (torch.log_softmax(both, -1) - torch.log_softmax(causal, -1)).abs().max() > 1e-3


def test_an_image_larger_than_the_step_budget_runs_whole(tmp_path):
    """16 tokens per image (no pooling) with 12-token steps: the image cannot be split, so it runs alone past the
    budget, and the tokens still equal transformers'."""
    import transformers
    path = make_random_gemma3_vl(str(tmp_path / "m16"), mm_tokens=16)
    hf = transformers.AutoModelForImageTextToText.from_pretrained(path).eval()
    proc = transformers.AutoProcessor.from_pretrained(path)
    assert_matches_hf(make_engine(path), hf, proc, f"Two: {IMG} and {IMG} done", [noise_image(1), noise_image(2)])


def test_image_token_counts_equal_the_processor(gemma3, engine):
    _, _, proc = gemma3
    images = [noise_image(7, (300, 200)), noise_image(8, (20, 40))]
    prompt = f"a {IMG} b {IMG}"
    mm = engine.images.process(prompt, images)
    ref = proc(text=prompt, images=images, return_tensors="pt")
    assert mm.token_ids == ref["input_ids"][0].tolist()
    # the spans the decoder attends both ways: exactly the processor's token_type_ids == 1
    types = ref["token_type_ids"][0].tolist()
    assert [i for i, t in enumerate(types) if t == 1] == [p for m in mm.items for p in range(m.offset, m.end)]
    assert [m.length for m in mm.items] == [4, 4] and all(m.bidirectional for m in mm.items)
    boi = proc.tokenizer.convert_tokens_to_ids(IMG)
    assert all(mm.token_ids[m.offset - 1] == boi for m in mm.items)


def _seq(*spans):
    return SimpleNamespace(mm_items=[MMItem(lo, hi - lo, 0, {}, bidirectional=True) for lo, hi in spans])


def test_chunks_and_cache_hits_never_end_inside_an_image():
    seq = _seq((10, 20), (30, 34))
    assert fit_budget(seq, 0, 15, 100, first=True) == 10        # ends before the image
    assert fit_budget(seq, 10, 5, 5, first=True) == 10          # starts at it: all of it, past the budget
    assert fit_budget(seq, 10, 5, 5, first=False) == 0          # not alone: waits for a step of its own
    assert fit_budget(seq, 0, 25, 100, first=True) == 25        # the whole image and text after it
    assert fit_budget(seq, 20, 12, 100, first=False) == 10      # cut before the second image
    assert [whole_image_prefix(seq, n) for n in (8, 10, 16, 20, 32, 40)] == [8, 10, 10, 20, 30, 40]
    causal = SimpleNamespace(mm_items=[MMItem(10, 10, 0, {})])  # LLaVA's images may be split
    assert fit_budget(causal, 0, 15, 100, first=True) == 15 and whole_image_prefix(causal, 16) == 16


def test_prefix_cache_same_image_hits_different_image_does_not(gemma3):
    assert_prefix_cache_keys_images(gemma3[0], IMG)


def test_openai_sdk_with_a_data_uri(gemma3, tmp_path_factory):
    server = start_api_server(tmp_path_factory.mktemp("gemma3_server"), gemma3[0], *API_SERVER_ARGS,
                              "--kernels", "torch")
    try:
        text_only, out = sdk_chat_with_images(server.url, [png_uri((80, 60), 3)])
        # boi + 4 image tokens + eoi, and the "\n\n" around them
        assert out.usage.prompt_tokens - text_only.usage.prompt_tokens >= 4 + 2
    finally:
        server.stop()


def test_cpp_kernels_keep_the_image_mask(gemma3):
    """The C++ kernels (decode attention, packed GEMMs, norms) around the masked prefill path: still transformers'
    tokens, an image split from its text by the chunk boundaries included."""
    from lmserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from lmserve.engine.llm_engine import LLMEngine
    path, hf, proc = gemma3
    engine = LLMEngine(EngineConfig(
        model=ModelConfig(model=path, dtype="float32", kernels="auto", attention_backend="cpp"),
        cache=CacheConfig(block_size=8, num_blocks=128), scheduler=SchedulerConfig(max_num_batched_tokens=12)))
    assert_matches_hf(engine, hf, proc, CASES["two_images"][0], [noise_image(0), noise_image(1, (90, 60))])


def test_hub_config_layout_is_read(tmp_path):
    """google/gemma-3-4b-it's config.json (the decoder fields equal to transformers' defaults left out; no
    layer_norm_eps in the SigLIP config): gemma3_vl with the gemma3 decoder; a text-only gemma3 file stays gemma3."""
    import json

    from lmserve.model.clip_vision import VisionConfig
    from lmserve.model.gemma3_vl import Gemma3Projector
    from lmserve.model.hf_checkpoint import hf_arch_config
    text = dict(hidden_size=2560, intermediate_size=10240, model_type="gemma3_text", num_hidden_layers=34,
                rope_scaling={"factor": 8.0, "rope_type": "linear"}, sliding_window=1024)
    vision = dict(hidden_size=1152, image_size=896, intermediate_size=4304, model_type="siglip_vision_model",
                  num_attention_heads=16, num_hidden_layers=27, patch_size=14, vision_use_head=False)
    cfg = dict(architectures=["Gemma3ForConditionalGeneration"], model_type="gemma3", boi_token_index=255999,
               eoi_token_index=256000, eos_token_id=[1, 106], image_token_index=262144, mm_tokens_per_image=256,
               text_config=text, vision_config=vision)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    arch = hf_arch_config(str(tmp_path))
    assert (arch.architecture, arch.hidden_size, arch.num_hidden_layers, arch.sliding_window) == \
        ("gemma3_vl", 2560, 34, 1024)
    assert arch.qk_norm and arch.layer_window(5) is None and arch.layer_window(0) == 1024
    vcfg = VisionConfig.from_hf(arch.vision["vision_config"])
    assert vcfg.kind == "siglip" and vcfg.layer_norm_eps == 1e-6
    assert Gemma3Projector(vcfg, 8, 256).kernel == 4          # 64x64 patches pooled to 16x16 tokens
    text_only = dict(text, model_type="gemma3", num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                     vocab_size=262208)                         # model_type gemma3 without a vision_config
    (tmp_path / "config.json").write_text(json.dumps(text_only))
    assert hf_arch_config(str(tmp_path)).architecture == "gemma3"
