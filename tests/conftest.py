"""Shared test set-up: the tests folder on sys.path (for `workflow`, `fake_transport`,
`data_fixtures` and the `workers` package), and one run of the whole workflow on the tiny
config that every end-to-end test module reads (about two minutes on 2 cores, run once).
"""
from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from workflow import log_tail, remove_orphaned_semaphores, snakemake, tiny_config  # noqa: E402


_MLFLOW_URI_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@pytest.fixture(autouse=True)
def mlflow_uris_stay_in_their_test():
    """mlflow.set_tracking_uri / set_registry_uri (a test's, or the registry's inside a test)
    write os.environ, which every later test and its subprocesses would inherit: a client of
    another store would then find another registry. Each test leaves them as it found them."""
    import os

    saved = {k: os.environ.get(k) for k in _MLFLOW_URI_VARS}
    yield
    if saved == {k: os.environ.get(k) for k in _MLFLOW_URI_VARS}:
        return
    if "mlflow" in sys.modules:
        import mlflow

        mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])
        mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


# semaphore name -> the tests during which it appeared (named in the session's clean-up line): one,
# or under pytest-xdist one per process, since a process sees the other's semaphores appear too
_SEMAPHORE_MAKERS: dict[str, list[str]] = {}
_SUMMARY: list[str] = []  # lines for the end of the run


def _semaphores() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("sem.mp-*")}


_SESSION_START = time.time() - 1.0


def pytest_sessionfinish(session):
    """Tests that SIGKILL a whole job leave its named semaphores behind (a full run, 8d2be75: 10
    from test_resume's snakemake kill test, 6 from test_shard's killed shard run). Once every test
    has ended (under pytest-xdist: in the controller, after both workers) remove those made during
    the session that no living process maps (see remove_orphaned_semaphores), and name the tests
    they appeared during. A worker only hands its notes of those tests to the controller."""
    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["semaphore_makers"] = dict(_SEMAPHORE_MAKERS)
        return
    removed = remove_orphaned_semaphores(_SESSION_START)
    if removed:
        by = Counter(test for name in removed for test in _SEMAPHORE_MAKERS.get(name, ["outside a test"]))
        _SUMMARY.append(f"removed {len(removed)} semaphores left in /dev/shm by SIGKILLed jobs, appeared during: "
                        + ", ".join(f"{test} ({n})" for test, n in by.most_common()))


@pytest.hookimpl(optionalhook=True)  # an xdist hook: the suite also runs without xdist
def pytest_testnodedown(node, error):
    """In the controller: a worker's notes of which test each semaphore appeared during."""
    for name, tests in getattr(node, "workeroutput", {}).get("semaphore_makers", {}).items():
        _SEMAPHORE_MAKERS.setdefault(name, []).extend(tests)


def pytest_terminal_summary(terminalreporter):
    """The clean-up's line in the run's summary (a fixture's own output is captured)."""
    for line in _SUMMARY:
        terminalreporter.write_line(line)


# `make test` runs the suite in two processes (pytest-xdist, `-n 2`). The scheduler below hands
# out whole modules, so a module's fixtures are made once, and every module that reads the tiny
# workflow run as one unit, so that run is made once (and no two processes run snakemake in its
# folder). The SLURM tests and that unit, the longest, go out first, in collection order.
_TINY_GROUP = "tiny_workflow"
_FIRST = ("tests/test_slurm.py", _TINY_GROUP)


def _tiny_modules(root: Path) -> set[str]:
    """The test modules (paths as in node ids) that name the tiny_workflow fixture."""
    return {str(p.relative_to(root)) for p in (root / "tests").glob("test_*.py") if "tiny_workflow" in p.read_text()}


def _group(nodeid: str, tiny: set[str]) -> str:
    module = nodeid.split("::", 1)[0]
    return _TINY_GROUP if module in tiny else module


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    tiny = _tiny_modules(config.rootpath)
    for item in items:
        if "tiny_workflow" in item.fixturenames and _group(item.nodeid, tiny) != _TINY_GROUP:
            raise pytest.UsageError(f"{item.nodeid} reads tiny_workflow but its module does not name it: "
                                    "the parallel run would make that workflow run twice")
    rank = {name: i for i, name in enumerate(_FIRST)}
    items.sort(key=lambda item: rank.get(_group(item.nodeid, tiny), len(_FIRST)))  # stable: modules stay whole


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """For `-n N` (xdist's default `--dist load`): whole modules, the tiny-workflow modules as
    one unit, in collection order. Other `--dist` modes are left to xdist."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    tiny = _tiny_modules(config.rootpath)

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group(nodeid, tiny)

    config.option.loadscopereorder = False  # keep the order pytest_collection_modifyitems made
    return ModuleScheduling(config, log)


@pytest.fixture(autouse=True)
def _semaphore_makers_noted(request):
    """Notes which test each new semaphore appeared in (a glob of /dev/shm before and after)."""
    before = _semaphores()
    yield
    for name in _semaphores() - before:
        _SEMAPHORE_MAKERS.setdefault(name, []).append(request.node.nodeid)


@dataclass
class TinyRun:
    """The finished tiny-config workflow: its folder, config and MLflow experiment."""

    workdir: Path
    config: dict
    client: object  # mlflow.MlflowClient on the run's store
    experiment_id: str


@pytest.fixture(scope="session")
def tiny_workflow(tmp_path_factory) -> TinyRun:
    """`snakemake --cores 2` on tests/configs/tiny.yaml in a scratch folder, once per session.

    Tests that rerun rules in this folder must not assume they are the only ones to have done so:
    they find their own parent run (e.g. the newest) rather than counting all of them."""
    from deepimage import mlflow_client, tracking

    workdir = tmp_path_factory.mktemp("e2e")
    cfg = tiny_config(workdir)
    r = snakemake(workdir, "--cores", "2", config=cfg, timeout=900)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}\n{log_tail(workdir)}"
    uri = cfg["mlflow"]["tracking_uri"]
    return TinyRun(workdir, cfg, mlflow_client.client(uri), tracking.experiment_id(uri, cfg["mlflow"]["experiment"]))
