"""The labelling API: every call checks the token, the page never learns which model wrote what,
a missing item is a 404, bad input is one sentence (never a traceback), and two annotators'
judgments of one item are both kept."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from lmforge.label.app import STATIC, create_app
from lmforge.label.store import Response, Store


@pytest.fixture()
def setup(tmp_path):
    s = Store(tmp_path / "l.sqlite")
    s.configure(mode="rank", overlap=1.0, overlap_annotators=2)
    for i in range(6):
        s.add_item(f"q{i}", [{"role": "user", "content": f"Question {i}?"}],
                   [Response(f"answer {i}.{j}", f"secret-model-{j}", {"seed": j}) for j in range(3)], source="t")
    ann, bob = s.add_annotator("ann"), s.add_annotator("bob")
    return TestClient(create_app(s)), s, {"Authorization": f"Bearer {ann}"}, {"Authorization": f"Bearer {bob}"}


def test_every_call_checks_the_token(setup):
    c, s, ann, _ = setup
    for method, path in (("get", "/api/me"), ("get", "/api/next"), ("get", "/api/items/1"), ("post", "/api/undo"),
                         ("get", "/api/stats")):
        for headers in ({}, {"Authorization": "Bearer not-a-token"}, {"Authorization": ann["Authorization"][7:]}):
            r = getattr(c, method)(path, headers=headers)
            assert r.status_code == 401 and "token" in r.json()["detail"], (path, headers)
    r = c.post("/api/judgments", json={"item_id": 1, "verdict": "tie"}, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and s.judgments() == []


def test_items_hide_models_and_shuffle_per_annotator(setup):
    c, s, ann, bob = setup
    assert c.get("/api/me", headers=ann).json()["name"] == "ann"
    orders = []
    for i in range(1, 7):
        r = c.get(f"/api/items/{i}", headers=ann)
        assert r.status_code == 200 and "secret-model" not in r.text and "seed" not in r.text
        shown = [x["id"] for x in r.json()["item"]["responses"]]
        assert shown == [x["id"] for x in c.get(f"/api/items/{i}", headers=ann).json()["item"]["responses"]]
        assert sorted(shown) == [x["id"] for x in s.item(i)["responses"]]
        orders.append(shown)
    assert any(o != sorted(o) for o in orders)  # shuffled (6 items x 3 responses: all in order is 1 in 6^6)
    first = c.get("/api/next", headers=ann).json()
    assert first["item"]["id"] == c.get("/api/next", headers=ann).json()["item"]["id"]  # same item until judged
    assert first["progress"] == {"done": 0, "remaining": 6, "total": 6}


def test_missing_item_is_404_and_bad_input_one_sentence(setup):
    c, s, ann, _ = setup
    assert c.get("/api/items/999", headers=ann).status_code == 404
    r = c.post("/api/judgments", json={"item_id": 999, "verdict": "tie"}, headers=ann)
    assert r.status_code == 404 and r.json() == {"detail": "There is no item 999."}
    rid = [x["id"] for x in s.item(1)["responses"]]
    bad = [({"item_id": 1, "verdict": "ranked", "ranking": rid[:2]}, "ranking"),
           ({"item_id": 1, "verdict": "ranked", "ranking": "abc"}, "ranking"),
           ({"item_id": "x", "verdict": "tie"}, "item_id"),
           ({"item_id": 1}, "verdict"),
           ({"item_id": 1, "verdict": "tie", "color": "red"}, "color"),
           ({"item_id": 1, "verdict": "tie", "flags": {str(rid[0]): ["rude"]}}, "flags")]
    for body, word in bad:
        r = c.post("/api/judgments", json=body, headers=ann)
        detail = r.json()["detail"]
        assert r.status_code == 422 and isinstance(detail, str) and word in detail and detail.count("\n") == 0, body
    r = c.post("/api/judgments", content=b"{not json", headers={**ann, "Content-Type": "application/json"})
    assert r.status_code == 422 and isinstance(r.json()["detail"], str)
    assert s.judgments() == []


def test_two_annotators_keep_their_judgments_and_undo(setup):
    c, s, ann, bob = setup
    rid = [x["id"] for x in s.item(1)["responses"]]
    assert c.post("/api/judgments", json={"item_id": 1, "verdict": "ranked", "ranking": rid, "seconds": 2.5},
                  headers=ann).status_code == 200
    assert c.post("/api/judgments", json={"item_id": 1, "verdict": "ranked", "ranking": rid[::-1],
                                          "flags": {str(rid[0]): ["wrong"]}}, headers=bob).status_code == 200
    live = s.judgments()
    assert [(j["annotator"], j["ranking"]) for j in live] == [("ann", rid), ("bob", rid[::-1])]
    assert c.post("/api/undo", headers=bob).json()["item_id"] == 1
    nxt = c.get("/api/next", headers=bob).json()
    assert nxt["item"]["id"] == 1 and nxt["previous"]["ranking"] == rid[::-1]  # back, pre-filled
    assert [j["annotator"] for j in s.judgments()] == ["ann"]
    st = c.get("/api/stats", headers=ann).json()
    assert st["judgments"] == 1 and st["judgments_per_annotator"] == {"ann": 1}


def test_page_uses_no_internet_asset_and_forbids_inline_script(setup):
    c, *_ = setup
    r = c.get("/")
    assert r.status_code == 200 and "label.js" in r.text
    assert "script-src 'self'" in r.headers["content-security-policy"]
    for f in STATIC.iterdir():
        text = f.read_text()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), f  # no CDN, font or image URL
        assert c.get(f"/static/{f.name}").status_code == 200
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write", (STATIC / "label.js").read_text())
