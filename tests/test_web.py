"""The browser chat (``python web_demo.py``), driven for real: the app runs as a subprocess on a free
port and headless Debian chromium clicks through it with Playwright.

Only the HTML-injection test uses a scripted model (a real model cannot be made to emit a chosen
string); it runs ``qwen.apps.web.build_ui`` in this process.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qwen.serve.process import free_port, wait_until_ok

pytest.importorskip("gradio")
sync_api = pytest.importorskip("playwright.sync_api")

ROOT = Path(__file__).resolve().parents[1]
WEB = str(ROOT / "web_demo.py")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
BOT = '#chatbot [data-testid="bot"]'
USER = '#chatbot [data-testid="user"]'
DEFAULT_MAX_NEW_TOKENS = 16  # written into the served checkpoint copy: replies stay short unless a test asks
ENV = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")

if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is not installed", allow_module_level=True)

# The chat is idle: its status tracker is hidden, every user message has a rendered reply, and (if
# given) there are ``n`` bot messages and the last user message contains ``user``.
IDLE_JS = """({n, user}) => {
  const chat = document.querySelector('#chatbot');
  const status = chat && chat.querySelector('[data-testid="status-tracker"]');
  if (!status || !status.classList.contains('hide')) return false;
  const bots = [...chat.querySelectorAll('[data-testid="bot"]')].map(b => b.innerText);
  const users = [...chat.querySelectorAll('[data-testid="user"]')].map(u => u.innerText);
  if (n !== null && bots.length !== n) return false;
  if (bots.length !== users.length) return false;
  if (user !== null && !(users.length && users[users.length - 1].includes(user))) return false;
  const last = bots.length ? bots[bots.length - 1] : null;
  return last === null || (last.trim().length > 0 && !last.includes('Loading content'));
}"""
BUSY_JS = """() => {
  const status = document.querySelector('#chatbot [data-testid="status-tracker"]');
  return status && !status.classList.contains('hide');
}"""


@contextlib.contextmanager
def web_demo(tiny_chat: Path, folder: Path, *extra: str) -> Iterator[str]:
    """``web_demo.py`` (with ``extra`` flags) serving a copy of the tiny checkpoint in ``folder`` whose default reply
    length is short; yields its URL."""
    folder = folder / "tiny-chat"
    shutil.copytree(tiny_chat, folder)
    generation = json.loads((folder / "generation_config.json").read_text())
    generation["max_new_tokens"] = DEFAULT_MAX_NEW_TOKENS
    (folder / "generation_config.json").write_text(json.dumps(generation))
    port = free_port()
    log = folder.parent / "web_demo.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, WEB, "-c", str(folder), "--server-port", str(port), "--server-name", "127.0.0.1", *extra],
            cwd=ROOT, env=ENV, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_ok(url, 150, proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def web_url(tiny_chat, tmp_path_factory):
    with web_demo(tiny_chat, tmp_path_factory.mktemp("web")) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def open_chat(browser, url: str):
    context = browser.new_context(viewport={"width": 1100, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(url)
    page.wait_for_selector("#msg textarea")
    return page


@pytest.fixture
def page(browser, web_url):
    page = open_chat(browser, web_url)
    yield page
    page.context.close()


def bots(page) -> list[str]:
    return [t.strip() for t in page.locator(BOT).all_inner_texts()]


def users(page) -> list[str]:
    return [t.strip() for t in page.locator(USER).all_inner_texts()]


def is_idle(page, n_bots: int | None = None, user: str | None = None) -> bool:
    return page.evaluate(IDLE_JS, {"n": n_bots, "user": user})


def wait_idle(page, n_bots: int | None = None, user: str | None = None, timeout: float = 90) -> None:
    """Wait for the running event to start (if it has not already finished) and then to finish."""
    try:
        page.wait_for_function(BUSY_JS, timeout=3_000, polling=50)
    except sync_api.TimeoutError:
        pass
    page.wait_for_function(IDLE_JS, arg={"n": n_bots, "user": user}, timeout=timeout * 1000, polling=100)


def send(page, text: str, shown: str | None = None) -> str:
    """Type a message, press Enter, wait for its reply to finish; return the last bot message.
    ``shown``: the part of the message's rendered text to wait for (default: all of it)."""
    page.fill("#msg textarea", text)
    page.press("#msg textarea", "Enter")
    wait_idle(page, user=text if shown is None else shown)
    return bots(page)[-1]


def retry(action, what: str, attempts: int = 6) -> None:
    """Run ``action`` until it succeeds: a page that is still settling can swallow a click or a key."""
    for attempt in range(attempts):
        try:
            action()
            return
        except sync_api.TimeoutError:
            if attempt == attempts - 1:
                raise AssertionError(f"could not {what}") from None


def open_settings(page) -> None:
    def click_open():
        if not page.locator("#system textarea").is_visible():
            page.get_by_role("button", name=re.compile(r"^Settings\s*▼")).first.click(timeout=10_000)
            page.wait_for_selector("#system textarea", state="visible", timeout=5_000)

    retry(click_open, "open the Settings accordion")


def set_slider(page, label: str, value: float) -> None:
    open_settings(page)
    box = page.get_by_label(f"number input for {label}")
    slider = page.get_by_label(f"range slider for {label}")

    def fill():
        box.fill(str(value), timeout=10_000)
        box.press("Enter", timeout=10_000)
        page.wait_for_function("([el, v]) => Number(el.value) === v", arg=[slider.element_handle(), value],
                               timeout=5_000)

    retry(fill, f"set {label} to {value}")


def clear(page) -> None:
    page.click("#clear")
    page.wait_for_function(IDLE_JS, arg={"n": 0, "user": None})
    assert users(page) == []


def test_a_reply_streams_into_the_chat(page, tmp_path):
    set_slider(page, "Max new tokens", 100)
    page.fill("#msg textarea", "hello")
    page.press("#msg textarea", "Enter")
    seen: list[int] = []
    deadline = time.monotonic() + 90
    while not is_idle(page, 1, "hello"):
        assert time.monotonic() < deadline, "the reply did not finish"
        texts = bots(page)
        if texts and "Loading content" not in texts[-1]:
            seen.append(len(texts[-1]))
        time.sleep(0.1)
    final = bots(page)
    assert len(final) == 1 and final[0], final
    assert users(page) == ["hello"]
    partial = sorted({n for n in seen if 0 < n < len(final[0])})
    assert len(partial) >= 2, f"the reply was not seen growing: lengths {seen} then {len(final[0])}"
    assert page.locator("#msg textarea").input_value() == ""  # the box is emptied for the next message

    shot = tmp_path / "chat.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.is_file() and shot.stat().st_size > 1000
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_regenerate_replaces_the_last_reply(page):
    first = send(page, "hello")
    assert first
    earlier = send(page, "and then?")
    page.click("#regenerate")
    wait_idle(page, 2, "and then?")
    deadline = time.monotonic() + 30  # in case the event's busy phase was missed: wait for the new text
    while bots(page)[-1] == earlier and time.monotonic() < deadline:
        time.sleep(0.2)
    wait_idle(page, 2, "and then?")
    assert users(page) == ["hello", "and then?"]
    texts = bots(page)
    assert len(texts) == 2
    assert texts[0] == first  # earlier turns stay as they were
    assert texts[1] and texts[1] != earlier  # sampling: a new reply, not a second one


def test_clear_history_empties_the_chat_and_the_history(page):
    send(page, "remember this")
    assert users(page) == ["remember this"]
    clear(page)
    assert bots(page) == []
    send(page, "fresh start")
    assert users(page) == ["fresh start"]  # the old turn does not come back with the next reply


def test_the_chatbots_own_clear_button_also_forgets_the_history(page):
    """gradio's Chatbot has its own trash-can button: after it, the old turns must not come back."""
    send(page, "remember this")
    page.click('#chatbot button[aria-label="Clear"]')
    page.wait_for_function(IDLE_JS, arg={"n": 0, "user": None})
    send(page, "fresh start")
    assert users(page) == ["fresh start"]


def test_the_system_prompt_changes_the_reply(page):
    set_slider(page, "Temperature (0 = greedy)", 0)

    def reply_with(system: str) -> str:
        page.fill("#system textarea", system)
        text = send(page, "hello")
        clear(page)
        return text

    default = reply_with("You are a helpful assistant.")
    pirate = reply_with("You are a pirate. Answer like one.")
    assert default and pirate
    assert pirate != default
    assert reply_with("You are a pirate. Answer like one.") == pirate  # greedy: reproducible
    assert reply_with("You are a helpful assistant.") == default


def start_long_reply_and_stop(page, text: str) -> str:
    """Send ``text`` with a 2000-token limit, press Stop once the reply is under way; return the shown reply."""
    set_slider(page, "Max new tokens", 2000)
    n = len(bots(page)) + 1
    page.fill("#msg textarea", text)
    page.press("#msg textarea", "Enter")
    page.wait_for_function(
        "n => { const b = document.querySelectorAll('#chatbot [data-testid=\"bot\"]');"
        " return b.length === n && b[n - 1].innerText.trim().length > 20 && !b[n - 1].innerText.includes('Loading'); }",
        arg=n,
    )
    page.click("#stop")
    page.wait_for_function(IDLE_JS, arg={"n": n, "user": text}, timeout=90_000)
    stopped = bots(page)[-1]
    time.sleep(1.5)
    assert bots(page)[-1] == stopped, "the reply kept growing after Stop"
    set_slider(page, "Max new tokens", 8)
    return stopped


def test_stop_ends_a_long_reply_and_the_chat_goes_on(page):
    start_long_reply_and_stop(page, "tell me a long story")
    assert send(page, "short one please")
    assert users(page)[-1] == "short one please"


def test_a_stopped_reply_stays_in_the_conversation(page):
    """After Stop the partial turn is on screen: the history must agree with it, so the next message
    follows it and Regenerate redoes it (not the turn before it)."""
    send(page, "hello")
    start_long_reply_and_stop(page, "tell me a long story")
    page.click("#regenerate")
    wait_idle(page)
    assert users(page) == ["hello", "tell me a long story"]
    send(page, "short one please")
    assert users(page) == ["hello", "tell me a long story", "short one please"]


def test_clear_during_a_reply_ends_it_and_it_does_not_come_back(page):
    set_slider(page, "Max new tokens", 2000)
    page.fill("#msg textarea", "tell me a long story")
    page.press("#msg textarea", "Enter")
    page.wait_for_function(
        "() => { const b = document.querySelectorAll('#chatbot [data-testid=\"bot\"]');"
        " return b.length === 1 && b[0].innerText.trim().length > 20 && !b[0].innerText.includes('Loading'); }"
    )
    page.click("#clear")
    page.wait_for_function(IDLE_JS, arg={"n": 0, "user": None}, timeout=90_000)
    time.sleep(1.5)
    assert bots(page) == [] and users(page) == [], "the cleared reply came back"
    set_slider(page, "Max new tokens", 8)
    send(page, "fresh start")
    assert users(page) == ["fresh start"]


def test_two_users_have_their_own_history(browser, web_url):
    alice, bob = open_chat(browser, web_url), open_chat(browser, web_url)
    try:
        for page, text in ((alice, "I am Alice"), (bob, "I am Bob")):  # both replies generate at once
            page.fill("#msg textarea", text)
            page.press("#msg textarea", "Enter")
        wait_idle(alice, user="I am Alice")
        wait_idle(bob, user="I am Bob")
        send(alice, "Alice again")
        assert users(alice) == ["I am Alice", "Alice again"]
        assert users(bob) == ["I am Bob"]
        clear(bob)
        assert users(alice) == ["I am Alice", "Alice again"]  # Bob's Clear History is Bob's alone
        send(bob, "Bob again")
        assert users(bob) == ["Bob again"]
        assert len(bots(alice)) == 2
    finally:
        alice.context.close()
        bob.context.close()


HTML_REPLY = ('<img src=x onerror="window.__pwned=1"><script>window.__pwned2=1</script>'
              '<a href="javascript:window.__pwned4=1" id="evil">link</a> hello')


@pytest.fixture(scope="module")
def scripted_url(tiny_chat, tokenizer):
    """The page around the tiny model whose lm_head is scripted to reply with HTML (streamed token by token
    through the engine, as any reply)."""
    from test_examples_online import ScriptedHead
    from transformers import AutoModelForCausalLM

    from qwen.apps.web import build_ui

    model = AutoModelForCausalLM.from_pretrained(tiny_chat).eval()
    model.lm_head = ScriptedHead(model.lm_head, tokenizer.im_end_id)
    model.lm_head.load(tokenizer.encode(HTML_REPLY))
    model.generation_config.max_new_tokens = 200  # the page's default: room for the whole script
    demo = build_ui(model, tokenizer)
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_until_ok(url, 60)
        yield url
    finally:
        demo.close()


def test_html_in_a_reply_or_a_message_does_not_run(browser, scripted_url):
    page = open_chat(browser, scripted_url)
    try:
        reply = send(page, '<img src=y onerror="window.__pwned3=1"> hi', shown="hi")
        assert "hello" in reply
        page.wait_for_timeout(500)  # give any injected handler time to fire
        flags = page.evaluate("() => [window.__pwned, window.__pwned2, window.__pwned3, window.__pwned4]")
        assert flags == [None, None, None, None], flags
        assert page.locator("#chatbot script").count() == 0
        assert page.locator("#chatbot [onerror]").count() == 0
        assert page.locator('#chatbot [href^="javascript:"]').count() == 0
        if page.locator("#chatbot #evil").count():
            page.click("#chatbot #evil")
            assert page.evaluate("() => window.__pwned4") is None
    finally:
        page.context.close()


def test_a_bad_checkpoint_path_gives_a_one_line_error(tmp_path, tiny_chat):
    missing = tmp_path / "nonexistent"
    no_weights = tmp_path / "no-weights"  # has a config.json, but no weight files
    no_weights.mkdir()
    (no_weights / "config.json").write_text((Path(tiny_chat) / "config.json").read_text())
    procs = {
        path: subprocess.Popen(
            [sys.executable, WEB, "-c", str(path), "--server-port", str(free_port())], cwd=ROOT, env=ENV,
            text=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        for path in (missing, no_weights)
    }
    try:
        for path, proc in procs.items():
            out, err = proc.communicate(timeout=120)
            assert proc.returncode != 0, (path, out, err)
            assert "Traceback" not in out + err, err
            errors = [line for line in err.splitlines() if line.startswith("error:")]
            assert len(errors) == 1, err
            assert str(path) in errors[0]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_speculative_flags_reach_the_engine(tmp_path, tiny_chat):
    """``--speculative`` and ``--draft-model`` go to the page's engine: settings it refuses, and a draft that cannot
    load, end the program with a one-line error before the page starts."""
    cases = {"int8 KV cache": ["--speculative", "ngram", "--kv-cache-int8"],
             f"--draft-model {tmp_path / 'nowhere'}": ["--draft-model", str(tmp_path / "nowhere")]}
    for says, extra in cases.items():
        done = subprocess.run([sys.executable, WEB, "-c", str(tiny_chat), "--server-port", str(free_port()), *extra],
                              cwd=ROOT, env=ENV, text=True, stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert done.returncode != 0 and "Traceback" not in done.stderr and len(errors) == 1, done.stderr
        assert says in errors[0], errors


def test_a_speculative_page_gives_the_plain_pages_greedy_reply(browser, web_url, tiny_chat, tmp_path):
    """``--draft-model`` through the page, an unrelated small draft whose guesses are mostly wrong: the same greedy
    reply as without (kept only where the model agrees)."""
    from qwen.tiny import make_tiny_checkpoint

    draft = make_tiny_checkpoint(tmp_path / "draft", layers=1, hidden=32, heads=2, intermediate=64, seed=7)
    replies = []
    with web_demo(tiny_chat, tmp_path, "--draft-model", str(draft)) as fast_url:
        for url in (web_url, fast_url):
            page = open_chat(browser, url)
            set_slider(page, "Temperature (0 = greedy)", 0)
            set_slider(page, "Max new tokens", 40)
            replies.append(send(page, "hello"))
            page.context.close()
    assert replies[0] and replies[1] == replies[0]
