"""Fingerprint of two campaigns that use every built-in decision kind on the tiny zoo: stage keys, every
trial's params, label, values and Recipe, the decisions, and the sha256 of the exported weights.

A refactor that must not change behaviour runs this with the old and the new tree and compares:

    OLMOPT_THREADS=1 PYTHONPATH=OLD python scripts/campaign_fingerprint.py OLD /tmp/old ZOO
    OLMOPT_THREADS=1 PYTHONPATH=NEW python scripts/campaign_fingerprint.py NEW /tmp/new ZOO
    cmp /tmp/old/result.json /tmp/new/result.json

(recorded for the decision-kind registry against main at 3f7b4f1, 974edeb and 719297e: identical, 22
stages over 13 stage kinds plus the two exported models; for the layout by merge system against main at
8b77298: identical; for the runner split, typed decisions and PrefixCache, 8227427 against 8b77298:
identical, 24 entries).
"""

import hashlib
import json
import sys
from pathlib import Path

import optuna
import yaml

from olmopt.cli import main

tree, out = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
repo = Path(__file__).resolve().parents[1]
# the same zoo for both runs (recipes name models by path)
zoo = Path(sys.argv[3]).resolve() if len(sys.argv) > 3 else repo / "storage" / "zoo-tiny"
unit = "model.layers.1.mlp.down_proj"
data = {
    "name": "every",
    "pool": {"models": [str(zoo / m) for m in ["base", "spec_add", "spec_rev", "spec_mc", "spec_fact"]]},
    "objectives": [
        {
            "name": "add",
            "dataset": str(repo / "objectives/add.json"),
            "metric": "token_accuracy",
            "samples": 30,
        },
        {
            "name": "mc",
            "dataset": str(repo / "objectives/mc_choices.json"),
            "metric": "mc_accuracy",
            "samples": 30,
        },
    ],
    "decisions": {
        "base": {"mode": "fixed", "model": str(zoo / "base")},
        "boundary": {"mode": "greedy"},
        "layers": {"mode": "greedy", "windows": [2, 1], "only": [2, 3], "then_joint": 4},
        "tensors": {"mode": "greedy", "only": [1], "then_joint": 3},
        "es": {"svd": {"units": [unit], "tune": {"trials": 2}}, "norm": {"units": [unit], "generations": 2}},
        "fusion": {"mode": "joint", "n_trials": 3, "calibration_samples": 8},
    },
}
(out / "every.yaml").write_text(yaml.safe_dump(data))
dfs = dict(
    data,
    name="dfs",
    decisions={
        "base": data["decisions"]["base"],
        "layers": {"mode": "off"},
        "merge": {"mode": "joint", "n_trials": 4},
        "dfs": {"mode": "joint", "n_trials": 4, "repetitions": 1},
    },
)
(out / "dfs.yaml").write_text(yaml.safe_dump(dfs))
assert Path(main.__code__.co_filename).is_relative_to(tree), main.__code__.co_filename
url = f"sqlite:///{out}/s.db"
result = {}
for name in ("every", "dfs"):
    assert main(["study", "create", str(out / f"{name}.yaml"), "--storage", url]) == 0
    assert main(["study", "run", name, "--storage", url, "--quiet"]) == 0
    assert main(["export", "best", name, "--storage", url, "--out", str(out / f"m-{name}"), "--quiet"]) == 0
    for s in optuna.get_all_study_summaries(url):
        if not s.study_name.startswith(name + "/"):
            continue
        st = optuna.load_study(study_name=s.study_name, storage=url)
        d = st.user_attrs.get("olmopt.decision", {})
        result[s.study_name] = {
            "trials": [
                [t.number, t.params, t.user_attrs.get("candidate"), t.values, t.user_attrs.get("recipe")]
                for t in st.trials
            ],
            "decision": {
                k: d.get(k) for k in ("winner", "recipe", "metrics", "held_out", "reason", "es_tune")
            },
        }
    for f in sorted((out / f"m-{name}").rglob("*.safetensors")):
        result[f"file:{name}/{f.name}"] = hashlib.sha256(f.read_bytes()).hexdigest()
(out / "result.json").write_text(json.dumps(result, indent=1, sort_keys=True))
print(len(result), "entries")
