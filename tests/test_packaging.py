"""The installed import names: pact (with pact.cli), pact.kernels, pact.cache_tools, and nothing top-level that
shadows `kernels`."""

import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent
NOT_OURS = (
    "import importlib.util as u, pathlib, sys;"
    "spec = u.find_spec('kernels');"
    "print(spec is None or not pathlib.Path(spec.origin).resolve().is_relative_to(pathlib.Path(sys.argv[1])))"
)


def test_installed_packages_do_not_shadow_kernels(tmp_path):
    """Outside the source tree, `cache_tools` is not importable and `kernels`, if importable, is not ours (it is the hub's
    package, which transformers 5.25+ installs); the pact.* names are."""
    code = f"import pact.kernels, pact.cache_tools, importlib.util as u;{NOT_OURS};" \
           "print(u.find_spec('cache_tools') is None, pact.kernels.__name__, pact.cache_tools.__name__)"
    result = subprocess.run([sys.executable, "-c", code, str(ROOT)], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["True", "True", "pact.kernels", "pact.cache_tools"]


def test_checkout_root_does_not_shadow_kernels_once_pact_is_imported():
    """`python -m ...` started in the checkout's root (pytest, torchrun -m pact.cli) puts the root on sys.path, where the
    `kernels/` folder would hide the hub's `kernels` that transformers imports; importing pact takes the root off."""
    code = f"import pact;{NOT_OURS};import transformers.modeling_utils"
    result = subprocess.run([sys.executable, "-c", code, str(ROOT)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["True"]


def test_console_scripts_are_installed():
    """`pact` and `pact-cache` entry points resolve to the package's CLIs."""
    from importlib.metadata import entry_points

    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts") if ep.name in ("pact", "pact-cache")}
    assert scripts == {"pact": "pact.cli.main:main", "pact-cache": "pact.cli.cache:main"}


def test_every_package_folder_is_declared_for_the_wheel():
    """A wheel holds only the packages `[tool.setuptools] packages` names (an editable install, as CI's, sees every
    folder, so it cannot tell): each folder with an `__init__.py` under pact/, kernels/ and cache_tools/ must be named,
    as its import name through `package-dir`, and each name must be such a folder."""
    tomllib = pytest.importorskip("tomllib")
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {folder: name for name, folder in setuptools["package-dir"].items()}
    found = set()
    for top, name in folders.items():
        for init in sorted((ROOT / top).rglob("__init__.py")):
            relative = init.parent.relative_to(ROOT / top).parts
            if "__pycache__" not in relative:
                found.add(".".join((name, *relative)))
    assert found == set(setuptools["packages"])


def test_the_bitsandbytes_floor_is_the_qlora_extra():
    """The version `pact train --load-in-4bit` requires (and its install hint names) is the `qlora` extra's floor."""
    from pact.models.quantization import INSTALL, MIN_BITSANDBYTES

    tomllib = pytest.importorskip("tomllib")
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["qlora"]
    assert extra == [f"bitsandbytes>={MIN_BITSANDBYTES}"]
    assert INSTALL == f"pip install '{extra[0]}'"


def test_every_public_name_imports_from_the_package():
    """`from pact import ...` gives each public name (the issue's TRL user got an AttributeError): the ones a training
    script needs are there, each resolves from its module, and a misspelt one is an AttributeError naming it."""
    import pact

    assert {"PactTrainer", "PactTrainingArguments", "ObjectiveArguments", "load_model", "CacheReader", "build_cache",
            "plan"} <= set(pact.__all__)
    for name in pact.__all__:
        value = getattr(pact, name)
        assert getattr(value, "__name__", name) == name, name
    with pytest.raises(AttributeError, match="no attribute 'PactTrainr'"):
        pact.PactTrainr  # noqa: B018
