"""Golden check: rebuild a reference case's model with the init rule and compare every output.

Usage: ``python -m student_model_v2.anytext2.golden CASE_DIR [CASE_DIR ...]``

A case folder holds ``model.yaml`` (+ ``clip_config.json``), ``case.json`` (strings, scalars, the
tolerance rule) and ``tensors.safetensors`` (inputs ``in.*``, reference outputs ``out.*``), made with the
original AnyText2 code. Exit status 0 only if every compared tensor of every case is within tolerance.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from .checkpoint import build_random_teacher
from .model import AnyText2Model, TextInfo
from .text_encoder import split_chunks

RELATIVE_TOLERANCE = 1e-3


def _text_info(case: dict, tensors: dict[str, torch.Tensor]) -> TextInfo:
    lines = int(case["max_lines"])
    return TextInfo(
        glyphs=[tensors[f"in.glyphs.{j}"] for j in range(lines)],
        gly_line=[tensors[f"in.gly_line.{j}"] for j in range(lines)],
        positions=[tensors[f"in.positions.{j}"] for j in range(lines)],
        colors=[tensors[f"in.colors.{j}"] for j in range(lines)],
        font_hint=tensors["in.font_hint"],
        masked_x=tensors["in.masked_x"],
        n_lines=[int(n) for n in case["n_lines"]],
    )


@torch.no_grad()
def compute_outputs(model: AnyText2Model, case: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Run the reference call sequence of ``case.json`` on ``model``; return ``out.*`` names -> tensors."""
    outputs: dict[str, torch.Tensor] = {}
    encoder = model.cond_stage_model
    uncond_spec = case["uncond"]
    captions = {
        "cond": (case["img_captions"], case["text_captions"]),
        "uncond": (uncond_spec["img_captions"], uncond_spec["text_captions"]),
    }
    for kind, (images, texts) in captions.items():
        image_ids = encoder.tokenize_image_captions(images)
        outputs[f"out.tokens.{kind}.img"] = image_ids
        outputs[f"out.tokens.{kind}.img_chunks"] = torch.stack(split_chunks(image_ids))
        outputs[f"out.tokens.{kind}.txt"] = encoder.tokenize_text_captions(texts)

    info = _text_info(case, tensors)
    cond, _ = model.encode_conditions(info, *captions["cond"])
    uncond, _ = model.encode_conditions(info, *captions["uncond"])
    lines = cond.line_embeddings
    outputs.update({
        "out.cond.img_emb": cond.image_context, "out.cond.txt_emb": cond.text_context,
        "out.uncond.img_emb": uncond.image_context, "out.uncond.txt_emb": uncond.text_context,
        "out.em.line_emb": torch.cat(lines.per_sample), "out.em.glyph_proj": lines.glyph,
        "out.em.pos": lines.position, "out.em.style": lines.style, "out.em.color": lines.color,
        "out.ocr.gly_line_input": lines.glyph_ocr_input, "out.ocr.gly_line_neck": lines.glyph_neck,
        "out.ocr.style_input": lines.style_ocr_input, "out.ocr.style_neck": lines.style_neck,
    })
    order = [(i, j) for i, count in enumerate(info.n_lines) for j in range(count)]
    for crop, (i, j) in zip(lines.style_crops, order):
        outputs[f"out.style_crop.{i}.{j}"] = crop

    strength = float(case.get("strength", 1.0))
    attnx_scale = float(case.get("attnx_scale", 1.0))
    residuals = {}
    for kind, conditions in (("cond", cond), ("uncond", uncond)):
        residuals[kind], internals = model.control_residuals(conditions, strength, return_internals=True)
        for k, tensor in enumerate(residuals[kind]):
            outputs[f"out.control.{kind}.{k}"] = tensor
        if kind == "cond":
            outputs.update({
                "out.control.glyph_union": internals.glyph_union, "out.control.pos_sum": internals.pos_sum,
                "out.control.enc_glyph": internals.enc_glyph, "out.control.enc_pos": internals.enc_pos,
                "out.control.guided_hint": internals.guided_hint,
            })
    x_noisy = tensors["in.x_noisy"]
    for t in tensors["in.timesteps"].tolist():
        for kind, conditions in (("cond", cond), ("uncond", uncond)):
            outputs[f"out.eps.{kind}.t{t}"] = model.predict_eps(x_noisy, int(t), conditions, residuals[kind], attnx_scale)

    vae = model.first_stage_model
    image = tensors["in.vae.image"]
    outputs["out.vae.moments"] = vae.encode_moments(image)
    torch.manual_seed(int(case["vae_sample_seed"]))
    outputs["out.vae.z_sample"] = model.vae_encode(image, sample=True)
    outputs["out.vae.decoded"] = model.vae_decode(tensors["in.vae.latent"])
    return outputs


def compare(name: str, ours: torch.Tensor | None, ref: torch.Tensor) -> tuple[bool, str]:
    """Apply the case tolerance rule to one tensor; return (passed, report line)."""
    if ours is None:
        return False, f"{name:34s} MISSING (not produced by this implementation)"
    ours = ours.detach().cpu()
    if tuple(ours.shape) != tuple(ref.shape):
        return False, f"{name:34s} FAIL shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    if not ref.is_floating_point():
        equal = torch.equal(ours.to(ref.dtype), ref)
        return equal, f"{name:34s} {'ok  ' if equal else 'FAIL'} integer tensor, exact match {equal}"
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    error = float((ours.float() - ref.float()).abs().max()) if ref.numel() else 0.0
    passed = error <= RELATIVE_TOLERANCE * max(1e-6, scale) and bool(torch.isfinite(ours).all())
    return passed, f"{name:34s} {'ok  ' if passed else 'FAIL'} max_abs_err {error:.3e}  ref_scale {scale:.3e}"


def run_case(case_dir: Path) -> tuple[int, int]:
    """Check one case folder, printing one line per tensor; return (passed, failed)."""
    case = json.loads((case_dir / "case.json").read_text())
    tensors = load_file(str(case_dir / "tensors.safetensors"))
    model = build_random_teacher(case_dir / "model.yaml")
    outputs = compute_outputs(model, case, tensors)
    passed = failed = 0
    print(f"== case {case.get('name', case_dir.name)} ({case_dir})")
    for name in sorted(n for n in tensors if n.startswith("out.")):
        if not case["tensors"].get(name, {}).get("compare", True):
            continue
        ok, line = compare(name, outputs.get(name), tensors[name])
        print(line)
        passed += ok
        failed += not ok
    return passed, failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("case_dirs", nargs="+", type=Path, metavar="CASE_DIR")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    total_passed = total_failed = 0
    for case_dir in args.case_dirs:
        if not (case_dir / "case.json").is_file() or not (case_dir / "tensors.safetensors").is_file():
            print(f"== case {case_dir}: FAIL, no case.json / tensors.safetensors in this folder")
            total_failed += 1
            continue
        passed, failed = run_case(case_dir)
        total_passed += passed
        total_failed += failed
    print(f"golden: {total_passed} passed, {total_failed} failed")
    return 0 if total_failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
