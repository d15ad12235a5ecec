"""The labelling page in a real headless Chromium (Debian's chromium + chromedriver, driven by
selenium; the Makefile installs them): an annotator labels five prompts by keyboard alone, reloads
the page, the server is SIGKILLed and restarted, the annotator continues and undoes a judgment.
Then: the stored judgments, the export, and a tiny reward model trained on the export ranks the
labelled-better response above the others on those items.

LMFORGE_LABEL_SCREENSHOT=docs/label.png also saves the screenshot there (the README's image)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from lmforge.label.store import Store

from ..train.conftest import run_cli, write_yaml

GOOD = {"animal": ["The quick brown fox.", "The old fox.", "A brown fox."], "number": ["Three.", "Two plus two."]}
BAD = {"animal": ["Four.", "<b>Two.</b><script>window.pwned = 1</script>", "Five."],
       "number": ["The lazy dog.", "A brown dog."]}
IDK = "I don't know."
KINDS = ["animal", "number", "animal", "number", "animal"]
SUBJ = ["The king sees the bridge.", "A fox loves a song.", "My sister finds the gate.", "The river is old.",
        "A child greets the queen."]


def items() -> list[dict]:
    """Five prompts; the better answer is the kind the question asks for, "I don't know." in between."""
    rows, count = [], {"animal": 0, "number": 0}
    for i, kind in enumerate(KINDS):
        j = count[kind]
        count[kind] += 1
        rows.append({"id": f"q{i + 1}", "prompt": f"{SUBJ[i]} Name {'an animal' if kind == 'animal' else 'a number'}.",
                     "responses": [{"text": BAD[kind][j], "model": "worse-model", "sampling": {"temperature": 1.0}},
                                   {"text": IDK, "model": "shy-model", "sampling": {"temperature": 0.7}},
                                   {"text": GOOD[kind][j], "model": "better-model", "sampling": {"temperature": 1.0}}]})
    return rows


def score(text: str) -> int:
    return 0 if text in sum(BAD.values(), []) else 1 if text == IDK else 2


def chrome():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser and driver):
        pytest.fail("chromium and chromedriver are needed (`make test` installs them as root: apt-get install "
                    "chromium chromium-driver)")
    o = webdriver.ChromeOptions()
    o.binary_location = browser
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,860", "--disable-gpu",
              "--disable-extensions", "--no-first-run"):
        o.add_argument(a)
    return webdriver.Chrome(service=Service(driver), options=o)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(resp: Path, out: Path, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lmforge.cli", "label", "--responses", str(resp), "--out", str(out), "--k", "3",
           "--port", str(port), "--overlap", "1", "--max-wait", "900"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    for _ in range(600):  # the server answers 401 without a token once it is up
        if p.poll() is not None:
            pytest.fail(f"the label server exited: {p.stdout.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/me", timeout=1).status_code == 401:
                return p
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    p.kill()
    pytest.fail("the label server did not start")


def test_label_by_keyboard_across_reload_and_kill(tmp_path, tiny_model_dir):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    resp = tmp_path / "responses.jsonl"
    resp.write_text("".join(json.dumps(r) + "\n" for r in items()))
    out, port = tmp_path / "labels", free_port()
    token = run_cli("label", "--add-annotator", "ann", "--add-annotator", "bob", "--out", str(out), timeout=120)
    assert token.returncode == 0, token.stderr
    ann = token.stdout.split("annotator ann: token ")[1].split()[0]
    server = start_server(resp, out, port)
    d = chrome()
    try:
        keys = lambda *ks: ActionChains(d).send_keys(*ks).perform()  # noqa: E731 - to whatever has focus
        wait = WebDriverWait(d, 60)

        def count(n):
            wait.until(lambda d: d.find_element(By.ID, "count").text == f"{n} / 5")

        def cards() -> list[tuple[str, str]]:
            return [(c.find_element(By.CLASS_NAME, "label").text, c.find_element(By.CLASS_NAME, "text").text)
                    for c in d.find_elements(By.CSS_SELECTOR, "#responses .card")]

        def rank_by_rule(best_first=True):
            order = sorted(cards(), key=lambda c: -score(c[1]) if best_first else score(c[1]))
            keys(*[label for label, _ in order[:2]])  # the third is implied

        def prompt() -> str:
            return d.find_element(By.ID, "prompt").text

        d.get(f"http://127.0.0.1:{port}/?token={ann}")
        count(0)
        assert "token" not in d.current_url  # moved to localStorage, out of the address bar
        assert "worse-model" not in d.page_source and "better-model" not in d.page_source
        keys_text = d.find_element(By.ID, "keys").text
        assert "rank the next best" in keys_text and "undo last judgment" in keys_text
        t0 = time.perf_counter()
        # 1: flag the wrong answer (w, then its key), rank, submit
        bad = next(label for label, text in cards() if score(text) == 0)
        keys("w", bad)
        wait.until(lambda d: "wrong" in d.find_element(By.CSS_SELECTOR, "#responses").text)
        best = max(cards(), key=lambda c: score(c[1]))[0]
        keys(best)
        d.save_screenshot(str(tmp_path / "label.png"))
        if os.environ.get("LMFORGE_LABEL_SCREENSHOT"):
            d.save_screenshot(os.environ["LMFORGE_LABEL_SCREENSHOT"])
        keys(Keys.BACKSPACE)
        rank_by_rule()
        keys(Keys.ENTER)
        count(1)
        # 2: write an ideal answer (e, type, Esc), rank, submit
        keys("e", "Seven.", Keys.ESCAPE)
        rank_by_rule()
        keys(Keys.ENTER)
        count(2)
        # reload: the same item, the same progress
        before = prompt()
        d.refresh()
        count(2)
        assert prompt() == before
        # 3: the response holding <script> and <b> is shown as text, never run or rendered
        assert d.execute_script("return window.pwned") is None
        assert d.find_elements(By.CSS_SELECTOR, "#responses script, #responses b") == []
        assert any("<script>window.pwned = 1</script>" in text for _, text in cards())
        keys("n", "markup in a response", Keys.ESCAPE)
        rank_by_rule()
        keys(Keys.ENTER)
        count(3)
        # SIGKILL the server: every committed judgment is on disk
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=30)
        t_kill = time.perf_counter()
        s = Store(out / "labels.sqlite")
        assert [j["prompt_id"] for j in s.judgments()] == ["q1", "q2", "q3"]
        s.close()
        server = start_server(resp, out, port)
        t_back = time.perf_counter()
        # 4: the page is still open on item 4; the annotator just continues
        rank_by_rule()
        keys(Keys.ENTER)
        count(4)
        # 5: a wrong ranking, undone (z), cleared (Backspace) and redone
        rank_by_rule(best_first=False)
        keys(Keys.ENTER)
        count(5)
        wait.until(lambda d: d.find_element(By.ID, "done").is_displayed())
        keys("z")
        count(4)
        wait.until(lambda d: d.find_element(By.ID, "work").is_displayed())
        assert len(d.find_elements(By.CSS_SELECTOR, "#responses .card.ranked, #responses .card.best")) == 3  # pre-filled
        keys(Keys.BACKSPACE)
        rank_by_rule()
        keys(Keys.ENTER)
        count(5)
        wall = time.perf_counter() - t0 - (t_back - t_kill)
        print(f"\nlabel browser test: 6 judgments + 1 undo by keyboard in {wall:.1f}s "
              f"({6 * 60 / wall:.0f} judgments per minute, server restart excluded)")
    finally:
        d.quit()
        server.send_signal(signal.SIGINT)  # Ctrl-C: the server stops and exports what was labelled
        server_out = server.communicate(timeout=120)[0]
    assert server.returncode == 0 and "stopped by the user" in server_out, server_out
    png = (tmp_path / "label.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000

    s = Store(out / "labels.sqlite")
    live = s.judgments()
    assert [j["prompt_id"] for j in live] == ["q1", "q2", "q3", "q4", "q5"] and {j["annotator"] for j in live} == {"ann"}
    assert [j["status"] for j in s.judgments(live=False)].count("undone") == 1
    for j in live:
        texts = {r["id"]: r["text"] for r in s.item(j["item_id"])["responses"]}
        assert [score(texts[r]) for r in j["ranking"]] == [2, 1, 0] and j["seconds"] > 0
    assert [texts_flag for j in live for texts_flag in j["flags"].values()] == [["wrong"]]
    assert live[1]["ideal"] == "Seven." and live[2]["note"] == "markup in a response"

    r = run_cli("label", "export", str(out), "--to", str(tmp_path / "export"), timeout=120)
    assert r.returncode == 0, r.stderr
    pref = [json.loads(x) for x in (tmp_path / "export/preference.jsonl").read_text().splitlines()]
    assert len(pref) == 15 and all(score(p["chosen"]) > score(p["rejected"]) for p in pref)
    assert {p["provenance"]["chosen"]["model"] for p in pref} == {"better-model", "shy-model"}
    sft = [json.loads(x) for x in (tmp_path / "export/sft.jsonl").read_text().splitlines()]
    assert [row["messages"][-1]["content"] for row in sft] == ["Seven."]
    assert (out / "data/preference.jsonl").read_text() == (tmp_path / "export/preference.jsonl").read_text()

    # A tiny reward model trained on the export ranks the labelled-better response higher.
    from lmforge.pipeline import run_single
    from lmforge.scoring import load_reward_model

    train = dict(max_steps=40, batch_size=8, lr=3e-3, warmup_steps=2, eval_every=0, checkpoint_every=0, log_every=10,
                 tensorboard=False, threads=1, seed=11, keep_best=False)
    cfg = {"model": str(tiny_model_dir), "data": str(tmp_path / "export/preference.jsonl"), "val_fraction": 0.0,
           "train": train}
    run_single("reward", str(write_yaml(tmp_path / "reward.yaml", cfg)), [], out=str(tmp_path / "reward"),
               force=True, resume=False, echo=lambda *a: None)
    rm = load_reward_model(str(tmp_path / "reward"), device="cpu")
    for p in pref:
        c, r = rm.score([p["prompt"]] * 2, [p["chosen"], p["rejected"]])
        assert c > r, (p["prompt"], p["chosen"], p["rejected"], c, r)


def test_pairwise_by_keyboard(tmp_path):
    """Pairwise mode: a/b pick a side, t tie, x both bad, s skip; the stored verdicts follow the keys."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from lmforge.label.app import Server
    from lmforge.label.store import Response

    s = Store(tmp_path / "l.sqlite")
    s.configure(mode="pairwise", overlap=0.0, overlap_annotators=2)
    for i in range(4):
        s.add_item(f"q{i}", [{"role": "user", "content": f"Pick one {i}."}],
                   [Response(f"left {i}", "m0", {}), Response(f"right {i}", "m1", {})], "t")
    token = s.add_annotator("ann")
    server = Server(s, "127.0.0.1", 0).start()
    d = chrome()
    try:
        wait = WebDriverWait(d, 60)
        d.get(f"{server.url}?token={token}")
        wait.until(lambda d: d.find_element(By.ID, "count").text == "0 / 4")
        assert "A is better" in d.find_element(By.ID, "keys").text and "both bad" in d.find_element(By.ID, "keys").text
        chosen = []
        for n, key in enumerate(["b", "t", "x", "s"]):
            labels = [c.find_element(By.CLASS_NAME, "label").text for c in d.find_elements(By.CSS_SELECTOR, ".card")]
            texts = [c.find_element(By.CLASS_NAME, "text").text for c in d.find_elements(By.CSS_SELECTOR, ".card")]
            assert labels == ["A", "B"]
            chosen.append(texts[1])
            ActionChains(d).send_keys(key, *([Keys.ENTER] if key != "s" else [])).perform()
            wait.until(lambda d, n=n: d.find_element(By.ID, "count").text == f"{n + 1} / 4")
        wait.until(lambda d: d.find_element(By.ID, "done").is_displayed())
    finally:
        d.quit()
        server.stop()
    live = s.judgments()
    assert [j["verdict"] for j in live] == ["ranked", "tie", "all_bad", "skip"]
    first = {r["id"]: r["text"] for r in s.item(live[0]["item_id"])["responses"]}
    assert first[live[0]["ranking"][0]] == chosen[0]  # B, as shown, is the preferred one


DRAG = """
const [card, slot] = arguments;
const dt = new DataTransfer();
card.dispatchEvent(new DragEvent("dragstart", {dataTransfer: dt, bubbles: true}));
slot.dispatchEvent(new DragEvent("dragover", {dataTransfer: dt, bubbles: true, cancelable: true}));
slot.dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
"""


def test_rank_by_dragging(tmp_path):
    """Dropping a card on a place of the ranking bar ranks it there (the mouse alternative to 1..k)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from lmforge.label.app import Server
    from lmforge.label.store import Response

    s = Store(tmp_path / "l.sqlite")
    s.configure(mode="rank", overlap=0.0, overlap_annotators=2)
    s.add_item("q0", [{"role": "user", "content": "Rank us."}], [Response(t, "m", {}) for t in ("x", "y", "z")], "t")
    token = s.add_annotator("ann")
    server = Server(s, "127.0.0.1", 0).start()
    d = chrome()
    try:
        wait = WebDriverWait(d, 60)
        d.get(f"{server.url}?token={token}")
        wait.until(lambda d: d.find_element(By.ID, "count").text == "0 / 1")
        shown = [c.find_element(By.CLASS_NAME, "text").text for c in d.find_elements(By.CSS_SELECTOR, ".card")]
        for place, card in ((0, 2), (1, 0)):  # the third card shown to #1, the first to #2; the last is implied
            cards, slots = d.find_elements(By.CSS_SELECTOR, ".card"), d.find_elements(By.CSS_SELECTOR, ".slot")
            d.execute_script(DRAG, cards[card], slots[place])
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".slot.filled")) == 3)
        ActionChains(d).send_keys(Keys.ENTER).perform()
        wait.until(lambda d: d.find_element(By.ID, "count").text == "1 / 1")
    finally:
        d.quit()
        server.stop()
    j = s.judgments()[0]
    texts = {r["id"]: r["text"] for r in s.item(j["item_id"])["responses"]}
    assert [texts[r] for r in j["ranking"]] == [shown[2], shown[0], shown[1]]
