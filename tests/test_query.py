"""General queries (addrmem.query, addrmem query): recall is linear in the
queries and one-hot queries give recall()'s images; label maps are validated
with one-line errors; the training sets a memory gives for a new label space;
soft labels train through evaluate; the command on a tiny saved digits run."""

import json
import os

import pytest
import torch
import yaml

from addrmem.cli import main
from addrmem.evaluation import EvalSettings, evaluate
from addrmem.memory import AddressableMemory, ImageMemory
from addrmem.query import (BUILTIN_MAPS, label_map, load_map, memory_training_sets, relabel_dataset,
                           soft_queries)
from test_cli import fails
from tiny_run import TINY, digits, tiny  # noqa: F401 (digits is a fixture)

DIGITS = [str(c) for c in range(10)]


def memories():
    draws = torch.Generator().manual_seed(0)
    return [AddressableMemory(10, (1, 4, 4), n_bases=3, per_class=2, generator=draws),
            ImageMemory(10, (1, 4, 4), per_class=2, generator=draws)]


@pytest.mark.parametrize("memory", memories(), ids=["addressable", "image"])
def test_queries_are_linear(memory):
    q1, q2 = torch.rand(3, 10, generator=torch.Generator().manual_seed(1)).split([1, 2])
    q1 = q1.expand(2, 10)
    a, b = 0.7, -1.3
    mixed, labels = memory.recall(a * q1 + b * q2)
    expected = a * memory.recall(q1)[0] + b * memory.recall(q2)[0]
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(labels, (a * q1 + b * q2).repeat_interleave(2, dim=0))


@pytest.mark.parametrize("memory", memories(), ids=["addressable", "image"])
def test_one_hot_queries_give_recall_images_exactly(memory):
    images, labels = memory.recall(torch.eye(10))
    stored, stored_labels = memory.recall()
    assert torch.equal(images, stored)
    assert torch.equal(labels.argmax(1), stored_labels)


def test_builtin_maps_and_relabelling():
    parity = load_map("parity", DIGITS, "digits")
    assert parity.classes == ["even", "odd"] and parity.groups == [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]
    mod3 = load_map("mod3", DIGITS, "mnist")
    assert mod3.assignment().tolist() == [c % 3 for c in range(10)]
    images = torch.arange(10.0).view(10, 1, 1, 1)
    partial = label_map({"small": [0, "1"], "big": ["9"]}, DIGITS)  # indices or names; 2..8 left out
    kept, labels = partial.relabel(images, torch.arange(10))
    assert kept.flatten().tolist() == [0, 1, 9] and labels.tolist() == [0, 0, 1]
    assert partial.aggregated_queries()[0].tolist() == [0.5, 0.5] + [0.0] * 8


@pytest.mark.parametrize("spec, match", [
    ({"even": ["0", "2"], "odd": ["1", "11"]}, "names classes the memory does not have: '11'"),
    ({"even": ["0", "2"], "odd": [10]}, "names classes the memory does not have: 10"),
    ({"even": ["0", "2"], "odd": []}, "new class 'odd' has no old classes"),
    ({"even": ["0", "2"], "odd": ["1", "2"]}, "assigns old class '2' twice (to 'even' and 'odd')"),
    ({"even": ["0", "2"], "odd": [1, "1"]}, "assigns old class '1' twice"),
    ({"all": ["0", "1"]}, "at least two new classes"),
    (["0", "1"], "a map is a mapping of each new class to a list of old classes"),
])
def test_bad_maps_get_one_line_errors(spec, match):
    with pytest.raises(ValueError) as info:
        label_map(spec, DIGITS, "m.yaml")
    assert match in str(info.value) and "\n" not in str(info.value)


def test_load_map_reads_yaml_and_json_files_and_refuses_unknown_maps(tmp_path):
    (tmp_path / "m.yaml").write_text("low: ['0', '1', '2']\nhigh: [7, 8, 9]\n")
    (tmp_path / "m.json").write_text(json.dumps({"low": ["0"], "high": ["9"]}))
    assert load_map(str(tmp_path / "m.yaml"), DIGITS, "digits").groups == [[0, 1, 2], [7, 8, 9]]
    assert load_map(str(tmp_path / "m.json"), DIGITS, "digits").groups == [[0], [9]]
    with pytest.raises(ValueError, match="unknown map 'nope'"):
        load_map("nope", DIGITS, "digits")
    with pytest.raises(ValueError, match="is for cifar10; this memory was distilled on digits"):
        load_map("animal-vehicle", DIGITS, "digits")
    assert set(BUILTIN_MAPS["animal-vehicle"][1]) == {"animal", "vehicle"}


@pytest.mark.parametrize("memory", memories(), ids=["addressable", "image"])
def test_memory_training_sets(memory):
    ge5 = load_map("ge5", DIGITS, "digits")
    sets = memory_training_sets(memory, ge5, torch.Generator().manual_seed(0))
    stored, old = memory.recall()
    one_hot, labels = sets["one-hot"]
    assert torch.equal(one_hot, stored) and torch.equal(labels, (old >= 5).long())
    aggregated, agg_labels = sets["aggregated"]  # per slot, the mean of the group's images
    means = stored.view(2, 5, 2, 1, 4, 4).mean(1).flatten(0, 1)
    torch.testing.assert_close(aggregated, means, rtol=1e-5, atol=1e-6)
    assert agg_labels.tolist() == [0, 0, 1, 1]
    soft, probs = sets["soft"]
    assert len(soft) == 20 + 10 * 10 * 2 and probs.shape == (220, 2)
    torch.testing.assert_close(probs.sum(1), torch.ones(220))
    assert torch.equal(probs[:20], torch.nn.functional.one_hot(labels, 2).float())


def test_soft_queries_mix_two_kept_classes():
    partial = label_map({"a": [1, 2], "b": [5]}, DIGITS)
    queries = soft_queries(partial, 200, torch.Generator().manual_seed(0))
    torch.testing.assert_close(queries.sum(1), torch.ones(200))
    assert ((queries > 0).sum(1) <= 2).all() and (queries[:, [0, 3, 4, 6, 7, 8, 9]] == 0).all()
    assert (queries >= 0).all() and queries[:, 5].gt(0).any()


def test_evaluate_trains_on_soft_labels(digits):  # noqa: F811
    """evaluate's cross-entropy takes (N, classes) probabilities: one-hot ones train as the int labels."""
    config = EvalSettings.of(tiny(eval_epochs=3))
    images, labels = digits.train[0][:50], digits.train[1][:50]
    hard = evaluate(images, labels, digits, config, 1, split="test", progress=False)
    soft = evaluate(images, torch.nn.functional.one_hot(labels, 10).float(), digits, config, 1, split="test",
                    progress=False)
    assert hard.mean == pytest.approx(soft.mean, abs=0.5)
    ge5 = relabel_dataset(digits, load_map("ge5", DIGITS, "digits"))
    assert ge5.num_classes == 2 and ge5.test[1].tolist() == (digits.test[1] >= 5).long().tolist()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("query")
    config = folder / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    assert main(["distill", "--config", str(config), "--out", str(folder / "run")]) == 0
    return str(folder / "run")


def test_query_command(run, capsys, tmp_path):
    capsys.readouterr()
    assert main(["query", run, "--map", "parity", "--nets", "2"]) == 0
    out = capsys.readouterr().out
    folder = os.path.join(run, "query-parity")
    results = json.load(open(os.path.join(folder, "query.json")))
    names = ["addressable one-hot", "addressable aggregated", "addressable soft", "image one-hot",
             "image aggregated", "image soft", "random real", "full data", "distilled on new labels"]
    assert list(results["methods"]) == names
    for name in names:
        assert name in out
        assert len(results["methods"][name]["test"]["runs"]) == 2
    assert results["classes"] == {"even": ["0", "2", "4", "6", "8"], "odd": ["1", "3", "5", "7", "9"]}
    assert results["methods"]["addressable soft"]["images"] == 9 * 10 + 9 * 10 * 10
    assert results["methods"]["distilled on new labels"]["num_floats"] <= 640
    for name in ("query.png", "distilled/memory.pt", "distilled/config.yaml"):
        assert os.path.isfile(os.path.join(folder, name)), name
    mapping = tmp_path / "bad.yaml"
    mapping.write_text("even: ['0', '2']\nodd: ['1', '11']\n")
    fails(["query", run, "--map", str(mapping)], capsys, "names classes the memory does not have: '11'")
    fails(["query", run, "--map", "animal-vehicle"], capsys, "is for cifar10")
    fails(["query", run, "--map", "parity"], capsys, "is not empty")
    fails(["query", run, "--map", "ge5", "--nets", "0"], capsys, "--nets must be >= 1")
