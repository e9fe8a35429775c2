"""Writes the flat Hub code files (`trust_remote_code`) next to a saved model or processor.

transformers copies remote code by file name and only follows `from .sibling import X` imports, while this
package keeps each part in its own folder. The export copies every shipped module into the save folder flat and
rewrites its package-relative imports to sibling imports. This module itself is never shipped.
"""

import ast
import importlib.util
import json
import os
import re


# flat file name on the Hub -> module of the installed package that holds its source
REMOTE_CODE_MODULES = {
    "configuration_nextchat.py": "nextchat.configuration.configuration_nextchat",
    "modeling_nextchat.py": "nextchat.modeling_nextchat",
    "generation_nextchat.py": "nextchat.generation_nextchat",
    "loss_nextchat.py": "nextchat.loss_nextchat",
    "sam_nextchat.py": "nextchat.sam_nextchat",
    "geometry_nextchat.py": "nextchat.processing.geometry_nextchat",
    "image_processing_nextchat.py": "nextchat.processing.image_processing_nextchat",
    "text_nextchat.py": "nextchat.processing.text_nextchat",
    "postprocessing_nextchat.py": "nextchat.processing.postprocessing_nextchat",
    "drawing_nextchat.py": "nextchat.processing.drawing_nextchat",
    "processing_nextchat.py": "nextchat.processing.processing_nextchat",
    "pipeline_nextchat.py": "nextchat.pipeline_nextchat",
}

# shipped only where a folder's tokenizer is this class (transformers' own `register_for_auto_class` copies it when
# the tokenizer is saved); `refresh_folder` refreshes it there
TOKENIZER_CODE_MODULES = {"tokenization_nextchat.py": "nextchat.processing.tokenization_nextchat"}

PROCESSOR_AUTO_MAP = {"AutoProcessor": "processing_nextchat.NextChatProcessor"}
IMAGE_PROCESSOR_AUTO_MAP = {"AutoImageProcessor": "image_processing_nextchat.NextChatImageProcessor"}

_RELATIVE_IMPORT = re.compile(r"^(?P<indent>\s*)from\s+\.+(?:\w+\.)*(?P<module>\w+)\s+import\b", re.MULTILINE)


def flatten_imports(source: str) -> str:
    """`from .configuration.configuration_nextchat import X` / `from ..x import X` -> `from .<last name> import X`."""
    return _RELATIVE_IMPORT.sub(lambda m: f"{m['indent']}from .{m['module']} import", source)


def add_json_entries(json_path: str, key: str, entries: dict):
    """Adds `entries` to the dict under `key` of a saved JSON file (keeping the entries it has)."""
    with open(json_path, encoding="utf-8") as handle:
        content = json.load(handle)
    content[key] = {**content.get(key, {}), **entries}
    with open(json_path, "w", encoding="utf-8") as handle:
        json.dump(content, handle, indent=2, sort_keys=True)
        handle.write("\n")


def add_auto_map(json_path: str, entries: dict):
    """Adds `auto_map` entries to a saved JSON file."""
    add_json_entries(json_path, "auto_map", entries)


def add_custom_pipelines(json_path: str, entries: dict):
    """Adds `custom_pipelines` entries (transformers' custom-pipeline mechanism) to a saved config.json."""
    add_json_entries(json_path, "custom_pipelines", entries)


def add_processor_auto_map(save_directory: str):
    """`auto_map` entries of a saved processor folder: `AutoProcessor` in `processor_config.json`, and
    `AutoImageProcessor` wherever the image processor's settings were written (nested in `processor_config.json`,
    or `preprocessor_config.json`), because transformers loads a processor's image processor through
    `AutoImageProcessor`."""
    processor_path = os.path.join(save_directory, "processor_config.json")
    if os.path.isfile(processor_path):
        with open(processor_path, encoding="utf-8") as handle:
            content = json.load(handle)
        content["auto_map"] = {**content.get("auto_map", {}), **PROCESSOR_AUTO_MAP}
        nested = content.get("image_processor")
        if isinstance(nested, dict):
            nested["auto_map"] = {**nested.get("auto_map", {}), **IMAGE_PROCESSOR_AUTO_MAP}
        with open(processor_path, "w", encoding="utf-8") as handle:
            json.dump(content, handle, indent=2, sort_keys=True)
            handle.write("\n")
    image_path = os.path.join(save_directory, "preprocessor_config.json")
    if os.path.isfile(image_path):
        add_auto_map(image_path, {**IMAGE_PROCESSOR_AUTO_MAP, **PROCESSOR_AUTO_MAP})


def _source_path(module_name: str) -> str | None:
    spec = importlib.util.find_spec(module_name)
    return spec.origin if spec is not None else None


def write_remote_code(save_directory: str) -> list[str]:
    """Writes the flat remote-code files into `save_directory`; returns their names.

    Raises:
        RuntimeError: if a written file imports a sibling that is not shipped (it would fail on the Hub).
    """
    os.makedirs(save_directory, exist_ok=True)
    written = []
    for file_name, module_name in REMOTE_CODE_MODULES.items():
        path = _source_path(module_name)
        if path is None:
            continue
        with open(path, encoding="utf-8") as handle:
            source = flatten_imports(handle.read())
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and node.level:
                target = f"{node.module}.py"
                if node.level != 1 or target not in REMOTE_CODE_MODULES:
                    raise RuntimeError(f"{file_name} imports `{'.' * node.level}{node.module}`, which is not shipped")
        with open(os.path.join(save_directory, file_name), "w", encoding="utf-8") as handle:
            handle.write(source)
        written.append(file_name)
    return written


def refresh_folder(folder: str) -> list[str]:
    """Rewrites the remote code and the `auto_map` entries of an existing saved folder from the installed sources,
    exactly as `save_pretrained` writes them, without touching its weights or settings; returns the code files."""
    from .modeling_nextchat import MODEL_AUTO_MAP
    from .pipeline_nextchat import CUSTOM_PIPELINES

    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"`folder` {folder!r} has no config.json: not a saved NExT-Chat folder")
    written = write_remote_code(folder)
    tokenizer_config = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(tokenizer_config):
        with open(tokenizer_config, encoding="utf-8") as handle:
            auto_map = json.load(handle).get("auto_map") or {}
        names = auto_map.get("AutoTokenizer") if isinstance(auto_map, dict) else auto_map
        for file_name, module_name in TOKENIZER_CODE_MODULES.items():
            if any(isinstance(n, str) and n.split(".")[0] == file_name[:-3] for n in names or []):
                with open(_source_path(module_name), encoding="utf-8") as handle:
                    source = handle.read()
                with open(os.path.join(folder, file_name), "w", encoding="utf-8") as handle:
                    handle.write(source)
                written.append(file_name)
    add_auto_map(os.path.join(folder, "config.json"), MODEL_AUTO_MAP)
    add_custom_pipelines(os.path.join(folder, "config.json"), CUSTOM_PIPELINES)
    add_processor_auto_map(folder)
    return written


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(
        description="Refresh the remote code (trust_remote_code files and auto_map) of saved NExT-Chat folders from "
        "the installed nextchat, e.g. after upgrading it; weights and settings are left as they are."
    )
    parser.add_argument("folders", nargs="+", help="folders written by save_pretrained or nextchat-convert")
    args = parser.parse_args(argv)
    for folder in args.folders:
        print(f"{folder}: wrote {', '.join(refresh_folder(folder))}")


if __name__ == "__main__":
    main()
