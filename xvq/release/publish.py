"""What Hugging Face and ModelScope read from a release folder, and the commands that upload it.
xvq never uploads by itself: the user runs the printed commands with their own account."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

ORG = "<your-org>"


def modelscope_configuration(remote_code: bool) -> dict:
    """ModelScope's configuration.json: framework and task (its model page and pipeline read them);
    allow_remote where loading needs the folder's own modeling file."""
    cfg = {"framework": "pytorch", "task": "text-generation"}
    if remote_code:
        cfg["allow_remote"] = True
    return cfg


def write_hub_files(folder: Path) -> None:
    """configuration.json beside the card (README.md, whose front matter both hubs read)."""
    config = folder / "config.json"
    remote = config.is_file() and "auto_map" in json.loads(config.read_text(encoding="utf-8"))
    (folder / "configuration.json").write_text(json.dumps(modelscope_configuration(remote), indent=2) + "\n",
                                               encoding="utf-8")


def upload_commands(folder: Path, org: str = ORG) -> list[str]:
    repo, path = f"{org}/{folder.name}", shlex.quote(str(folder))
    return [f"hf upload {repo} {path} .",
            f"modelscope upload {repo} {path}"]


def release_folders(package: Path) -> list[Path]:
    return sorted(p for p in Path(package).iterdir() if p.is_dir() and (p / "README.md").is_file())
