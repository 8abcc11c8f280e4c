"""The best recall any model can reach on the embedded synthetic test split.

A caption names two or three objects (size, colour and shape each), either a related
pair with its relation or a list, so a few test images besides its own can match it.
From the scene metadata (`scenes.jsonl`) this finds, for every caption, the test images it is true of, and scores two ideal models:

- `uniform`: knows exactly which images a caption is true of, ranks them in random order;
- `bayes`: ranks as well as possible: for text-to-image the same (the matching images are
  equally likely), for image-to-text the captions true of fewer images first.

    python benchmarks/synthetic_ceiling.py     # after `dvc repro synthesize`
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
from math import comb
from pathlib import Path

import numpy as np

from avse.data.synthetic import RELATIONS, SceneObject, spatial_relation

KS = (1, 5, 10)
RELATION = re.compile("|".join(RELATIONS))


def caption_terms(text: str, scene: list[dict], mentioned: list[int]) -> tuple[list[tuple[str, str, str]], str | None]:
    """What a caption requires: the (size, colour, shape) of each object named, and the relation if any."""
    terms = [(scene[i]["size"], scene[i]["colour"], scene[i]["shape"]) for i in mentioned]
    relation = RELATION.search(text)
    return terms, relation.group(0) if relation else None


def scene_facts(objects: list[SceneObject]) -> tuple[set, set]:
    """The (size, colour, shape) kinds a scene shows, and its (kind, relation, kind) facts."""
    kinds = [(obj.size, obj.colour, obj.shape) for obj in objects]
    relations = {(kinds[i], spatial_relation(objects[i], objects[j]), kinds[j]) for i, j in itertools.permutations(range(len(objects)), 2)}
    return set(kinds), relations  # unrelated pairs add (kind, None, kind), which no caption asks for


def true_of(facts: tuple[set, set], terms: list[tuple[str, str, str]], relation: str | None) -> bool:
    """Whether a scene fits the terms: shows every kind named (colour and shape pairs are distinct
    within a scene, so distinct terms are distinct objects) and, for a relation, the related pair."""
    kinds, relations = facts
    if relation is not None:
        return (terms[0], relation, terms[1]) in relations
    return all(term in kinds for term in terms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", default="data/synthetic/scenes.jsonl")
    parser.add_argument("--split", default="test")
    args = parser.parse_args()

    rows = [json.loads(line) for line in Path(args.scenes).read_text().splitlines()]
    scenes = [row for row in rows if row["split"] == args.split]
    objects = [[SceneObject(**obj) for obj in row["objects"]] for row in scenes]
    captions = [(caption_terms(c["text"], row["objects"], c["objects"]), i) for i, row in enumerate(scenes) for c in row["captions"]]
    facts = [scene_facts(scene) for scene in objects]
    truth = np.array([[true_of(fact, *terms) for fact in facts] for terms, _ in captions])  # [captions, images]
    owner = np.array([i for _, i in captions])
    matches = truth.sum(axis=1)  # images each caption is true of

    t2i = {k: 100 * np.mean(np.minimum(1.0, k / matches)) for k in KS}
    per_image = truth.sum(axis=0)  # captions true of each image, its own 5 among them
    uniform_i2t = {k: 100 * np.mean([1 - comb(n - 5, k) / comb(n, k) if n > k else 1.0 for n in per_image.tolist()]) for k in KS}
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
