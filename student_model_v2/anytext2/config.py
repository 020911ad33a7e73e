"""Model configuration in the original AnyText2 YAML schema.

The YAML files keep the upstream layout (``model.params.unet_config.params`` and so on) so users can
diff them against the released ``anytext_v2.0`` config. Only the keys this package interprets are read;
a key it does not know inside a section it does interpret is an error, because a silently ignored key
means the built model differs from what the user asked for.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent.parent
MODELS_YAML_DIR = REPO_ROOT / "models_yaml"
BUNDLED_TOKENIZER_DIR = MODELS_YAML_DIR / "clip_tokenizer"
BUNDLED_OCR_DICT = MODELS_YAML_DIR / "ocr_dicts" / "ppocr_keys_v1.txt"

# CLIP ViT-L/14 text tower, the text encoder of SD1.5 and of AnyText2.
CLIP_L_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "projection_dim": 768,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

_UNET_KEYS = {
    "image_size", "in_channels", "out_channels", "model_channels", "attention_resolutions",
    "num_res_blocks", "channel_mult", "num_heads", "use_spatial_transformer", "transformer_depth",
    "context_dim", "use_checkpoint", "legacy", "input_attnx", "mid_attnx", "output_attnx",
    "output_attnx_level", "dropout", "num_head_channels", "use_linear_in_transformer",
}
_CONTROL_KEYS = {
    "image_size", "in_channels", "model_channels", "glyph_channels", "glyph_scale",
    "position_channels", "attention_resolutions", "num_res_blocks", "channel_mult", "num_heads",
    "use_spatial_transformer", "transformer_depth", "context_dim", "use_checkpoint", "legacy",
    "fast_control", "dropout", "num_head_channels", "use_linear_in_transformer",
}
_DDCONFIG_KEYS = {
    "double_z", "z_channels", "resolution", "in_channels", "out_ch", "ch", "ch_mult",
    "num_res_blocks", "attn_resolutions", "dropout",
}
_EMBEDDING_KEYS = {
    "valid", "emb_type", "big_linear", "glyph_channels", "position_channels", "add_pos",
    "add_style_conv", "add_style_ocr", "style_ocr_trainable", "add_color", "color_big_linear",
    "enable_flag", "color_fourier_encode", "placeholder_string",
}


# (released AnyText2 value, upstream constructor default used when the key is absent) of every setting whose other
# values the model here does not implement: another value would be silently ignored, so it is refused.
_EMBEDDING_RELEASED: dict[str, tuple[Any, Any]] = {
    "emb_type": ("ocr", "ocr"),
    "big_linear": (False, False),
    "add_pos": (True, False),
    "add_style_conv": (False, False),
    "add_style_ocr": (True, False),
    "add_color": (True, False),
    "color_big_linear": (False, False),
    "color_fourier_encode": (False, False),
    "enable_flag": (False, True),
}
_COND_STAGE_RELEASED: dict[str, tuple[Any, Any]] = {
    "use_vision": (False, False),
    "img_concat_text": (False, False),
}


class ConfigError(ValueError):
    """A model YAML that this package cannot build faithfully."""


def _check_keys(section: dict[str, Any], allowed: set[str], where: str, path: Path) -> None:
    for key in section:
        if key not in allowed:
            hint = difflib.get_close_matches(key, sorted(allowed), n=1)
            suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ConfigError(f"{path}: unknown key '{key}' in {where}{suggestion}")


def _check_released(section: dict[str, Any], released: dict[str, tuple[Any, Any]], where: str, path: Path) -> None:
    """Refuse, naming the key, a setting whose value (or upstream default when absent) is not the released one."""
    for key, (value, default) in released.items():
        got = section.get(key, default)
        if got != value:
            state = f"{got!r}" if key in section else f"absent (upstream default {default!r})"
            raise ConfigError(f"{path}: {where}.{key} is {state}; only the released AnyText2 setting {key}: "
                              f"{value!r} is implemented (another value would be silently ignored)")


def _require(section: dict[str, Any], key: str, where: str, path: Path) -> Any:
    if key not in section:
        raise ConfigError(f"{path}: missing key '{key}' in {where}")
    return section[key]


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build the teacher, resolved from one YAML file."""

    path: Path
    unet: dict[str, Any]
    control: dict[str, Any]
    ddconfig: dict[str, Any]
    embed_dim: int
    embedding_manager: dict[str, Any]
    clip_version: str
    clip_text_config: dict[str, Any]
    tokenizer_dir: Path
    linear_start: float
    linear_end: float
    timesteps: int
    scale_factor: float
    only_mid_control: bool

    @property
    def latent_channels(self) -> int:
        return int(self.ddconfig["z_channels"])


def _resolve_clip(yaml_path: Path, version: str) -> tuple[dict[str, Any], Path]:
    """Find the CLIP text config and tokenizer for ``version``.

    Order: a user's local ``clip-vit-large-patch14`` folder named by the YAML (absolute, or relative to
    the YAML's folder or the working directory); then ``<yaml stem>.clip_config.json`` or
    ``clip_config.json`` beside the YAML (tiny configs); else the CLIP-L text config built in code.
    The bundled tokenizer serves whenever the folder has none, so the real checkpoint needs only the
    ``.ckpt`` file.
    """
    text_config = dict(CLIP_L_TEXT_CONFIG)
    tokenizer_dir = BUNDLED_TOKENIZER_DIR
    candidates = [Path(version)] if Path(version).is_absolute() else [yaml_path.parent / version, Path.cwd() / version]
    folder = next((c for c in candidates if c.is_dir()), None)
    sidecars = [yaml_path.with_name(yaml_path.stem + ".clip_config.json"), yaml_path.with_name("clip_config.json")]
    if folder is not None and (folder / "config.json").is_file():
        raw = json.loads((folder / "config.json").read_text())
        text_config.update(raw.get("text_config", raw))
    else:
        sidecar = next((s for s in sidecars if s.is_file()), None)
        if sidecar is not None:
            text_config.update(json.loads(sidecar.read_text()))
    if folder is not None and (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        tokenizer_dir = folder
    keep = set(CLIP_L_TEXT_CONFIG)
    return {k: v for k, v in text_config.items() if k in keep}, tokenizer_dir


def load_model_config(path: str | Path) -> ModelConfig:
    """Parse an AnyText2 model YAML (original schema) into a :class:`ModelConfig`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model config not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict) or "model" not in raw:
        raise ConfigError(f"{path}: expected a top-level 'model' section (AnyText2 schema)")
    params = _require(raw["model"], "params", "model", path)
    unet = dict(_require(_require(params, "unet_config", "model.params", path), "params", "unet_config", path))
    control = dict(_require(_require(params, "control_stage_config", "model.params", path), "params", "control_stage_config", path))
    first_stage = _require(_require(params, "first_stage_config", "model.params", path), "params", "first_stage_config", path)
    ddconfig = dict(_require(first_stage, "ddconfig", "first_stage_config.params", path))
    embedding = dict(_require(_require(params, "embedding_manager_config", "model.params", path), "params", "embedding_manager_config", path))
    cond_stage = _require(_require(params, "cond_stage_config", "model.params", path), "params", "cond_stage_config", path)
    _check_keys(unet, _UNET_KEYS, "unet_config.params", path)
    _check_keys(control, _CONTROL_KEYS, "control_stage_config.params", path)
    _check_keys(ddconfig, _DDCONFIG_KEYS, "first_stage_config.params.ddconfig", path)
    _check_keys(embedding, _EMBEDDING_KEYS, "embedding_manager_config.params", path)
    for name, section in (("unet_config", unet), ("control_stage_config", control)):
        if section.get("use_linear_in_transformer", False):
            raise ConfigError(f"{path}: {name}.params.use_linear_in_transformer=True is not an AnyText2 setting")
        if section.get("num_head_channels", -1) != -1:
            raise ConfigError(f"{path}: {name}.params.num_head_channels must be -1 (AnyText2 uses num_heads)")
    encoder_keys = ("model_channels", "channel_mult", "num_res_blocks", "attention_resolutions", "num_heads", "transformer_depth", "context_dim")
    for key in encoder_keys:
        if unet.get(key) != control.get(key):
            raise ConfigError(
                f"{path}: unet_config and control_stage_config must agree on '{key}' "
                f"({unet.get(key)} vs {control.get(key)}): ControlNet outputs pair with UNet skips"
            )
    if not control.get("fast_control", False):
        raise ConfigError(f"{path}: control_stage_config.params.fast_control must be true (the released AnyText2 setting)")
    if control.get("glyph_scale", 1) != 1:
        raise ConfigError(f"{path}: only glyph_scale 1 (the released AnyText2 setting) is supported")
    _check_released(embedding, _EMBEDDING_RELEASED, "embedding_manager_config.params", path)
    _check_released(cond_stage, _COND_STAGE_RELEASED, "cond_stage_config.params", path)
    clip_text_config, tokenizer_dir = _resolve_clip(path, str(cond_stage.get("version", "")))
    return ModelConfig(
        path=path,
        unet=unet,
        control=control,
        ddconfig=ddconfig,
        embed_dim=int(first_stage.get("embed_dim", 4)),
        embedding_manager=embedding,
        clip_version=str(cond_stage.get("version", "")),
        clip_text_config=clip_text_config,
        tokenizer_dir=tokenizer_dir,
        linear_start=float(params.get("linear_start", 0.00085)),
        linear_end=float(params.get("linear_end", 0.012)),
        timesteps=int(params.get("timesteps", 1000)),
        scale_factor=float(params.get("scale_factor", 0.18215)),
        only_mid_control=bool(params.get("only_mid_control", False)),
    )
