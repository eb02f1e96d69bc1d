"""model/lora.py against peft: an adapter made by peft (random, non-zero B) on a tiny random llama, loaded by
lmserve, gives each linear layer's output peft's, and a batch mixing two adapters and the base gives each row
its own adapter's output."""
from __future__ import annotations

import json
import os

import pytest
import torch

from lmserve.model.lora import LoraError, add_grouped_delta, check_shapes, load_peft_adapter

peft = pytest.importorskip("peft")


def make_adapter(base_dir: str, path: str, seed: int, r: int = 4, alpha: int = 8):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                  "gate_proj", "up_proj", "down_proj"])
    pm = peft.get_peft_model(model, cfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:        # peft starts B at zero (a no-op adapter): make it do something
                p.normal_(0, 0.1)
    pm.save_pretrained(path)
    return pm.eval()


@pytest.fixture(scope="module")
def adapters(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    return {name: (str(root / name), make_adapter(tiny_models["llama"], str(root / name), seed))
            for name, seed in (("a", 1), ("b", 2))}


def test_grouped_delta_equals_peft_per_row(adapters):
    loaded = {n: load_peft_adapter(n, path, max_rank=16) for n, (path, _) in adapters.items()}
    for layer, module, part in ((0, "q_proj", "self_attn"), (1, "down_proj", "mlp"), (1, "v_proj", "self_attn")):
        peft_layers = {n: getattr(getattr(pm.base_model.model.model.layers[layer], part), module)
                       for n, (_, pm) in adapters.items()}
        base = peft_layers["a"].base_layer
        torch.manual_seed(layer)
        x = torch.randn(7, base.in_features)
        # rows 0-2 adapter a, 3-4 the base model, 5-6 adapter b
        out = base(x)
        untouched = out.clone()
        groups = []
        for n, (start, end) in (("a", (0, 3)), ("b", (5, 7))):
            a, b = loaded[n].weights[(layer, module)]
            groups.append((start, end, a, b, loaded[n].scaling))
        add_grouped_delta(x, out, groups)
        with torch.no_grad():
            want_a = peft_layers["a"](x[0:3])
            want_b = peft_layers["b"](x[5:7])
            assert not torch.allclose(want_a, base(x[0:3]), atol=1e-3)     # the adapter changes the output
            torch.testing.assert_close(out[0:3], want_a, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out[3:5], untouched[3:5], atol=0, rtol=0)   # base rows: nothing added
            torch.testing.assert_close(out[5:7], want_b, atol=1e-5, rtol=1e-5)


def test_bad_adapters_are_named(adapters, tmp_path):
    path, _ = adapters["a"]
    with pytest.raises(LoraError, match="rank 4 is over --max-lora-rank 2"):
        load_peft_adapter("a", path, max_rank=2)
    with pytest.raises(LoraError, match="not found"):
        load_peft_adapter("missing", str(tmp_path), max_rank=16)
    adapter = load_peft_adapter("a", path, max_rank=16)
    shapes = {where: (b.shape[0], a.shape[1]) for where, (a, b) in adapter.weights.items()}
    check_shapes(adapter, shapes)
    shapes[(0, "q_proj")] = (128, 64)
    with pytest.raises(LoraError, match="layer 0 q_proj"):
        check_shapes(adapter, shapes)
    with open(os.path.join(path, "adapter_config.json")) as f:
        assert json.load(f)["r"] == 4
