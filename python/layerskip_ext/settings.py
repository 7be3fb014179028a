"""Tuned self-speculative settings stored with a model: `layerskip_settings.json`.

A Hugging Face directory keeps the file beside config.json; a GGUF file `m.gguf` keeps a sidecar
`m.gguf.layerskip_settings.json` next to it. `layerskip-ext tune` writes it; `load()` reads and checks it, and
`generate(strategy="self_speculative")` and the CLI use it when the caller gives no exit_layer /
num_speculations. The file:

    {"format": "layerskip_settings", "version": 1, "num_layers": 16,
     "exit_layer": 4, "num_speculations": 4, "draft_threshold": 0.3, "adaptive": true, "draft_vocab_size": 0,
     "measured": {...}}          # optional: what the tuner measured (free-form, not read back)

Any corrupt or mismatched file (not JSON, a wrong type, an exit layer beyond the model's depth, a file tuned
for a model of another depth) is rejected with a ValueError that names the file and the field.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field

from .errors import CheckpointError

FILE_NAME = "layerskip_settings.json"
FORMAT, VERSION = "layerskip_settings", 1


@dataclass(frozen=True)
class Settings:
    exit_layer: int
    num_speculations: int
    draft_threshold: float = 0.0
    adaptive: bool = False
    draft_vocab_size: int = 0  # K of the reduced draft head (0: the whole head)
    measured: dict = field(default_factory=dict)


KNOWN_FIELDS = {"format", "version", "num_layers", "exit_layer", "num_speculations", "draft_threshold", "adaptive",
                "draft_vocab_size", "measured"}


def settings_path(model_path: str) -> str:
    """Where the settings of the model at `model_path` (an HF directory or a .gguf file) live."""
    if os.path.isdir(model_path):
        return os.path.join(model_path, FILE_NAME)
    return model_path + "." + FILE_NAME


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_settings(raw, num_layers: int, path: str) -> Settings:
    """The Settings in a parsed JSON value, checked against a model of `num_layers` layers."""
    def bad(name: str, problem: str):
        return CheckpointError(f"{path}: field {name!r} {problem}", path=path, field=name)

    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(raw).__name__}", path=path)
    if raw.get("format") != FORMAT:
        raise bad("format", f"must be {FORMAT!r}, got {raw.get('format')!r}")
    if raw.get("version") != VERSION:
        raise bad("version", f"must be {VERSION}, got {raw.get('version')!r}")
    unknown = sorted(set(raw) - KNOWN_FIELDS)  # a misspelled "draft_treshold" was ignored, the threshold left at 0
    if unknown:
        raise bad(unknown[0], f"is not a settings field (known: {sorted(KNOWN_FIELDS)})")
    for name in ("num_layers", "exit_layer", "num_speculations"):
        if name not in raw:
            raise bad(name, "is missing")
        if not _is_int(raw[name]):
            raise bad(name, f"must be an integer, got {raw[name]!r}")
    if raw["num_layers"] != num_layers:
        raise bad("num_layers", f"is {raw['num_layers']}, but the model has {num_layers} layers (the settings were "
                                "tuned for another model)")
    if not 1 <= raw["exit_layer"] <= num_layers - 1:
        raise bad("exit_layer", f"must be in [1, {num_layers - 1}] for a model with {num_layers} layers, got "
                                f"{raw['exit_layer']}")
    if not 1 <= raw["num_speculations"] <= 1024:
        raise bad("num_speculations", f"must be in [1, 1024], got {raw['num_speculations']}")
    threshold = raw.get("draft_threshold", 0.0)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise bad("draft_threshold", f"must be a number in [0, 1], got {threshold!r}")
    adaptive = raw.get("adaptive", False)
    if not isinstance(adaptive, bool):
        raise bad("adaptive", f"must be true or false, got {adaptive!r}")
    k = raw.get("draft_vocab_size", 0)
    if not _is_int(k) or k < 0:
        raise bad("draft_vocab_size", f"must be an integer >= 0 (0: the whole head), got {k!r}")
    measured = raw.get("measured", {})
    if not isinstance(measured, dict):
        raise bad("measured", f"must be an object, got {type(measured).__name__}")
    return Settings(raw["exit_layer"], raw["num_speculations"], float(threshold), adaptive, k, measured)


def load_settings(model_path: str | None, num_layers: int) -> Settings | None:
    """The model's stored settings, None when it has none. Raises CheckpointError naming the file and field when
    the file is corrupt or does not fit the model."""
    if model_path is None:
        return None
    path = settings_path(model_path)
    raw = read_sidecar_json(path, "; delete it or rerun `layerskip-ext tune`")
    return None if raw is None else check_settings(raw, num_layers, path)


def read_sidecar_json(path: str, hint: str = ""):
    """The parsed JSON of a file stored beside a model (settings, draft vocabulary); None when there is none.
    CheckpointError naming the file when it is not valid JSON (`hint` says what to do about it)."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}){hint}", path=path) from None
    except RecursionError:  # nested deeper than the parser goes
        raise CheckpointError(f"{path}: not valid JSON (nested too deeply){hint}", path=path) from None


def save_settings(model_path: str, settings: Settings, num_layers: int) -> str:
    """Writes the settings beside the model (checked first); returns the file's path."""
    path = settings_path(model_path)
    raw = dict(format=FORMAT, version=VERSION, num_layers=num_layers, **asdict(settings))
    check_settings(raw, num_layers, path)
    text = json.dumps(raw, indent=2, allow_nan=False, default=_plain)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    os.replace(tmp, path)  # a reader never sees half a file
    return path


def _plain(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    raise TypeError(f"cannot store {type(x).__name__} in a settings file")
