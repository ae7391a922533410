"""The cost of explaining T prompts of a CLIP model in one call, against its image tower's plain forward.

    python -m benchmarks.clip_cost [--rounds 15] [--prompts 1 --prompts 8]

(as a module from the repository's root: this folder's transformers.py would shadow the package, and the test
suite's word tokenizer is read from tests/).

Needs transformers and optimum (the bench venv of the README). A CLIP ViT-B/32 image tower (Hugging Face's
``CLIPModel`` at its released config, random weights: they do not change the cost) exported as its users export it
(optimum's zero-shot export), grafted by onnxcam with no layer flag; the plain forward is the image tower cut from
the same file (pixels -> image_embeds), run by the same ONNX Runtime on the same threads. Each round runs every
contender once in a shuffled order at batch 1; each ratio is taken within its round and the median of the rounds'
ratios is printed (as ``latency.py``). The onnxcam call returns the T logits, the activations and the T gradients.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort

from benchmarks.process import alternated, cpu
from onnxcam.engine import Engine
from onnxcam_export.from_onnx import Preprocessing, graft_file
from onnxcam_export.image_text import split_combined

PROMPTS = ["a photo of a cat", "a dog", "grass", "a red car", "the sea", "a person", "a shoe", "snow"]


def export(folder: Path) -> Path:
    import torch
    import transformers
    from optimum.exporters.onnx import main_export

    torch.manual_seed(0)
    model = transformers.CLIPModel(transformers.CLIPConfig()).eval()  # ViT-B/32 at 224, as openai/clip-vit-base-patch32
    model.save_pretrained(folder / "hf")
    transformers.CLIPImageProcessor().save_pretrained(folder / "hf")
    from tests.test_clip import write_tokenizer

    write_tokenizer(folder / "tokenizer.json")
    transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), pad_token="[PAD]",
                                         unk_token="[UNK]").save_pretrained(folder / "hf")  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main_export(str(folder / "hf"), folder / "onnx", task="zero-shot-image-classification", no_post_process=True)
    return folder / "onnx" / "model.onnx"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--prompts", type=int, action="append")
    args = parser.parse_args()
    counts = args.prompts or [1, 8]
    with tempfile.TemporaryDirectory() as tmp:
        source = export(Path(tmp))
        out = Path(tmp) / "clip.cam.onnx"
        graft_file(source, out, prep=Preprocessing())
        import onnx

        image, _, _ = split_combined(onnx.load(source))
        options = ort.SessionOptions()
        plain = ort.InferenceSession(image.SerializeToString(), options, providers=["CPUExecutionProvider"])
        engine = Engine(out)
        from onnxcam.api import Explainer

        texts = Explainer(out).text_tower.embed(PROMPTS[: max(counts)])
        photo = np.random.default_rng(0).integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)
        pixels = np.random.default_rng(0).normal(0, 1, (1, 3, 224, 224)).astype(np.float32)
        contenders = {"forward": lambda: plain.run(None, {image.graph.input[0].name: pixels})}
        for t in counts:
            contenders[f"T={t}"] = lambda t=t: engine.run(photo, np.arange(t)[None], references=texts[:t])
        times = alternated(contenders, args.rounds, random.Random())
    print(f"CLIP ViT-B/32 image tower, batch 1, {args.rounds} rounds, {cpu()}, onnxruntime {ort.__version__}")
    print(f"  forward: median {statistics.median(times['forward']) * 1e3:.1f} ms")
    for t in counts:
        ratios = [a / b for a, b in zip(times[f"T={t}"], times["forward"], strict=True)]
        print(f"  T={t}: median {statistics.median(times[f'T={t}']) * 1e3:.1f} ms, "
              f"{statistics.median(ratios):.2f}x the forward (median of the rounds' ratios)")  # fmt: skip


if __name__ == "__main__":
    main()
