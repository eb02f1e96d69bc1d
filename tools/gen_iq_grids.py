"""Writes the C++ tables of the i-quant grids, csrc/cpu/gguf_iq1_grids.h, gguf_iq2_grids.h and gguf_iq3_grids.h,
from gguf-py's grids (lmserve/ops/gguf_iq.py grid / ksigns): data, generated once and committed;
tests/test_gguf_kernels.py checks the committed files equal what this writes.

    python tools/gen_iq_grids.py [lmserve/csrc/cpu]
"""
from __future__ import annotations

import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from lmserve.ops.gguf_iq import grid, ksigns  # noqa: E402

# file -> the grids it holds (type, values per entry); kIQ2Signs (the sign codes of IQ2_XXS / IQ2_XS / IQ3_XXS)
# goes with the IQ2 grids
FILES = {"gguf_iq1_grids.h": [("IQ1_S", 8)],
         "gguf_iq2_grids.h": [("IQ2_XXS", 8), ("IQ2_XS", 8), ("IQ2_S", 8)],
         "gguf_iq3_grids.h": [("IQ3_XXS", 4), ("IQ3_S", 4)]}


def header(name: str) -> str:
    """One file's text: each grid entry's int8 values packed little-endian into one integer."""
    packing = ("its 8 values -1, 0, 1 as 2-bit codes 0, 1, 2, value j in bits 2j, 2j + 1"
               if name == "gguf_iq1_grids.h" else "its int8 magnitudes packed little-endian")
    out = [f"// The i-quant grids of {', '.join(t for t, _ in FILES[name])} (gguf-py's, as llama.cpp ships them): "
           "entry i", f"// holds {packing}.", "// Written by tools/gen_iq_grids.py; do not edit.", "#pragma once",
           "#include <cstdint>", "", "namespace gguf {", ""]
    if name == "gguf_iq1_grids.h":    # 4 KB instead of 16 (gguf_blocks.h expands it when compiling)
        codes = (grid("IQ1_S").numpy().astype(np.int64) + 1) << (2 * np.arange(8))
        words = codes.sum(-1)
        out.append(f"alignas(64) inline constexpr uint16_t kIQ1SPacked[{len(words)}] = {{")
        for i in range(0, len(words), 12):
            out.append("    " + ", ".join(f"0x{int(v):04x}" for v in words[i:i + 12]) + ",")
        out += ["};", "", "}  // namespace gguf", ""]
        return "\n".join(out)
    for qtype, width in FILES[name]:
        words = grid(qtype).numpy().view(np.uint8).reshape(-1, width).view(
            np.uint64 if width == 8 else np.uint32).reshape(-1)
        ctype, digits, per = ("uint64_t", 16, 5) if width == 8 else ("uint32_t", 8, 9)
        out.append(f"alignas(64) inline constexpr {ctype} k{qtype.replace('_', '')}Grid[{len(words)}] = {{")
        for i in range(0, len(words), per):
            out.append("    " + ", ".join(f"0x{int(v):0{digits}x}" for v in words[i:i + per]) + ",")
        out.append("};")
    if name == "gguf_iq2_grids.h":
        out += ["// 7 sign bits -> 8, the eighth making the count of set bits even (IQ2_XXS, IQ2_XS, IQ3_XXS)",
                "inline constexpr uint8_t kIQ2Signs[128] = {"]
        signs = ksigns().numpy()
        for i in range(0, 128, 16):
            out.append("    " + ", ".join(f"0x{int(v):02x}" for v in signs[i:i + 16]) + ",")
        out.append("};")
    out += ["", "}  // namespace gguf", ""]
    return "\n".join(out)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    directory = argv[0] if argv else os.path.join(ROOT, "lmserve", "csrc", "cpu")
    for name in FILES:
        with open(os.path.join(directory, name), "w") as f:
            f.write(header(name))


if __name__ == "__main__":
    main()
