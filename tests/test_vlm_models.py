"""Vision-language models in the engine (offline LLM), against transformers on tiny random weights (LLaVA-1.5;
SmolVLM / Idefics3 with image splitting):
greedy tokens identical and logprobs within 1e-3 with 1 and 2 images and with an image inside a prompt that chunked
prefill splits (a small token budget); image-token counts equal the HF processor's; the prefix cache hits on the
same image and never on a different image of the same size; placeholder/image count mismatches are errors."""
from __future__ import annotations

import pytest
import torch
from PIL import Image
from vlm_builders import VLM_ARCHS, make_random_vlm

from lmserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from lmserve.engine.llm_engine import LLMEngine
from lmserve.engine.mm_inputs import MMInputError
from lmserve.offline import Pipeline
from lmserve.sampling_params import SamplingParams

LONG_TEXT = " ".join(f"word{i}" for i in range(40))
CASES = {
    "one_image": ("Describe <image> briefly.", 1),
    "two_images": ("Compare <image> with <image> please.", 2),
    "image_in_long_text": (f"{LONG_TEXT} <image> and then {LONG_TEXT}", 1),
}


def noise_image(seed: int, size=(80, 60)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), "RGB")


@pytest.fixture(scope="module", params=VLM_ARCHS)
def vlm(request, tmp_path_factory):
    import transformers
    path = make_random_vlm(request.param, str(tmp_path_factory.mktemp("vlm") / request.param))
    hf = transformers.AutoModelForImageTextToText.from_pretrained(path).eval()
    return path, hf, transformers.AutoProcessor.from_pretrained(path)


def make_engine(path: str, budget: int = 12, prefix_caching: bool = True) -> LLMEngine:
    # 12-token steps: every image (16 tokens) and the long prompts are prefilled over several chunks
    return LLMEngine(EngineConfig(
        model=ModelConfig(model=path, dtype="float32", kernels="torch", attention_backend="torch"),   # exact
        cache=CacheConfig(block_size=8, num_blocks=128, enable_prefix_caching=prefix_caching),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget)))


@pytest.fixture(scope="module")
def engine(vlm):
    return make_engine(vlm[0])


def hf_reference(hf, proc, prompt: str, images: list, max_new: int):
    """-> (prompt ids, greedy tokens, log-softmax rows of each generated position)."""
    inp = proc(text=prompt, images=images, return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(**inp, max_new_tokens=max_new, do_sample=False, output_scores=True,
                          return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
    n = inp["input_ids"].shape[1]
    return inp["input_ids"][0].tolist(), out.sequences[0, n:].tolist(), \
        [torch.log_softmax(s[0].float(), -1) for s in out.scores]


def assert_matches_hf(engine, hf, proc, prompt: str, images: list, max_new: int = 8) -> None:
    """Greedy tokens equal to transformers' generate, logprobs within 1e-3, same prompt ids."""
    ids, tokens, lps = hf_reference(hf, proc, prompt, images, max_new)
    params = SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True, logprobs=1)
    out = engine.generate(prompt, params, images=images)[0]
    assert out.prompt_token_ids == ids          # the placeholders expanded exactly as the HF processor does
    assert out.outputs[0].token_ids == tokens
    for lp, ref in zip(out.outputs[0].logprobs, lps):
        assert abs(lp.logprob - ref[lp.token_id].item()) < 1e-3


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_and_logprobs_match_transformers(case, vlm, engine):
    path, hf, proc = vlm
    prompt, num_images = CASES[case]
    images = [noise_image(i, (80 + 10 * i, 60)) for i in range(num_images)]
    assert_matches_hf(engine, hf, proc, prompt, images)


def test_image_token_counts_equal_the_processor(vlm, engine):
    _, _, proc = vlm
    images = [noise_image(7, (300, 200)), noise_image(8, (20, 40))]
    mm = engine.images.process("a <image> b <image>", images)
    ref = proc(text="a <image> b <image>", images=images, return_tensors="pt")["input_ids"][0].tolist()
    assert mm.token_ids == ref
    image_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    assert sum(m.length for m in mm.items) == ref.count(image_id)
    assert all(ref[m.offset:m.end] == [image_id] * m.length for m in mm.items)
    # LLaVA: one 16-token run per image; Idefics3: 2x2 tiles + the global view, 4 tokens each (pixel shuffle)
    assert {m.length for m in mm.items} == ({16} if len(mm.items) == 2 else {4})
    assert len(mm.items) == 2 or len(mm.items) > 2 + 1     # Idefics3 split the 300x200 image into tiles


def test_prefix_cache_same_image_hits_different_image_does_not(vlm):
    assert_prefix_cache_keys_images(vlm[0])


def assert_prefix_cache_keys_images(path: str, placeholder: str = "<image>") -> None:
    """The same image again hits the prefix cache; a different image of the same size shares only the text before
    it and gives what it gives alone."""
    engine = make_engine(path, budget=64)
    prompt = f"Look: {placeholder} What is it?"
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    a, b = noise_image(1), noise_image(2)          # equal sizes: equal image tokens, different pixels
    first = engine.generate(prompt, params, images=[a])[0]
    hits = engine.get_stats().prefix_cache_hits
    again = engine.generate(prompt, params, images=[a.copy()])[0]   # the same content, another object
    assert again.num_cached_tokens >= 8 and engine.get_stats().prefix_cache_hits > hits
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    other = engine.generate(prompt, params, images=[b])[0]
    image_start = engine.images.process(prompt, [b]).items[0].offset
    assert other.num_cached_tokens <= image_start   # only the text before the image can be shared
    solo = make_engine(path, budget=64, prefix_caching=False).generate(prompt, params, images=[b])[0]
    assert other.outputs[0].token_ids == solo.outputs[0].token_ids != first.outputs[0].token_ids


def test_placeholder_count_mismatch_is_an_input_error(engine):
    params = SamplingParams(max_tokens=2)
    with pytest.raises(MMInputError, match="1 image placeholder.*2 image"):
        engine.add_request("r1", "one <image> only", params, images=[noise_image(1), noise_image(2)])
    with pytest.raises(MMInputError, match="0 image"):
        engine.add_request("r2", "a placeholder <image> without its image", params)
    assert engine.modalities == ("text", "image") and engine.image_placeholder == "<image>"
    assert not engine.has_unfinished()
    out = Pipeline(engine).generate("a <image>", SamplingParams(max_tokens=1), images=[noise_image(3)])[0]
    assert len(out.outputs[0].token_ids) == 1     # the offline pipeline passes images through


def test_async_engine_takes_images_and_reports_modalities(vlm, engine):
    """The server's path: AsyncEngine.generate(..., images=) preprocesses off the loop and streams the same tokens."""
    import asyncio

    from lmserve.engine.async_engine import AsyncEngine
    image = noise_image(11)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    want = engine.generate("Say <image> now", params, images=[image])[0].outputs[0].token_ids

    async def run():
        ae = AsyncEngine(engine)
        await ae.start()
        try:
            assert ae.modalities == ("text", "image") and ae.image_placeholder == "<image>"
            last = None
            async for out in ae.generate("a1", "Say <image> now", params, images=[image]):
                last = out
            with pytest.raises(MMInputError):
                async for _ in ae.generate("a2", "Say <image> now", params, images=[image, image]):
                    pass
            return last.outputs[0].token_ids
        finally:
            await ae.shutdown()
    assert asyncio.run(run()) == want
