"""Results on a real S3-compatible server (moto's, started by the s3_server fixture), reached only
through the standard settings a user exports: AWS_ENDPOINT_URL and the credentials."""

import pickle
from urllib.parse import quote

import optuna
import pytest
import ray
from conftest import free_port, write_space

from ray_jobs.results import ResultsStore
from ray_jobs.study import Study
from ray_jobs.tuning import _searcher


def bad_storage_cases(s3) -> dict[str, tuple[dict[str, str], str, str]]:
    """Each kind of bad storage: the environment it needs, the --results root, the error."""
    return {
        "unreachable endpoint": (
            {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"},
            s3.uri("bad"),
            f"--results {s3.uri('bad')}: cannot reach the storage (",
        ),
        "missing bucket": ({}, "s3://no-such-bucket/runs", "bucket 'no-such-bucket' not found"),
        "refused credentials": (
            {"AWS_SECRET_ACCESS_KEY": "not-the-secret"},
            s3.uri("bad"),
            f"--results {s3.uri('bad')}: access denied (",
        ),
        "credentials in the URI": (
            {},
            f"s3://{s3.env['AWS_ACCESS_KEY_ID']}:{quote(s3.env['AWS_SECRET_ACCESS_KEY'], safe='')}"
            "@hpo/bad",
            "error: --results: s3://... carries credentials",
        ),
    }


@pytest.mark.parametrize(
    "command, case",
    [
        *(
            ("tune", case)
            for case in (
                "unreachable endpoint",
                "missing bucket",
                "refused credentials",
                "credentials in the URI",
            )
        ),
        # The same store check (an unreachable endpoint costs 6 s of pyarrow's retries each).
        *(
            (command, case)
            for command in ("final_fit", "report")
            for case in ("missing bucket", "refused credentials")
        ),
    ],
)
def test_bad_storage_is_one_line_before_ray_starts_and_writes_nothing(
    s3, demo_dir, tmp_path, monkeypatch, capsys, command, case
):
    import importlib

    env, results, message = bad_storage_cases(s3)[case]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    space = write_space(tmp_path / "space.yaml", demo_dir, experiment="bad")
    args = {
        "tune": ["--space", str(space)],
        "final_fit": ["--best", "--name", "bad"],
        "report": ["--name", "bad"],
    }[command]
    before = s3.keys()
    main = importlib.import_module(f"ray_jobs.{command}").main
    assert main([*args, "--results", results]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert s3.env["AWS_SECRET_ACCESS_KEY"] not in lines[0]
    assert not ray.is_initialized()
    assert s3.keys() == before and sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml"]


def test_the_study_of_a_search_on_object_storage_survives_a_resume(s3, tmp_path, monkeypatch):
    """The searcher's Optuna journal is on the driver's disk; whenever Tune saves the searcher it is
    copied into the experiment folder first, and a resumed search starts from that copy (on
    another machine), or from the driver's own file where that is the same journal further on."""
    from ray_jobs.space import parse_space

    space = parse_space(
        {
            "experiment": "study",
            "data": {"dir": "/data"},
            "model": {"name": "test_resnet"},
            "search": {"searcher": "optuna", "num_samples": 4},
            "space": {"lr": {"loguniform": [1.0e-3, 1.0e-1]}},
        },
        source="study.yaml",
    )
    store = ResultsStore(s3.uri("study-survives"), "study")
    monkeypatch.setenv("SKETCH_CACHE_DIR", str(tmp_path / "driver"))
    searcher, _ = _searcher(space, study=Study(store))
    for trial in ("a", "b"):
        searcher.suggest(trial)
        searcher.on_trial_complete(trial, {"val_acc": 0.5, "training_iteration": 1})
    assert not s3.exists("study-survives/study/study.journal")  # Tune has not saved it yet
    searcher.save(str(tmp_path / "searcher-state.pkl"))  # as Tune does, every ~10 s and at the end
    saved_state = (tmp_path / "searcher-state.pkl").read_bytes()
    assert str(tmp_path).encode() not in saved_state  # nor is the journal's place on this disk
    searcher.suggest("c")  # asked after the save: in the driver's journal only

    def resumed_study(cache_dir: str) -> list:
        """The study a search resumed with SKETCH_CACHE_DIR=cache_dir goes on with."""
        monkeypatch.setenv("SKETCH_CACHE_DIR", str(tmp_path / cache_dir))
        Study(store).prepare_resume()  # tune.py --resume, before Tuner.restore
        restored = pickle.loads(saved_state)  # Tune's searcher-state file
        return restored["_ot_study"].trials

    # Another machine: the copy in the bucket, with every trial the saved searcher knows.
    on_another_machine = resumed_study("elsewhere")
    assert [t.state for t in on_another_machine] == [optuna.trial.TrialState.COMPLETE] * 2
    # The same machine after a kill -9 between two uploads: its own journal, one trial further.
    assert len(resumed_study("driver")) == 3
    # A journal this disk kept of an earlier experiment of the same name is not that one.
    monkeypatch.setenv("SKETCH_CACHE_DIR", str(tmp_path / "elsewhere"))
    Study(store).start_new()
    searcher, _ = _searcher(space, study=Study(store))
    searcher.suggest("x")
    assert len(resumed_study("elsewhere")) == 2
