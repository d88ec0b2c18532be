"""The `segcap` labeller of `launcher data annotate`: an exported segcap model (`launcher export`) asked what is
inside each mask, drawn as a red outline on the photo. It lives in launcher/ because it runs a model; the
pipeline (datapipes/annotate.py) sees only the labeller interface of datapipes/labellers.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image

from datapipes.labellers import LabelCache, clean_label, mask_digest, outlined

QUESTION = "What is inside the red outline? Answer with a short noun phrase."


class SegcapLabeller:
    needs_image = True

    def __init__(self, model_dir: str | Path, device: str = "auto", dtype: str = "auto", cache_path: str | None = None,
                 max_new_tokens: int = 12):
        from launcher.infer import Predictor

        self.model_dir = Path(model_dir)
        self.predictor = Predictor(self.model_dir, device, dtype, max_new_tokens=max_new_tokens)
        self.cache = LabelCache(cache_path, self.namespace()) if cache_path else None

    def describe(self) -> dict:
        digest = hashlib.sha256()
        for f in sorted(self.model_dir.rglob("*")):  # configs and weight indexes name what decides the labels
            if f.suffix in (".json", ".yaml"):
                digest.update(f.read_bytes())
        return {"kind": "segcap", "model": str(self.model_dir.resolve()), "configs_sha256": digest.hexdigest(),
                "question": QUESTION}

    def namespace(self) -> str:
        return hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode()).hexdigest()[:16]

    def answer(self, image: np.ndarray, mask: np.ndarray) -> str:
        """The model's label for one region: its first grounded phrase, else its whole answer, cleaned."""
        result, _ = self.predictor(Image.fromarray(outlined(image, mask)), QUESTION)
        return clean_label(result["phrases"][0] if result["phrases"] else result["answer"])

    def label(self, image_key: str, image: np.ndarray, masks: list[np.ndarray], refs=None) -> list[str]:
        image_id = f"{image_key}:{hashlib.sha256(image.tobytes()).hexdigest()[:16]}"
        labels = []
        for m in masks:
            hit = self.cache.get(image_id, mask_digest(m)) if self.cache else None
            if hit is None:
                hit = self.answer(image, m)
                if self.cache:
                    self.cache.put(image_id, mask_digest(m), hit)
            labels.append(hit)
        return labels
