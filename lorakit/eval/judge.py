"""An MLLM judge on any OpenAI-compatible chat endpoint (vLLM, ollama, llama.cpp server, hosted APIs).

Two protocols (docs/eval.md, "MLLM judge"):
  * ``pairwise``: two images from one prompt, each scored 0-10 on composition and quality; asked in both orders
    (image A first, then B first) and averaged, which cancels the judge's position bias.
  * ``yesno``: one image, one question per concept ("does it show the subject?", "is it in the style?");
    an image passes when every answer is yes (LoRA.rar's subject+style protocol).

Answers are parsed robustly (a JSON object, or free text with labelled numbers / yes-no words). A malformed
answer is asked again (``parse_retries``) and then recorded as failed; transport errors (timeouts, 429, 5xx)
are retried with exponential backoff. Only a judge that can never be used (unreachable from the first request,
401/403/404) stops the run. Answers are cached in a JSON file keyed by the images' SHA-256, the protocol, the
model and the question, so a rerun asks only what it has not asked before.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lorakit.eval.report import all_present
from lorakit.fileio import write_json
from lorakit.hashing import file_sha256
from lorakit.logs import tqdm

KEY_ENV_VARS = ("LORAKIT_JUDGE_API_KEY", "OPENAI_API_KEY")

PAIRWISE_QUESTION = """You compare two images made by a text-to-image model from the same prompt.
Prompt: "{prompt}"
{concepts}Score EACH image from 0 to 10 on two criteria:
- composition: every requested element (characters, objects, style, background) is present, recognisable and combined into one coherent scene;
- quality: overall visual quality, detail and absence of artifacts.
The first image shown is image 1, the second is image 2.
Answer with JSON only, no other text:
{{"image_1": {{"composition": <0-10>, "quality": <0-10>}}, "image_2": {{"composition": <0-10>, "quality": <0-10>}}}}"""

SUBJECT_QUESTION = "Does this image show {description}? Answer with one word: yes or no."
STYLE_QUESTION = "Is this image rendered in the style of {description}? Answer with one word: yes or no."
STYLE_CATEGORIES = ("style",)
CRITERIA = ("composition", "quality")


class JudgeError(ValueError):
    """The judge endpoint cannot be used at all (unreachable, bad key, unknown model/URL)."""


# ------------------------------------------------------------------------------------------------- parsing


def _json_objects(text: str):
    """Every JSON object embedded in ``text`` (code fences and prose around it are ignored), in order."""
    decoder = json.JSONDecoder()
    for m in re.finditer(r"\{", text):
        try:
            obj, _ = decoder.raw_decode(text, m.start())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            yield obj


def _number(value) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        m = re.match(r"\s*(-?\d+(?:\.\d+)?)", value)
        return float(m.group(1)) if m else None
    return None


def _norm(key: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(key).lower())


_IMAGE_KEYS = {
    "image_1": ("image1", "img1", "1", "first", "firstimage", "a"),
    "image_2": ("image2", "img2", "2", "second", "secondimage", "b"),
}


def _scores_from_json(obj: dict) -> dict | None:
    keys = {_norm(k): v for k, v in obj.items()}
    out = {}
    for idx, names in _IMAGE_KEYS.items():
        entry = next((keys[n] for n in names if n in keys), None)
        if not isinstance(entry, dict):
            break
        sub = {_norm(k): v for k, v in entry.items()}
        out[idx] = {c: _number(sub.get(c)) for c in CRITERIA}
    else:
        return out
    # {"composition": [a, b], "quality": [a, b]}
    if all(isinstance(keys.get(c), list) and len(keys[c]) == 2 for c in CRITERIA):
        return {f"image_{i + 1}": {c: _number(keys[c][i]) for c in CRITERIA} for i in range(2)}
    return None


def _scores_from_text(text: str) -> dict | None:
    clean = re.sub(r"(?i)\s*(?:/\s*10|out of 10)\b", "", text)
    parts = re.split(r"(?i)\b(?:image|img|picture)\s*#?\s*([12])\b", clean)
    found: dict[str, dict] = {"image_1": {}, "image_2": {}}
    for label, body in zip(parts[1::2], parts[2::2]):
        for crit in CRITERIA:
            m = re.search(rf"(?i)\b{crit}\b\W{{0,12}}?(?:score\W{{0,3}})?(-?\d+(?:\.\d+)?)", body)
            if m and crit not in found[f"image_{label}"]:
                found[f"image_{label}"][crit] = float(m.group(1))
    if all(len(v) == 2 for v in found.values()):
        return found
    # Last resort: exactly four bare numbers, read as composition 1, quality 1, composition 2, quality 2.
    bare = re.sub(r"(?i)\b(?:image|img|picture)\s*#?\s*[12]\b", " ", clean)
    nums = [float(x) for x in re.findall(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w.])", bare)]
    if len(nums) == 4:
        return {"image_1": dict(zip(CRITERIA, nums[:2])), "image_2": dict(zip(CRITERIA, nums[2:]))}
    return None


def parse_pairwise(text: str) -> dict | None:
    """Scores from a pairwise answer: ``{"image_1": {"composition": c1, "quality": q1}, "image_2": {...}}``, or
    ``None`` when
    the answer has no complete set of four scores in [0, 10]."""
    if not isinstance(text, str):
        return None
    candidates = [_scores_from_json(obj) for obj in _json_objects(text)] + [_scores_from_text(text)]
    for scores in candidates:
        if scores and all(
            s.get(c) is not None and 0.0 <= s[c] <= 10.0 for s in scores.values() for c in CRITERIA
        ):
            return scores
    return None


_YES = ("yes", "true", "present", "y")
_NO = ("no", "false", "absent", "n")


def parse_yesno(text: str) -> bool | None:
    """``True``/``False`` from a yes/no answer (a bare word, a sentence starting with it, or a JSON object with an
    ``answer``-like field); ``None`` when it says neither or both."""
    if not isinstance(text, str):
        return None
    for obj in _json_objects(text):
        for key, value in obj.items():
            if _norm(key) in ("answer", "present", "result", "value", "yesno", "verdict"):
                if isinstance(value, bool):
                    return value
                if isinstance(value, str) and _norm(value) in _YES:
                    return True
                if isinstance(value, str) and _norm(value) in _NO:
                    return False
    t = re.sub(r"^[\s*_\"'`#>\-:]+", "", text.strip().lower())
    t = re.sub(r"^(?:answer|final answer)\s*[:\-]\s*[*_\"'`]*", "", t)
    if re.match(r"yes\b", t):
        return True
    if re.match(r"no\b", t):
        return False
    words = set(re.findall(r"\b(yes|no)\b", t))
    if len(words) == 1:
        return words.pop() == "yes"
    return None


# --------------------------------------------------------------------------------------------------- cache


class AnswerCache:
    """Judge answers on disk: a JSON object ``{key: {"answer": raw text, "parsed": ...}}``, rewritten atomically
    after every new answer. Keys hash the protocol, model, question and the images' SHA-256 in order."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path else None
        self.entries: dict[str, dict] = {}
        self.hits = 0
        self._lock = threading.Lock()
        if self.path and self.path.exists():
            try:
                data = json.loads(self.path.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{self.path}: judge cache is not valid JSON ({err}); delete it or pass another --judge-cache") from err
            if not isinstance(data, dict):
                raise ValueError(f"{self.path}: judge cache must be a JSON object")
            self.entries = data

    @staticmethod
    def key(protocol: str, model: str, image_hashes: list[str], question: str) -> str:
        blob = json.dumps([protocol, model, image_hashes, question])
        return hashlib.sha256(blob.encode()).hexdigest()

    def get(self, key: str) -> dict | None:
        with self._lock:
            hit = self.entries.get(key)
            self.hits += hit is not None
            return hit

    def put(self, key: str, value: dict) -> None:
        with self._lock:
            self.entries[key] = value
            if self.path:
                write_json(self.entries, self.path)


# -------------------------------------------------------------------------------------------------- client


_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp", ".bmp": "image/bmp"}


def data_url(path: str | os.PathLike) -> str:
    """The image file as a base64 ``data:`` URL (its own bytes; no re-encoding)."""
    path = Path(path)
    mime = _MIME.get(path.suffix.lower(), "application/octet-stream")
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def api_key_from_env(var: str | None = None) -> str | None:
    """The judge API key from ``var``, else ``LORAKIT_JUDGE_API_KEY``, else ``OPENAI_API_KEY``; None when unset."""
    for name in ((var,) if var else ()) + KEY_ENV_VARS:
        if os.environ.get(name):
            return os.environ[name]
    return None


_CREDENTIAL_HEADERS = ("Authorization", "Proxy-authorization", "Cookie")


def _origin(url: str) -> tuple[str, str, int | None]:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme.lower(), (parts.hostname or "").lower(), port


class _CredentialSafeRedirect(urllib.request.HTTPRedirectHandler):
    """Follow redirects as urllib does, but never send the key (or cookies) to another scheme, host or port."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and _origin(new.full_url) != _origin(req.full_url):
            for name in _CREDENTIAL_HEADERS:
                new.remove_header(name)
        return new


_OPENER = urllib.request.build_opener(_CredentialSafeRedirect)


@dataclass
class JudgeClient:
    """A chat-completions client for one judge model.

    base_url: the API root (``http://localhost:8000/v1``) or the full ``.../chat/completions`` URL.
    retries / backoff: transport retries (timeouts, connection errors, 408/409/429/5xx), waiting
        ``backoff * 2**attempt`` seconds between them.
    parse_retries: how many more times a malformed answer is asked for before it is recorded as failed.
    """

    base_url: str
    model: str
    api_key: str | None = None
    timeout: float = 120.0
    retries: int = 3
    backoff: float = 2.0
    parse_retries: int = 2
    max_tokens: int = 200
    temperature: float = 0.0
    cache: AnswerCache = field(default_factory=lambda: AnswerCache(None))
    sleep: Callable[[float], None] = time.sleep
    requests_made: int = 0

    def __post_init__(self):
        self._reached = False  # a response (any status) has come back at least once
        self._hashes: dict[Path, str] = {}
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        base = self.base_url.rstrip("/")
        return base if base.endswith("/chat/completions") else base + "/chat/completions"

    def image_hash(self, path) -> str:
        path = Path(path)
        if path not in self._hashes:
            self._hashes[path] = file_sha256(path)
        return self._hashes[path]

    def _post(self, body: dict) -> str:
        """One chat request with transport retries; returns the answer text (may be malformed)."""
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = None
        for attempt in range(self.retries + 1):
            if attempt:
                self.sleep(self.backoff * 2 ** (attempt - 1))
            with self._lock:
                self.requests_made += 1
            req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with _OPENER.open(req, timeout=self.timeout) as resp:
                    payload = resp.read()
                self._reached = True
            except urllib.error.HTTPError as err:
                self._reached = True
                detail = err.read()[:300].decode("utf-8", "replace")
                if err.code in (401, 403):
                    raise JudgeError(f"judge at {self.url} refused the key (HTTP {err.code}): {detail}") from err
                if err.code == 404:
                    raise JudgeError(f"judge at {self.url}: HTTP 404 (wrong --judge-url or --judge-model?): {detail}") from err
                last = f"HTTP {err.code}: {detail}"
                if err.code in (408, 409, 429) or err.code >= 500:
                    continue
                return f"<{last}>"  # other 4xx: recorded as this item's (malformed) answer
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
                last = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
                continue
            try:
                content = json.loads(payload)["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError):
                return payload[:500].decode("utf-8", "replace")
            if isinstance(content, list):  # content parts
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            return content if isinstance(content, str) else ""
        if not self._reached:
            raise JudgeError(f"cannot reach the judge at {self.url} after {self.retries + 1} tries: {last}")
        return f"<transport error: {last}>"

    def ask(self, protocol: str, images: list, question: str, parse: Callable[[str], object]) -> tuple[object, dict]:
        """Ask ``question`` about ``images`` (paths, in order); return ``(parsed or None, info)``.

        info: ``{"cached": bool, "answers": [raw texts], "attempts": n}``. Only parsed answers are cached.
        """
        key = AnswerCache.key(protocol, self.model, [self.image_hash(p) for p in images], question)
        hit = self.cache.get(key)
        if hit is not None:
            return hit["parsed"], {"cached": True, "answers": [hit["answer"]], "attempts": 0}
        content = [{"type": "text", "text": question}]
        content += [{"type": "image_url", "image_url": {"url": data_url(p)}} for p in images]
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        answers = []
        for _ in range(self.parse_retries + 1):
            text = self._post(body)
            answers.append(text)
            parsed = parse(text)
            if parsed is not None:
                self.cache.put(key, {"answer": text, "parsed": parsed, "protocol": protocol, "model": self.model})
                return parsed, {"cached": False, "answers": answers, "attempts": len(answers)}
        return None, {"cached": False, "answers": answers, "attempts": len(answers)}


# ----------------------------------------------------------------------------------------------- protocols


def _concept_line(concepts) -> str:
    if not concepts:
        return ""
    return "It should show: " + "; ".join(c.description for c in concepts) + ".\n"


def judge_pair(client: JudgeClient, image_a, image_b, prompt: str, concepts=()) -> dict:
    """Score images A and B (same prompt) 0-10 on composition and quality, asked in both orders and averaged.

    Returns:
        ``{"a": {"composition", "quality"}, "b": {...}, "a_first": scores|None, "b_first": scores|None,
        "failed": bool, "answers": [...]}``; when either order failed, ``failed`` is True and ``a``/``b`` are None
        (one order alone carries the position bias the protocol exists to cancel).
    """
    question = PAIRWISE_QUESTION.format(prompt=prompt, concepts=_concept_line(concepts))
    ab, info_ab = client.ask("pairwise", [image_a, image_b], question, parse_pairwise)
    ba, info_ba = client.ask("pairwise", [image_b, image_a], question, parse_pairwise)
    out = {"a_first": ab, "b_first": ba, "answers": info_ab["answers"] + info_ba["answers"],
           "cached": info_ab["cached"] and info_ba["cached"], "failed": ab is None or ba is None, "a": None, "b": None}
    if not out["failed"]:
        out["a"] = {c: (ab["image_1"][c] + ba["image_2"][c]) / 2 for c in CRITERIA}
        out["b"] = {c: (ab["image_2"][c] + ba["image_1"][c]) / 2 for c in CRITERIA}
    return out


def presence_question(concept) -> str:
    """The yes/no question for one concept: a style question for style concepts, a subject question otherwise."""
    template = STYLE_QUESTION if concept.category.lower() in STYLE_CATEGORIES else SUBJECT_QUESTION
    return template.format(description=concept.description)


def judge_presence(client: JudgeClient, image, concepts) -> dict:
    """Ask one yes/no question per concept about one image.

    Returns:
        ``{"answers": {concept name: True/False/None}, "all_present": bool|None, "failed": [names], "raw": {...}}``;
        ``all_present`` is None when any answer failed and none was "no".
    """
    answers, raw, failed = {}, {}, []
    for concept in concepts:
        verdict, info = client.ask("yesno", [image], presence_question(concept), parse_yesno)
        answers[concept.name] = verdict
        raw[concept.name] = info["answers"]
        if verdict is None:
            failed.append(concept.name)

    return {"answers": answers, "all_present": all_present(answers), "failed": failed, "raw": raw}


def map_items(fn, items, workers: int = 1, desc: str = "judge"):
    """``[fn(item) for item in items]`` with a progress bar, in ``workers`` threads (judges are slow, I/O bound)."""
    if workers <= 1:
        return [fn(item) for item in tqdm(items, desc=desc)]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        return list(tqdm(pool.map(fn, items), total=len(items), desc=desc))
