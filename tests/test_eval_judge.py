"""MLLM judge mechanics against a fake OpenAI-compatible server on 127.0.0.1 (started by the tests)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from lorakit.cli import main
from lorakit.eval.images import Concept
from lorakit.eval.judge import (
    AnswerCache,
    JudgeClient,
    JudgeError,
    judge_pair,
    judge_presence,
    parse_pairwise,
    parse_yesno,
)


class FakeJudge:
    """A chat-completions server whose answer is ``reply(request_body) -> (status, text)``."""

    def __init__(self):
        self.requests = []
        self.reply = lambda body: (200, "yes")
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                status, text = outer.reply(body)
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    server = FakeJudge()
    yield server
    server.close()


def _client(fake, cache=None, **kw):
    kw = {"retries": 2, "parse_retries": 1, "timeout": 10, "sleep": lambda s: None, **kw}
    return JudgeClient(fake.url, "fake-vl", cache=AnswerCache(cache), **kw)


def _image(path, color):
    Image.new("RGB", (8, 8), color).save(path)
    return path


def _images_in(body):
    return [p["image_url"]["url"] for p in body["messages"][0]["content"] if p["type"] == "image_url"]


@pytest.fixture
def two_images(tmp_path):
    return _image(tmp_path / "a.png", "red"), _image(tmp_path / "b.png", "blue")


def _biased_scores(a_url):
    """The judge likes A (8 first, 6 second) more than B (4 first, 2 second): a +2 bias for the first position."""

    def reply(body):
        first_is_a = _images_in(body)[0] == a_url
        s1, s2 = (8, 2) if first_is_a else (4, 6)
        return 200, json.dumps({"image_1": {"composition": s1, "quality": s1 - 1}, "image_2": {"composition": s2, "quality": s2 - 1}})

    return reply


def test_pairwise_asks_both_orders_and_averages(fake, two_images):
    from lorakit.eval.judge import data_url

    a, b = two_images
    fake.reply = _biased_scores(data_url(a))
    out = judge_pair(_client(fake), a, b, "a red cat")
    assert len(fake.requests) == 2
    firsts = [_images_in(r["body"])[0] for r in fake.requests]
    assert firsts == [data_url(a), data_url(b)]  # A first, then B first
    assert out["a"] == {"composition": 7.0, "quality": 6.0}  # (8 + 6) / 2
    assert out["b"] == {"composition": 3.0, "quality": 2.0}  # (4 + 2) / 2
    assert not out["failed"]
    assert fake.requests[0]["path"] == "/v1/chat/completions"
    assert fake.requests[0]["body"]["model"] == "fake-vl"
    assert "a red cat" in fake.requests[0]["body"]["messages"][0]["content"][0]["text"]


def test_cache_hits_skip_the_server(fake, two_images, tmp_path):
    from lorakit.eval.judge import data_url

    a, b = two_images
    fake.reply = _biased_scores(data_url(a))
    cache = tmp_path / "cache.json"
    first = judge_pair(_client(fake, cache), a, b, "a red cat")
    assert len(fake.requests) == 2 and cache.exists()
    client = _client(fake, cache)  # a new run reading the cache file
    again = judge_pair(client, a, b, "a red cat")
    assert len(fake.requests) == 2 and client.cache.hits == 2 and again["a"] == first["a"]
    judge_pair(client, a, b, "another prompt")  # a different question is not a hit
    assert len(fake.requests) == 4
    other_model = JudgeClient(fake.url, "other-model", cache=AnswerCache(cache), sleep=lambda s: None)
    judge_pair(other_model, a, b, "a red cat")  # the model is part of the key
    assert len(fake.requests) == 6


def test_malformed_answers_are_retried_then_recorded(fake, two_images, tmp_path):
    a, b = two_images
    answers = iter(["I like them both", json.dumps({"image_1": {"composition": 5, "quality": 5}, "image_2": {"composition": 5, "quality": 5}})])
    fake.reply = lambda body: (200, next(answers, "no scores here"))
    out = judge_pair(_client(fake, tmp_path / "c.json"), a, b, "p")
    # order A,B: malformed then good (2 requests); order B,A: malformed twice -> failed (parse_retries=1)
    assert len(fake.requests) == 4
    assert out["failed"] and out["a"] is None and out["a_first"] is not None and out["b_first"] is None
    assert "no scores here" in out["answers"]
    cached = json.loads((tmp_path / "c.json").read_text())
    assert len(cached) == 1  # only the parsed answer is cached


def test_transport_errors_retry_and_fatal_errors_stop(fake, two_images):
    a, _ = two_images
    statuses = iter([503, 429, 200])
    fake.reply = lambda body: (next(statuses), "yes")
    verdict = judge_presence(_client(fake), a, [Concept("cat", "character", "a cat")])
    assert verdict["answers"] == {"cat": True} and len(fake.requests) == 3
    fake.reply = lambda body: (401, "bad key")
    with pytest.raises(JudgeError, match="401"):
        judge_presence(_client(fake, api_key="sk-x"), a, [Concept("dog")])
    assert fake.requests[-1]["auth"] == "Bearer sk-x"
    with pytest.raises(JudgeError, match="cannot reach"):
        JudgeClient("http://127.0.0.1:9/v1", "m", retries=1, sleep=lambda s: None, timeout=2).ask(
            "yesno", [a], "q?", parse_yesno
        )


def test_parsers():
    good = {"image_1": {"composition": 7.0, "quality": 6.0}, "image_2": {"composition": 3.0, "quality": 8.5}}
    assert parse_pairwise('```json\n{"image_1": {"composition": 7, "quality": "6/10"}, "image_2": {"composition": 3, "quality": 8.5}}\n```') == good
    assert parse_pairwise("Image 1: composition 7/10, quality 6. Image 2 - Composition: 3, Quality: 8.5") == good
    assert parse_pairwise("7, 6, 3, 8.5") == good
    assert parse_pairwise('{"composition": [7, 3], "quality": [6, 8.5]}') == good
    assert parse_pairwise('{"image_1": {"composition": 12, "quality": 6}, "image_2": {"composition": 3, "quality": 8}}') is None
    assert parse_pairwise("both are fine") is None and parse_pairwise(None) is None
    assert [parse_yesno(t) for t in ("Yes.", "no", "**No**, it does not", '{"answer": "yes"}', "I think so: yes", "maybe", "Answer: No")] == [
        True, False, False, True, True, None, False]


def test_cli_yesno_and_pairwise(fake, tmp_path):
    from lorakit.eval.judge import data_url

    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir(), b_dir.mkdir()
    for i, color in enumerate(("red", "green", "white")):
        _image(a_dir / f"{i}.png", color)
        _image(b_dir / f"{i}.png", "black")
        side = {"prompt": f"p{i}", "concepts": [{"name": "cat", "category": "character", "description": "a cat"},
                                                 {"name": "ink", "category": "style", "description": "ink drawing"}]}
        (a_dir / f"{i}.json").write_text(json.dumps(side))
    red, green = data_url(a_dir / "0.png"), data_url(a_dir / "1.png")

    def yesno(body):
        text = body["messages"][0]["content"][0]["text"]
        url = _images_in(body)[0]
        if url == green:
            return 200, "hmm"  # malformed forever -> failed, the run goes on
        return 200, "Yes" if (url == red or "style" not in text) else "No"

    fake.reply = yesno
    args = ["eval", "--metric", "judge", "--protocol", "yesno", "--images", str(a_dir), "--judge-url", fake.url,
            "--judge-model", "m", "--retries", "0", "--parse-retries", "0"]
    assert main(args) == 0
    res = json.loads((a_dir / "eval_judge_yesno.json").read_text())
    s = res["summary"]
    assert s["images"] == 3 and s["failed_images"] == 1 and s["all_present_rate"] == 0.5
    assert s["per_concept"]["cat"] == {"rate": 1.0, "n": 2} and s["per_concept"]["ink"] == {"rate": 0.5, "n": 2}
    assert (a_dir / "eval_judge_yesno.md").read_text().count("|") > 10
    n = len(fake.requests)
    assert main(args) == 0 and len(fake.requests) == n + 2  # cached except the failed image's two questions

    fake.reply = lambda body: (200, "Image 1: composition 9, quality 8. Image 2: composition 1, quality 2")
    assert main(["eval", "--metric", "judge", "--images", str(a_dir), "--against", str(b_dir), "--judge-url", fake.url,
                 "--judge-model", "m", "--out", str(tmp_path / "pw")]) == 0
    res = json.loads((tmp_path / "pw.json").read_text())
    assert res["pairs"] == 3 and res["mean"]["a"]["composition"] == 5.0  # (9 + 1) / 2: position bias cancels
    assert res["composition_wins"] == {"a": 0, "b": 0, "ties": 3}


def test_toy_concepts_are_described_for_the_judge():
    import lorakit.toyworld  # noqa: F401  (registers the trigger words' descriptions)
    from lorakit.eval.metrics import _described
    from lorakit.eval.judge import presence_question

    robot, ink = _described(Concept("zorbo")), _described(Concept("inkvel"))
    assert robot.category == "character" and "robot" in presence_question(robot) and "zorbo" not in presence_question(robot)
    assert ink.category == "style" and presence_question(ink).startswith("Is this image rendered in the style of ink")
    assert _described(Concept("x")) == Concept("x") and _described(Concept("ink")) == Concept("ink")  # plain words: as given


def test_key_is_not_sent_along_a_redirect_to_another_host(fake, two_images):
    """Issue 13 case 5: a 302 to another host must not carry Authorization (urllib copies it by default)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen = []

    class Redirect(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(302)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    class Other(BaseHTTPRequestHandler):  # another origin (port): records what arrives
        def do_GET(self):  # noqa: N802
            seen.append(dict(self.headers))
            data = json.dumps({"choices": [{"message": {"content": "yes"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_POST = do_GET

        def log_message(self, *args):
            pass

    servers = [ThreadingHTTPServer(("127.0.0.1", 0), h) for h in (Redirect, Other)]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    target = f"http://127.0.0.1:{servers[1].server_address[1]}/v1/chat/completions"
    try:
        client = JudgeClient(f"http://127.0.0.1:{servers[0].server_address[1]}/v1", "m", api_key="sk-secret",
                             retries=0, parse_retries=0, timeout=10, sleep=lambda s: None)
        client._post({"model": "m", "messages": []})
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()
    assert len(seen) == 1
    assert not any(k.lower() in ("authorization", "cookie") for k in seen[0]), seen[0]
