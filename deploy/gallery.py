"""A face gallery: L2-normalised embeddings of known identities, saved as a plain .npz, searched by cosine score.

One row per identity (the re-normalised mean of its images' normalised embeddings, robust and small) or one
row per image (`per_image`: an identity scores as its best image). The file holds no pickles (loaded with
allow_pickle=False) and records the embedding size and the model's metadata, so a query embedded by another
model is refused instead of silently matched.
"""

from __future__ import annotations

import io
import json
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deploy.embedder import l2_normalize
from utils.atomic import write_output

FORMAT_VERSION = 1
UNKNOWN = "unknown"


@dataclass
class GalleryIndex:
    embeddings: np.ndarray          # K x D float32, unit rows
    identities: np.ndarray          # K identity names (str)
    files: np.ndarray               # K source images (per-image index) or "" (mean per identity)
    per_image: bool
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def embedding_size(self) -> int:
        return int(self.embeddings.shape[1])

    def save(self, path: str | Path, force: bool = False) -> None:
        """Write atomically with np.savez (strings as unicode arrays, metadata as a JSON string: no pickle)."""
        buf = io.BytesIO()
        np.savez(buf, format_version=np.int64(FORMAT_VERSION), embeddings=self.embeddings.astype(np.float32),
                 identities=np.asarray(self.identities, dtype=str), files=np.asarray(self.files, dtype=str),
                 per_image=np.bool_(self.per_image), meta=np.asarray(json.dumps(self.meta)))
        write_output(path, buf.getvalue(), force=force)

    @classmethod
    def load(cls, path: str | Path) -> GalleryIndex:
        try:
            with np.load(path, allow_pickle=False) as z:
                missing = {"format_version", "embeddings", "identities", "files", "per_image", "meta"} - set(z.files)
                if missing:
                    raise ValueError(f"not a gallery index (missing {', '.join(sorted(missing))})")
                if int(z["format_version"]) != FORMAT_VERSION:
                    raise ValueError(f"index format {int(z['format_version'])}, this tool reads {FORMAT_VERSION}")
                index = cls(z["embeddings"].astype(np.float32), z["identities"], z["files"], bool(z["per_image"]),
                            json.loads(str(z["meta"])))
        except (OSError, ValueError, zipfile.BadZipFile, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: unreadable gallery index ({e})") from None
        if index.embeddings.ndim != 2 or not len(index.identities) == len(index.embeddings) == len(index.files):
            raise ValueError(f"{path}: inconsistent gallery index (embeddings {index.embeddings.shape}, "
                             f"{len(index.identities)} identities, {len(index.files)} files)")
        return index

    def check_model(self, embedding_size: int, meta: dict[str, Any], index_name: str = "index") -> None:
        """Refuse queries of another embedding size; warn when the model's weights differ from the index's."""
        if embedding_size != self.embedding_size:
            raise ValueError(f"{index_name} holds {self.embedding_size}-d embeddings but the model gives "
                             f"{embedding_size}-d: rebuild the index with this model")
        ours, theirs = self.meta.get("source", {}).get("sha256"), meta.get("source", {}).get("sha256")
        if ours and theirs and ours != theirs:
            warnings.warn(f"{index_name} was built with weights {ours[:12]}, the query model is {theirs[:12]}: "
                          "scores are meaningless across models", stacklevel=2)

    def search(self, queries: np.ndarray, top_k: int = 5, threshold: float = 0.3) -> list[dict[str, Any]]:
        """Rank identities for each query by cosine score; the best is `unknown` if it scores below `threshold`."""
        if queries.ndim != 2 or queries.shape[1] != self.embedding_size:
            raise ValueError(f"queries of shape {list(queries.shape)} do not match {self.embedding_size}-d index")
        scores = l2_normalize(queries.astype(np.float32)) @ self.embeddings.T
        names, first = np.unique(self.identities, return_inverse=True)
        if self.per_image:  # an identity scores as its best image: max over each identity's columns
            order = np.argsort(first, kind="stable")
            starts = np.flatnonzero(np.r_[True, np.diff(first[order]) != 0])
            scores = np.maximum.reduceat(scores[:, order], starts, axis=1)
        else:
            scores = scores[:, np.argsort(first)]  # columns in `names` order
        k = min(top_k, len(names))
        ranked = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        results = []
        for row, idx in zip(scores, ranked, strict=True):
            top = [{"identity": str(names[j]), "score": round(float(row[j]), 6)} for j in idx]
            best = top[0]
            results.append({"identity": best["identity"] if best["score"] >= threshold else UNKNOWN,
                            "score": best["score"], "top_k": top})
        return results


def build_index(embeddings: np.ndarray, identities: list[str], files: list[str], per_image: bool = False,
                meta: dict[str, Any] | None = None) -> GalleryIndex:
    """Normalise each image's embedding; keep them all (`per_image`) or average per identity and re-normalise."""
    if len(embeddings) != len(identities) or len(identities) != len(files):
        raise ValueError(f"{len(embeddings)} embeddings for {len(identities)} identities and {len(files)} files")
    unit = l2_normalize(np.asarray(embeddings, dtype=np.float32))
    if per_image:
        return GalleryIndex(unit, np.asarray(identities, dtype=str), np.asarray(files, dtype=str), True, meta or {})
    names, inverse = np.unique(np.asarray(identities, dtype=str), return_inverse=True)
    sums = np.zeros((len(names), unit.shape[1]), dtype=np.float64)
    np.add.at(sums, inverse, unit)
    means = l2_normalize(sums).astype(np.float32)
    return GalleryIndex(means, names, np.full(len(names), "", dtype=str), False, meta or {})
