"""Several worker processes sharing one campaign on real PostgreSQL / MariaDB servers, and the SQLite refusal.

Server URLs come from OLMOPT_TEST_POSTGRES_URL / OLMOPT_TEST_MYSQL_URL (set by .ci/run). Without them, or
without a reachable server, these tests skip with the reason (and fail when OLMOPT_REQUIRE_SERVERS=1).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import pytest

from olmopt.cli import main
from olmopt.search.api import campaign_status
from tests.test_study import study_file

if TYPE_CHECKING:
    from tests.conftest import CliProcesses

SERVERS = {"postgres": "OLMOPT_TEST_POSTGRES_URL", "mysql": "OLMOPT_TEST_MYSQL_URL"}
FAST_HEARTBEAT = {"OLMOPT_HEARTBEAT_INTERVAL": "1", "OLMOPT_HEARTBEAT_GRACE": "4"}


_STORAGES: dict[str, optuna.storages.BaseStorage] = {}


def storage_of(url: str) -> optuna.storages.BaseStorage:
    """One storage (connection pool) per server URL for the whole module."""
    if url not in _STORAGES:
        _STORAGES[url] = optuna.storages.get_storage(url)
    return _STORAGES[url]


def study_list(url: str) -> list:
    """Studies of a storage without reading trials, safe while workers create and drop lock studies."""
    from olmopt.search.campaign import all_studies

    return all_studies(storage_of(url))


def server_url(kind: str) -> str:
    url = os.environ.get(SERVERS[kind])
    reason = f"{SERVERS[kind]} is not set"
    if url:
        try:
            from sqlalchemy import create_engine, text

            with create_engine(url).connect() as conn:
                conn.execute(text("select 1"))
            return url
        except Exception as exc:  # noqa: BLE001 - any failure means "no server here"
            reason = f"{kind} server unreachable at {url}: {str(exc).splitlines()[0]}"
    if os.environ.get("OLMOPT_REQUIRE_SERVERS"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(params=["postgres", "mysql"])
def rdb_url(request: pytest.FixtureRequest) -> str:
    return server_url(request.param)


def workers(cli: CliProcesses, url: str, name: str, n: int) -> list[subprocess.Popen[bytes]]:
    """``n`` worker processes of campaign ``name`` with fast heartbeats."""
    return [
        cli.start("study", "run", name, "--storage", url, "--quiet", env=FAST_HEARTBEAT) for _ in range(n)
    ]


LAYERS = [2, 3]  # two greedy stages keep four workers busy without making CI slow


def create(tiny_zoo: Path, tmp: Path, url: str) -> str:
    name = f"dist-{uuid.uuid4().hex[:10]}"
    decisions = {"layers": {"mode": "greedy", "only": LAYERS}}
    path = study_file(tmp, tiny_zoo, name, **decisions)
    # the servers keep the evaluation cache across test runs: these tests need real evaluations to kill
    path.write_text(path.read_text() + "evaluation: {cache: false}\n")
    assert main(["study", "create", str(path), "--storage", url]) == 0
    return name


def cleanup(url: str, name: str) -> None:
    from olmopt.search.campaign import delete_campaign

    delete_campaign(storage_of(url), name)


def assert_exact_candidates(url: str, name: str) -> None:
    """Every stage: each candidate COMPLETE exactly once
    (retries of killed trials are FAIL + one COMPLETE)."""
    status = campaign_status(name, url)
    assert status["finished"]
    for stage in status["stages"]:
        study = optuna.load_study(study_name=f"{name}/{stage['stage']}", storage=url)
        complete = [
            t.user_attrs["candidate"] for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
        ]
        assert len(complete) == len(set(complete)), f"duplicate candidates in {stage['stage']}: {complete}"
        expected = 1 if stage["kind"] == "base" else 5
        assert len(complete) == expected, (stage["stage"], complete)
        assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING))


@pytest.fixture(scope="module")
def single_worker_recipe(tiny_zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("single")
    url = f"sqlite:///{tmp}/s.db"
    path = study_file(tmp, tiny_zoo, "single", layers={"mode": "greedy", "only": LAYERS})
    assert main(["study", "create", str(path), "--storage", url]) == 0
    assert main(["study", "run", "single", "--storage", url, "--quiet"]) == 0
    return campaign_status("single", url)["recipe"]


@pytest.mark.server
@pytest.mark.slow
def test_four_workers_share_a_greedy_campaign(rdb_url, tiny_zoo, tmp_path, single_worker_recipe, cli) -> None:
    name = create(tiny_zoo, tmp_path, rdb_url)
    try:
        for p in workers(cli, rdb_url, name, 4):
            code, err = cli.finish(p, timeout=600)
            assert code == 0, err[-2000:]
        assert_exact_candidates(rdb_url, name)
        assert campaign_status(name, rdb_url)["recipe"] == single_worker_recipe
        # every worker took part: trials carry the worker that ran them
        ran = set()
        for s in study_list(rdb_url):
            if s.study_name.startswith(name + "/"):
                study = optuna.load_study(study_name=s.study_name, storage=rdb_url)
                ran |= {t.user_attrs.get("worker") for t in study.get_trials()}
        assert len(ran - {None}) >= 2
    finally:
        cleanup(rdb_url, name)


_CAMPAIGNS: dict[tuple[str, str], Any] = {}


def _running_trial_worker(url: str, name: str, *, middle_stage: bool = False) -> str | None:
    """The worker of a RUNNING trial of campaign ``name`` (its stage studies only: quick on a busy server);
    with ``middle_stage``, only of a stage that has a stage before it and one after it."""
    from olmopt.search.campaign import Campaign

    if (url, name) not in _CAMPAIGNS:
        _CAMPAIGNS[url, name] = Campaign.load(name, url)  # one storage connection for the whole polling
    campaign = _CAMPAIGNS[url, name]
    for stage in campaign.plan[1:-1] if middle_stage else campaign.plan:
        study = campaign.existing_stage_study(stage)
        if study is not None:
            for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,)):
                worker = t.user_attrs.get("worker")
                if worker:
                    return worker
    return None


@pytest.mark.server
@pytest.mark.slow
def test_kill_9_mid_trial_is_failed_retried_and_finishes_with_the_same_recipe(
    rdb_url, tiny_zoo, tmp_path, single_worker_recipe, cli
) -> None:
    """Issue 20 item 21: one of three workers killed with SIGKILL mid-trial, and a replacement started. The
    killed worker's trial is failed by the heartbeat sweep and its candidate evaluated again, once (every
    candidate COMPLETE exactly once); each stage's decision is recorded by exactly one worker; the recipe is
    a single worker's."""
    name = create(tiny_zoo, tmp_path, rdb_url)
    try:
        procs = workers(cli, rdb_url, name, 3)
        by_pid = {p.pid: p for p in procs}
        killed, killed_worker = None, None
        deadline = time.time() + 300
        while killed is None and time.time() < deadline:
            worker = _running_trial_worker(rdb_url, name)
            if worker and int(worker.rsplit(":", 1)[1]) in by_pid:
                killed, killed_worker = by_pid[int(worker.rsplit(":", 1)[1])], worker
                killed.kill()
            time.sleep(0.01)
        assert killed is not None, "never saw a running trial to kill"
        killed.wait(timeout=30)
        procs += workers(cli, rdb_url, name, 1)  # the restart
        for p in procs:
            if p is not killed:
                code, err = cli.finish(p, timeout=600)
                assert code == 0, err[-2000:]
        assert_exact_candidates(rdb_url, name)
        stage_studies = [
            optuna.load_study(study_name=s.study_name, storage=rdb_url)
            for s in study_list(rdb_url)
            if s.study_name.startswith(name + "/") and "#" not in s.study_name
        ]
        failed = [
            t for study in stage_studies for t in study.get_trials(states=(optuna.trial.TrialState.FAIL,))
        ]
        assert failed, "the killed worker's trial should be marked FAIL"
        assert {t.user_attrs.get("worker") for t in failed} == {killed_worker}
        logs = "".join(cli.stderr(p) for p in procs)
        for stage in campaign_status(name, rdb_url)["stages"]:
            assert logs.count(f" {stage['stage']}: winner ") == 1, (stage["stage"], logs[-3000:])
        assert campaign_status(name, rdb_url)["recipe"] == single_worker_recipe
    finally:
        cleanup(rdb_url, name)


def _caught_in_middle_stage(
    cli: CliProcesses, url: str, tiny_zoo: Path, tmp: Path, attempts: int = 3
) -> tuple[str, list[subprocess.Popen[bytes]]]:
    """A new campaign and two workers caught running a trial of a middle stage: the base stage is complete
    by then (later stages start from its decision), and a whole stage is left, so the campaign cannot
    finish before a signal sent now lands. On a busy machine the poll can miss that stage (it takes well
    under a second on the tiny zoo); the workers then finish the campaign, and a fresh one is tried."""
    for _ in range(attempts):
        name = create(tiny_zoo, tmp, url)
        procs = workers(cli, url, name, 2)
        deadline = time.time() + 300
        while time.time() < deadline and any(p.poll() is None for p in procs):
            if _running_trial_worker(url, name, middle_stage=True) is not None:
                return name, procs
            time.sleep(0.01)
        for p in procs:
            cli.finish(p, timeout=60)
        cleanup(url, name)
    pytest.fail(f"no trial of the middle stage was seen running in {attempts} campaigns")


@pytest.mark.server
@pytest.mark.slow
def test_sigterm_all_workers_then_restart_resumes(
    rdb_url, tiny_zoo, tmp_path, single_worker_recipe, cli
) -> None:
    name, procs = _caught_in_middle_stage(cli, rdb_url, tiny_zoo, tmp_path)
    try:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=60)
        # nothing left RUNNING: SIGTERM is handled like Ctrl-C
        assert _running_trial_worker(rdb_url, name) is None
        done_before = sum(s["trials"]["complete"] for s in campaign_status(name, rdb_url)["stages"])
        assert not campaign_status(name, rdb_url)["finished"]
        for p in workers(cli, rdb_url, name, 2):
            code, err = cli.finish(p, timeout=600)
            assert code == 0, err[-2000:]
        assert_exact_candidates(rdb_url, name)
        assert (
            sum(s["trials"]["complete"] for s in campaign_status(name, rdb_url)["stages"])
            == 1 + len(LAYERS) * 5
        )
        assert done_before >= 1
        assert campaign_status(name, rdb_url)["recipe"] == single_worker_recipe
    finally:
        cleanup(rdb_url, name)


@pytest.mark.server
@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_trials_of_dead_workers_are_failed_whether_or_not_they_ever_beat(rdb_url) -> None:
    """A worker killed after taking a trial but before its first beat leaves a RUNNING trial that Optuna's
    heartbeat sweep never fails; it must be failed after 3 intervals, while a beating trial lives on."""
    from olmopt.search.coordination import fail_dead_workers_trials

    storage = optuna.storages.RDBStorage(rdb_url, heartbeat_interval=1, grace_period=2)
    name = f"dead-{uuid.uuid4().hex[:10]}"
    study = optuna.create_study(study_name=name, storage=storage)
    try:
        never_beat, beating, stopped = study.ask(), study.ask(), study.ask()
        never_beat.set_user_attr("worker", "elsewhere:1")  # the worker named itself, then died
        storage.record_heartbeat(beating._trial_id)
        storage.record_heartbeat(stopped._trial_id)
        assert fail_dead_workers_trials(study, storage, stale_after=900) == []  # all young
        time.sleep(3.5)
        storage.record_heartbeat(beating._trial_id)
        assert fail_dead_workers_trials(study, storage, stale_after=900) == [never_beat.number]
        states = {t.number: t.state for t in study.get_trials()}
        assert states == {
            never_beat.number: optuna.trial.TrialState.FAIL,
            beating.number: optuna.trial.TrialState.RUNNING,
            stopped.number: optuna.trial.TrialState.FAIL,  # by Optuna's heartbeat sweep
        }
    finally:
        optuna.delete_study(study_name=name, storage=storage)


def test_without_heartbeats_trials_are_failed_by_age(tmp_path: Path) -> None:
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    from olmopt.search.coordination import fail_dead_workers_trials

    storage = JournalStorage(JournalFileBackend(str(tmp_path / "j.log")))
    study = optuna.create_study(storage=storage)
    old = study.ask()
    time.sleep(1.2)
    young = study.ask()
    assert fail_dead_workers_trials(study, storage, stale_after=1.0) == [old.number]
    assert [t.state for t in study.get_trials()] == [
        optuna.trial.TrialState.FAIL,
        optuna.trial.TrialState.RUNNING,
    ]
    assert young.number == 1


def test_a_second_process_on_one_sqlite_file_is_refused(tiny_zoo, tmp_path, cli) -> None:
    """Two `study run` processes on one SQLite file: exactly one runs, the other is refused in one line."""
    url = f"sqlite:///{tmp_path}/s.db"
    name = create(tiny_zoo, tmp_path, url)
    procs = [cli.start("study", "run", name, "--storage", url, "--quiet") for _ in range(2)]
    results = [cli.finish(p, timeout=600) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2).strip().splitlines()
    assert len(refused) == 1 and "SQLite cannot be shared" in refused[0] and "PostgreSQL" in refused[0]
    assert campaign_status(name, url)["finished"]


@pytest.mark.server
@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_dead_workers_candidate_is_queued_again_exactly_once(rdb_url, monkeypatch) -> None:
    """Issue 20 item 21. Worker A fails a dead worker's trials (a row-locked state change, then the storage's
    stale-trial callback); worker B's enqueue of the missing candidates can run between the two. Only one
    of them may queue the enqueued candidate again (else two trials of it complete); a sampled trial is
    queued again by the callback with its own params."""
    from olmopt.search import trials as T
    from olmopt.search.coordination import fail_dead_workers_trials
    from olmopt.search.storage import open_storage

    for key, value in FAST_HEARTBEAT.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("OLMOPT_HEARTBEAT_GRACE", "2")
    storage = open_storage(rdb_url)
    name = f"once-{uuid.uuid4().hex[:10]}"
    study = optuna.create_study(study_name=name, storage=storage)
    candidates = [("a", {"x": 1}), ("b", {"x": 2})]
    try:
        sampled = study.ask()  # before the enqueue: ask() would pop a queued candidate
        sampled.suggest_int("x", 0, 9)
        sampled.set_user_attr(T.LABEL_ATTR, "sampled")
        T.enqueue_absent(study, candidates)
        enqueued = T.pop_waiting(study)
        assert enqueued is not None and enqueued.suggest_int("x", 0, 9) == 1
        for trial in (enqueued, sampled):
            storage.record_heartbeat(trial._trial_id)  # then the worker dies: no more beats
        time.sleep(3.2)
        # worker A, first half of its sweep: both trials FAIL ...
        for trial in (enqueued, sampled):
            assert storage.set_trial_state_values(trial._trial_id, state=optuna.trial.TrialState.FAIL)
        T.enqueue_absent(study, candidates)  # ... worker B enqueues what is missing ...
        callback = storage.get_heartbeat_stale_trial_callback()
        assert callback is not None
        for trial in (enqueued, sampled):  # ... and A's second half runs the callback
            callback(study, storage.get_trial(trial._trial_id))
        waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
        labels = sorted(str(t.user_attrs[T.LABEL_ATTR]) for t in waiting)
        assert labels == ["a", "b", "sampled"], labels  # each once ("b" was never taken)
        assert next(t for t in waiting if t.user_attrs[T.LABEL_ATTR] == "sampled").params == sampled.params
        # a second sweep by another worker fails and queues nothing more
        assert fail_dead_workers_trials(study, storage, stale_after=900) == []
        assert len(study.get_trials(states=(optuna.trial.TrialState.WAITING,))) == 3
    finally:
        optuna.delete_study(study_name=name, storage=storage)


@pytest.mark.server
def test_two_workers_race_a_joint_stage_and_resume_each_near_tie_once(
    rdb_url, tiny_zoo, tmp_path, cli
) -> None:
    """Early stopping (on by default under ``score: mean``) and racing (asked for) with two `study run`
    workers: the stage ends only when no race-stopped near-tie of the leader is left unresumed, each
    resume runs once, and stopped trials never win."""
    from olmopt.evaluate.early_stop import StopRule
    from olmopt.search.campaign import Campaign
    from olmopt.search.near_ties import RACED_ATTR, RESUME_ATTR, NearTies

    name = f"race-{uuid.uuid4().hex[:10]}"
    layers = {"mode": "joint", "n_trials": 16, "warm_start": True, "sampler": "tpe"}
    path = study_file(tmp_path, tiny_zoo, name, layers=layers)
    path.write_text(
        path.read_text()
        + "selection: {score: mean}\nevaluation: {cache: false, racing: {mode: on, eta: 2}}\n"
    )
    assert main(["study", "create", str(path), "--storage", rdb_url]) == 0
    try:
        for p in workers(cli, rdb_url, name, 2):
            code, err = cli.finish(p, timeout=600)
            assert code == 0, err[-2000:]
        campaign = Campaign.load(name, rdb_url)
        assert (
            campaign.config.evaluation.early_stop.mode == "on"
            and campaign.config.evaluation.racing.mode == "on"
        )
        stage = campaign.plan[-1]
        study = campaign.existing_stage_study(stage)
        assert study is not None
        trials = study.get_trials()
        done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        assert all(t.state in (*done, optuna.trial.TrialState.FAIL) for t in trials)
        resumed = [
            int(t.user_attrs[RESUME_ATTR]) for t in trials if RESUME_ATTR in t.user_attrs and t.state in done
        ]
        assert len(resumed) == len(set(resumed))  # each near-tie resumed once, by one of the workers
        raced = [t for t in trials if t.user_attrs.get(RACED_ATTR)]
        maximize = dict.fromkeys(("add", "rev", "fact", "mc"), "maximize")
        metrics = {
            "add": "token_accuracy",
            "rev": "token_accuracy",
            "fact": "token_accuracy",
            "mc": "mc_accuracy",
        }
        rule = NearTies(StopRule(0.05, maximize, metrics, "mean"), ["add", "rev", "fact", "mc"], 0.05)
        assert raced and rule.due(trials) == []  # racing stopped some; nothing left that could still win
        print(f"{len(trials)} trials, {len(raced)} raced, resumed {resumed}")
        decision = campaign.decisions()[stage.key]
        pruned = {str(t.user_attrs["candidate"]) for t in trials if t.state == optuna.trial.TrialState.PRUNED}
        assert decision.winner not in pruned and campaign_status(name, rdb_url)["finished"]
    finally:
        cleanup(rdb_url, name)


@pytest.fixture
def another_thread() -> Iterator[None]:
    """A second live thread, as a worker has (torch's, a heartbeat's): the kernel may hand it a
    process-wide signal that the main thread masks, so masking the main thread defers nothing."""
    done = threading.Event()
    thread = threading.Thread(target=done.wait, daemon=True)
    thread.start()
    yield
    done.set()
    thread.join()


def test_interrupts_deferred_holds_a_signal_back_to_the_end_of_the_block(another_thread) -> None:
    from olmopt.commands._common import sigterm_as_interrupt
    from olmopt.search.coordination import interrupts_deferred

    previous = signal.getsignal(signal.SIGTERM)
    sigterm_as_interrupt()
    installed = signal.getsignal(signal.SIGTERM)
    reached = []
    try:
        with pytest.raises(KeyboardInterrupt), interrupts_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            sum(range(10_000))
            time.sleep(0.05)
            reached.append("end of block")
        assert reached == ["end of block"]
        assert signal.getsignal(signal.SIGTERM) is installed  # the handler is restored
        with interrupts_deferred():  # nothing noted: the block ends quietly
            pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_an_interrupt_while_taking_a_lock_leaves_no_lock_behind(
    tmp_path, monkeypatch, another_thread
) -> None:
    """SIGTERM (handled like Ctrl-C) landing inside the storage write that takes a stage lock: the write
    completes, the interrupt is raised when it is done, and the lock is released, so the next worker takes
    it at once instead of waiting ``stale_after`` seconds for an unstamped lock."""
    from olmopt.commands._common import sigterm_as_interrupt
    from olmopt.search import coordination

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/lock.db")
    real_create = optuna.create_study

    def create_then_signalled(**kwargs: Any) -> optuna.Study:
        study = real_create(**kwargs)  # the lock's row is written ...
        os.kill(os.getpid(), signal.SIGTERM)  # ... and the stop arrives before the call returns
        sum(range(10_000))  # bytecode the handler could run in
        return study

    previous = signal.getsignal(signal.SIGTERM)
    sigterm_as_interrupt()
    try:
        monkeypatch.setattr(coordination.optuna, "create_study", create_then_signalled)
        with pytest.raises(KeyboardInterrupt):
            coordination.StageLock(storage, "stage").acquire()
        monkeypatch.setattr(coordination.optuna, "create_study", real_create)
        assert coordination.StageLock(storage, "stage", stale_after=3600).acquire()  # free at once
    finally:
        signal.signal(signal.SIGTERM, previous)
