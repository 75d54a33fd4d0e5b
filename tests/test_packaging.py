"""The installed import names: pact, pact.kernels, pact.cache_tools, and nothing top-level that shadows `kernels`."""

import subprocess
import sys


def test_installed_packages_do_not_shadow_kernels(tmp_path):
    """Outside the source tree, `kernels` and `cache_tools` are not importable, the pact.* names are."""
    code = (
        "import importlib.util as u, pact.kernels, pact.cache_tools;"
        "print(u.find_spec('kernels') is None, u.find_spec('cache_tools') is None,"
        " pact.kernels.__name__, pact.cache_tools.__name__)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["True", "True", "pact.kernels", "pact.cache_tools"]


def test_console_scripts_are_installed():
    """`pact` and `pact-cache` entry points resolve to the package's CLIs."""
    from importlib.metadata import entry_points

    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts") if ep.name in ("pact", "pact-cache")}
    assert scripts == {"pact": "pact.cli:main", "pact-cache": "pact.cache_tools.cli:main"}
