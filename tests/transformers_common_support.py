"""Fetches transformers' own common test mixins for the INSTALLED transformers version, at test time.

`load_common_tests()` downloads the transformers sdist with pip (`pip download --no-deps --no-binary :all:
transformers==<installed version>`), extracts `tests/test_modeling_common.py`, `tests/test_configuration_common.py` and
`tests/test_processing_common.py` into a cache folder (default `~/.cache/nextchat-tests/transformers-<version>/`,
override with `NEXTCHAT_TEST_CACHE`) and imports them from there as the package `_transformers_common_tests`. Nothing
of transformers' test code is kept in this repository.

The sdist ships the top-level `tests/test_*.py` files only, not the sibling modules they import. Where a sibling is
missing, a minimal stand-in is written next to the extracted files (never in the repository) and listed in
`STAND_INS` so that the test module can say what is not covered:

- `tests/generation/test_utils.py`: an empty `GenerationTesterMixin`: transformers' generation test mixin cannot be
  run (NExT-Chat's generation is covered by `tests/test_generation.py`).
- `tests/exporters/test_export.py`: an empty `ExportTesterMixin` (the `torch.export` tests are not run).
- `tests/utils/test_configuration_utils.py`: `config_common_kwargs = {}`; transformers reads it only in
  `check_config_arguments_init`, which returns early for composite configurations such as `NextChatConfig`.
- `utils/fetch_hub_objects_for_ci.py`: `url_to_local_path` as upstream's (the URL itself when no local copy
  exists), with local copies of the two test pictures the image tests fetch (`coco_sample.png`, `australia.jpg`),
  generated here since the Hub cannot be reached.

Any failure (no network, no pip, an import error) raises `CommonTestsUnavailable` with the reason.
"""

import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

import transformers


PACKAGE = "_transformers_common_tests"
COMMON_FILES = ("test_modeling_common.py", "test_configuration_common.py", "test_processing_common.py")

_EMPTY_GENERATION_MIXIN = '''"""Stand-in written by nextchat's tests: transformers' sdist does not ship tests/generation/test_utils.py."""


class GenerationTesterMixin:
    """Empty: transformers' generation test mixin is not available from the sdist."""

    STAND_IN = True
'''

_EMPTY_EXPORT_MIXIN = '''"""Stand-in written by nextchat's tests: transformers' sdist does not ship tests/exporters/test_export.py."""


class ExportTesterMixin:
    """Empty: transformers' torch.export test mixin is not available from the sdist."""

    STAND_IN = True
'''

_CONFIG_UTILS = '''"""Stand-in written by nextchat's tests: transformers' sdist does not ship tests/utils/test_configuration_utils.py.

`config_common_kwargs` is read only by `ConfigTester.check_config_arguments_init`, which returns before reading it for
composite configurations (those with `sub_configs`), such as `NextChatConfig`.
"""

config_common_kwargs = {}
'''

_FETCH_HUB_OBJECTS = '''"""Stand-in written by nextchat's tests for transformers' utils/fetch_hub_objects_for_ci.py (not in the sdist).

As upstream: the local copy of a test file when there is one (here: pictures generated next to this file, since the
Hub cannot be reached), else the URL itself.
"""

import os

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def url_to_local_path(url, return_url_if_not_found=True):
    path = os.path.join(FIXTURES, url.split("/")[-1])
    if not os.path.exists(path) and return_url_if_not_found:
        return url
    return path
'''

# relative path in the cache -> (path in the sdist, stand-in text when the sdist lacks it)
_SIBLINGS = {
    "tests/generation/test_utils.py": _EMPTY_GENERATION_MIXIN,
    "tests/exporters/test_export.py": _EMPTY_EXPORT_MIXIN,
    "tests/utils/test_configuration_utils.py": _CONFIG_UTILS,
    "utils/fetch_hub_objects_for_ci.py": _FETCH_HUB_OBJECTS,
}
_PACKAGES = ("tests", "tests/generation", "tests/exporters", "tests/utils")

STAND_INS: list[str] = []  # filled by load_common_tests(): the siblings that are our stand-ins


class CommonTestsUnavailable(RuntimeError):
    pass


def cache_dir() -> str:
    root = os.environ.get("NEXTCHAT_TEST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "nextchat-tests")
    return os.path.join(root, f"transformers-{transformers.__version__}")


def _write_fixtures(folder: str):
    """The two pictures of transformers' image tests, as deterministic generated images of their sizes."""
    import numpy as np
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, (height, width) in {"coco_sample.png": (480, 640), "australia.jpg": (480, 640)}.items():
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, name))


def _download_sdist(target: str) -> str:
    version = transformers.__version__
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check",
        "--timeout", "30", "--retries", "2", f"transformers=={version}", "-d", target,
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise CommonTestsUnavailable(f"`{' '.join(command)}` failed: {error}") from error
    sdists = [f for f in os.listdir(target) if f.startswith("transformers-") and f.endswith(".tar.gz")]
    if result.returncode or not sdists:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise CommonTestsUnavailable(
            f"could not download the sdist of transformers {version} (`{' '.join(command)}` exited "
            f"{result.returncode}): {' / '.join(tail)}"
        )
    return os.path.join(target, sdists[0])


def _extract(sdist: str, destination: str) -> list[str]:
    """Writes the common test files (and the siblings the sdist has, stand-ins for the others) under
    `destination`; returns the stand-ins written."""
    stand_ins = []
    with tarfile.open(sdist) as archive:
        members = {m.name.split("/", 1)[1]: m for m in archive.getmembers() if "/" in m.name and m.isfile()}
        wanted = [f"tests/{name}" for name in COMMON_FILES]
        missing = [name for name in wanted if name not in members]
        if missing:
            raise CommonTestsUnavailable(f"the transformers sdist {os.path.basename(sdist)} lacks {missing}")
        for name in wanted + [s for s in _SIBLINGS if s in members]:
            path = os.path.join(destination, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with archive.extractfile(members[name]) as source, open(path, "wb") as out:
                shutil.copyfileobj(source, out)
        for name, text in _SIBLINGS.items():
            if name not in members:
                path = os.path.join(destination, name)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w") as out:
                    out.write(text)
                stand_ins.append(name)
    for package in _PACKAGES:
        init = os.path.join(destination, package, "__init__.py")
        if not os.path.exists(init):
            open(init, "w").close()
    _write_fixtures(os.path.join(destination, "utils", "fixtures"))
    with open(os.path.join(destination, "STAND_INS"), "w") as out:
        out.write("".join(f"{name}\n" for name in stand_ins))
    return stand_ins


def prepare_cache() -> str:
    """The cache folder holding the extracted files, downloading and extracting them on first use."""
    folder = cache_dir()
    if os.path.exists(os.path.join(folder, "COMPLETE")):
        return folder
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    work = tempfile.mkdtemp(prefix=os.path.basename(folder) + ".", dir=os.path.dirname(folder))
    try:
        sdist = _download_sdist(os.path.join(work, "sdist"))
        _extract(sdist, os.path.join(work, "files"))
        open(os.path.join(work, "files", "COMPLETE"), "w").close()
        shutil.rmtree(folder, ignore_errors=True)
        try:
            os.replace(os.path.join(work, "files"), folder)
        except OSError:
            if not os.path.exists(os.path.join(folder, "COMPLETE")):  # not another process that was faster
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return folder


def load_common_tests():
    """`(test_modeling_common, test_configuration_common, test_processing_common)` modules of the installed
    transformers version; raises `CommonTestsUnavailable` with the reason when they cannot be had."""
    try:
        folder = prepare_cache()
    except CommonTestsUnavailable:
        raise
    except Exception as error:  # disk, tar or permission problems
        raise CommonTestsUnavailable(f"could not prepare transformers' common tests: {error!r}") from error
    with open(os.path.join(folder, "STAND_INS")) as f:
        STAND_INS[:] = [line.strip() for line in f if line.strip()]
    if PACKAGE not in sys.modules:
        init = os.path.join(folder, "tests", "__init__.py")
        spec = importlib.util.spec_from_file_location(PACKAGE, init, submodule_search_locations=[os.path.dirname(init)])
        package = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = package
        spec.loader.exec_module(package)
    modules = []
    for name in COMMON_FILES:
        try:
            modules.append(importlib.import_module(f"{PACKAGE}.{name[:-3]}"))
        except Exception as error:  # e.g. a test dependency (parameterized, ...) is not installed
            raise CommonTestsUnavailable(
                f"could not import transformers' tests/{name} from {folder}: {error!r} "
                "(install the test extra: pip install -e .[test])"
            ) from error
    return tuple(modules)
