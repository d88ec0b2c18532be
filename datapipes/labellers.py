"""Labellers for the MGSC pipeline: a short noun phrase per mask of an image (GPT-4o/Osprey in the paper).

`file`: names from a JSON file. `openai`: any OpenAI-compatible chat endpoint serving a multimodal model (vLLM
and the like), one request per mask with the region outlined on the image and cropped, bounded concurrency,
retries with backoff that honour Retry-After, timeouts, and a response cache keyed by (image, mask) so a
restarted run asks nothing twice. (`segcap`, an exported segcap model, lives in launcher/: it needs a model.)
Every labeller has label(image_key, image, masks, refs) -> [label or "" per mask] and describe() -> its settings;
refs are the masks' (annotation id, position in the mask file), for labellers that look names up.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

NO_LABEL = {"", "none", "unknown", "nothing", "n/a", "background", "unclear"}
PROMPT = ("The first image shows a photo with one region outlined in red; the second is a close-up of that region. "
          "Name the object or part inside the red outline with a short noun phrase of one to three words, "
          "lower case, no article, no punctuation. Answer with the phrase only.")


class LabellerError(RuntimeError):
    """A label could not be obtained (after retries): the image is skipped and counted."""


def clean_label(text: str, max_words: int = 4) -> str:
    """'A Red car.' -> 'red car'; refusals and non-answers -> '' (the mask is then left out)."""
    text = text.strip().splitlines()[0] if text.strip() else ""
    text = re.sub(r"[^a-z0-9 \-']", " ", text.lower())
    words = [w for w in text.split() if w]
    while words and words[0] in ("a", "an", "the"):
        words = words[1:]
    label = " ".join(words[:max_words])
    return "" if label in NO_LABEL else label


def mask_digest(mask: np.ndarray) -> str:
    return hashlib.sha256(np.packbits(mask.astype(bool)).tobytes() + str(mask.shape).encode()).hexdigest()[:32]


class FileLabeller:
    """Names from a JSON file: {image stem: {annotation id: label}} (SA-1B's `id` of each mask) or
    {image stem: [label per annotation, in the mask file's order]}. A mask without a name gets ""."""

    needs_image = False

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.table = json.loads(self.path.read_text())
        except (OSError, ValueError) as e:
            raise LabellerError(f"--labels {self.path}: cannot read a JSON object of labels: {e}") from e
        if not isinstance(self.table, dict):
            raise LabellerError(f"--labels {self.path}: expected {{image stem: labels}}, got {type(self.table).__name__}")

    def describe(self) -> dict:
        return {"kind": "file", "path": str(self.path.resolve()),
                "sha256": hashlib.sha256(self.path.read_bytes()).hexdigest()}

    def label(self, image_key: str, image, masks: list[np.ndarray], refs=None) -> list[str]:
        refs = refs or [(str(i), i) for i in range(len(masks))]
        entry = self.table.get(image_key, self.table.get(Path(image_key).name))
        if entry is None:
            return [""] * len(masks)
        if isinstance(entry, list):
            return [clean_label(str(entry[i])) if 0 <= i < len(entry) else "" for _, i in refs]
        return [clean_label(str(entry.get(ann_id, ""))) for ann_id, _ in refs]


class LabelCache:
    """(labeller settings, image, mask) -> label, in SQLite beside the shards: safe for the converter's forked
    worker processes (one connection per process, WAL journal), durable across a killed run."""

    def __init__(self, path: str | os.PathLike, namespace: str):
        self.path, self.namespace = str(path), namespace
        self._local = threading.local()
        self._pid = None
        with self._db() as db:
            db.execute("CREATE TABLE IF NOT EXISTS labels (ns TEXT, image TEXT, mask TEXT, label TEXT, "
                       "PRIMARY KEY (ns, image, mask))")

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None or self._local.pid != os.getpid():  # a forked worker opens its own connection
            db = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            self._local.db, self._local.pid = db, os.getpid()
        return db

    def get(self, image: str, mask: str) -> str | None:
        row = self._db().execute("SELECT label FROM labels WHERE ns=? AND image=? AND mask=?",
                                 (self.namespace, image, mask)).fetchone()
        return None if row is None else row[0]

    def put(self, image: str, mask: str, label: str) -> None:
        self._db().execute("INSERT OR REPLACE INTO labels VALUES (?, ?, ?, ?)", (self.namespace, image, mask, label))

    def __getstate__(self):  # connections do not cross fork/pickle; reopen lazily
        return {"path": self.path, "namespace": self.namespace}

    def __setstate__(self, state):
        self.path, self.namespace = state["path"], state["namespace"]
        self._local = threading.local()


def outlined(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A copy of the photo with the mask's outline drawn in red, 3 px wide (visible after downscaling)."""
    padded = np.pad(mask, 1)
    edge = mask & ~(padded[2:, 1:-1] & padded[:-2, 1:-1] & padded[1:-1, 2:] & padded[1:-1, :-2])
    grown = edge.copy()
    for dy, dx in ((0, 1), (1, 0), (0, -1), (-1, 0)):
        grown |= np.roll(edge, (dy, dx), axis=(0, 1))
    out = np.array(image)
    out[grown] = (255, 0, 0)
    return out


def region_images(image: np.ndarray, mask: np.ndarray, context_side: int = 768, crop_side: int = 384) -> list[bytes]:
    """The photo with the mask's outline in red (downscaled to context_side) and a crop around the mask with 25%
    margin (crop_side), both JPEG: what the labeller model sees."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    outlined_photo = outlined(image, mask)
    context = Image.fromarray(outlined_photo)
    context.thumbnail((context_side, context_side))
    mx, my = max(4, (x1 - x0) // 4), max(4, (y1 - y0) // 4)
    crop = Image.fromarray(outlined_photo).crop((max(0, x0 - mx), max(0, y0 - my), min(w, x1 + mx), min(h, y1 + my)))
    crop.thumbnail((crop_side, crop_side))
    out = []
    for im in (context, crop):
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


class OpenAILabeller:
    """One chat-completions request per mask to an OpenAI-compatible server, cached by (image, mask)."""

    needs_image = True

    def __init__(self, url: str, model: str, api_key: str | None = None, *, cache: LabelCache | None = None,
                 concurrency: int = 4, timeout_s: float = 60.0, max_retries: int = 5, backoff_s: float = 1.0,
                 max_backoff_s: float = 30.0):
        import requests  # noqa: F401  fail at construction, not in a worker, if it is missing

        if not url:
            raise LabellerError("the openai labeller needs --url (or SEGCAP_LABELLER_URL), e.g. http://host:8000/v1")
        if not model:
            raise LabellerError("the openai labeller needs --model (or SEGCAP_LABELLER_MODEL)")
        self.url = url.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.cache = model, api_key, cache
        self.concurrency, self.timeout_s, self.max_retries = concurrency, timeout_s, max_retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.requests_sent = 0  # per process: what the throughput figures count
        self._lock = threading.Lock()

    def describe(self) -> dict:  # what decides the labels (never the key)
        return {"kind": "openai", "url": self.url, "model": self.model, "prompt": PROMPT}

    def namespace(self) -> str:
        return hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode()).hexdigest()[:16]

    def label(self, image_key: str, image: np.ndarray, masks: list[np.ndarray], refs=None) -> list[str]:
        image_id = f"{image_key}:{hashlib.sha256(image.tobytes()).hexdigest()[:16]}"

        def one(mask: np.ndarray) -> str:
            digest = mask_digest(mask)
            if self.cache is not None:
                hit = self.cache.get(image_id, digest)
                if hit is not None:
                    return hit
            label = clean_label(self.ask(region_images(image, mask)))
            if self.cache is not None:
                self.cache.put(image_id, digest, label)
            return label

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(one, masks))

    def ask(self, jpegs: list[bytes]) -> str:
        """POST one request; retry 429/5xx/timeouts/malformed replies with exponential backoff (Retry-After wins)."""
        import requests

        content = [{"type": "text", "text": PROMPT}] + [
            {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(j).decode()}}
            for j in jpegs
        ]
        body = {"model": self.model, "messages": [{"role": "user", "content": content}], "max_tokens": 16,
                "temperature": 0}
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        problem = "no attempt"
        for attempt in range(self.max_retries + 1):
            wait = min(self.max_backoff_s, self.backoff_s * 2**attempt)
            try:
                with self._lock:
                    self.requests_sent += 1
                r = requests.post(self.url, json=body, headers=headers, timeout=self.timeout_s)
                if r.status_code == 200:
                    return str(r.json()["choices"][0]["message"]["content"])
                problem = f"HTTP {r.status_code}: {r.text[:200]}"
                if r.status_code not in (408, 409, 429) and r.status_code < 500:
                    raise LabellerError(f"{self.url}: {problem}")  # 4xx other than these will not get better
                retry_after = r.headers.get("Retry-After", "")
                if retry_after.strip().replace(".", "", 1).isdigit():
                    wait = min(self.max_backoff_s, float(retry_after))
            except requests.Timeout:
                problem = f"no answer within {self.timeout_s} s"
            except requests.ConnectionError as e:
                problem = f"connection failed: {e}"
            except (ValueError, KeyError, IndexError, TypeError) as e:
                problem = f"malformed reply: {type(e).__name__}: {e}"
            if attempt < self.max_retries:
                time.sleep(wait)
        raise LabellerError(f"{self.url}: gave up after {self.max_retries + 1} attempts; last: {problem}")


def build_labeller(kind: str, *, labels: str | None = None, url: str | None = None, model: str | None = None,
                   api_key: str | None = None, cache_path: str | None = None, concurrency: int = 4,
                   timeout_s: float = 60.0, max_retries: int = 5):
    """The `file` and `openai` labellers from CLI flags (environment: SEGCAP_LABELLER_URL/_MODEL/_API_KEY)."""
    if kind == "file":
        if not labels:
            raise LabellerError("--labeller file needs --labels FILE")
        return FileLabeller(labels)
    if kind == "openai":
        lab = OpenAILabeller(url or os.environ.get("SEGCAP_LABELLER_URL", ""),
                             model or os.environ.get("SEGCAP_LABELLER_MODEL", ""),
                             api_key or os.environ.get("SEGCAP_LABELLER_API_KEY") or os.environ.get("OPENAI_API_KEY"),
                             concurrency=concurrency, timeout_s=timeout_s, max_retries=max_retries)
        if cache_path:
            lab.cache = LabelCache(cache_path, lab.namespace())
        return lab
    raise LabellerError(f"unknown labeller {kind!r} (file, openai, segcap)")
