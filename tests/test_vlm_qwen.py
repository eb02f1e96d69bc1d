"""Qwen2-VL and Qwen2.5-VL in the engine, against transformers on tiny random weights (tests/vlm_builders.py):
greedy tokens identical and logprobs within 1e-3 with 1 image, 2 images of different sizes and an image inside a
long prompt that chunked prefill splits (a 12-token budget); image-token counts equal the HF processor's (dynamic
resolution); M-RoPE positions (pure logic); the prefix cache hits on the same image and never shares a different
image of the same size; one openai SDK request with a data: URI on a real server."""
from __future__ import annotations

import httpx
import pytest
from conftest import API_SERVER_ARGS, start_api_server
from test_vlm_models import (assert_matches_hf, hf_reference, make_engine, noise_image, png_uri,
                             sdk_chat_with_images)
from vlm_builders import QWEN_VL_ARCHS, make_random_qwen_vl

from lmserve.engine.mm_items import MMItem
from lmserve.engine.mm_qwen import QWEN_PLACEHOLDER as IMG
from lmserve.engine.mm_qwen import load_qwen_processor
from lmserve.engine.mrope import mrope_positions, prompt_positions
from lmserve.engine.sequence import Sequence
from lmserve.sampling_params import SamplingParams

pytestmark = pytest.mark.timeout(600)
LONG_TEXT = " ".join(f"word{i}" for i in range(30))
CASES = {
    "one_image": (f"Describe {IMG} briefly.", [(80, 60)]),
    "two_images_of_different_sizes": (f"Compare {IMG} with {IMG} please.", [(80, 60), (130, 100)]),
    "image_in_long_text": (f"{LONG_TEXT} {IMG} and then {LONG_TEXT}", [(120, 70)]),
}


@pytest.fixture(scope="module", params=QWEN_VL_ARCHS)
def qwen(request, tmp_path_factory):
    import transformers
    path = make_random_qwen_vl(request.param, str(tmp_path_factory.mktemp("qwen") / request.param))
    hf = transformers.AutoModelForImageTextToText.from_pretrained(path).eval()
    return path, hf, load_qwen_processor(path, request.param)


@pytest.fixture(scope="module")
def engine(qwen):
    return make_engine(qwen[0])     # 12-token steps: images and long prompts are prefilled over several chunks


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_and_logprobs_match_transformers(case, qwen, engine):
    _, hf, proc = qwen
    prompt, sizes = CASES[case]
    images = [noise_image(i, size) for i, size in enumerate(sizes)]
    assert_matches_hf(engine, hf, proc, prompt, images)


def test_batched_sequences_with_different_position_deltas(qwen, engine):
    """One batch, three sequences whose decode positions are offset differently (two image grids, and a text-only
    prompt with no offset): each equals its own transformers run."""
    _, hf, proc = qwen
    prompts = [f"A {IMG} b", f"Two: {IMG} and {IMG}", "only text here"]
    images = [[noise_image(5, (140, 56))], [noise_image(6, (56, 140)), noise_image(7, (84, 84))], []]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    outs = engine.generate(prompts, params, images=images)
    for prompt, ims, out in zip(prompts, images, outs):
        if ims:
            want = hf_reference(hf, proc, prompt, ims, 6)[1]
        else:
            ids = proc.tokenizer(prompt, return_tensors="pt")
            want = hf.generate(**ids, max_new_tokens=6, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, ids["input_ids"].shape[1]:].tolist()
        assert out.outputs[0].token_ids == want


def test_preempted_sequences_recompute_with_their_positions(qwen):
    """A KV cache too small for three image requests at once: the newest are preempted and recomputed (prompt and
    generated tokens, the latter at index + mrope_delta), and each still equals its transformers run."""
    from lmserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from lmserve.engine.llm_engine import LLMEngine
    path, hf, proc = qwen
    engine = LLMEngine(EngineConfig(
        model=ModelConfig(model=path, dtype="float32", kernels="torch", attention_backend="torch"),
        cache=CacheConfig(block_size=4, num_blocks=16, enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=64)))
    prompts = [f"Picture {i}: {IMG} ok" for i in range(3)]
    images = [[noise_image(20 + i, (84, 56))] for i in range(3)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outs = engine.generate(prompts, params, images=images)
    assert engine.scheduler.num_preemptions_total > 0
    for prompt, ims, out in zip(prompts, images, outs):
        assert out.outputs[0].token_ids == hf_reference(hf, proc, prompt, ims, 12)[1]


def test_image_token_counts_equal_the_processor(qwen, engine):
    # dynamic resolution: 84x56 is already a multiple of 28 (6x4 patches -> 6 tokens); 300x200 is capped by
    # max_pixels (28*28*20), so it has at most 20 tokens
    assert_qwen_token_counts(engine, qwen[2], (84, 56), 6, 20)


def assert_qwen_token_counts(engine, proc, exact: tuple[int, int], exact_tokens: int, cap: int) -> None:
    """Three images (large, narrow, and `exact`, whose sides need no resizing): the engine's prompt ids and items
    equal the HF processor's; `exact` takes exact_tokens, the large one at most `cap` (max_pixels)."""
    images = [noise_image(7, (300, 200)), noise_image(8, (40, 150)), noise_image(9, exact)]
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
    # the sizes differ, so do the counts
    assert mm.items[2].length == exact_tokens and mm.items[0].length <= cap and len({m.length for m in mm.items}) == 3


def test_mrope_positions_follow_the_image_grid():
    """Text, a 1x2x3 image, text: the image's tokens sit on its grid and the text after it resumes at
    start + max(rows, columns), so decode positions are offset from the token index (mrope_delta)."""
    item = MMItem(offset=2, length=6, content_hash=1, data={"llm_grid": (1, 2, 3)})
    streams, delta = prompt_positions(10, [item])
    assert streams == [[0, 1, 2, 2, 2, 2, 2, 2, 5, 6],
                       [0, 1, 2, 2, 2, 3, 3, 3, 5, 6],
                       [0, 1, 2, 3, 4, 2, 3, 4, 5, 6]]
    assert delta == 7 - 10
    seq = Sequence(0, "r", list(range(10)), SamplingParams())
    seq.mm_items = [item]
    seq.token_ids += [11, 12]            # two generated tokens
    # a chunk that ends inside the image, and one that runs from the prompt's tail into the generated tokens
    assert mrope_positions(seq, 0, 4) == [s[:4] for s in streams]
    assert mrope_positions(seq, 8, 4) == [[5, 6, 7, 8]] * 3
    assert seq.mrope_delta == -3
    text_only = Sequence(1, "t", [5, 6, 7], SamplingParams())
    assert mrope_positions(text_only, 1, 2) == [[1, 2]] * 3


def test_prefix_cache_same_image_hits_different_image_does_not(qwen, engine):
    _, hf, proc = qwen
    prompt = f"Look: {IMG} What is it?"
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    a, b = noise_image(1, (112, 112)), noise_image(2, (112, 112))     # equal sizes: equal image tokens
    first = engine.generate(prompt, params, images=[a])[0]
    hits = engine.get_stats().prefix_cache_hits
    again = engine.generate(prompt, params, images=[a.copy()])[0]     # the same content, another object
    assert again.num_cached_tokens >= 8 and engine.get_stats().prefix_cache_hits > hits
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    other = engine.generate(prompt, params, images=[b])[0]
    image_start = engine.images.process(prompt, [b]).items[0].offset
    assert other.num_cached_tokens <= image_start      # only the text before the image can be shared
    # the solo run: transformers on the same inputs (no cache shared with anything)
    assert other.outputs[0].token_ids == hf_reference(hf, proc, prompt, [b], 6)[1] != first.outputs[0].token_ids


def test_placeholder_is_qwens_vision_block(engine):
    assert engine.modalities == ("text", "image") and engine.image_placeholder == IMG
    out = engine.generate("no image here", SamplingParams(max_tokens=2, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 2       # text-only requests to a VLM: plain positions


def assert_sdk_chat_with_an_image(url: str, size: tuple[int, int], image_tokens: int) -> None:
    """The openai SDK: a text-only chat, then the same with an image (a data: URI) that takes image_tokens more."""
    text_only, one = sdk_chat_with_images(url, [png_uri(size, 3)])
    assert one.usage.prompt_tokens - text_only.usage.prompt_tokens >= image_tokens


@pytest.mark.slow      # a server start
def test_openai_sdk_with_a_data_uri(tmp_path_factory):
    path = make_random_qwen_vl("qwen2_5_vl", str(tmp_path_factory.mktemp("qwen_http") / "qwen2_5_vl"))
    server = start_api_server(tmp_path_factory.mktemp("qwen_server"), path, *API_SERVER_ARGS, "--kernels", "torch")
    try:
        # the 84x56 image is 6x4 patches -> 6 image tokens, between <|vision_start|> and <|vision_end|>
        assert_sdk_chat_with_an_image(server.url, (84, 56), 6)
        # LMDeploy's /generate: image_data, the image where <IMAGE_TOKEN> is (Qwen's vision block in its place)
        image = png_uri((84, 56), 3)
        marked = httpx.post(f"{server.url}/generate", json={"prompt": "<IMAGE_TOKEN>\nDescribe.", "image_data": [image],
                                                            "max_tokens": 3, "temperature": 0}, timeout=120)
        raw = httpx.post(f"{server.url}/generate", json={"prompt": f"{IMG}\nDescribe.", "image_data": image,
                                                         "max_tokens": 3, "temperature": 0}, timeout=120)
        assert marked.status_code == raw.status_code == 200, marked.text + raw.text
        assert marked.json()["output_ids"] == raw.json()["output_ids"]
    finally:
        server.stop()


def test_hub_config_layout_is_read(tmp_path):
    """Qwen2-VL's hub config.json: the decoder's fields at the top level and rope_scaling {"type": "mrope"}."""
    import json

    from lmserve.model.hf_checkpoint import hf_arch_config
    cfg = dict(architectures=["Qwen2VLForConditionalGeneration"], model_type="qwen2_vl", hidden_size=64,
               intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               vocab_size=100, rope_theta=1e6, max_position_embeddings=512, tie_word_embeddings=False,
               rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
               vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    arch = hf_arch_config(str(tmp_path))
    assert arch.architecture == "qwen2_vl" and arch.attention_bias and arch.rope_scaling is None
    assert arch.rope_theta == 1e6 and arch.vision["mrope_section"] == [2, 3, 3]
    assert arch.vision["vision_config"]["embed_dim"] == 32
