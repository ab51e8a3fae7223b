"""Named configuration presets: the JSON files in the repository's `configuration/` folder."""

from __future__ import annotations

import json
from pathlib import Path

from .configuration_moe import MoeConfig

PRESET_DIR = Path(__file__).resolve().parent.parent / "configuration"


def preset_names() -> list[str]:
    """Names of the presets shipped in `configuration/` (file names without `.json`)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_preset(name_or_path: str | Path, **overrides) -> MoeConfig:
    """Build a `MoeConfig` from a preset name (see `preset_names()`) or a path to a JSON file.

    Args:
        name_or_path: "tiny-mixtral", "mixtral-8x7b", ... or a path to a config JSON.
        overrides: fields to set on top of the preset, validated like any other.
    Returns:
        The validated `MoeConfig`.
    Raises:
        FileNotFoundError: unknown preset name or missing file (the message lists the known presets).
        ValueError: the file is not JSON or not a JSON object (the message names the file), or a field is invalid
            or misspelt (`MoeConfigError`).
    """
    path = Path(name_or_path)
    if not path.suffix == ".json":
        path = PRESET_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no preset or config file {str(name_or_path)!r}; known presets: {preset_names()}")
    try:
        values = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a JSON object of MoeConfig fields, got {type(values).__name__}")
    values.pop("model_type", None)
    values.pop("_comment", None)
    return MoeConfig(**{**values, **overrides})


__all__ = ["PRESET_DIR", "load_preset", "preset_names"]
