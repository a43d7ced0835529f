#!/usr/bin/env python3
"""Checks that a LoRA written by cogvx loads in diffusers at its trained alpha.

    python scripts/check_lora_diffusers.py --model MODEL_DIR --lora pytorch_lora_weights.safetensors \
        [--cogvx-forward cogvx_forward.safetensors] [--rank R --alpha A] [--tol 1e-4]

1. `CogVideoXPipeline.from_pretrained(MODEL_DIR)` and `pipe.load_lora_weights(LORA)`.
2. The loaded adapter's PEFT config has the rank, alpha and target modules of the file's
   `lora_adapter_metadata` header (and `--rank`/`--alpha` when given); every LoRA layer's scaling is
   alpha / rank, and every `lora_A`/`lora_B` tensor of the file is in the transformer unchanged.
3. On a fixed input (the one in `--cogvx-forward`, else a seeded random one), the transformer's
   output with the loaded LoRA equals the output of a fresh transformer whose weights were merged
   by hand, W + alpha / r * B @ A (DoRA, `use_dora` in the header: m / ||V||_row * V with
   V = W + alpha / r * B @ A, the magnitude vectors loaded unchanged too), and differs clearly from
   the output without the LoRA.
4. With `--cogvx-forward` (written by `cargo run -p cogvx-bench --example lora_export`), it also
   equals cogvx's own forward with the same LoRA.

Prints one line per check and PASS or FAIL at the end; the exit status is 0 only on PASS.
"""
import argparse
import json
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel

ADAPTER = "cogvx"


def rel_l2(got, want):
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def header_metadata(path):
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if "lora_adapter_metadata" not in meta:
        return None
    raw = json.loads(meta["lora_adapter_metadata"])
    return {k[len("transformer."):]: v for k, v in raw.items() if k.startswith("transformer.")}


def forward(transformer, pipe, inputs):
    x, ctx, t = inputs
    rope = None
    if transformer.config.use_rotary_positional_embeddings:
        _, f, _, h, w = x.shape
        s = pipe.vae_scale_factor_spatial
        rope = pipe._prepare_rotary_positional_embeddings(h * s, w * s, f, x.device)
    ofs = None
    if transformer.config.ofs_embed_dim is not None:
        ofs = torch.full((x.shape[0],), 2.0)
    with torch.no_grad():
        return transformer(hidden_states=x, encoder_hidden_states=ctx, timestep=t, ofs=ofs,
                           image_rotary_emb=rope, return_dict=False)[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="diffusers CogVideoX model folder")
    ap.add_argument("--lora", required=True, help="pytorch_lora_weights.safetensors written by cogvx")
    ap.add_argument("--cogvx-forward", help="cogvx_forward.safetensors (inputs and cogvx's output with the LoRA)")
    ap.add_argument("--rank", type=int, help="expected LoRA rank")
    ap.add_argument("--alpha", type=float, help="expected LoRA alpha")
    ap.add_argument("--tol", type=float, default=1e-4, help="relative L2 bound for the output comparisons")
    a = ap.parse_args()

    failures = []

    def check(ok, what):
        print(("ok   " if ok else "FAIL ") + what)
        if not ok:
            failures.append(what)

    meta = header_metadata(a.lora)
    check(meta is not None, f"{a.lora} has `lora_adapter_metadata` in its header")
    if meta is None:
        print("FAIL")
        return 1
    rank, alpha = meta["r"], float(meta["lora_alpha"])
    targets = sorted(meta["target_modules"])
    use_dora = bool(meta.get("use_dora", False))
    print(f"     header: r={rank}, lora_alpha={alpha}, target_modules={targets}, use_dora={use_dora}")
    if a.rank is not None:
        check(rank == a.rank, f"header rank {rank} == expected {a.rank}")
    if a.alpha is not None:
        check(alpha == a.alpha, f"header alpha {alpha} == expected {a.alpha}")

    torch.manual_seed(0)
    pipe = CogVideoXPipeline.from_pretrained(a.model, torch_dtype=torch.float32)
    pipe.load_lora_weights(a.lora, adapter_name=ADAPTER)
    tr = pipe.transformer
    cfg = tr.peft_config[ADAPTER]
    check(cfg.r == rank, f"loaded adapter: peft r = {cfg.r} (header {rank})")
    check(float(cfg.lora_alpha) == alpha, f"loaded adapter: peft lora_alpha = {cfg.lora_alpha} (header {alpha})")
    check(sorted(cfg.target_modules) == targets, f"loaded adapter: target_modules = {sorted(cfg.target_modules)}")
    check(bool(cfg.use_dora) == use_dora, f"loaded adapter: use_dora = {cfg.use_dora} (header {use_dora})")

    file_tensors = {k[len("transformer."):]: v for k, v in load_file(a.lora).items()}
    pairs = sorted({k.rsplit(".lora_", 1)[0] for k in file_tensors})
    scale = alpha / rank
    bad_scaling, bad_values = [], []
    for layer in pairs:
        module = tr.get_submodule(layer)
        if abs(module.scaling[ADAPTER] - scale) > 1e-12:
            bad_scaling.append(f"{layer}: {module.scaling[ADAPTER]}")
        for ab in ("A", "B"):
            loaded = getattr(module, f"lora_{ab}")[ADAPTER].weight.detach()
            if not torch.equal(loaded, file_tensors[f"{layer}.lora_{ab}.weight"]):
                bad_values.append(f"{layer}.lora_{ab}")
        if use_dora:
            loaded = module.lora_magnitude_vector[ADAPTER].weight.detach()
            if not torch.equal(loaded, file_tensors[f"{layer}.lora_magnitude_vector"]):
                bad_values.append(f"{layer}.lora_magnitude_vector")
    check(not bad_scaling, f"{len(pairs)} LoRA layers scaled by alpha/r = {scale}" + (f" (wrong: {bad_scaling})" if bad_scaling else ""))
    check(not bad_values, "every lora_A/lora_B" + ("/lora_magnitude_vector" if use_dora else "") + " of the file is loaded unchanged" + (f" (differ: {bad_values})" if bad_values else ""))

    if a.cogvx_forward:
        dump = load_file(a.cogvx_forward)
        inputs = (dump["hidden_states"], dump["encoder_hidden_states"], dump["timestep"])
    else:
        c = tr.config
        g = torch.Generator().manual_seed(0)
        f = (c.sample_frames - 1) // c.temporal_compression_ratio + 1
        inputs = (torch.randn(1, f, c.in_channels, c.sample_height, c.sample_width, generator=g),
                  torch.randn(1, c.max_text_seq_length, c.text_embed_dim, generator=g), torch.tensor([500.0]))

    with_lora = forward(tr, pipe, inputs)

    def merge(model, s):
        """Merges the file's adapter into `model`'s weights at scale `s` = alpha / r."""
        with torch.no_grad():
            for layer in pairs:
                lin = model.get_submodule(layer)
                v = lin.weight + s * file_tensors[f"{layer}.lora_B.weight"] @ file_tensors[f"{layer}.lora_A.weight"]
                if use_dora:
                    m = file_tensors[f"{layer}.lora_magnitude_vector"]
                    v = m[:, None] * v / v.norm(dim=1, keepdim=True)
                lin.weight.copy_(v)

    # The same model merged by hand on a fresh copy of the base weights.
    merged = CogVideoXTransformer3DModel.from_pretrained(a.model, subfolder="transformer", torch_dtype=torch.float32)
    base_out = forward(merged, pipe, inputs)
    merge(merged, scale)
    by_hand = forward(merged, pipe, inputs)

    formula = f"m / |V| * V, V = W + {scale} * B @ A" if use_dora else f"W + {scale} * B @ A"
    err = rel_l2(with_lora, by_hand)
    check(err <= a.tol, f"diffusers + load_lora_weights vs merged by hand ({formula}): rel L2 {err:.2e} <= {a.tol:g}")
    effect = rel_l2(base_out, with_lora)
    check(effect > 100 * a.tol, f"the LoRA changes the output: rel L2 to the base model {effect:.2e}")
    if scale != 1.0:
        # What a loader that drops alpha (scale 1) would give: it must be distinguishable.
        merged_1 = CogVideoXTransformer3DModel.from_pretrained(a.model, subfolder="transformer", torch_dtype=torch.float32)
        merge(merged_1, 1.0)
        lost = rel_l2(with_lora, forward(merged_1, pipe, inputs))
        check(lost > 100 * a.tol, f"alpha matters: output at scale 1.0 differs by rel L2 {lost:.2e}")
    if a.cogvx_forward:
        err = rel_l2(with_lora, dump["sample"])
        check(err <= a.tol, f"diffusers + load_lora_weights vs cogvx forward with the same LoRA: rel L2 {err:.2e} <= {a.tol:g}")

    print("PASS" if not failures else f"FAIL ({len(failures)} check(s) failed)")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
