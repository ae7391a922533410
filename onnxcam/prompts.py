"""Text prompts as targets: an image-text model's text tower turns each prompt into a reference embedding.

The grafted image tower (task ``similarity``, with the card's ``logit_scale``) compares its image's embedding with
the references of each call; its card's ``text`` (:data:`onnxcam.contract.TEXT_TOWER`) names the text tower and
the tokenizer that onnxcam export put beside it. The text tower runs once per distinct prompt of a run (cached),
one prompt at a time: a tower of fixed length gets its tokens padded with the card's pad id and a mask of ones on
the real tokens, one of free length the tokens as they are, so no prompt's embedding depends on another's.
The tokenizer is a Hugging Face ``tokenizer.json``, read by the ``tokenizers`` package (``onnxcam[text]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from onnxcam.errors import OnnxcamError

MISSING = "text prompts need the tokenizers package, which is not installed here: pip install tokenizers"


def load_tokenizer(path: Path) -> object:
    """A ``tokenizers.Tokenizer`` from ``path`` (a ``tokenizer.json``) with its own padding and truncation off:
    onnxcam pads, and refuses a prompt too long instead of cutting it."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise OnnxcamError(MISSING) from None
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises its own Exception for a missing or malformed file
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise OnnxcamError(f"cannot read {path} as a Hugging Face tokenizer.json: {first}") from None
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def unit(rows: np.ndarray) -> np.ndarray:
    """Each row L2-normalised (a zero row stays zero, as the graph's)."""
    return rows / np.maximum(np.linalg.norm(rows, axis=-1, keepdims=True), 1e-12)


class TextTower:
    """The text tower of an image-text model: prompts -> ``[T, D]`` embeddings, L2-normalised."""

    def __init__(self, folder: Path, spec: dict, providers: Sequence[str] = ("CPUExecutionProvider",)) -> None:
        """``spec``: the card's ``text``; its files lie in ``folder`` (the grafted file's)."""
        self.spec, self.path = spec, folder / spec["model"]
        for name in (spec["model"], spec["tokenizer"]):
            if not (folder / name).is_file():
                raise OnnxcamError(f"the text tower's file {name} is not beside the model in {folder}; copy it with "
                                   "the .onnx file (onnxcam export wrote both)")  # fmt: skip
        self.tokenizer = load_tokenizer(folder / spec["tokenizer"])
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=list(providers))
        except Exception as exc:  # ORT's own pybind types
            raise OnnxcamError(f"could not load the text tower {self.path}: {str(exc).splitlines()[0][:160]}") from None
        self.dtype = np.int32 if "int32" in self.session.get_inputs()[0].type else np.int64
        self._cache: dict[str, np.ndarray] = {}
        self.runs = 0  # text-tower calls so far (one per distinct prompt)

    def tokens(self, prompt: str) -> dict[str, np.ndarray]:
        """The text tower's feeds for one prompt ``[1, L]``: its token ids, padded to the tower's length, and the
        mask (1 on the prompt's tokens) where the tower takes one."""
        if not prompt.strip():
            raise OnnxcamError("a prompt must hold some text, e.g. --prompt 'a photo of a dog'")
        ids = self.tokenizer.encode(prompt).ids
        length = self.spec["length"]
        if length is not None and len(ids) > length:
            raise OnnxcamError(f"the prompt {prompt[:60]!r} is {len(ids)} tokens; the text tower takes at most "
                               f"{length}: shorten it")  # fmt: skip
        fill = (length or len(ids)) - len(ids)
        feeds = {self.spec["ids"]: np.asarray([ids + [self.spec["pad"]] * fill], self.dtype)}
        if self.spec["mask"] is not None:
            feeds[self.spec["mask"]] = np.asarray([[1] * len(ids) + [0] * fill], self.dtype)
        return feeds

    def embed(self, prompts: Sequence[str]) -> np.ndarray:
        """``[T, D]`` float32, each prompt's text embedding L2-normalised; the tower runs once per new prompt."""
        for prompt in dict.fromkeys(prompts):
            if prompt not in self._cache:
                (found,) = self.session.run([self.session.get_outputs()[0].name], self.tokens(prompt))
                self.runs += 1
                self._cache[prompt] = unit(np.asarray(found, np.float64).reshape(-1)).astype(np.float32)
        return np.stack([self._cache[p] for p in prompts])
