"""The container images (docker/Dockerfile.cpu, docker/Dockerfile.cuda) without a Docker engine:
hadolint finds nothing, and a structural reading checks what the images promise: multi-stage,
pinned bases, a non-root numeric user, no ENTRYPOINT in the way of KFP's `sh -c`, no secrets in
ENV/ARG, and only the files the package build needs in the build context.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import tomllib
import zipfile

import pytest
from infra_tools import (
    DOCKER_DIR,
    REPO_ROOT,
    dockerfile_instructions,
    dockerfile_stages,
    find_venv_tool,
    parse_image,
    run,
)
from packaging.specifiers import SpecifierSet

from tgrl_lib.env import is_secret_key

DOCKERFILES = {"cpu": DOCKER_DIR / "Dockerfile.cpu", "cuda": DOCKER_DIR / "Dockerfile.cuda"}
# What the package build needs (pyproject's readme + packages) and the recipes shipped in the image.
BUILD_INPUTS = {"pyproject.toml", "README.md", "tgrl_lib/", "components/", "pipelines/", "configs/"}
UID = "10001"


@pytest.fixture(scope="module")
def hadolint():
    path = find_venv_tool("hadolint")
    assert path is not None, "hadolint not found: it comes with the dev extras (pip install -e '.[dev]')"
    return path


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_hadolint_reports_nothing(hadolint, flavour):
    result = run([hadolint, "--no-color", "--format", "json", DOCKERFILES[flavour]])
    findings = json.loads(result.stdout or "[]")
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)
    assert result.returncode == 0, result.stderr


def test_hadolint_flags_an_unpinned_base(hadolint, tmp_path):
    """Negative control: the linter run above would have caught a `latest` base and an unpinned pip."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\n")
    codes = {f["code"] for f in json.loads(run([hadolint, "--format", "json", bad]).stdout)}
    assert {"DL3007", "DL3013"} <= codes


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_multi_stage_runtime_copies_from_builder(flavour):
    stages = dockerfile_stages(DOCKERFILES[flavour])
    assert len(stages) >= 2, "expected a builder stage and a runtime stage"
    names = [s.name for s in stages]
    assert "builder" in names
    runtime = stages[-1]
    froms = [i.value for i in runtime.all("COPY") if i.value.startswith("--from=")]
    assert any(v.startswith("--from=builder ") for v in froms), "runtime stage takes nothing from the builder"


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_bases_pinned_to_a_release_tag(flavour):
    stages = dockerfile_stages(DOCKERFILES[flavour])
    names = {s.name for s in stages if s.name}
    for stage in stages:
        if stage.base in names:
            continue  # FROM an earlier stage
        assert "$" not in stage.base, f"{stage.base}: a base from a build arg cannot be checked"
        image = parse_image(stage.base)
        assert image is not None, f"{stage.base} is not an image reference"
        assert image["tag"], f"{stage.base}: no tag"
        assert image["tag"] != "latest" and "latest" not in image["tag"], f"{stage.base}: moving tag"
        assert re.search(r"\d+\.\d+\.\d+", image["tag"]), f"{stage.base}: tag names no exact version"


def test_cpu_base_pinned_by_digest_and_same_in_both_stages():
    """The venv copied from the builder links to the base's interpreter: both stages share one base."""
    stages = dockerfile_stages(DOCKERFILES["cpu"])
    bases = {s.base for s in stages}
    assert len(bases) == 1, bases
    image = parse_image(bases.pop())
    assert image["repo"] == "python" and image["tag"].startswith("3.11.") and "slim" in image["tag"]
    assert image["digest"] and re.fullmatch(r"sha256:[0-9a-f]{64}", image["digest"])


def test_cuda_base_is_a_vllm_release_matching_torch():
    stages = dockerfile_stages(DOCKERFILES["cuda"])
    for stage in stages:
        image = parse_image(stage.base)
        assert image["repo"] == "vllm/vllm-openai"
        assert re.fullmatch(r"v0\.(2[7-9]|30)\.\d+", image["tag"]), (
            f"{image['tag']}: only vLLM v0.27-v0.30 pin torch 2.13 without capping transformers below 5.23; "
            "update docker/Dockerfile.cuda's notes and this test together when pyproject moves"
        )


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_final_stage_runs_as_numeric_non_root_user(flavour):
    runtime = dockerfile_stages(DOCKERFILES[flavour])[-1]
    users = runtime.all("USER")
    assert users, "the final stage never sets USER: the image would run as root"
    user = users[-1].value
    # Numeric, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
    assert re.fullmatch(r"\d+(:\d+)?", user), f"USER {user} is not numeric"
    assert user.split(":")[0] == UID and all(part != "0" for part in user.split(":"))
    # Nothing after the last USER switches back to root.
    assert runtime.instructions.index(users[-1]) > max(
        runtime.instructions.index(i) for i in runtime.instructions if i.keyword == "RUN"
    )
    created = " ".join(i.value for i in runtime.all("RUN"))
    assert f"--uid {UID}" in created, "the user is not created in the final stage"


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_kfp_can_start_python_in_the_image(flavour):
    """KFP lightweight components run `sh -c ... python3 -m kfp.dsl.executor_main`: no ENTRYPOINT may
    wrap that (the CUDA base's `vllm serve` is cleared), and the launcher's staging dirs are writable."""
    runtime = dockerfile_stages(DOCKERFILES[flavour])[-1]
    entrypoints = [i.value for i in runtime.all("ENTRYPOINT")]
    assert entrypoints in ([], ["[]"]), entrypoints
    assert [json.loads(i.value) for i in runtime.all("CMD")] == [["tgrl", "--help"]]
    assert runtime.all("WORKDIR"), "no WORKDIR in the final stage"
    assert all(i.value.upper() == "NONE" for i in runtime.all("HEALTHCHECK"))
    run_text = " ".join(i.value for i in runtime.all("RUN"))
    for staging in ("/minio", "/s3", "/gcs"):
        assert staging in run_text and f"chown {UID}" in run_text, f"{staging} not prepared for uid {UID}"


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_no_secrets_in_env_or_arg(flavour):
    for ins in dockerfile_instructions(DOCKERFILES[flavour]):
        if ins.keyword not in ("ENV", "ARG"):
            continue
        for name, _, value in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)(=(\"[^\"]*\"|\S*))?", ins.value):
            assert not is_secret_key(name), f"line {ins.line}: {ins.keyword} {name} looks like a secret"
            assert not re.search(r"://[^/\s:@]+:[^@\s]+@", value), f"line {ins.line}: credentials in a URL"


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_copies_only_the_build_inputs(flavour):
    copied = set()
    for stage in dockerfile_stages(DOCKERFILES[flavour]):
        for ins in stage.all("COPY") + stage.all("ADD"):
            assert ins.keyword == "COPY", f"line {ins.line}: ADD fetches or unpacks; use COPY"
            words = ins.value.split()
            if any(w.startswith("--from=") for w in words):
                continue
            sources = [w for w in words if not w.startswith("--")][:-1]
            copied.update(sources)
    assert copied == BUILD_INPUTS, (copied - BUILD_INPUTS, BUILD_INPUTS - copied)
    for source in copied:
        assert (REPO_ROOT / source).exists(), f"{source} is copied but missing from the repository"


def test_build_inputs_cover_every_package_of_pyproject():
    """If pyproject gains a package directory, the images (and .dockerignore) must copy it too."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    setuptools = project["tool"]["setuptools"]
    dirs = {pkg.split(".")[0] + "/" for pkg in setuptools["packages"]}
    dirs |= {path.split("/")[0] + "/" for path in setuptools.get("package-dir", {}).values()}
    dirs.add(project["project"]["readme"])
    assert dirs <= BUILD_INPUTS, dirs - BUILD_INPUTS


def test_dockerignore_allows_exactly_the_build_inputs():
    lines = [
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    assert lines[0] == "*", "the context must start from deny-all"
    allowed = {line[1:] for line in lines if line.startswith("!")}
    assert allowed == BUILD_INPUTS
    assert {"**/__pycache__", "**/.env"} <= set(lines)


def test_cpu_torch_is_the_cpu_wheel_within_the_project_range():
    text = DOCKERFILES["cpu"].read_text()
    version = re.search(r"^ARG TORCH_VERSION=(\S+)$", text, re.M).group(1)
    index = re.search(r"^ARG TORCH_INDEX_URL=(\S+)$", text, re.M).group(1)
    assert index == "https://download.pytorch.org/whl/cpu"
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    torch_req = next(r for r in project["project"]["dependencies"] if r.startswith("torch"))
    assert version in SpecifierSet(torch_req.removeprefix("torch")), (version, torch_req)
    # The project install is constrained to the torch just installed, so pip cannot swap it.
    assert "--constraint /opt/venv/torch-constraint.txt ." in text


def test_cuda_install_keeps_the_base_torch_and_vllm():
    text = " ".join(i.value for i in dockerfile_instructions(DOCKERFILES["cuda"]) if i.keyword == "RUN")
    assert "[gpu]" in text
    assert "--constraint /etc/tgrl-base-constraints.txt" in text
    for pinned in ("'torch'", "'vllm'"):
        assert pinned in text, f"{pinned} missing from the base constraints"
    assert "grep -q '^torch==' /etc/tgrl-base-constraints.txt" in text


def test_package_builds_from_the_copied_files_alone(tmp_path):
    """Build the wheel the images install from exactly the files they copy (no network: the
    environment's setuptools), and check that every module of the source tree lands in it. An editable
    install hides a package missing from pyproject's list; the image's regular install does not."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    package_dir = project["tool"]["setuptools"].get("package-dir", {})
    where = {path: package.replace(".", "/") for package, path in package_dir.items()}  # components -> ...
    context = tmp_path / "context"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".env")
    expected = set()
    for source in sorted(BUILD_INPUTS - {"configs/"}):
        src = REPO_ROOT / source
        if src.is_dir():
            shutil.copytree(src, context / source, ignore=ignore)
            root = where.get(source.rstrip("/"), source.rstrip("/"))
            for path in (context / source).rglob("*"):
                if path.is_file():
                    expected.add(f"{root}/{path.relative_to(context / source).as_posix()}")
        else:
            context.mkdir(exist_ok=True)
            shutil.copy2(src, context / source)
    out = tmp_path / "wheel"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir", "-q"]
    result = run([*cmd, "--wheel-dir", out, context], timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = out.glob("tgrl-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "tgrl = tgrl_lib.cli:main" in archive.read(entry_points).decode()
    missing = sorted(expected - names)
    assert not missing, (
        f"{len(missing)} source files are not in the wheel (list their packages in pyproject.toml "
        f"[tool.setuptools] packages): {missing[:10]}"
    )
