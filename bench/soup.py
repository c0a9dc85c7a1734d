"""Does a greedy soup of a search's own models beat their ensemble? (bench/README.md)

    python bench/soup.py --results RESULTS --name EXPERIMENT [--no-tta]

Given a finished search with local results (its trials' best checkpoints kept, as tune.py keeps
them), three submissions from the same trial models, each chosen on one half of the search's
validation images and scored on the other half (``ensemble.halves``, both ways round), and on the
test set against test_answers.csv (each chosen there on the whole validation split, as the
product chooses):
- the best single trial model (by log-loss on the choosing half, as ``--from-trials``' estimate
  picks it);
- the trial ensemble of ``final_fit.py --from-trials``: Caruana's greedy selection of members and
  weights on their temperature-scaled probabilities by log-loss (``ensemble.fit_ensemble``);
- Wortsman et al.'s greedy soup (``sketch_core.soup.greedy_soup``): the trials whose weights share
  the best one's architecture, best first, each averaged in only if the choosing half's accuracy
  does not drop.

Runs in one process, without Ray: each
candidate soup predicts the validation images once. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from searches import test_answers

from ray_jobs.results import ResultsStore, best_checkpoints, ranked
from ray_jobs.trial import CHECKPOINT_FILE
from sketch_core import ensemble as ens
from sketch_core.config import TrainConfig
from sketch_core.data import read_test_table
from sketch_core.engine import TrainingRun, evaluated_weights, load_checkpoint
from sketch_core.soup import compatible, greedy_soup


def trial_states(store: ResultsStore) -> dict[str, dict]:
    """Each trial's checkpoint at its best epoch, best trial first."""
    trials = store.read_parquet("trials.parquet")
    checkpoints = best_checkpoints(trials, store.read_parquet("epochs.parquet"))
    order = ranked(trials, metric="val_acc", mode="max")["trial_id"]
    return {
        trial: load_checkpoint(Path(store.fs_path_of(checkpoints[trial])) / CHECKPOINT_FILE)
        for trial in order
        if trial in checkpoints
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--results", type=Path, required=True, help="the search's --results")
    parser.add_argument("--name", required=True, help="the search's experiment")
    parser.add_argument("--no-tta", dest="tta", action="store_false")
    args = parser.parse_args(argv)
    store = ResultsStore(str(args.results.resolve()), args.name)
    states = trial_states(store)
    # Each trial model as it was at its best epoch (a head-only one is its head on the backbone).
    runs = {
        trial: TrainingRun(TrainConfig.from_dict(state["config"]), state=state)
        for trial, state in states.items()
    }
    # A model of the best trial's configuration that each candidate soup is loaded into.
    run = TrainingRun(TrainConfig.from_dict(next(iter(states.values()))["config"]))
    rows = run.split[1]
    targets = run.table.targets[rows]
    val_paths = [run.table.paths[i] for i in rows]
    test = read_test_table(run.config.data_dir)

    def predict(weights, paths):
        run.eval_model.load_state_dict(weights)
        return run.predict(paths, tta=args.tta)

    val = {trial: model.predict(val_paths, tta=args.tta) for trial, model in runs.items()}
    # The soup's candidates: the trials whose weights share the best one's keys and shapes.
    weights = {trial: evaluated_weights(state) for trial, state in states.items()}
    best_weights = next(iter(weights.values()))
    weights = {t: w for t, w in weights.items() if compatible([best_weights, w])}
    # The product's own choice of ensemble (final_fit.py --from-trials' defaults) and its estimate.
    choose = dict(method="greedy", calibrate=True, metric="log_loss")
    half = ens.halves(targets, int(run.config.seed))
    estimate = ens.selected_on_halves(val, targets, half=half, **choose)

    def soup_of(pick: np.ndarray) -> tuple[dict, list[str]]:
        """The greedy soup of the models that share the best one's architecture, by the
        accuracy of the validation images ``pick``."""
        same = list(weights)

        def score(soup):
            return ens.scores(predict(soup, val_paths)[pick], targets[pick])["accuracy"]

        soup, kept, _ = greedy_soup([weights[t] for t in same], score)
        return soup, [same[i] for i in kept]

    soup_held_out = []
    for chosen_on in (0, 1):
        soup, _ = soup_of(half == chosen_on)
        scored = half != chosen_on
        soup_held_out.append(
            ens.scores(predict(soup, val_paths)[scored], targets[scored])["accuracy"]
        )
    held_out = {
        "single": estimate["single"]["accuracy"],
        "ensemble": estimate["ensemble"]["accuracy"],
        "soup": float(np.mean(soup_held_out)),
    }

    best = ens.fit_ensemble(val, targets, **{**choose, "method": "best"})
    combined = ens.fit_ensemble(val, targets, **choose)
    soup, ingredients = soup_of(np.ones(len(targets), bool))
    test_probs = {t: model.predict(test.paths, tta=args.tta) for t, model in runs.items()}
    answers = test_answers(run.config.data_dir)
    tested = {
        name: ens.scores(probs, answers)["accuracy"]
        for name, probs in (
            ("single", best(test_probs)),
            ("ensemble", combined(test_probs)),
            ("soup", predict(soup, test.paths)),
        )
    }
    print(
        f"{len(runs)} trial models of {store.uri()} ({len(weights)} share the best one's "
        f"architecture), {len(targets)} validation images"
    )
    for name in ("single", "ensemble", "soup"):
        print(f"  {name:8s} held-out half {held_out[name]:.4f}   test {tested[name]:.4f}")
    print(f"  the soup holds {len(ingredients)} of {len(weights)}: {', '.join(ingredients)}")
    print(
        json.dumps(
            {
                "models": len(runs),
                "soup_candidates": len(weights),
                "validation_images": len(targets),
                "held_out_half": held_out,
                "test": tested,
                "soup_ingredients": ingredients,
                "ensemble_weights": combined.weights,
                "tta": args.tta,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
