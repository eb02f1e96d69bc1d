"""A bfloat16 safetensors checkpoint served in place (default) vs as float32 (--weights float): memory and speed of
the same weights, same client, alternating rounds (issue 20: 16-bit checkpoints load as 16-bit).

    python benchmarks/checkpoint_16bit.py --gguf /path/llama-3.2-1b-bf16.gguf --hf-dir /tmp/llama1b-bf16-hf

The HF directory is exported from the GGUF once (lmserve.hf_export, bfloat16) when it does not exist, so both
runs serve the same weights; llama.cpp has no safetensors loader, so its figures for the GGUF are in real_size.py.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from types import SimpleNamespace

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import real_size  # noqa: E402
import server_probe  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", required=True, help="a BF16 GGUF to export the checkpoint from")
    ap.add_argument("--hf-dir", required=True)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out-dir", default="/tmp/checkpoint_16bit")
    cli = ap.parse_args()
    if not os.path.isdir(cli.hf_dir):
        import torch

        from lmserve.hf_export import export_hf
        export_hf(cli.gguf, cli.hf_dir, torch.bfloat16)
    os.makedirs(cli.out_dir, exist_ok=True)
    args = SimpleNamespace(lmserve_repo=real_size.REPO, max_rss_gib=14.0, startup_s=900.0, min_free_gib=1.5,
                           out_dir=cli.out_dir, c1_prompts=3, c1_output=64, pp_prompts=1, c16_prompts=0)
    rows = []
    for rnd in range(cli.rounds):
        modes = [("in place", []), ("float32", ["--weights", "float"])]
        for label, extra in modes if rnd % 2 == 0 else modes[::-1]:
            port = server_probe.free_port()
            cmd, env = real_size.lmserve_command(real_size.REPO, cli.hf_dir, port, extra)
            row = real_size.measure_server("lmserve", cmd, env, port, cli.hf_dir, args,
                                           os.path.join(cli.out_dir, f"{label.replace(' ', '_')}.log"))
            row.update(mode=label, round=rnd)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "command"}), flush=True)
    with open(os.path.join(cli.out_dir, "checkpoint_16bit.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
