"""The image's recipe without building it: the Dockerfile, kubernetes/build_and_push.sh and install.sh's own checks.

hadolint lints the Dockerfile and shellcheck the scripts; the Dockerfile is then read for what the image promises (a
Python >= 3.11 base, the example's environment, install.sh for both PyTriton sources, every file the server needs, a
numeric non-root user whose home holds the server's caches).
build_and_push.sh runs for real, from a copy of it in a scratch repository, with a stand-in `docker` on PATH that
records what it is asked to do. hadolint and shellcheck come from `./install.sh --test` (the venv's bin folder).
"""
from __future__ import annotations

import ast
import fnmatch
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from serving import tool

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
BUILD_AND_PUSH = ROOT / "kubernetes" / "build_and_push.sh"
INSTALL = ROOT / "install.sh"

# Ubuntu 24.04: apt's python3 is 3.12 and glibc is 2.39. The example's default ships Ubuntu 22.04 with Python 3.10,
# which jax 0.7.1 and flax 0.12.0 do not support.
BASE_IMAGE = "nvcr.io/nvidia/cuda:12.8.1-base-ubuntu24.04"
EXAMPLE_BASE_IMAGE = "nvcr.io/nvidia/tensorflow:24.10-tf2-py3"
IMAGE = "registry.example.com:5000/opt-jax:0.1"


# ------------------------------------------------------------------------------------------------------------------
# Reading the Dockerfile
# ------------------------------------------------------------------------------------------------------------------


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined and comments left out."""
    result: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, arguments = pending.strip().partition(" ")
        result.append((keyword.upper(), " ".join(arguments.split())))
        pending = ""
    assert not pending, f"the Dockerfile ends inside a continued line: {pending!r}"
    return result


def stages() -> dict[str, list[tuple[str, str]]]:
    """Each build stage's instructions after its FROM, by stage name ("" for the global ARGs before the first FROM,
    "final <image>" for an unnamed stage)."""
    result: dict[str, list[tuple[str, str]]] = {"": []}
    current = ""
    for keyword, arguments in instructions():
        if keyword == "FROM":
            words = arguments.split()
            current = words[2] if len(words) == 3 and words[1].upper() == "AS" else f"final {words[0]}"
            result[current] = []
        else:
            result[current].append((keyword, arguments))
    return result


def key_values(arguments: str) -> dict[str, str]:
    """ENV or ARG arguments (NAME=value ...) as a dict."""
    return dict(word.split("=", 1) for word in shlex.split(arguments))


def runs(stage: list[tuple[str, str]]) -> list[str]:
    return [arguments for keyword, arguments in stage if keyword == "RUN"]


def copied_sources() -> list[str]:
    """Every source path of every COPY, as written."""
    return [source for keyword, arguments in instructions() if keyword == "COPY"
            for source in arguments.split()[:-1] if not source.startswith("--")]


# ------------------------------------------------------------------------------------------------------------------
# Linters
# ------------------------------------------------------------------------------------------------------------------


def test_hadolint_reports_nothing_on_the_dockerfile() -> None:
    result = subprocess.run([tool("hadolint"), "--no-color", str(DOCKERFILE)], capture_output=True, text=True,
                            cwd=ROOT, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", ""), result.stdout + result.stderr


def test_hadolint_does_report_a_dockerfile_with_faults(tmp_path: Path) -> None:
    # So that silence above means a clean Dockerfile, not a linter that checks nothing.
    faulty = tmp_path / "Dockerfile"
    faulty.write_text("FROM ubuntu\nRUN apt-get update && apt-get install -y python3\n")
    result = subprocess.run([tool("hadolint"), "--no-color", str(faulty)], capture_output=True, text=True,
                            cwd=tmp_path, timeout=60)
    assert result.returncode != 0
    for rule in ("DL3006", "DL3008", "DL3009", "DL3015"):
        assert rule in result.stdout, result.stdout


@pytest.mark.parametrize("script", [INSTALL, BUILD_AND_PUSH], ids=lambda path: path.name)
def test_shell_script_passes_shellcheck(script: Path) -> None:
    result = subprocess.run([tool("shellcheck"), str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------------------------------------------------------
# What the Dockerfile promises
# ------------------------------------------------------------------------------------------------------------------


def test_default_base_image_is_ubuntu_24_04_with_python_3_12_not_the_examples_python_3_10() -> None:
    global_args = {name: value for keyword, arguments in stages()[""] if keyword == "ARG"
                   for name, value in key_values(arguments).items()}
    assert global_args["FROM_IMAGE_NAME"] == BASE_IMAGE
    assert global_args["FROM_IMAGE_NAME"] != EXAMPLE_BASE_IMAGE
    assert BASE_IMAGE.endswith("-ubuntu24.04")
    assert [arguments for keyword, arguments in instructions() if keyword == "FROM"][0] == "${FROM_IMAGE_NAME} AS base"
    # The CUDA base image has no Python: Ubuntu 24.04's python3 (3.12), its venv, and the libpython3.12.so.1.0 that
    # Triton's Python 3.12 backend stub links.
    apt_installs = [run for run in runs(stages()["base"]) if "apt-get install" in run]
    assert len(apt_installs) == 1, runs(stages()["base"])
    packages = set(apt_installs[0].split("apt-get install", 1)[1].split("&&")[0].split())
    assert {"python3", "python3-venv", "libpython3.12t64"} <= packages, packages


def test_image_environment_is_the_examples_with_the_venv_first_on_path() -> None:
    env = {name: value for keyword, arguments in stages()["base"] if keyword == "ENV"
           for name, value in key_values(arguments).items()}
    assert env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert env["NCCL_LAUNCH_MODE"] == "PARALLEL"
    # pip may not install into Ubuntu's python3 (PEP 668): install.sh --system installs into the venv made from it.
    assert env["PATH"].split(":")[0] == "/opt/venv/bin"
    assert any("python3 -m venv /opt/venv" in run for run in runs(stages()["base"]))


def test_pypi_and_dist_builds_both_install_with_install_sh_cuda_system() -> None:
    build_from = [key_values(arguments)["BUILD_FROM"] for keyword, arguments in stages()[""]
                  if keyword == "ARG" and arguments.startswith("BUILD_FROM=")]
    assert build_from == ["pypi"]
    assert "final pytriton-from-${BUILD_FROM}" in stages()
    assert runs(stages()["pytriton-from-pypi"]) == ["./install.sh --cuda --system"]
    dist = stages()["pytriton-from-dist"]
    assert ("COPY", "dist/ dist/") in dist
    assert runs(dist) == ["PYTRITON_WHEEL=\"$(find dist -name '*.whl')\" ./install.sh --cuda --system"]


def our_imports_from(start: str) -> set[str]:
    """`start` and every module of ours it imports, at any depth (function-level imports included)."""
    seen, todo = set(), [start]
    while todo:
        source = todo.pop()
        if source in seen:
            continue
        seen.add(source)
        for node in ast.walk(ast.parse((ROOT / source).read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
            todo.extend(f"{name}.py" for name in names if (ROOT / f"{name}.py").is_file())
    return seen


def test_image_copies_every_file_the_server_and_install_sh_need() -> None:
    copied = copied_sources()
    needed = {"install.sh", "constraints.txt", "requirements.txt", "requirements-test.txt", "kubernetes/",
              "stub_model.py"}  # Triton loads our stub from its file: nothing imports it
    # Every module of ours that server.py and client.py import, directly or through each other, so that a
    # new module cannot be left out of the image.
    needed |= our_imports_from("server.py") | our_imports_from("client.py")
    assert {"server.py", "client.py", "opt_utils.py", "modeling_flax_opt.py", "engine.py"} <= needed
    assert needed <= set(copied), sorted(needed - set(copied))
    ignored = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    for source in copied:
        assert (ROOT / source).exists() or source == "dist/", f"COPY {source}: no such file in the repository"
        assert not any(fnmatch.fnmatch(source.rstrip("/"), pattern) for pattern in ignored), (source, ignored)


def test_image_by_default_prints_the_servers_usage() -> None:
    commands = [arguments for keyword, arguments in instructions() if keyword == "CMD"]
    assert [json.loads(command) for command in commands] == [["python", "server.py", "--help"]]


# ------------------------------------------------------------------------------------------------------------------
# Who the server runs as
# ------------------------------------------------------------------------------------------------------------------

# The charts' securityContext runs the pods as this uid and gid (fsGroup too, so that a claim's cache is writable).
IMAGE_UID = IMAGE_GID = 1000
IMAGE_HOME = "/home/opt"


def final_stage() -> list[tuple[str, str]]:
    (name,) = [name for name in stages() if name.startswith("final ")]
    return stages()[name]


def commands(run: str) -> list[list[str]]:
    """The simple commands of a RUN's `a && b && c`, each as its words."""
    return [shlex.split(part) for part in run.split("&&")]


def option(words: list[str], name: str) -> str:
    assert words.count(name) == 1, (name, words)
    return words[words.index(name) + 1]


def user_creation() -> str:
    (run,) = [run for run in runs(final_stage()) if "useradd" in run]
    return run


def test_image_runs_as_a_numeric_non_root_user() -> None:
    users = [arguments for keyword, arguments in final_stage() if keyword == "USER"]
    assert users, "the image's last stage has no USER: the server would run as root"
    # The last USER of the whole file is the final stage's (a USER of another stage does not carry over).
    assert users[-1] == [arguments for keyword, arguments in instructions() if keyword == "USER"][-1]
    uid, _, gid = users[-1].partition(":")
    # Kubernetes' runAsNonRoot refuses to start a container whose USER is a name: it cannot tell the uid.
    assert uid.isdigit() and gid.isdigit(), f"USER {users[-1]} is not numeric uid:gid"
    assert (int(uid), int(gid)) == (IMAGE_UID, IMAGE_GID) and int(uid) != 0


def test_image_creates_that_user_with_a_home_holding_the_servers_default_caches() -> None:
    import server

    creation = commands(user_creation())
    (groupadd,) = [words for words in creation if words[0] == "groupadd"]
    (useradd,) = [words for words in creation if words[0] == "useradd"]
    assert int(option(groupadd, "--gid")) == IMAGE_GID
    assert (int(option(useradd, "--uid")), int(option(useradd, "--gid"))) == (IMAGE_UID, IMAGE_GID)
    assert "--create-home" in useradd and option(useradd, "--home-dir") == IMAGE_HOME
    env = {name: value for keyword, arguments in final_stage() if keyword == "ENV"
           for name, value in key_values(arguments).items()}
    assert env["HOME"] == IMAGE_HOME
    # server.py's --cache-dir default and PyTriton's workspaces (~/.cache/pytriton) exist, owned by the user.
    (install,) = [words for words in creation if words[0] == "install"]
    assert (int(option(install, "-o")), int(option(install, "-g"))) == (IMAGE_UID, IMAGE_GID) and "-d" in install
    default_cache = Path(server.DEFAULT_CACHE_DIR).relative_to(Path.home())
    for folder in (default_cache, Path(".cache/pytriton")):
        assert f"{IMAGE_HOME}/{folder}" in install, (folder, install)


def test_application_files_stay_roots_and_read_only_to_the_server() -> None:
    copies = [arguments for keyword, arguments in final_stage() if keyword == "COPY"]
    assert copies and not [c for c in copies if "--chown" in c or "--chmod" in c], copies
    for run in runs(final_stage()):
        assert "/opt/app" not in run and "chown" not in run, run


@pytest.mark.parametrize("taken", [True, False], ids=["uid-1000-is-ubuntus", "uid-1000-is-free"])
def test_user_creation_frees_uid_1000_only_when_the_base_image_uses_it(tmp_path: Path, taken: bool) -> None:
    """The RUN that creates the user, under sh with stand-ins for getent and the account tools."""
    stubs, log = tmp_path / "bin", tmp_path / "calls"
    stubs.mkdir()
    for name in ("userdel", "groupdel", "groupadd", "useradd", "install"):
        (stubs / name).write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\n')
    # Ubuntu 24.04 images have the user and group `ubuntu`, uid and gid 1000; the CUDA images keep them.
    ubuntu = ('case "$1 $2" in\n'
              '  "passwd 1000") echo ubuntu:x:1000:1000:Ubuntu:/home/ubuntu:/bin/bash ;;\n'
              '  "group 1000") echo ubuntu:x:1000: ;;\n'
              '  *) exit 2 ;;\n'
              'esac\n')
    (stubs / "getent").write_text("#!/bin/sh\n" + (ubuntu if taken else "exit 2\n"))  # getent: 2 for "not found"
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    result = subprocess.run(["sh", "-c", user_creation()], capture_output=True, text=True, timeout=30,
                            env={"PATH": f"{stubs}:{os.environ['PATH']}"})
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines()
    removed = ["userdel --remove ubuntu", "groupdel ubuntu"] if taken else []
    assert calls[:len(removed)] == removed, calls
    assert [call.split()[0] for call in calls[len(removed):]] == ["groupadd", "useradd", "install"], calls


# ------------------------------------------------------------------------------------------------------------------
# kubernetes/build_and_push.sh
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A scratch repository holding build_and_push.sh, so that its dist/ is the test's and not the real one's."""
    (tmp_path / "repo" / "kubernetes").mkdir(parents=True)
    shutil.copy2(BUILD_AND_PUSH, tmp_path / "repo" / "kubernetes" / "build_and_push.sh")
    shutil.copy2(DOCKERFILE, tmp_path / "repo" / "Dockerfile")
    return tmp_path / "repo"


@pytest.fixture
def tools_path(tmp_path: Path) -> str:
    """A PATH with only what build_and_push.sh needs besides docker: bash (for its #! line) and dirname."""
    folder = tmp_path / "tools"
    folder.mkdir()
    for name in ("bash", "dirname"):
        found = shutil.which(name)
        assert found, name
        (folder / name).symlink_to(found)
    return str(folder)


@pytest.fixture
def docker_log(tmp_path: Path) -> Path:
    """Where the stand-in `docker` of `docker_path` records each call, as a JSON line."""
    return tmp_path / "docker-calls.jsonl"


@pytest.fixture
def docker_path(tmp_path: Path, tools_path: str, docker_log: Path) -> str:
    """tools_path with a stand-in `docker` first, which records its calls in docker_log and succeeds unless its
    subcommand is the FAKE_DOCKER_FAILS variable."""
    folder = tmp_path / "fake-docker"
    folder.mkdir()
    docker = folder / "docker"
    docker.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        f"with open({str(docker_log)!r}, 'a') as log:\n"
        "    log.write(json.dumps({'args': sys.argv[1:], 'buildkit': os.environ.get('DOCKER_BUILDKIT')}) + '\\n')\n"
        "sys.exit(1 if sys.argv[1] == os.environ.get('FAKE_DOCKER_FAILS') else 0)\n")
    docker.chmod(0o755)
    return f"{folder}:{tools_path}"


def build_and_push(repo: Path, path: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Runs the repository's build_and_push.sh with only PATH and the given variables in its environment."""
    return subprocess.run([str(repo / "kubernetes" / "build_and_push.sh")], env={"PATH": path, **env},
                          capture_output=True, text=True, timeout=60)


def docker_calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.mark.parametrize("env, wheels, message", [
    ({}, 0, "DOCKER_IMAGE_NAME_WITH_TAG is not set"),
    ({"DOCKER_IMAGE_NAME_WITH_TAG": ""}, 0, "DOCKER_IMAGE_NAME_WITH_TAG is not set"),
    ({"DOCKER_IMAGE_NAME_WITH_TAG": IMAGE, "BUILD_FROM": "git"}, 0, "BUILD_FROM must be pypi or dist, got 'git'"),
    ({"DOCKER_IMAGE_NAME_WITH_TAG": IMAGE, "BUILD_FROM": "dist"}, None, "BUILD_FROM=dist needs exactly one wheel"),
    ({"DOCKER_IMAGE_NAME_WITH_TAG": IMAGE, "BUILD_FROM": "dist"}, 0, "BUILD_FROM=dist needs exactly one wheel"),
    ({"DOCKER_IMAGE_NAME_WITH_TAG": IMAGE, "BUILD_FROM": "dist"}, 2, "BUILD_FROM=dist needs exactly one wheel"),
], ids=["no image", "empty image", "bad BUILD_FROM", "dist without folder", "dist without wheel", "dist, two wheels"])
def test_build_and_push_refuses_bad_inputs_with_status_2_and_builds_nothing(
        repo: Path, docker_path: str, docker_log: Path, env: dict[str, str], wheels: int | None, message: str
) -> None:
    if wheels is not None:
        (repo / "dist").mkdir()
    for version in range(wheels or 0):
        (repo / "dist" / f"nvidia_pytriton-0.7.{version}-py3-none-manylinux_2_35_x86_64.whl").write_bytes(b"")
    result = build_and_push(repo, docker_path, **env)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert docker_calls(docker_log) == []


def test_build_and_push_without_docker_on_path_says_so_with_status_2(repo: Path, tools_path: str) -> None:
    result = build_and_push(repo, tools_path, DOCKER_IMAGE_NAME_WITH_TAG=IMAGE)
    assert result.returncode == 2, result.stderr
    assert "docker is not on PATH" in result.stderr


def test_build_and_push_builds_the_repository_root_with_buildkit_then_pushes(
        repo: Path, docker_path: str, docker_log: Path) -> None:
    result = build_and_push(repo, docker_path, DOCKER_IMAGE_NAME_WITH_TAG=IMAGE)
    assert result.returncode == 0, result.stderr
    assert docker_calls(docker_log) == [
        {"args": ["build", "--build-arg", "BUILD_FROM=pypi", "--tag", IMAGE, str(repo)], "buildkit": "1"},
        {"args": ["push", IMAGE], "buildkit": None},
    ]


def test_build_and_push_from_dist_passes_the_base_image_and_build_from(
        repo: Path, docker_path: str, docker_log: Path) -> None:
    (repo / "dist").mkdir()
    (repo / "dist" / "nvidia_pytriton-0.7.1.dev0-py3-none-manylinux_2_35_x86_64.whl").write_bytes(b"")
    base = "nvcr.io/nvidia/cuda:12.9.1-base-ubuntu24.04"
    result = build_and_push(repo, docker_path, DOCKER_IMAGE_NAME_WITH_TAG=IMAGE, BUILD_FROM="dist",
                            FROM_IMAGE_NAME=base)
    assert result.returncode == 0, result.stderr
    build, push = docker_calls(docker_log)
    assert build["args"] == ["build", "--build-arg", "BUILD_FROM=dist", "--build-arg", f"FROM_IMAGE_NAME={base}",
                             "--tag", IMAGE, str(repo)]
    assert push["args"] == ["push", IMAGE]


def test_build_and_push_pushes_nothing_when_the_build_fails(repo: Path, docker_path: str, docker_log: Path) -> None:
    result = build_and_push(repo, docker_path, DOCKER_IMAGE_NAME_WITH_TAG=IMAGE, FAKE_DOCKER_FAILS="build")
    assert result.returncode != 0
    assert [call["args"][0] for call in docker_calls(docker_log)] == ["build"]


# ------------------------------------------------------------------------------------------------------------------
# install.sh's own checks (the installs themselves are what CI's ./install.sh --test proves)
# ------------------------------------------------------------------------------------------------------------------


def test_install_sh_help_lists_its_options() -> None:
    result = subprocess.run([str(INSTALL), "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    for option in ("--test", "--cuda", "--system", "PYTHON", "VENV", "PYTRITON_WHEEL", "Helm"):
        assert option in result.stdout, option


def test_install_sh_refuses_an_unknown_option_with_status_2(tmp_path: Path) -> None:
    result = subprocess.run([str(INSTALL), "--gpu"], capture_output=True, text=True, timeout=30,
                            env={**os.environ, "VENV": str(tmp_path / "venv")})
    assert result.returncode == 2
    assert "unknown option --gpu" in result.stderr
    assert not (tmp_path / "venv").exists()


@pytest.mark.parametrize("wheel", ["missing.whl", "constraints.txt", "a.whl\nb.whl"], ids=["missing", "not a wheel",
                                                                                           "two wheels"])
def test_install_sh_refuses_a_pytriton_wheel_that_is_not_one_wheel_file(tmp_path: Path, wheel: str) -> None:
    result = subprocess.run([str(INSTALL)], capture_output=True, text=True, timeout=30, cwd=ROOT,
                            env={**os.environ, "VENV": str(tmp_path / "venv"), "PYTRITON_WHEEL": wheel})
    assert result.returncode == 2
    assert "PYTRITON_WHEEL must name one wheel file" in result.stderr
    assert not (tmp_path / "venv").exists()
