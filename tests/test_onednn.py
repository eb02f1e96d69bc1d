"""The packed GEMM path runs on oneDNN's best kernel for the CPU: AMX tiles where the CPU has AMX-BF16."""
import pytest
import torch

from lmserve.config import cpu_bf16_feature
from lmserve.ops.onednn import packed_gemm_implementation, parse_verbose, uses_amx

LOG = """onednn_verbose,v1,info,cpu,isa:Intel AVX-512 with Intel AMX
onednn_verbose,v1,primitive,exec,cpu,reorder,jit:uni,undef,src:bf16::blocked:ab::f0 dst:bf16,,1536x576,11.1
onednn_verbose,v1,primitive,exec,cpu,inner_product,brg_matmul:avx512_core_amx,forward_inference,src:bf16,,mb64,0.6
"""


def test_parse_verbose():
    assert parse_verbose(LOG) == [("reorder", "jit:uni"), ("inner_product", "brg_matmul:avx512_core_amx")]
    assert uses_amx("brg_matmul:avx512_core_amx") and not uses_amx("brg_matmul:avx512_core_bf16")
    assert not uses_amx(None)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch build")
def test_float32_packed_gemm_is_onednn_brgemm():
    impl = packed_gemm_implementation(torch.float32)
    assert impl is not None and impl.startswith("brg"), impl


@pytest.mark.skipif(cpu_bf16_feature() is None, reason="the CPU has no native bf16")
def test_bf16_packed_gemm_uses_the_cpus_bf16_unit():
    impl = packed_gemm_implementation(torch.bfloat16)
    assert impl is not None, "bf16 weights were not packed for oneDNN"
    if cpu_bf16_feature() == "amx_bf16":
        assert uses_amx(impl), f"CPU has AMX-BF16 but oneDNN ran {impl}"
    else:
        assert "bf16" in impl, f"CPU has AVX512_BF16 but oneDNN ran {impl}"
