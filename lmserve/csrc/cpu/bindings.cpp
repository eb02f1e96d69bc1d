// Python bindings of the CPU kernel library.
// NOTE: torch's pybind11 glue (the Tensor type caster), not <torch/extension.h>, whose C++ frontend alone takes ~28 s
// to parse: the first start compiles this library
#include <torch/csrc/utils/pybind.h>
#include "ops.h"
#include "decoder.h"

// NOTE: the GIL is released inside every kernel so the server's event loop (another thread of this process)
// can run while the engine thread computes.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("paged_decode_attention", &paged_decode_attention, nogil);
  m.def("causal_prefill_attention", &causal_prefill_attention, nogil);
  m.def("rms_norm", &rms_norm, nogil);
  m.def("add_rms_norm", &add_rms_norm, nogil);
  m.def("rms_norm_heads", &rms_norm_heads, nogil);
  m.def("rope_write_kv", &rope_write_kv, nogil);
  m.def("silu_mul", &silu_mul, nogil);
  m.def("gguf_matmul", &gguf_matmul, nogil);
  m.def("gguf_matmul_parts", &gguf_matmul_parts, nogil);
  m.def("gguf_dequantize", &gguf_dequantize, nogil);
  m.def("gguf_repack", &gguf_repack, nogil);
  m.def("gguf_isa", &gguf_isa);
  m.def("gguf_bf16_dot", &gguf_bf16_dot);
  m.def("gguf_set_isa", &gguf_set_isa);
  m.def("gguf_set_vnni512", &gguf_set_vnni512);
  m.def("built_baseline", &built_baseline);
  py::class_<DecoderStack>(m, "DecoderStack")
      .def(py::init<int64_t, int64_t, int64_t, double, at::Tensor, int64_t>())
      .def("add_layer", &DecoderStack::add_layer)
      .def("set_moe", &DecoderStack::set_moe)
      .def("set_moe_shared", &DecoderStack::set_moe_shared)
      .def("forward", &DecoderStack::forward, nogil)
      .def_property_readonly("num_layers", &DecoderStack::num_layers);
  py::class_<MoeMlp, std::shared_ptr<MoeMlp>>(m, "MoeMlp")
      .def(py::init([](at::Tensor router, std::vector<std::vector<at::Tensor>> gate_up,
                       std::vector<std::vector<int64_t>> gate_up_types, std::vector<std::vector<at::Tensor>> down,
                       std::vector<std::vector<int64_t>> down_types, int64_t top_k, bool norm_topk, bool int8) {
        return std::make_shared<MoeMlp>(MoeMlp::make(std::move(router), std::move(gate_up), std::move(gate_up_types),
                                                     std::move(down), std::move(down_types), top_k, norm_topk, int8));
      }))
      .def("set_shared", &MoeMlp::set_shared)
      .def("forward", &MoeMlp::forward, nogil);
}
