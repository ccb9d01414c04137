"""The models file (default `serving/models.yaml`): which models and versions load, and which version of each
is the default. Read it, and change one model's default in place, keeping the file's comments and layout."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from serving.errors import ServeError
from serving.project import REPO

DEFAULT_MODELS_FILE = REPO / "serving" / "models.yaml"


@dataclass(frozen=True)
class ModelEntry:
    name: str
    variant: str
    versions: tuple[str, ...]
    default: str


def read_models(models_file: Path) -> list[ModelEntry]:
    document = yaml.safe_load(models_file.read_text()) or {}
    entries = []
    for name, spec in (document.get("models") or {}).items():
        versions = tuple(str(version) for version in spec.get("versions", []))
        default = str(spec.get("default", versions[-1] if versions else ""))
        if not versions or default not in versions:
            raise ServeError(f"{models_file}: model {name!r} needs 'versions' and a 'default' among them")
        entries.append(ModelEntry(name, str(spec["variant"]), versions, default))
    if not entries:
        raise ServeError(f"{models_file} declares no models")
    return entries


def write_default(models_file: Path, model: str, version: str) -> None:
    """Set `default:` of one model in place, keeping the file's comments and layout."""
    entry = next((e for e in read_models(models_file) if e.name == model), None)
    if entry is None or version not in entry.versions:
        raise ServeError(f"{models_file} declares no version {version} of {model}")
    lines = models_file.read_text().splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.strip() == f"{model}:")
    block_indent = " " * (len(lines[start]) - len(lines[start].lstrip()) + 1)
    for index in range(start + 1, len(lines)):
        if lines[index].strip().startswith("default:"):
            indent = lines[index][: len(lines[index]) - len(lines[index].lstrip())]
            lines[index] = f'{indent}default: "{version}"\n'
            break
        if lines[index].strip() and not lines[index].startswith(block_indent):  # left the model's block
            raise ServeError(f"{models_file}: {model} has no 'default:' line to change")
    models_file.write_text("".join(lines))
    if next(e for e in read_models(models_file) if e.name == model).default != version:
        raise ServeError(f"{models_file}: could not set the default of {model}")
