"""pyproject.toml, requirements.lock and environment.yml agree; the console script exists."""
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def lock(project_root) -> dict[str, str]:
    pins = {}
    for line in (project_root / "requirements.lock").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"requirements.lock: {line!r} is not pinned with =="
            pins[canonicalize_name(name)] = version
    return pins


def project(project_root) -> dict:
    return tomllib.loads((project_root / "pyproject.toml").read_text())["project"]


def test_every_dependency_is_pinned_within_its_range(project_root):
    pins = lock(project_root)
    meta = project(project_root)
    reqs = [Requirement(r) for r in meta["dependencies"]]
    reqs += [Requirement(r) for extra in meta["optional-dependencies"].values() for r in extra]
    for req in reqs:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is in pyproject.toml but not pinned in requirements.lock"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"requirements.lock pins {req.name}=={pins[name]}, outside pyproject's {req.specifier}"


def test_core_packages_of_the_design_are_dependencies(project_root):
    names = {canonicalize_name(Requirement(r).name) for r in project(project_root)["dependencies"]}
    names |= {canonicalize_name(Requirement(r).name) for e in project(project_root)["optional-dependencies"].values() for r in e}
    core = ["torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "ipywidgets", "jupytext",
            "papermill", "fugashi", "unidic-lite", "pycocoevalcap", "seaborn"]
    assert not [c for c in core if canonicalize_name(c) not in names]


def test_environment_yml_installs_the_lock_and_the_package(project_root):
    env = yaml.safe_load((project_root / "environment.yml").read_text())
    deps = env["dependencies"]
    assert "python=3.11" in deps
    pip_section = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    assert "-r requirements.lock" in pip_section
    assert "-e ." in pip_section


def test_console_script(project_root):
    assert project(project_root)["scripts"]["jpcap"] == "jpcap_helpers.cli:main"
