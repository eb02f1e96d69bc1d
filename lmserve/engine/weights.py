"""A runner's weights: building the model without float copies of quantized matrices, giving each linear layer its
LinearMethod (ops/linear_method.py), packed copies for float GEMMs, and the memory all of it takes (start-up log,
/metrics, the KV pool's default size).

With --weights quantized (the default for GGUF files, and for safetensors checkpoints of bfloat16 / float16
matrices) the model is built with meta tensors for its matrices (layers.deferred_weights), every matrix the file
holds in a block type or in F16 / BF16 becomes a GGUFLinear over a view of the mmap'd file, and only genuinely
float tensors (norms, biases, F32 matrices, or a layer whose parts cannot all stay in place) are materialized.
Nothing is converted at start-up.
"""
from __future__ import annotations

import contextlib
import logging
import os

import psutil
import torch
from torch import nn

from lmserve.config import cpu_bf16_feature
from lmserve.model.gguf import gguf_reader, gguf_state_dict
from lmserve.model.gguf_weights import gguf_weights
from lmserve.model.hf_checkpoint import hf_state_dict
from lmserve.model.layers import Linear, deferred_weights
from lmserve.model.loader import is_gguf, load_state_dict
from lmserve.model.moe import Experts
from lmserve.model.parallel import VocabParallelEmbedding
from lmserve.model.registry import get_model_class
from lmserve.model.repack_cache import RepackCache
from lmserve.model.safetensors_weights import has_16bit_matrices, safetensors_weights
from lmserve.ops.gguf_blocks import REPACKED
from lmserve.ops.linear_method import FloatLinear, GGUFLinear, packed_method, unpacked_method
from lmserve.ops.onednn import packed_gemm_implementation, uses_amx

logger = logging.getLogger(__name__)
GiB = 2**30


def keeps_quantized(model_config, path: str, op_table, arch=None) -> bool:
    """--weights quantized, or auto where ops.gguf_matmul has a kernel arm (see ModelConfig.weights): a GGUF file,
    or a text model's safetensors checkpoint with bfloat16 / float16 matrices (served in place as they are)."""
    if model_config.weights == "float":
        return False
    if not is_gguf(path):       # only where the kernels run them (on CUDA, or the torch oracle: the float model)
        return (os.path.isdir(path) and getattr(arch, "vision", None) is None
                and not op_table.is_native("gguf_matmul") and has_16bit_matrices(path))
    if model_config.weights == "auto" and op_table.is_native("gguf_matmul"):
        logger.info("weights: float (--weights auto: no quantized-matmul kernel here; --weights quantized "
                    "serves the GGUF blocks on the PyTorch reference, slowly)")
        return False
    return True


def build_model(arch, device: torch.device, dtype: torch.dtype, quantized: bool) -> nn.Module:
    cls = get_model_class(arch.architecture)
    with torch.device(device), (deferred_weights() if quantized else contextlib.nullcontext()):
        model = cls(arch).to(dtype)
    return model.eval().requires_grad_(False)


def check_fits(path: str, quantized: bool, dtype: torch.dtype) -> None:
    """A clear error before loading, rather than an OOM kill during it, when the weights cannot fit in RAM."""
    if not is_gguf(path):
        return
    size = os.path.getsize(path)
    need = size if quantized else _float_bytes(path, dtype)
    avail = psutil.virtual_memory().available
    if need > avail:
        how = "the GGUF file, memory-mapped" if quantized else f"dequantized to {dtype} (--weights float)"
        raise MemoryError(f"the model does not fit: its weights need {need / GiB:.2f} GiB ({how}) and "
                          f"{avail / GiB:.2f} GiB of memory is available"
                          + ("" if quantized else "; --weights quantized needs about the file size, "
                             f"{size / GiB:.2f} GiB"))


def _float_bytes(path: str, dtype: torch.dtype) -> int:
    elem = torch.tensor([], dtype=dtype).element_size()
    return sum(int(t.n_elements) for t in gguf_reader(path).tensors) * elem


def load_model_weights(model: nn.Module, path: str, arch, dtype: torch.dtype, quantized: bool,
                       int8: bool = False, repack: bool = False, repack_cache: str | None = None) -> None:
    """int8: GGUF layers multiply with int8-quantized activations (--quant-activations); repack: Q4_0, Q4_1, Q5_0,
    Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, Q3_K, Q2_K, IQ4_XS, IQ4_NL, MXFP4 matrices in the int8 kernels' 8-row groups, F16
    ones as BF16 where the bf16 path runs (--gguf-repack; model/gguf_weights.py); repack_cache: the directory the repacked GGUF matrices are
    kept and shared in (--gguf-repack-cache; model/repack_cache.py), None = private memory."""
    if not quantized:
        model.load_weights(load_state_dict(path, dtype, arch.tp_rank, arch.tp_size))
        return
    if not is_gguf(path):          # a safetensors checkpoint's 16-bit matrices, in place
        kept = attach_gguf(model, safetensors_weights(path, arch, repack=repack and int8), dtype, int8)
        _materialize_rest(model, dtype, next(p.device for p in model.parameters() if not p.is_meta))
        model.load_weights(hf_state_dict(path, arch, dtype, skip=kept))
        return
    reader = gguf_reader(path)
    cache = RepackCache(repack_cache, path, arch) if repack_cache and repack and int8 else None
    kept = attach_gguf(model, gguf_weights(reader, arch, repack=repack and int8, cache=cache), dtype, int8)
    device = next(p.device for p in model.parameters() if not p.is_meta)
    _materialize_rest(model, dtype, device)
    model.load_weights(gguf_state_dict(reader, arch, dtype, skip=kept))


def _target(model: nn.Module, modules: dict, name: str) -> tuple[str, int]:
    """HF weight name -> (our module's name, first output row in it): fused q/k/v and gate/up share a module."""
    sliced = model.fused_slice(name, lambda m: modules[m].weight.shape[0] if m in modules else None) \
        if hasattr(model, "fused_slice") else None
    return (sliced[0], sliced[1]) if sliced is not None else (name.rsplit(".", 1)[0], 0)


def attach_gguf(model: nn.Module, quant: dict, dtype: torch.dtype, int8: bool = False) -> set[str]:
    """Give each linear / embedding module whose whole weight the file holds in blocks a GGUFLinear over them.
    -> the HF names now served from the file (the rest load as float)."""
    modules = dict(model.named_modules())
    groups: dict[str, list] = {}
    experts: dict[str, dict] = {}
    for name, w in quant.items():
        if name == "lm_head.weight" and getattr(model, "lm_head", None) is None:
            continue
        parts = name.split(".")
        if len(parts) >= 4 and parts[-3].isdigit() and isinstance(modules.get(".".join(parts[:-3])), Experts):
            experts.setdefault(".".join(parts[:-3]), {})[(int(parts[-3]), parts[-2])] = w
            continue
        target, start = _target(model, modules, name)
        if isinstance(modules.get(target), (Linear, VocabParallelEmbedding)):
            groups.setdefault(target, []).append((start, name, w))
    kept = set()
    for target, parts in groups.items():
        module = modules[target]
        parts.sort(key=lambda p: p[0])
        n, k = module.weight.shape
        rows, ok = 0, True
        for start, _, w in parts:               # the parts must tile the module's rows exactly
            ok &= start == rows and w.shape[1] == k
            rows += w.shape[0]
        if not ok or rows != n:
            continue
        module.linear_method = GGUFLinear([w for _, _, w in parts], dtype, int8)
        kept.update(name for _, name, _ in parts)
    return kept | _attach_experts(modules, experts, dtype, int8)


def _attach_experts(modules: dict, experts: dict, dtype: torch.dtype, int8: bool) -> set[str]:
    """Each MoE layer whose every expert the file holds in blocks gets per-expert GGUFLinears (gate and up
    stacked in one); -> the names served so, the per-expert ones and the stacked ones the float loader reads."""
    kept = set()
    for prefix, ws in experts.items():
        module = modules[prefix]
        n, two_inter, hidden = module.gate_up_proj.shape
        want = {"gate_proj": (two_inter // 2, hidden), "up_proj": (two_inter // 2, hidden),
                "down_proj": (hidden, two_inter // 2)}
        if len(ws) != 3 * n or any(ws.get((e, p)) is None or tuple(ws[e, p].shape) != shape
                                   for e in range(n) for p, shape in want.items()):
            continue
        module.methods = [(GGUFLinear([ws[e, "gate_proj"], ws[e, "up_proj"]], dtype, int8),
                           GGUFLinear([ws[e, "down_proj"]], dtype, int8)) for e in range(n)]
        kept.update(f"{prefix}.{e}.{p}.weight" for e in range(n) for p in want)
        kept.update(f"{prefix}.{p}.weight" for p in want)
    return kept


def _materialize_rest(model: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    """Real float storage for every deferred matrix that did not get GGUF blocks (load_weights fills it)."""
    for module in model.modules():
        if isinstance(module, Experts) and module.methods is None:
            for pname in ("gate_up_proj", "down_proj"):
                p = getattr(module, pname)
                if p.is_meta:
                    setattr(module, pname, nn.Parameter(torch.empty(p.shape, dtype=dtype, device=device),
                                                        requires_grad=False))
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and weight.is_meta and not isinstance(
                getattr(module, "linear_method", None), GGUFLinear):
            module.weight = nn.Parameter(torch.empty(weight.shape, dtype=dtype, device=device), requires_grad=False)
            if hasattr(module, "linear_method"):
                module.linear_method = FloatLinear(module.weight)


# ---- packed copies for float GEMMs ----------------------------------------------------------------------------
def _float_layers(model: nn.Module):
    """Modules whose method multiplies: linear layers, and the embedding when it is also the (tied) head."""
    layers = [m for m in model.modules() if isinstance(m, Linear) and m.packable]
    if getattr(model, "lm_head", 0) is None and hasattr(model, "output_head"):
        layers.append(model.output_head())
    return layers


def pack_float_layers(model: nn.Module, dtype: torch.dtype, pack: bool = True) -> bool:
    """Packed (oneDNN) / lower-precision copies for float layers; GGUF layers stay as they are.
    -> whether the output head got a packed oneDNN weight."""
    for module in _float_layers(model):
        module.linear_method = packed_method(module.linear_method, dtype, pack)
    head = model.output_head().linear_method if hasattr(model, "output_head") else None
    return getattr(getattr(head, "packed", None), "is_mkldnn", False)


def attach_fast_copies(model: nn.Module, matmul_precision: str, pack: bool = True) -> None:
    """Packed (and, with matmul_precision "bfloat16", bf16) copies of a float32 model's float weights for its
    GEMMs; GGUF layers keep their blocks. Logs which GEMM implementation oneDNN picked."""
    fast = torch.bfloat16 if matmul_precision == "bfloat16" else torch.float32
    packed = pack_float_layers(model, fast, pack=pack)
    impl = packed_gemm_implementation(fast) if packed else None
    logger.info("%s matmuls on %s float weights%s", fast, "packed" if packed else "plain",
                f" (oneDNN {impl})" if impl else "")
    if fast == torch.bfloat16 and cpu_bf16_feature() == "amx_bf16" and impl and not uses_amx(impl):
        logger.warning("the CPU has AMX but oneDNN runs bf16 GEMMs with %s: AMX tiles unused (kernel too old "
                       "to grant AMX permission?); expect ~half the prefill speed", impl)


def unpack_float_layers(model: nn.Module) -> None:
    for module in _float_layers(model):
        module.linear_method = unpacked_method(module.linear_method)


# ---- memory -----------------------------------------------------------------------------------------------------
def mapped_resident_bytes(path: str) -> int | None:
    """Bytes of `path`'s mappings (a file, or the files of a directory) in this process that are resident (Linux
    /proc/self/smaps), None elsewhere."""
    real, total, inside = os.path.realpath(path), 0, False
    mapped = (lambda p: p.startswith(real + os.sep)) if os.path.isdir(real) else (lambda p: p == real)
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                if line[0] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
                    fields = line.split(None, 5)
                    inside = len(fields) == 6 and mapped(fields[5].rstrip("\n"))
                elif inside and line.startswith("Rss:"):
                    total += int(line.split()[1]) * 1024
    except OSError:
        return None
    return total


def weight_memory(model: nn.Module, path: str) -> dict[str, int]:
    """gguf: bytes of GGUF blocks the layers use; gguf_repacked: of those, repacked copies in private memory;
    gguf_repacked_shared: repacked, mapped from the repack cache's file (populated at load); mapped_resident: of
    the GGUF's mapping, resident now; float: float parameters and buffers; packed: packed / lower-precision GEMM
    copies."""
    methods = {id(m.linear_method): m.linear_method for m in model.modules() if hasattr(m, "linear_method")}
    methods.update((id(x), x) for m in model.modules() if isinstance(m, Experts) for pair in m.methods or ()
                   for x in pair)
    gguf = sum(m.nbytes for m in methods.values() if isinstance(m, GGUFLinear))
    parts = [p for m in methods.values() if isinstance(m, GGUFLinear) for p in m.parts]
    repacked = sum(p.nbytes for p in parts if p.owned)
    shared = sum(p.nbytes for p in parts if p.qtype in REPACKED and not p.owned)    # mapped from the repack cache
    packed = sum(m.packed.numel() * m.packed.element_size() for m in methods.values() if hasattr(m, "packed"))
    tensors = [*model.parameters(), *model.buffers()]
    flt = sum(t.numel() * t.element_size() for t in tensors if not t.is_meta)
    resident = mapped_resident_bytes(path) if gguf else 0
    return {"gguf": gguf, "gguf_repacked": repacked, "gguf_repacked_shared": shared,
            "mapped_resident": resident or 0, "float": flt,
            "packed": packed}


def log_weight_memory(mem: dict[str, int]) -> None:
    logger.info("weights: %.2f GiB in the file's format (%.2f GiB of them repacked in memory, %.2f GiB repacked in "
                "the shared cache file; of the mapped GGUF %.2f GiB resident now), %.2f GiB float, %.2f GiB packed "
                "GEMM copies; process RSS %.2f GiB",
                mem["gguf"] / GiB, mem["gguf_repacked"] / GiB, mem["gguf_repacked_shared"] / GiB,
                mem["mapped_resident"] / GiB, mem["float"] / GiB, mem["packed"] / GiB,
                psutil.Process().memory_info().rss / GiB)


def kv_cache_budget(cache_config, mem: dict[str, int], block_bytes: int) -> tuple[int, str]:
    """CPU: bytes for the KV pool and how they were chosen. --kv-cache-memory is taken as given (an error when it
    exceeds the available memory); by default, a fraction (--cache-max-entry-count, 0.1) of the memory still
    available once the weights' mapped pages not yet resident are counted as used."""
    avail = psutil.virtual_memory().available
    # pages of the file the model will still read (repacked copies are resident already)
    pending = max(0, mem["gguf"] - mem.get("gguf_repacked", 0) - mem.get("gguf_repacked_shared", 0)
                  - mem["mapped_resident"])
    if cache_config.kv_cache_memory is not None:
        if cache_config.kv_cache_memory > avail:
            raise MemoryError(f"--kv-cache-memory {cache_config.kv_cache_memory / GiB:.2f} GiB is more than the "
                              f"{avail / GiB:.2f} GiB of memory available")
        return cache_config.kv_cache_memory, "--kv-cache-memory"
    fraction = cache_config.cache_max_entry_count or 0.1
    free = max(0, avail - pending)
    budget = int(free * fraction)
    if budget < 2 * block_bytes:
        raise MemoryError(f"not enough memory for the KV cache: {avail / GiB:.2f} GiB available, "
                          f"{pending / GiB:.2f} GiB of it needed for the weights' pages, x {fraction} = "
                          f"{budget / 2**20:.1f} MiB < 2 blocks of {block_bytes / 2**20:.2f} MiB; "
                          "set --kv-cache-memory or --cache-block-count, or lower --session-len")
    return budget, (f"{fraction} x {free / GiB:.2f} GiB free after the weights (--cache-max-entry-count; "
                    "--kv-cache-memory sets bytes)")


def memory_stats(runner) -> dict[str, int]:
    """Bytes by kind for /metrics (the mapped pages' residency is read now: it grows as the model reads them)."""
    mem = getattr(runner, "weight_memory", None)
    if mem is None:                 # an encoder runner: float weights only
        return {"process_rss": psutil.Process().memory_info().rss}
    kv = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in runner.kv_caches)
    return {"weights_gguf": mem["gguf"], "weights_gguf_repacked": mem["gguf_repacked"],
            "weights_gguf_repacked_shared": mem["gguf_repacked_shared"],
            "weights_gguf_resident": mapped_resident_bytes(runner.model_path) or 0 if mem["gguf"] else 0,
            "weights_float": mem["float"], "weights_packed": mem["packed"], "kv_cache": kv,
            "process_rss": psutil.Process().memory_info().rss}
