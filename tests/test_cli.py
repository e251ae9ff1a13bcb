"""The terminal chat (``python cli_demo.py``), driven for real in a pseudo-terminal with pexpect.

No mocks: every test starts the program as a user would, types into it, and reads what it prints.
prompt_toolkit redraws the prompt line, so the tests synchronise on distinctive output (a command's
printed text, ``qwen> `` before a reply) and only then on the next ``you>`` prompt.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")
pytest.importorskip("prompt_toolkit")
pytest.importorskip("rich")

ROOT = Path(__file__).resolve().parents[1]
CLI = str(ROOT / "cli_demo.py")
ENV = dict(os.environ, PROMPT_TOOLKIT_NO_CPR="1", TERM="xterm", PYTHONUNBUFFERED="1", COLUMNS="250", LINES="40")
# CSI / OSC / charset / keypad escapes and carriage returns: what is left is the visible text.
ANSI = re.compile(r"\x1b\[[0-9;?<=>]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[()][0-9A-Za-z]|\x1b[=>78]|\r")
PROMPT = "you>"
READY = "Type :help for commands"


def clean(text: str) -> str:
    return ANSI.sub("", text)


class Cli:
    """One running ``cli_demo.py`` in a pseudo-terminal."""

    def __init__(self, *args: str, timeout: float = 90) -> None:
        self.child = pexpect.spawn(
            sys.executable, [CLI, *args], cwd=str(ROOT), env=ENV, encoding="utf-8", codec_errors="replace",
            timeout=timeout, dimensions=(40, 250),
        )
        self.banner = ""

    def expect(self, pattern: str, timeout: float | None = -1) -> str:
        """Wait for ``pattern`` (literal text); return the cleaned output up to and including it."""
        index = self.child.expect_exact([pattern, "Traceback (most recent call last)"], timeout=timeout)
        if index == 1:
            try:
                self.child.expect(pexpect.EOF, timeout=10)
            except pexpect.TIMEOUT:
                pass
            pytest.fail(f"the program crashed:\n{clean(self.child.before)}")
        return clean(self.child.before + self.child.after)

    def ready(self) -> str:
        text = self.expect(READY)
        self.expect(PROMPT)
        return text

    def command(self, line: str, expected: str) -> str:
        """Type ``line``, wait for ``expected`` in its output and then for the next prompt; return the
        output up to that prompt."""
        self.child.sendline(line)
        return self.expect(expected) + self.expect(PROMPT)

    def chat(self, line: str, timeout: float | None = -1) -> str:
        """Send a message and return the reply printed after ``qwen> `` (escapes stripped)."""
        self.child.sendline(line)
        self.expect("qwen> ")
        reply = self.expect(PROMPT, timeout=timeout)
        return reply[: -len(PROMPT)].strip()

    def finish(self) -> str:
        """Wait for the program to end; return the rest of its output, check 'Bye.' and exit status 0."""
        self.child.expect(pexpect.EOF, timeout=30)
        rest = clean(self.child.before)
        self.child.close()
        assert "Traceback" not in rest, rest
        assert "Bye." in rest, rest
        assert self.child.exitstatus == 0, (self.child.exitstatus, self.child.signalstatus, rest)
        return rest

    def kill(self) -> None:
        if self.child.isalive():
            self.child.terminate(force=True)


@pytest.fixture
def run_cli():
    started: list[Cli] = []

    def start(*args: str) -> Cli:
        cli = Cli(*args)
        started.append(cli)
        return cli

    yield start
    for cli in started:
        cli.kill()


@pytest.fixture(scope="module")
def qwen_tokenizer(tiny_chat):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_chat)


@pytest.fixture(scope="module")
def shared():
    """One program shared by the tests that need no fresh start (each start costs seconds of imports)."""
    holder: dict[str, Cli] = {}
    yield holder
    if "cli" in holder:
        holder["cli"].child.sendeof()
        holder["cli"].kill()


@pytest.fixture
def cli(shared, tiny_chat) -> Cli:
    """The shared program, restarted if a previous test ended it, with history, settings and seed reset."""
    running = shared.get("cli")
    if running is not None and running.child.isalive():
        try:
            running.command(":clh", "History cleared.")
            running.command(":reset-conf", "Generation settings reset.")
            running.command(":seed 1234", "seed = 1234")
            return running
        except (pexpect.ExceptionPexpect, pytest.fail.Exception):
            running.kill()
    shared["cli"] = Cli("-c", str(tiny_chat))
    shared["cli"].banner = shared["cli"].ready()
    return shared["cli"]


def test_a_chat_turn_streams_the_reply(cli, tiny_chat):
    assert f"Chatting with {Path(tiny_chat).name}" in cli.banner
    cli.command(":conf max_new_tokens=40", "max_new_tokens = 40")
    cli.child.sendline("hello")
    cli.expect("qwen> ")
    # Read the reply as it arrives: a streamed reply comes in several pieces spread over time.
    pending, cli.child.buffer = cli.child.buffer, ""
    pieces: list[tuple[float, str]] = [(time.monotonic(), pending)] if clean(pending).strip() else []
    text = pending
    deadline = time.monotonic() + 90
    while PROMPT not in clean(text):
        assert time.monotonic() < deadline, f"no prompt after the reply: {clean(text)!r}"
        try:
            data = cli.child.read_nonblocking(4096, timeout=1)
        except pexpect.TIMEOUT:
            continue
        text += data
        if clean(data).replace(PROMPT, "").strip():
            pieces.append((time.monotonic(), data))
    reply = clean(text).split(PROMPT)[0].strip()
    assert reply, "empty reply"
    assert "Traceback" not in reply
    assert len(pieces) >= 3, f"the reply came in {len(pieces)} piece(s), not streamed: {pieces!r}"
    assert pieces[-1][0] - pieces[0][0] > 0.2, "all pieces arrived at once"
    text = cli.command(":his", "[1] assistant:")
    assert "[1] user: hello" in text


def test_ctrl_c_stops_a_reply_and_keeps_the_session(cli):
    cli.command(":conf max_new_tokens=2000", "max_new_tokens = 2000")
    cli.child.sendline("tell me a long story")
    cli.expect("qwen> ")
    cli.child.expect(r"\S", timeout=60)  # the reply has started
    time.sleep(0.5)
    started = time.monotonic()
    cli.child.sendintr()
    cli.expect("[reply stopped]", timeout=20)
    cli.expect(PROMPT)
    assert time.monotonic() - started < 20
    # The session is intact: the stopped turn is not kept, and the next turn works.
    cli.command(":his", "(no history yet)")
    cli.command(":conf max_new_tokens=5", "max_new_tokens = 5")
    assert cli.chat("hello", timeout=60)
    cli.command(":his", "[1] user: hello")
    # Ctrl-C at the prompt does not end the program either.
    cli.child.sendintr()
    cli.command(":seed", "seed = 1234")


def test_user_text_is_printed_verbatim(cli):
    """Text that rich could read as markup or emoji codes (:smile:) is shown exactly as typed."""
    cli.command(":conf max_new_tokens=2", "max_new_tokens = 2")
    query = "say :smile: and [bold]x[/bold] <b>"
    cli.chat(query)
    text = cli.command(":his", "[1] assistant:")
    assert f"[1] user: {query}" in text, text


def test_conf_refuses_unknown_keys_and_bad_values_at_once_and_changes_nothing(cli):
    """A bad item is reported when typed, and no item of that line is applied; the next reply works."""
    before = cli.command(":conf", "}")
    before = before[before.index("{"):]
    for line, message in [
        (":conf bogus=1", "Unknown setting 'bogus'"),
        (":conf max_new_tokens=abc", "max_new_tokens must be a whole number >= 1, not 'abc'"),
        (":conf top_p=0.5 max_new_tokens=1.5", "max_new_tokens must be a whole number >= 1, not '1.5'"),
        (":conf max_new_tokens=0", "max_new_tokens must be a whole number >= 1, not '0'"),
        (":conf top_p=2", "top_p must be a number in (0, 1], not '2'"),
        (":conf temperature=-1", "temperature must be a number >= 0 (0 = greedy), not '-1'"),
        (":conf temperature=nan", "temperature must be a number >= 0 (0 = greedy), not 'nan'"),
        (":conf do_sample=maybe", "do_sample must be true or false, not 'maybe'"),
    ]:
        text = cli.command(line, "Nothing changed.")
        assert message in text, (line, text)
    text = cli.command(":conf bogus=1", "Nothing changed.")
    assert "keys: max_new_tokens, do_sample, temperature, top_p, top_k, repetition_penalty" in text, text
    after = cli.command(":conf", "}")
    assert after[after.index("{"):] == before
    cli.command(":conf max_new_tokens=4 top_k=5 do_sample=false", "do_sample = False")
    assert cli.chat("hello")


def test_conf_temperature_zero_is_greedy_as_on_the_web_page(cli):
    """``temperature=0`` turns sampling off (different seeds, same reply); a temperature above 0 turns it
    back on (different seeds, different replies)."""
    def replies() -> list[str]:
        out = []
        for seed in (1, 2):
            cli.command(f":seed {seed}", f"seed = {seed}")
            cli.command(":clh", "History cleared.")
            out.append(cli.chat("hello"))
        return out

    cli.command(":conf max_new_tokens=8 temperature=0", "do_sample = False")
    greedy = replies()
    assert greedy[0] and greedy[0] == greedy[1], greedy
    text = cli.command(":conf temperature=1.5", "temperature = 1.5")
    assert "do_sample = True" in text
    sampled = replies()
    assert sampled[0] != sampled[1], sampled


def test_every_command(run_cli, tiny_chat, qwen_tokenizer):
    cli = run_cli("-c", str(tiny_chat), "--max-new-tokens", "12")
    cli.ready()

    for name in (":help", ":h"):
        text = cli.command(name, "Ctrl-C stops a reply")
        for listed in (":help", ":exit", ":quit", ":q", ":clear", ":cl", ":clear-history", ":clh", ":history",
                       ":his", ":seed", ":conf", ":reset-conf"):
            assert listed in text, (listed, text)

    cli.command(":history", "(no history yet)")
    long_reply = cli.chat("hello")
    assert long_reply
    text = cli.command(":history", "[1] assistant:")
    assert "[1] user: hello" in text
    text = cli.command(":his", "[1] assistant:")
    assert "[1] user: hello" in text

    cli.command(":clear-history", "History cleared.")
    cli.command(":history", "(no history yet)")
    cli.chat("again")
    cli.command(":his", "[1] user: again")
    cli.command(":clh", "History cleared.")
    cli.command(":his", "(no history yet)")

    cli.command(":seed", "seed = 1234")
    cli.command(":seed 7", "seed = 7")
    cli.command(":seed", "seed = 7")
    cli.command(":seed x", "Not a number: 'x'")
    cli.command(":seed", "seed = 7")

    settings = cli.command(":conf", "}")
    settings = settings[settings.index("{"):]
    assert '"max_new_tokens": 12' in settings, settings
    assert '"top_p": 0.8' in settings, settings
    assert '"chat_format": "chatml"' in settings, settings

    # :conf really changes the settings the next reply uses.
    cli.command(":seed 1234", "seed = 1234")
    cli.command(":conf max_new_tokens=3", "max_new_tokens = 3")
    assert '"max_new_tokens": 3' in cli.command(":conf", "}")
    short_reply = cli.chat("hello")
    assert short_reply
    assert len(qwen_tokenizer.encode(short_reply)) <= 3, short_reply
    assert len(qwen_tokenizer.encode(long_reply)) > 3, long_reply
    cli.command(":conf nonsense", "Cannot read 'nonsense'")

    cli.command(":reset-conf", "Generation settings reset.")
    assert '"max_new_tokens": 12' in cli.command(":conf", "}")
    cli.command(":clh", "History cleared.")
    assert cli.chat("hello") == long_reply  # same seed, settings and history as the first turn

    cli.child.sendline(":clear")
    cli.child.expect_exact("\x1b[2J")  # the screen is erased ...
    cli.expect(PROMPT)  # ... and the session goes on
    cli.child.sendline(":cl")
    cli.child.expect_exact("\x1b[2J")
    cli.expect(PROMPT)
    cli.command(":his", "[1] user: hello")  # clearing the screen keeps the history

    cli.command(":frobnicate", "Unknown command :frobnicate")
    cli.command("", "Empty input")
    cli.command("   ", "Empty input")
    text = cli.command(":his", "[1] assistant:")  # an empty line is not sent to the model
    assert "[2]" not in text

    cli.child.sendline(":exit")
    cli.finish()


def test_a_bad_checkpoint_path_gives_a_one_line_error(tmp_path, tiny_chat):
    missing = tmp_path / "nonexistent"
    no_weights = tmp_path / "no-weights"  # has a config.json, but no weight files
    no_weights.mkdir()
    (no_weights / "config.json").write_text((Path(tiny_chat) / "config.json").read_text())
    procs = {
        path: subprocess.Popen([sys.executable, CLI, "-c", str(path)], cwd=ROOT, env=ENV, text=True,
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for path in (missing, no_weights)
    }
    for path, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode != 0, (path, out, err)
        assert "Traceback" not in out + err, err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, err
        assert str(path) in errors[0]


def test_demo_mode_says_replies_are_random_and_takes_system_and_seed(run_cli):
    # --demo, and no -c at all, both chat with a tiny random model and say so; both start at once.
    demo = run_cli("--demo", "--system", "You are a pirate.", "--seed", "42", "--max-new-tokens", "4")
    bare = run_cli("-s", "5")
    for cli, seed in ((demo, 42), (bare, 5)):
        text = cli.ready()
        assert "RANDOM weights" in text and "random text" in text, text
        assert "Chatting with tiny-random-qwen." in text, text  # not the temporary folder's name
        cli.command(":seed", f"seed = {seed}")
    assert demo.chat("hello")
    demo.child.sendline(":q")
    demo.finish()
    bare.child.sendeof()
    bare.finish()


def test_the_same_seed_gives_the_same_reply_in_two_runs(run_cli, tiny_chat):
    first, second = (run_cli("-c", str(tiny_chat), "--seed", "99", "--max-new-tokens", "16") for _ in range(2))
    replies = []
    for cli in (first, second):
        cli.ready()
        replies.append(cli.chat("hello"))
    # A different seed samples a different reply (the default settings sample).
    second.command(":seed 100", "seed = 100")
    second.command(":clh", "History cleared.")
    replies.append(second.chat("hello"))
    for cli in (first, second):
        cli.child.sendline(":quit")
        cli.finish()
    assert replies[0], replies
    assert replies[0] == replies[1]
    assert replies[2] != replies[0]


def test_lora_flag_chats_with_the_adapter(run_cli, tiny_chat, qwen_tokenizer, tmp_path):
    """``--lora DIR`` chats with the adapter on top of the checkpoint: the reply is the engine's with that adapter
    (same seed), not the base model's; a folder that is no adapter is a one-line error, as in web_demo.py."""
    from test_lora import make_adapter
    from transformers import AutoModelForCausalLM

    from qwen.apps.session import EngineChat
    from qwen.chat import DEFAULT_SYSTEM
    from qwen.lora import load_lora

    folder, _ = make_adapter(tiny_chat, tmp_path / "mine", ["c_attn", "c_proj", "w1", "w2"], seed=9)
    cli = run_cli("-c", str(tiny_chat), "--lora", str(folder), "--seed", "7", "--max-new-tokens", "10")
    assert "+ LoRA adapter mine." in cli.ready()
    reply = cli.chat("hello")
    cli.child.sendline(":q")
    cli.finish()

    model = AutoModelForCausalLM.from_pretrained(tiny_chat).eval()
    config = copy.deepcopy(model.generation_config)
    config.max_new_tokens = 10
    replies = []
    for adapter in (load_lora(model, folder), None):
        chat = EngineChat(model, qwen_tokenizer, max_batch_size=1, adapter=adapter)
        try:
            replies.append(list(chat.stream("hello", [], DEFAULT_SYSTEM, config, seed=7))[-1])
        finally:
            chat.close()
    assert clean(reply) == replies[0].strip() and replies[0] != replies[1]

    for program in (CLI, str(ROOT / "web_demo.py")):
        done = subprocess.run([sys.executable, program, "-c", str(tiny_chat), "--lora", str(tiny_chat)], cwd=ROOT,
                              env=ENV, text=True, capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
        assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
        assert f"error: --lora {tiny_chat}: {tiny_chat} has no adapter_config.json" in done.stderr


def test_speculative_flags_keep_the_seeded_reply_and_refuse_what_cannot_work(run_cli, tiny_chat, tmp_path):
    """``--speculative ngram`` and ``--draft-model`` (the checkpoint in int8) reach the engine: the same seeded reply
    as without them (qwen.speculative), and settings the engine refuses, or a draft that cannot load, end the
    program with a one-line error."""
    replies = []
    for extra in ([], ["--speculative", "ngram"], ["--draft-model", str(tiny_chat), "--draft-quant", "int8"]):
        cli = run_cli("-c", str(tiny_chat), "--seed", "5", "--max-new-tokens", "24", *extra)
        cli.ready()
        replies.append(cli.chat("a b a b a b a b"))
        cli.child.sendline(":q")
        cli.finish()
    assert replies[0] and replies[1] == replies[0] and replies[2] == replies[0]
    bad = {"int8 KV cache": ["--speculative", "ngram", "--kv-cache-int8"],
           f"--draft-model {tmp_path / 'nowhere'}": ["--draft-model", str(tmp_path / "nowhere")]}
    for says, extra in bad.items():
        done = subprocess.run([sys.executable, CLI, "-c", str(tiny_chat), *extra], cwd=ROOT, env=ENV, text=True,
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert done.returncode != 0 and "Traceback" not in done.stderr and len(errors) == 1, done.stderr
        assert says in errors[0], errors
