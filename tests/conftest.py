"""Shared fixtures: small real data sets made by the demo generator, and a private decode cache."""

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from sketch_core.demo_data import generate

REPO_ROOT = Path(__file__).resolve().parents[1]

# The real sketches and the pretrained backbone the repository ships (demo/README.md).
SHIPPED_SKETCHES = REPO_ROOT / "demo" / "sketches"
SHIPPED_BACKBONE = REPO_ROOT / "demo" / "test_resnet_quickdraw.safetensors"
# A short fine-tune of the shipped backbone on the shipped sketches: 6 epochs of 24 steps.
SHIPPED_FINE_TUNE = dict(
    data_dir=str(SHIPPED_SKETCHES),
    model="test_resnet",
    image_size=64,
    checkpoint_file=str(SHIPPED_BACKBONE),
    freeze="none",
    lr=1e-3,
    epochs=6,
    batch_size=32,
    augment="light",
    num_workers=0,
)

# Small enough for 2 CPU cores, varied enough that a tiny model learns well above chance.
LEARNABLE = dict(classes=8, images_per_class=40, test_images=80, min_size=96, max_size=128, seed=3)
# A configuration test_resnet learns on it in seconds (about 0.7 val_acc against 0.125 chance).
QUICK_TRAINING = dict(
    model="test_resnet",
    image_size=48,
    batch_size=16,
    lr=5e-3,
    weight_decay=0.01,
    augment="light",
    num_workers=0,
)


def pytest_collection_modifyitems(items):
    """A test of the shared quickstart search is an end-to-end test wherever it lives."""
    for item in items:
        if "finished_search" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session", autouse=True)
def private_cache_dir(tmp_path_factory):
    """Keep the per-node decode cache out of the user's home during tests."""
    path = tmp_path_factory.mktemp("decode-cache")
    os.environ["SKETCH_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """A read-only demo data set shared by every test that does not modify data."""
    return generate(tmp_path_factory.mktemp("demo") / "data", **LEARNABLE)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (for a test's own process group)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_space(
    path: Path,
    data_dir: Path,
    *,
    experiment: str = "e2e",
    num_samples: int = 5,
    max_epochs: int = 3,
    **sections,
) -> Path:
    """A small CPU search space over ``data_dir`` (the demo space, shrunk for 2 cores)."""
    import yaml

    document = {
        "experiment": experiment,
        "data": {"dir": str(data_dir)},
        "model": {"name": "test_resnet", "pretrained": False, "image_size": 48},
        # One worker per trial and two trials at once: DDP itself is tested in test_engine.py.
        "resources": {"workers": 1, "cpus_per_worker": 0.9, "gpus_per_worker": 0},
        "search": {
            "searcher": "optuna",
            "num_samples": num_samples,
            "max_concurrent": 2,
            "seed": 0,
        },
        "scheduler": {
            "type": "asha",
            "max_epochs": max_epochs,
            "grace_period": 1,
            "reduction_factor": 2,
        },
        "fixed": {"batch_size": 16, "num_workers": 0, "weight_decay": 0.01, "augment": "light"},
        "space": {"lr": {"loguniform": [1.0e-3, 2.0e-2]}, "head": {"choice": ["linear", "mlp"]}},
    }
    for (
        name,
        values,
    ) in sections.items():  # merged into the section, except `space`, which is replaced
        document[name] = {**document.get(name, {}), **values} if name != "space" else values
    path.write_text(yaml.safe_dump(document))
    return path


def scratch_study(folder: Path):
    """A new, empty Optuna study for a searcher made in a test, stored in ``folder``."""
    import uuid

    from ray_jobs.results import ResultsStore
    from ray_jobs.study import Study

    return Study(ResultsStore(str(folder), f"study-{uuid.uuid4().hex[:8]}"))


def run_script(script: str, *args: str, timeout: float = 900, cwd: Path = REPO_ROOT, **kwargs):
    """Run ray_jobs/<script> as a user would, with this test session's environment."""
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "ray_jobs" / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def quickstart_commands(
    readme: Path = REPO_ROOT / "README.md", python: str = sys.executable
) -> list[list[str]]:
    """The commands of README.md's quickstart block as a user types them (comments dropped), with
    ``python`` and ``pip`` meaning the interpreter ``python``."""
    section = readme.read_text().split("\n## Quickstart", 1)[1]
    block = section.split("```", 2)[1]
    commands = [line.split("#", 1)[0].split() for line in block.splitlines()[1:]]
    programs = {"python": [python], "pip": [python, "-m", "pip"]}
    return [programs.get(words[0], [words[0]]) + words[1:] for words in commands if words]


def newcomer_python(folder: Path) -> str:
    """The interpreter of a new virtual environment in ``folder`` that sees this machine's installed
    packages (so the install step installs only the project itself, here, and leaves this test
    session's installation of the project alone)."""
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", str(folder)], check=True
    )
    return str(folder / "bin" / "python")


def fresh_clone(target: Path) -> Path:
    """A clone of the committed repository, as a newcomer gets it. Uncommitted edits to tracked
    files are applied on top so that a developer tests what they see; files git does not track are
    not there, so a forgotten `git add` fails here as it would for a user."""
    subprocess.run(["git", "clone", "--quiet", str(REPO_ROOT), str(target)], check=True)
    diff = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "diff", "HEAD", "--binary"], check=True, capture_output=True
    ).stdout
    if diff:
        subprocess.run(["git", "-C", str(target), "apply", "-"], input=diff, check=True)
    return target


def ray_leftovers() -> str:
    """What of Ray runs on this machine: a search that failed to start may have found another."""
    from ray_jobs.ray_internals import local_ray_instances

    raylets = [" ".join(args)[:160] for args in session_processes("raylet").values()]
    return (
        f"running Ray instances: {local_ray_instances() or 'none'}; "
        f"raylet processes: {raylets or 'none'}"
    )


@pytest.fixture(scope="session")
def finished_search(tmp_path_factory):
    """The README's quickstart run in a fresh clone, exactly as written: its search (shared by every
    test that only reads its results, and probed while it runs: dashboard, ports, worker release)
    and its refit. Run under the commands' defaults: relative --results and data dir, the demo data
    generated on first use, 2 DDP workers per trial."""
    root = tmp_path_factory.mktemp("newcomer")
    clone = fresh_clone(root / "sketch-hpo")
    install, search, refit = quickstart_commands(
        clone / "README.md", newcomer_python(root / "venv")
    )
    assert install[-3:] == ["install", "-r", "requirements.txt"] and search[1:3] == [
        "ray_jobs/tune.py",
        "--space",
    ]
    installed = subprocess.run(install, cwd=clone, capture_output=True, text=True, timeout=900)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    imported = subprocess.run(
        [search[0], "-c", "import ray_jobs, sketch_core; print(sketch_core.__file__)"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert imported.startswith(str(clone)), (
        f"the install step did not install the clone's code: {imported}"
    )
    log = root / "tune.log"
    with (
        log.open("w") as output,
        started_command(search, cwd=clone, stdout=output, stderr=subprocess.STDOUT) as driver,
    ):
        try:
            dashboard = probe_dashboard(driver, log, root)
            journal = clone / "results" / "demo" / "study.journal"
            wait_for(journal.exists, "the stored Optuna study", driver, log=log)
            with study_view(journal) as study:
                live_study = wait_for(
                    lambda: study() if any(t["state"] == "Complete" for t in study()) else None,
                    "a complete trial in optuna-dashboard",
                    driver,
                    log=log,
                )
                released = watch_worker_release(driver, clone / "results" / "demo", timeout=900)
                final_study = study()
        except BaseException:
            print(
                f"the quickstart search failed while probed; {ray_leftovers()}\n"
                f"{log.read_text()[-6000:]}"
            )
            raise
    assert driver.returncode == 0, f"{ray_leftovers()}\n{log.read_text()[-6000:]}"
    refitted = subprocess.run(refit, cwd=clone, capture_output=True, text=True, timeout=900)
    assert refitted.returncode == 0, (
        f"{ray_leftovers()}\n{refitted.stdout[-3000:]}{refitted.stderr[-3000:]}"
    )
    return {
        "clone": clone,
        "results": clone / "results",
        "experiment": "demo",
        "data_dir": clone / "demo" / "sketches",
        "space": clone / search[3],
        "output": log.read_text(),
        "refit_output": refitted.stdout,
        "dashboard": dashboard,
        "released": released,
        "study": {"live": live_study, "final": final_study},
    }


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_for(
    probe,
    what: str,
    driver=None,
    *,
    timeout: float = 300,
    interval: float = 1,
    log: Path | None = None,
):
    """The first truthy value ``probe()`` returns while ``driver`` (if any) runs; the test fails if
    none comes within ``timeout`` seconds or the driver ends first (with the tail of ``log``, if
    given)."""
    deadline = time.monotonic() + timeout
    while (driver is None or driver.poll() is None) and time.monotonic() < deadline:
        if found := probe():
            return found
        time.sleep(interval)
    pytest.fail(f"{what} never came" + (f"\n{log.read_text()[-3000:]}" if log else ""))


# Ray prefixes each line it forwards from a worker process with "(ActorName pid=N, ip=...)",
# coloured.
RAY_WORKER_LINE = re.compile(r"^(\x1b\[\d+m)?\((\w+ )?pid=\d+(, ip=[\d.]+)?\)")


def own_output(output: str) -> str:
    """A driver's output less the lines Ray forwarded from worker processes. A worker that Ray
    stops with SIGTERM inside an import prints Python's "Exception ignored ... SystemExit"
    traceback, which is Ray's, not the driver's."""
    return "\n".join(line for line in output.splitlines() if not RAY_WORKER_LINE.match(line))


def trial_pids(epochs, trial_id: str) -> list[int]:
    """The training-worker PIDs a trial reported in epochs.parquet, over all its attempts."""
    return [
        int(pid)
        for pids in epochs.loc[epochs["trial_id"] == trial_id, "pids"].dropna()
        for pid in str(pids).split(",")
    ]


def watch_worker_release(
    driver, experiment_dir: Path, *, timeout: float, grace_s: float = 30
) -> dict[str, dict]:
    """Until ``driver`` (tune.py) ends: for each trial trained by Ray Train workers that ended while
    the search went on, its status and how many seconds its workers outlived it (None: more than
    ``grace_s``). (A head-only trial's process is kept on purpose, for the next trial.) The test
    fails if the driver runs longer than ``timeout`` seconds."""
    import pandas as pd

    trials_file, epochs_file = experiment_dir / "trials.parquet", experiment_dir / "epochs.parquet"
    ended_at, released = {}, {}
    deadline = time.monotonic() + timeout
    while driver.poll() is None:
        if time.monotonic() > deadline:
            pytest.fail(f"the search did not end within {timeout} s")
        if trials_file.exists() and epochs_file.exists():
            trials, epochs = pd.read_parquet(trials_file), pd.read_parquet(epochs_file)
            ended = trials["status"].isin(["finished", "stopped_early"]) & (
                trials["feature_cache"] == 0
            )
            for trial in trials[ended].itertuples():
                if trial.trial_id in released:
                    continue
                waited = time.monotonic() - ended_at.setdefault(trial.trial_id, time.monotonic())
                pids = trial_pids(epochs, trial.trial_id)
                if driver.poll() is not None:
                    # the search ended: Ray's shutdown ends every worker, which proves nothing
                    break
                if not any(pid_alive(pid) for pid in pids):
                    released[trial.trial_id] = {"status": trial.status, "after_s": waited}
                elif waited > grace_s:
                    released[trial.trial_id] = {
                        "status": trial.status,
                        "after_s": None,
                        "pids": pids,
                    }
        time.sleep(0.5)
    return released


def probe_dashboard(driver, log: Path, home: Path) -> dict:
    """While ``driver`` (tune.py on local Ray) runs: its dashboard URL; the HTTP status of a request
    without the token; /api/version with it; what a client with a wrong token got from the GCS port;
    and the Train runs the dashboard's Train tab lists once the first trial runs."""
    import json
    import urllib.error
    import urllib.request

    url = wait_for(
        lambda: next(
            (
                line.split(": ", 1)[1].strip()
                for line in log.read_text().splitlines()
                if line.startswith("Ray dashboard: ")
            ),
            None,
        ),
        "the dashboard line",
        driver,
        log=log,
    )
    try:
        urllib.request.urlopen(f"{url}/api/version", timeout=30)
        without_token = 200
    except urllib.error.HTTPError as refused:
        without_token = refused.code
    token = (Path.home() / ".ray" / "auth_token").read_text().strip()

    def dashboard_api(path: str):
        request = urllib.request.Request(
            f"{url}{path}", headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    gcs_address = wait_for(
        lambda: next(
            (
                argument.split("=", 1)[1]
                for arguments in session_processes(driver.ray_tmpdir).values()
                for argument in arguments
                if argument.startswith("--gcs-address=")
            ),
            None,
        ),
        "the GCS address",
        driver,
        log=log,
    )
    intruder = subprocess.run(
        [sys.executable, "-c", f"import ray; ray.init(address={gcs_address!r})"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HOME": str(home), "RAY_AUTH_TOKEN": "0" * 32},
    )

    def train_runs():
        try:  # the Train tab's source: an error until the first trial starts its Train run
            return dashboard_api("/api/train/v2/runs/v1")["train_runs"] or None
        except urllib.error.HTTPError:
            return None

    return {
        "url": url,
        "without_token": without_token,
        "version": dashboard_api("/api/version"),
        "intruder": intruder,
        # The search's first trial is head-only (no Train run): wait for a fine-tuning trial's,
        # however long the search takes to reach one (its own limit is the caller's).
        "train_runs": wait_for(
            train_runs, "a Train run on the dashboard", driver, timeout=900, log=log
        ),
    }


@contextmanager
def local_server(program: str, *args: str, ready: str):
    """``program`` (a console script installed beside this Python) serving HTTP on a free port of
    127.0.0.1 with ``args``; yields ``api(path)``, which returns the JSON that ``path`` answers,
    once ``ready`` answers (``api.url``: the server's address)."""
    import json
    import urllib.request

    port = free_port()
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / program),
            *args,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def api(path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
            return json.loads(response.read())

    api.url = f"http://127.0.0.1:{port}"

    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                api(ready)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"{program} did not start (exit status {server.poll()})")
                time.sleep(0.5)
        yield api
    finally:
        server.terminate()
        server.wait(timeout=30)


@contextmanager
def study_view(journal: Path):
    """optuna-dashboard on the study in ``journal``, as the README starts it; yields a function
    returning the trials its API lists now."""
    with local_server("optuna-dashboard", str(journal), ready="/api/meta") as api:

        def trials() -> list[dict]:
            studies = api("/api/studies")[
                "study_summaries"
            ]  # none until the searcher creates its study
            assert len(studies) <= 1, studies
            return api(f"/api/studies/{studies[0]['study_id']}")["trials"] if studies else []

        yield trials


def session_processes(marker: str) -> dict[int, list[str]]:
    """The processes whose command line mentions ``marker`` (a Ray session folder of this test):
    PID to arguments."""
    processes = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as file:
                    cmdline = file.read()
            except OSError:
                continue
            if marker.encode() in cmdline:
                processes[int(entry)] = cmdline.decode(errors="replace").split("\0")
    return processes


def kill_session(ray_tmpdir: str) -> None:
    """SIGKILL what is left of a local Ray started under ``ray_tmpdir`` (a killed driver's Ray
    outlives it)."""
    for pid in session_processes(ray_tmpdir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@contextmanager
def started_command(command: list[str], *, cwd: Path = REPO_ROOT, **kwargs):
    """``command`` running in the background with its own Ray folder (``process.ray_tmpdir``).
    However the test ends, the command and any local Ray it started are stopped, so a failed test
    never leaves a Ray instance that the next test's local Ray would refuse to run beside."""
    ray_tmpdir = tempfile.mkdtemp(
        prefix="ray-", dir="/tmp"
    )  # short: Ray's socket paths are limited
    env = {**os.environ, "RAY_TMPDIR": ray_tmpdir, **kwargs.pop("env", {})}
    process = subprocess.Popen(command, cwd=cwd, env=env, **kwargs)
    process.ray_tmpdir = ray_tmpdir
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)  # tune.py stops its trials and Ray on Ctrl-C
            try:
                process.communicate(timeout=60)  # drains its pipes, so it can finish writing
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()
        kill_session(ray_tmpdir)


def started_script(script: str, *args: str, **kwargs):
    """ray_jobs/<script> running in the background, as ``started_command``."""
    return started_command([sys.executable, str(REPO_ROOT / "ray_jobs" / script), *args], **kwargs)


class Bucket:
    """A bucket of the test's S3 server, read as any S3 client would (pyarrow's, with the server's
    settings), not through the product's ResultsStore."""

    def __init__(self, name: str, env: dict[str, str]):
        import pyarrow.fs as pafs

        self.name, self.env = name, env
        self.fs = pafs.S3FileSystem(
            endpoint_override=env["AWS_ENDPOINT_URL"],
            access_key=env["AWS_ACCESS_KEY_ID"],
            secret_key=env["AWS_SECRET_ACCESS_KEY"],
            region=env["AWS_DEFAULT_REGION"],
        )

    def uri(self, key: str = "") -> str:
        return f"s3://{self.name}/{key}".rstrip("/")

    def keys(self, prefix: str = "") -> list[str]:
        """Every object under ``prefix``, as keys in the bucket."""
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(f"{self.name}/{prefix}", recursive=True, allow_not_found=True)
        return sorted(
            info.path.removeprefix(f"{self.name}/")
            for info in self.fs.get_file_info(selector)
            if info.type == pafs.FileType.File
        )

    def exists(self, key: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(f"{self.name}/{key}").type == pafs.FileType.File

    def read(self, key: str) -> bytes:
        with self.fs.open_input_stream(f"{self.name}/{key}") as stream:
            return stream.read()

    def json(self, key: str):
        import json

        return json.loads(self.read(key))

    def parquet(self, key: str):
        import io

        import pandas as pd

        return pd.read_parquet(io.BytesIO(self.read(key)))

    def download(self, key: str, target: Path) -> Path:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(self.read(key))
        return target


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's, in its own process) on a free port of 127.0.0.1, with
    the bucket ``hpo``, that checks credentials as AWS does: a request signed with an access key it
    did not issue is refused. Yields the bucket; ``bucket.env`` is what a user exports to reach
    it (the endpoint, the access key of a user allowed s3:*, the region)."""
    import json
    import urllib.request

    import boto3

    with local_server("moto_server", ready="/moto-api/config") as api:
        # Until reset-auth below, moto takes any credentials: the administrator sets up the user.
        admin = dict(
            endpoint_url=api.url,
            region_name="us-east-1",
            aws_access_key_id="admin",
            aws_secret_access_key="admin",
        )
        iam = boto3.client("iam", **admin)
        iam.create_user(UserName="sketch-hpo")
        iam.put_user_policy(
            UserName="sketch-hpo",
            PolicyName="results",
            PolicyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
                }
            ),
        )
        key = iam.create_access_key(UserName="sketch-hpo")["AccessKey"]
        env = {
            "AWS_ENDPOINT_URL": api.url,
            "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        boto3.client(
            "s3",
            **{
                **admin,
                "aws_access_key_id": key["AccessKeyId"],
                "aws_secret_access_key": key["SecretAccessKey"],
            },
        ).create_bucket(Bucket="hpo")
        urllib.request.urlopen(
            urllib.request.Request(
                f"{api.url}/moto-api/reset-auth",
                data=b"0",  # requests without moto's own credentials from now on: none
                headers={"Content-Type": "text/plain"},
                method="POST",
            ),
            timeout=30,
        )
        yield Bucket("hpo", env)


@pytest.fixture
def s3(s3_server, monkeypatch) -> Bucket:
    """The S3 server's settings exported for this test, as a user exports them in the shell: the
    commands it runs, and every Ray process they start, read them from the environment."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    return s3_server


def mlflow_runs(uri: str, experiment: str):
    """The runs of an MLflow experiment in the store at ``uri``, read back as a user reads them:
    ``mlflow.search_runs`` (one row per run: params.*, metrics.* (the last), tags.*, status)."""
    import mlflow

    mlflow.set_tracking_uri(uri)  # also exported as MLFLOW_TRACKING_URI, for subprocesses
    try:
        return mlflow.search_runs(experiment_names=[experiment])
    finally:
        mlflow.set_tracking_uri(None)  # the commands of later tests are not tracked
