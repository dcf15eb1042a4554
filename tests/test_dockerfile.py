"""Static checks on the Dockerfile: no Docker engine is needed, so CI catches image regressions anyway."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG_PATH = "/etc/bgproxy/bgproxy.yaml"
SLIM_PYTHON = re.compile(
    r"^(?:docker\.io/)?(?:library/)?python:(?P<major>\d+)\.(?P<minor>\d+)(?:\.\d+)?-slim(?:-[a-z]+)?"
    r"(?:@sha256:[0-9a-f]{64})?$"
)


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Join continuations and drop comments as the Docker frontend does, so checks see whole instructions."""
    instructions: list[Instruction] = []
    parts: list[str] = []
    start = 0
    for lineno, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        # Comment lines vanish even in the middle of a continued instruction; blank ones too.
        if not stripped or stripped.startswith("#"):
            continue
        if not parts:
            start = lineno
        body = raw.rstrip()
        if body.endswith("\\"):
            parts.append(body[:-1].strip())
            continue
        parts.append(stripped)
        keyword, _, args = " ".join(p for p in parts if p).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        parts = []
    assert not parts, "Dockerfile ends inside a line continuation"
    return instructions


def split_stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    """Group instructions by build stage: each FROM opens one."""
    stages: list[list[Instruction]] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            stages.append([])
        assert stages, f"line {ins.line}: {ins.keyword} before the first FROM"
        stages[-1].append(ins)
    return stages


def words(args: str) -> list[str]:
    """Exec form (JSON array) or shell-style words."""
    if args.startswith("["):
        value = json.loads(args)
        assert isinstance(value, list)
        return [str(v) for v in value]
    return shlex.split(args)


def split_flags(args: str) -> tuple[dict[str, str], str]:
    """Split leading --flag=value options (COPY --from, HEALTHCHECK --interval) from the rest."""
    flags: dict[str, str] = {}
    rest = args
    while rest.startswith("--"):
        flag, _, rest = rest.partition(" ")
        name, _, value = flag[2:].partition("=")
        flags[name] = value
        rest = rest.lstrip()
    return flags, rest


def flags_and_operands(args: str) -> tuple[dict[str, str], list[str]]:
    flags, rest = split_flags(args)
    return flags, words(rest)


def env_pairs(args: str) -> dict[str, str]:
    """ENV in both the key=value form and the legacy `ENV key value` form."""
    tokens = shlex.split(args)
    if tokens and "=" not in tokens[0]:
        return {tokens[0]: " ".join(tokens[1:])}
    return dict(token.split("=", 1) for token in tokens)


def of(stage: list[Instruction], keyword: str) -> list[Instruction]:
    return [ins for ins in stage if ins.keyword == keyword]


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse_dockerfile((ROOT / "Dockerfile").read_text())


@pytest.fixture(scope="module")
def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    return split_stages(instructions)


@pytest.fixture(scope="module")
def final(stages: list[list[Instruction]]) -> list[Instruction]:
    return stages[-1]


def test_parser_joins_continuations_and_skips_comments() -> None:
    text = 'FROM python:3.12-slim\n# note\nRUN a \\\n    # inside\n\n    && b\nCMD ["x", \\\n "y"]\n'
    parsed = parse_dockerfile(text)
    assert [(i.keyword, i.args, i.line) for i in parsed] == [
        ("FROM", "python:3.12-slim", 1),
        ("RUN", "a && b", 3),
        ("CMD", '["x", "y"]', 7),
    ]


def test_every_base_is_slim_python_with_explicit_tag_at_least_3_11(stages: list[list[Instruction]]) -> None:
    aliases: set[str] = set()
    for stage in stages:
        _, operands = flags_and_operands(stage[0].args)
        image = operands[0]
        if image.lower() in aliases:
            continue
        match = SLIM_PYTHON.match(image)
        assert match, f"line {stage[0].line}: {image!r} is not a pinned python:X.Y-slim image"
        assert (int(match["major"]), int(match["minor"])) >= (3, 11), image
        if len(operands) == 3 and operands[1].upper() == "AS":
            aliases.add(operands[2].lower())


def test_no_latest_tags(instructions: list[Instruction]) -> None:
    for ins in instructions:
        if ins.keyword in {"FROM", "COPY"}:
            assert not re.search(r":latest\b", ins.args), f"line {ins.line}: floating :latest tag"


def test_no_remote_add(instructions: list[Instruction]) -> None:
    for ins in of(instructions, "ADD"):
        assert not re.search(r"\b(?:https?|git)://|git@", ins.args), f"line {ins.line}: ADD downloads"


def test_final_stage_runs_as_non_root(final: list[Instruction]) -> None:
    users = of(final, "USER")
    assert users, "final stage has no USER, so it runs as root"
    user = users[-1].args.split(":")[0].strip()
    assert user not in {"root", "0", ""}


def test_healthcheck_polls_admin_healthz_with_urllib(final: list[Instruction]) -> None:
    checks = of(final, "HEALTHCHECK")
    assert len(checks) == 1, "exactly one HEALTHCHECK in the final stage"
    flags, rest = split_flags(checks[0].args)
    kind, _, command_args = rest.partition(" ")
    assert kind.upper() == "CMD", "HEALTHCHECK NONE disables health checking"
    assert all(re.fullmatch(r"\d+(?:ms|s|m)", flags[k]) for k in ("interval", "timeout") if k in flags)
    command = " ".join(words(command_args.strip()))
    assert re.search(r"127\.0\.0\.1:9901/healthz\b", command)
    assert "urllib" in command
    assert not re.search(r"\b(?:curl|wget)\b", command), "slim images ship neither curl nor wget"


def test_exposes_proxy_and_admin_ports(final: list[Instruction]) -> None:
    ports = {p.split("/")[0] for ins in of(final, "EXPOSE") for p in ins.args.split()}
    assert {"8080", "9901"} <= ports


def test_default_config_is_copied_and_used(final: list[Instruction]) -> None:
    copies = [flags_and_operands(ins.args) for ins in of(final, "COPY")]
    assert any(operands[-1] == CONFIG_PATH and "from" not in flags for flags, operands in copies)
    cmds = of(final, "CMD")
    assert cmds and cmds[-1].args.startswith("["), "CMD must use the exec form"
    assert words(cmds[-1].args) == ["run", "--config", CONFIG_PATH]


def test_entrypoint_is_bgproxy_exec_form(final: list[Instruction]) -> None:
    entrypoints = of(final, "ENTRYPOINT")
    assert entrypoints, "no ENTRYPOINT"
    # Exec form so bgproxy is PID 1 and receives STOPSIGNAL directly, not via /bin/sh.
    assert entrypoints[-1].args.startswith("[")
    assert words(entrypoints[-1].args) == ["bgproxy"]


def test_stopsignal_is_sigterm(final: list[Instruction]) -> None:
    signals = of(final, "STOPSIGNAL")
    assert signals and signals[-1].args in {"SIGTERM", "15"}


def test_runtime_env(final: list[Instruction]) -> None:
    env: dict[str, str] = {}
    for ins in of(final, "ENV"):
        env.update(env_pairs(ins.args))
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"
    assert env.get("PYTHONUNBUFFERED") == "1"
    assert env.get("BGPROXY_LISTEN") == "0.0.0.0:8080", "the proxy must listen beyond the container's lo"


def test_pip_never_keeps_its_cache(instructions: list[Instruction]) -> None:
    for ins in of(instructions, "RUN"):
        for command in re.split(r"&&|;", ins.args):
            if re.search(r"\bpip3?\s+install\b", command):
                assert "--no-cache-dir" in command, f"line {ins.line}: {command.strip()}"


def test_no_secrets_baked_in(instructions: list[Instruction]) -> None:
    for ins in of(instructions, "ENV") + of(instructions, "ARG"):
        assert not re.search(r"(?i)token|secret|password|api_?key", ins.args), f"line {ins.line}"


def _dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip().rstrip("/") for line in lines if line.strip() and not line.startswith("#")]


def _ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore drops path or a directory above it (no `!` re-includes are used here)."""
    parts = path.rstrip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes for pattern in patterns)


def test_copy_sources_exist_and_reach_the_build_context(instructions: list[Instruction]) -> None:
    patterns = _dockerignore_patterns()
    sources = []
    for ins in of(instructions, "COPY"):
        flags, operands = flags_and_operands(ins.args)
        if "from" not in flags:
            sources += [(ins.line, src) for src in operands[:-1]]
    assert sources
    for line, src in sources:
        assert (ROOT / src).exists(), f"line {line}: COPY source {src} missing from the repo"
        assert not _ignored(src, patterns), f"line {line}: COPY source {src} is excluded by .dockerignore"


def test_dockerignore_keeps_venv_and_git_out() -> None:
    patterns = _dockerignore_patterns()
    for path in (".venv", ".git", ".venv/bin/python", ".git/HEAD"):
        assert _ignored(path, patterns), path
