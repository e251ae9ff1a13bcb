"""The container image and run scripts in docker/, for real: build the CPU image with docker/build.sh,
start the API server with docker_openai_api.sh --demo and talk to it with the openai client from this
machine, chat once through docker_cli_demo.sh --demo, fine-tune a step with docker_finetune.sh.

Opt-in (``python -m pytest -m docker tests/test_docker.py``): it needs a Docker daemon, builds a
2.3 GB image the first time (later runs reuse the build cache) and starts containers, which it removes
again; the image stays. Settings, all optional:

  QWEN_DOCKER_IMAGE        tag to build and test (default qwen:test-cpu)
  QWEN_DOCKER_BASE         base image (default qwen-base:bookworm, made with docker/make-local-base.sh
                           when it is missing and this runs as root with debootstrap; else python:3.11-slim)
  QWEN_DOCKER_BUILD_ARGS   extra docker/build.sh arguments; by default this machine's pip settings are
                           passed on (its pip.conf, CA bundle and find-links folders holding torch), so
                           that a machine without download.pytorch.org builds from what pip here uses
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.docker, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[1]
DOCKER_DIR = ROOT / "docker"
IMAGE = os.environ.get("QWEN_DOCKER_IMAGE", "qwen:test-cpu")
LOCAL_BASE = "qwen-base:bookworm"
TORCH_VERSION = "2.13.0"
DEMO_MODEL = "tiny-random-qwen"
# A tag unique to this run, so that names never clash with a user's containers or a parallel run.
RUN_ID = f"{os.getpid()}"


def run(cmd: list[str], timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """A command's result with stdout and stderr as text; never raises on a non-zero exit, since the tests
    check exit codes and messages themselves."""
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, **(env or {})})


def docker_works() -> str | None:
    """None when the docker CLI and daemon answer, else why not (the skip message)."""
    if shutil.which("docker") is None:
        return "no docker CLI (Debian: apt-get install docker.io)"
    info = run(["docker", "info", "--format", "{{.ServerVersion}}"], timeout=30)
    if info.returncode != 0:
        return f"the Docker daemon does not answer ({info.stderr.strip().splitlines()[-1:]}); start it: dockerd &"
    return None


def build_client() -> str:
    """A docker client that can use BuildKit: one with buildx, or one older than 23 (which has BuildKit
    built in). Debian bookworm's docker.io is 20.10, while a newer client without buildx may come first on
    PATH; build.sh explains this, the test just picks the client that works."""
    for client in ("docker", "/usr/bin/docker"):
        if shutil.which(client) is None:
            continue
        if run([client, "buildx", "version"], timeout=30).returncode == 0:
            return client
        version = run([client, "version", "--format", "{{.Client.Version}}"], timeout=30).stdout.strip()
        if version.split(".")[0].isdigit() and int(version.split(".")[0]) < 23:
            return client
    pytest.skip("no docker client with BuildKit: install the buildx plugin (docker-buildx)")


def base_image() -> str:
    """The base to build on: QWEN_DOCKER_BASE, else the debootstrapped Debian image (made now if missing
    and possible: no registry is needed), else python:3.11-slim from a registry."""
    if os.environ.get("QWEN_DOCKER_BASE"):
        return os.environ["QWEN_DOCKER_BASE"]
    if run(["docker", "image", "inspect", LOCAL_BASE]).returncode == 0:
        return LOCAL_BASE
    if os.geteuid() == 0 and shutil.which("debootstrap"):
        made = run(["bash", str(DOCKER_DIR / "make-local-base.sh"), LOCAL_BASE], timeout=900)
        assert made.returncode == 0, made.stderr[-3000:]
        return LOCAL_BASE
    return "python:3.11-slim"


def host_pip_args() -> list[str]:
    """build.sh flags that hand this machine's pip settings to the build: the user's pip.conf and the CA
    bundle pip trusts (both as BuildKit secrets, so never in a layer) and every find-links folder that
    holds the pinned CPU torch wheel."""
    if "QWEN_DOCKER_BUILD_ARGS" in os.environ:
        return shlex.split(os.environ["QWEN_DOCKER_BUILD_ARGS"])
    args: list[str] = []
    conf_candidates = [os.environ.get("PIP_CONFIG_FILE", ""), Path.home() / ".config/pip/pip.conf",
                       Path.home() / ".pip/pip.conf", "/etc/pip.conf"]
    conf = next((str(c) for c in conf_candidates if c and Path(c).is_file()), None)
    if conf:
        args += ["--pip-conf", conf]
    listed = run([sys.executable, "-m", "pip", "config", "list"]).stdout
    settings: dict[str, str] = {}
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        settings.setdefault(key.rsplit(".", 1)[-1], value.strip().strip("'\""))
    cert = os.environ.get("PIP_CERT") or settings.get("cert") or os.environ.get("SSL_CERT_FILE")
    if cert and Path(cert).is_file():
        args += ["--ca-cert", cert]
    links = os.environ.get("PIP_FIND_LINKS") or settings.get("find-links", "")
    for folder in links.split():
        if Path(folder).is_dir() and any(Path(folder).glob(f"torch-{TORCH_VERSION}+cpu-*.whl")):
            args += ["--wheels", folder]
    return args


def free_port() -> int:
    """A port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def remove_container(name: str) -> None:
    """docker rm -f, for the tests' finalizers (a missing container is fine)."""
    run(["docker", "rm", "-f", name], timeout=60)


@pytest.fixture(scope="module")
def image() -> str:
    """The CPU image, built now with docker/build.sh (from the build cache when nothing changed)."""
    reason = docker_works()
    if reason:
        pytest.skip(f"docker tests need a working Docker: {reason}")
    client = build_client()
    cmd = ["bash", str(DOCKER_DIR / "build.sh"), "-t", IMAGE, "--base", base_image(), *host_pip_args()]
    started = time.perf_counter()
    built = run(cmd, timeout=1800, env={"DOCKER": client})
    assert built.returncode == 0, f"{shlex.join(cmd)} failed:\n{built.stdout[-2000:]}\n{built.stderr[-4000:]}"
    print(f"\nbuilt {IMAGE} in {time.perf_counter() - started:.0f} s")
    return IMAGE


def wait_healthy(name: str, timeout: float = 300) -> float:
    """Seconds until the container's HEALTHCHECK reports healthy; fails with its log if it stops,
    restarts or turns unhealthy instead."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        state = json.loads(run(["docker", "inspect", "--format", "{{json .State}}", name]).stdout or "{}")
        health = (state.get("Health") or {}).get("Status")
        if health == "healthy":
            return time.perf_counter() - started
        if state.get("Status") != "running" or state.get("Restarting") or health == "unhealthy":
            logs = run(["docker", "logs", "--tail", "40", name])
            pytest.fail(f"container {name} is {state.get('Status')}/{health}:\n{logs.stdout}{logs.stderr}")
        time.sleep(1)
    pytest.fail(f"container {name} not healthy after {timeout} s")


@pytest.fixture(scope="module")
def api(image: str) -> Iterator[dict]:
    """docker_openai_api.sh --demo with an API key, on a free port; removed afterwards."""
    name, port, key = f"qwen-test-api-{RUN_ID}", free_port(), "sk-docker-test"
    script = [
        "bash", str(DOCKER_DIR / "docker_openai_api.sh"), "-i", image, "--demo", "--port", str(port),
        "-n", name, "--api-keys", key,
    ]
    try:
        started = run(script)
        assert started.returncode == 0, started.stderr
        yield {"name": name, "port": port, "key": key, "stdout": started.stdout,
               "healthy_after": wait_healthy(name)}
    finally:
        remove_container(name)


def test_the_api_script_prints_how_to_reach_follow_and_stop_the_server(api):
    out = api["stdout"]
    assert f"http://127.0.0.1:{api['port']}/v1" in out
    assert f"docker logs -f {api['name']}" in out
    assert f"docker rm -f {api['name']}" in out
    print(f"\nAPI container healthy {api['healthy_after']:.1f} s after the script returned")


def test_the_server_runs_as_a_non_root_user_with_the_image_healthcheck(api, image):
    assert run(["docker", "exec", api["name"], "id", "-u"]).stdout.strip() != "0"
    config = json.loads(run(["docker", "image", "inspect", "--format", "{{json .Config}}", image]).stdout)
    assert any("qwen-healthcheck" in part for part in config["Healthcheck"]["Test"])
    assert "8000/tcp" in config["ExposedPorts"]
    # The key went in through the environment, not the command line (which docker ps and ps show).
    args = json.loads(run(["docker", "inspect", "--format", "{{json .Args}}", api["name"]]).stdout)
    assert api["key"] not in " ".join(args)


def test_chat_completion_and_stream_from_the_host_with_the_openai_client(api):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{api['port']}/v1", api_key=api["key"], max_retries=0)
    assert [m.id for m in client.models.list().data] == [DEMO_MODEL]

    messages = [{"role": "user", "content": "Hello from outside the container"}]
    reply = client.chat.completions.create(model=DEMO_MODEL, messages=messages, max_tokens=8, seed=1)
    assert reply.model == DEMO_MODEL
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 5 and 1 <= reply.usage.completion_tokens <= 8
    assert isinstance(reply.choices[0].message.content, str)

    stream = client.chat.completions.create(model=DEMO_MODEL, messages=messages, max_tokens=8, seed=1,
                                            stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) >= 2  # several server-sent events, not one body
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert text == reply.choices[0].message.content  # same seed, same greedy-or-sampled tokens

    wrong = openai.OpenAI(base_url=client.base_url, api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_the_api_script_serves_a_mounted_lora_adapter(image, tmp_path):
    """--lora NAME=DIR mounts the adapter read-only and the server in the container serves it as model NAME."""
    openai = pytest.importorskip("openai")
    from test_lora import make_adapter  # tests/ is on sys.path

    from qwen.tiny import make_tiny_checkpoint

    adapter, _ = make_adapter(make_tiny_checkpoint(tmp_path / DEMO_MODEL), tmp_path / "mine",
                              ["c_attn", "c_proj", "w1", "w2"])  # for the demo model the container makes
    for path in (tmp_path, adapter):  # readable by the container's user
        path.chmod(0o755)
    for file in adapter.iterdir():
        file.chmod(0o644)
    name, port = f"qwen-test-lora-{RUN_ID}", free_port()
    try:
        started = run(["bash", str(DOCKER_DIR / "docker_openai_api.sh"), "-i", image, "--demo", "--port", str(port),
                       "-n", name, "--lora", f"mine={adapter}"])
        assert started.returncode == 0, started.stderr
        wait_healthy(name)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list().data] == [DEMO_MODEL, "mine"]
        messages = [{"role": "user", "content": "Hello"}]
        replies = [client.chat.completions.create(model=m, messages=messages, max_tokens=8, temperature=0)
                   for m in (DEMO_MODEL, "mine")]
        assert replies[1].model == "mine"
        assert replies[0].choices[0].message.content != replies[1].choices[0].message.content
    finally:
        remove_container(name)


def test_clear_errors_for_a_taken_port_a_taken_name_and_a_missing_checkpoint(api, image, tmp_path):
    script = str(DOCKER_DIR / "docker_openai_api.sh")
    same_port = run(["bash", script, "-i", image, "--demo", "--port", str(api["port"]), "-n", f"other-{RUN_ID}"])
    assert same_port.returncode != 0 and f"port {api['port']} is taken" in same_port.stderr
    same_name = run(["bash", script, "-i", image, "--demo", "--port", str(free_port()), "-n", api["name"]])
    assert same_name.returncode != 0 and f"a container named {api['name']} exists" in same_name.stderr
    missing = run(["bash", script, "-i", image, "-c", str(tmp_path / "nowhere"), "-n", f"other-{RUN_ID}"])
    assert missing.returncode != 0 and "does not exist" in missing.stderr
    no_daemon = run(["bash", script, "--demo"], env={"DOCKER_HOST": f"unix://{tmp_path}/no.sock"})
    assert no_daemon.returncode != 0 and "cannot reach the Docker daemon" in no_daemon.stderr
    no_docker = run(["bash", script, "--demo"], env={"DOCKER": str(tmp_path / "no-docker")})
    assert no_docker.returncode != 0 and "docker not found" in no_docker.stderr
    assert run(["docker", "container", "inspect", f"other-{RUN_ID}"]).returncode != 0  # nothing was left


def test_the_cpu_kernels_are_built_into_the_image(image):
    """Loading them in a container (as its user) compiles nothing: they were built with the image."""
    code = ("import logging; logging.basicConfig(level=logging.INFO); from qwen import cpu_kernels as k; "
            "print([f() is not None for f in (k.qwen_int4_kernel, k.qwen_int8_kernel, k.qwen_bf16_kernel)])")
    result = run(["docker", "run", "--rm", image, "python", "-c", code], timeout=300)
    assert result.returncode == 0, result.stderr
    assert "building qwen's" not in result.stderr and "True" in result.stdout, result.stderr


def test_the_cli_demo_script_answers_one_message(image):
    pexpect = pytest.importorskip("pexpect")
    name = f"qwen-test-cli-{RUN_ID}"
    env = dict(os.environ, TERM="xterm", COLUMNS="200", LINES="40")
    child = pexpect.spawn("bash", [str(DOCKER_DIR / "docker_cli_demo.sh"), "-i", image, "--demo", "-n", name],
                          cwd=str(ROOT), env=env, encoding="utf-8", timeout=180)
    try:
        child.expect("random text")  # the demo's warning, from inside the container
        child.expect("you>")
        child.sendline("What is in this container?")
        child.expect("qwen> ")
        child.expect("you>")
        reply = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", child.before).strip()
        assert reply, "the model printed no reply"
        child.sendline(":exit")
        child.expect("Bye.")
        child.expect(pexpect.EOF, timeout=60)
    finally:
        child.close()
        remove_container(name)
    assert child.exitstatus == 0
    assert run(["docker", "container", "inspect", name]).returncode != 0  # --rm removed it


def test_the_finetune_script_trains_on_a_mounted_checkpoint_and_data(image, tiny_chat, tmp_path):
    name, output = f"qwen-test-finetune-{RUN_ID}", tmp_path / "out"
    cmd = ["bash", str(DOCKER_DIR / "docker_finetune.sh"), "-i", image, "-c", str(tiny_chat),
           "-d", str(ROOT / "finetune/sample_data.json"), "-o", str(output), "-n", name,
           "--", "--max_steps", "1", "--save_strategy", "no"]
    try:
        done = run(cmd, timeout=600)
    finally:
        remove_container(name)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    adapter = output / "adapter_model.safetensors"
    assert adapter.is_file() and adapter.stat().st_size > 0
    assert adapter.stat().st_uid == os.getuid()  # the results belong to the caller


@pytest.mark.skipif(os.geteuid() != 0, reason="the check is for root callers, whose containers run as uid 1000")
def test_a_checkpoint_the_container_user_cannot_read_is_refused_before_starting(image, tiny_chat, tmp_path):
    private = tmp_path / "private-checkpoint"
    shutil.copytree(tiny_chat, private)
    (private / "model.safetensors").chmod(0o600)
    refused = run(["bash", str(DOCKER_DIR / "docker_cli_demo.sh"), "-i", image, "-c", str(private),
                   "-n", f"qwen-test-private-{RUN_ID}"])
    assert refused.returncode != 0
    assert "chmod -R a+rX" in refused.stderr
