"""The best recall any model can reach on the embedded synthetic test split.

A caption names one or two objects (colour, shape, sometimes size, a relation for two),
so several test images can match it. From the scene metadata (`scenes.jsonl`) this
finds, for every caption, the test images it is true of, and scores two ideal models:

- `uniform`: knows exactly which images a caption is true of, ranks them in random order;
- `bayes`: ranks as well as possible: for text-to-image the same (the matching images are
  equally likely), for image-to-text the captions true of fewer images first.

    python benchmarks/synthetic_ceiling.py     # after `dvc repro synthesize`
"""

from __future__ import annotations

import argparse
import json
import re
from math import comb
from pathlib import Path

import numpy as np

from avse.data.synthetic import SceneObject, spatial_relation

KS = (1, 5, 10)
RELATION = re.compile(r"(left of|right of|above|below)")


def caption_terms(text: str, scene: list[dict], mentioned: list[int]) -> tuple[list[dict], str | None]:
    """What a caption requires: per object named, its attributes (size only where stated), and the relation."""
    terms = []
    for index in mentioned:
        obj = scene[index]
        term = {"colour": obj["colour"], "shape": obj["shape"]}
        if f"{obj['size']} {obj['colour']} {obj['shape']}" in text:
            term["size"] = obj["size"]
        terms.append(term)
    relation = RELATION.search(text) if len(terms) == 2 else None
    return terms, relation.group(1) if relation else None


def true_of(objects: list[SceneObject], terms: list[dict], relation: str | None) -> bool:
    def fits(obj: SceneObject, term: dict) -> bool:
        return all(getattr(obj, key) == value for key, value in term.items())

    if len(terms) == 1:
        return any(fits(obj, terms[0]) for obj in objects)
    return any(fits(a, terms[0]) and fits(b, terms[1]) and spatial_relation(a, b) == relation
               for a in objects for b in objects if a is not b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", default="data/synthetic/scenes.jsonl")
    parser.add_argument("--split", default="test")
    args = parser.parse_args()

    rows = [json.loads(line) for line in Path(args.scenes).read_text().splitlines()]
    scenes = [row for row in rows if row["split"] == args.split]
    objects = [[SceneObject(**obj) for obj in row["objects"]] for row in scenes]
    captions = [(caption_terms(c["text"], row["objects"], c["objects"]), i) for i, row in enumerate(scenes) for c in row["captions"]]
    truth = np.array([[true_of(scene, *terms) for scene in objects] for terms, _ in captions])  # [captions, images]
    owner = np.array([i for _, i in captions])
    matches = truth.sum(axis=1)  # images each caption is true of

    t2i = {k: 100 * np.mean(np.minimum(1.0, k / matches)) for k in KS}
    per_image = truth.sum(axis=0)  # captions true of each image, its own 5 among them
    uniform_i2t = {k: 100 * np.mean([1 - comb(n - 5, k) / comb(n, k) for n in per_image]) for k in KS}
    rng = np.random.default_rng(0)
    scores = truth / matches[:, None] + rng.random(truth.shape) * 1e-9  # specific captions first, ties at random
    best_rank = np.array([np.flatnonzero(owner[np.argsort(-scores[:, i])] == i)[0] for i in range(len(scenes))])
    bayes_i2t = {k: 100 * np.mean(best_rank < k) for k in KS}

    print(f"{len(scenes)} images, {len(captions)} captions; a caption is true of {np.median(matches):.0f} images (median)")
    for name, i2t in (("uniform", uniform_i2t), ("bayes", bayes_i2t)):
        cells = " ".join(f"{v:5.1f}" for v in (*i2t.values(), *t2i.values()))
        print(f"{name:8} i2t R@1/5/10, t2i R@1/5/10: {cells}   rsum {sum(i2t.values()) + sum(t2i.values()):.1f}")


if __name__ == "__main__":
    main()
