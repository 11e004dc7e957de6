"""The process backend (``mode.backend=process``): pool sizing, GPU shares, the worker pool, and Flower's engine on it."""

from __future__ import annotations

import json
import os
import sys
import threading

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp.client_app import ClientAppException, LoadClientAppError
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpriv.process_backend import CONFIG_KEY, ProcessBackend
from fedpriv.worker_pool import WorkerPool, gpu_assignment, pool_size
from fedpriv.flower_engine import ENGINE_POLL_SECONDS, app_config_read_once, engine_backend, engine_stops_promptly
from fedpriv.simulation import SimulationMode, stage_app

CLIENT_APP = "process_apps:client"


def backend_config(app: str = CLIENT_APP, *, num_cpus: float = 1.0, num_gpus: float = 0.0) -> dict:
    """Flower's backend config for :class:`ProcessBackend`."""
    return {"client_resources": {"num_cpus": num_cpus, "num_gpus": num_gpus}, CONFIG_KEY: {"client_app": app}}


def job(action: str, *, node_id: int = 7, partition: int = 0) -> tuple[Message, Context]:
    """A train message asking the test ClientApp for ``action``, and its node's context."""
    message = Message(
        RecordDict({"config": ConfigRecord({"action": action})}), dst_node_id=node_id, message_type=MessageType.TRAIN
    )
    context = Context(
        run_id=1, node_id=node_id, node_config={"partition-id": partition}, state=RecordDict(), run_config={}
    )
    return message, context


def is_running(pid: int) -> bool:
    """Whether process ``pid`` exists (a reaped child does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def two_workers():
    """A built backend of two workers, terminated after the test."""
    backend = ProcessBackend(backend_config(), cpus=2)
    backend.build(lambda: pytest.fail("workers load the app themselves"))
    yield backend
    backend.terminate()


@pytest.mark.parametrize(
    ("cpus", "num_cpus", "gpus", "num_gpus", "expected"),
    [(2, 1.0, 0, 0.0, 2), (2, 0.5, 0, 0.0, 4), (16, 3.0, 0, 0.0, 5), (1, 0.3, 0, 0.0, 3), (16, 1.0, 2, 0.5, 4),
     (16, 1.0, 4, 2.0, 2), (2, 1.0, 8, 0.25, 2)],
)
def test_the_pool_holds_as_many_clients_as_the_cores_and_gpus_fit(cpus, num_cpus, gpus, num_gpus, expected):
    # Execute
    size = pool_size(cpus=cpus, client_num_cpus=num_cpus, gpus=gpus, client_num_gpus=num_gpus)

    # Assert
    assert size == expected


@given(cpus=st.integers(1, 256), num_cpus=st.floats(0.01, 256.0))
@settings(max_examples=200, deadline=None)
def test_the_pool_never_needs_more_cores_than_the_machine_has(cpus, num_cpus):
    # Execute / Assert: as many clients as fit, or a refusal when none does
    if num_cpus > cpus * (1 + 1e-9):
        with pytest.raises(ValueError, match=r"^mode.client_num_cpus="):
            pool_size(cpus=cpus, client_num_cpus=num_cpus)
    else:
        size = pool_size(cpus=cpus, client_num_cpus=num_cpus)
        assert size >= 1 and size * num_cpus <= cpus * (1 + 1e-6) and (size + 1) * num_cpus > cpus * (1 - 1e-6)


def test_gpus_a_client_cannot_get_are_refused_naming_the_key():
    # Execute / Assert
    with pytest.raises(ValueError, match=r"^mode.client_num_gpus=1.0: this machine has 0 visible GPUs"):
        pool_size(cpus=2, client_num_cpus=1.0, gpus=0, client_num_gpus=1.0)
    with pytest.raises(ValueError, match=r"^mode.client_num_gpus=1.5: above 1 it must be a whole number"):
        gpu_assignment(0, client_num_gpus=1.5)


def test_gpu_shares_pack_workers_onto_gpus_in_turn():
    # Execute
    halves = [gpu_assignment(worker, client_num_gpus=0.5) for worker in range(4)]
    thirds = [gpu_assignment(worker, client_num_gpus=0.3) for worker in range(4)]
    pairs = [gpu_assignment(worker, client_num_gpus=2) for worker in range(2)]
    none = gpu_assignment(3, client_num_gpus=0.0)

    # Assert
    assert halves == [(0,), (0,), (1,), (1,)]
    assert thirds == [(0,), (0,), (0,), (1,)]
    assert pairs == [(0, 1), (2, 3)]
    assert none == ()


def test_the_backend_config_must_name_the_client_app():
    # Execute / Assert
    with pytest.raises(ValueError, match=r"^backend config process.client_app='': must be 'module:attribute'"):
        ProcessBackend({"client_resources": {"num_cpus": 1.0}}, cpus=2)


def test_workers_answer_in_parallel_with_the_reply_and_the_updated_context(two_workers):
    # Prepare
    jobs = [job("echo", node_id=node, partition=node) for node in range(1, 7)]
    answers = [None] * len(jobs)

    def run(index):
        answers[index] = two_workers.process_message(*jobs[index])

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(jobs))]

    # Execute
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    # Assert: each reply answers its message, from a worker process (one thread
    # each, as a Ray actor of one CPU), and carries the node's new state
    assert two_workers.num_workers == 2
    for (message, _), (reply, context) in zip(jobs, answers, strict=True):
        facts = reply.content["facts"]
        assert reply.metadata.reply_to_message_id == message.metadata.message_id
        assert reply.metadata.src_node_id == message.metadata.dst_node_id
        assert facts["partition"] == message.metadata.dst_node_id
        assert facts["pid"] != os.getpid() and facts["threads"] == 1 and facts["gpus"] == ""
        assert context.state.config_records["seen"]["count"] == 1
    assert len({reply.content["facts"]["pid"] for reply, _ in answers}) <= 2


def test_workers_sharing_gpus_are_told_which_ones_before_the_app_loads():
    # Prepare: half a GPU per client on a machine said to have one GPU and two cores
    backend = ProcessBackend(backend_config(num_gpus=0.5), cpus=2, gpus=1)
    backend.build(lambda: None)

    # Execute
    facts = [backend.process_message(*job("echo"))[0].content["facts"] for _ in range(4)]
    backend.terminate()

    # Assert: both workers run on GPU 0, each seeing only it
    assert backend.pool.size == 2
    assert {fact["gpus"] for fact in facts} == {"0"}


def test_a_client_app_that_raises_gets_flowers_client_app_error_and_the_worker_goes_on(two_workers):
    # Execute
    with pytest.raises(ClientAppException, match="RuntimeError: asked to fail"):
        two_workers.process_message(*job("raise"))
    replies = [two_workers.process_message(*job("echo"))[0] for _ in range(2)]

    # Assert
    assert all(reply.content["facts"]["answered"] == 1 for reply in replies)
    assert two_workers.pool.replaced == 0


def test_a_worker_that_dies_is_replaced_and_its_message_gets_an_error(two_workers):
    # Prepare
    before = {worker.process.pid for worker in two_workers.pool._workers.values()}

    # Execute
    stopped = r"worker \d \(pid \d+, exit code 3\) stopped while running the ClientApp for node 7"
    with pytest.raises(ClientAppException, match=stopped):
        two_workers.process_message(*job("exit"))
    pids = {two_workers.process_message(*job("echo"))[0].content["facts"]["pid"] for _ in range(4)}
    after = {worker.process.pid for worker in two_workers.pool._workers.values()}

    # Assert: still two workers, one of them new, and the pool answers
    assert two_workers.pool.replaced == 1 and two_workers.num_workers == 2
    assert len(after - before) == 1 and pids <= after


def test_an_app_the_workers_cannot_load_fails_the_build():
    # Prepare
    missing = ProcessBackend(backend_config("process_apps:nothing_here"), cpus=1)
    wrong = ProcessBackend(backend_config("process_apps:not_an_app"), cpus=1)

    # Execute / Assert
    with pytest.raises(LoadClientAppError, match="cannot load the ClientApp 'process_apps:nothing_here'"):
        missing.build(lambda: None)
    with pytest.raises(LoadClientAppError, match="'process_apps:not_an_app' is a object, not a ClientApp"):
        wrong.build(lambda: None)
    missing.terminate()
    wrong.terminate()


@pytest.mark.parametrize("verbose", [False, True])
def test_workers_show_client_warnings_and_their_info_lines_only_when_verbose(verbose, capfd):
    # Prepare: the workers write to this process's stderr, which capfd reads
    pool = WorkerPool(client_app=CLIENT_APP, size=1, verbose=verbose)
    pool.wait_ready()
    capfd.readouterr()

    # Execute
    pool.run(*job("log"))
    pool.terminate()
    printed = capfd.readouterr().err

    # Assert
    assert "a warning from the client" in printed
    assert ("an info line from the client" in printed) is verbose


def test_workers_forked_after_the_environment_changed_see_it_as_spawned_ones_would(monkeypatch):
    # Prepare: the fork server already runs, started before the change
    from process_apps import MARK_ENV

    before = WorkerPool(client_app=CLIENT_APP, size=1)
    before.wait_ready()
    before.terminate()
    monkeypatch.setenv(MARK_ENV, "set after the fork server started")
    pool = WorkerPool(client_app=CLIENT_APP, size=1)
    pool.wait_ready()

    # Execute
    reply, _ = pool.run(*job("echo"))
    pool.terminate()

    # Assert
    assert reply.content["facts"]["mark"] == "set after the fork server started"


def test_a_pool_started_early_is_the_one_the_backend_uses_and_is_built_once():
    # Prepare: a pool whose workers load the app before any backend exists
    pool = WorkerPool(client_app=CLIENT_APP, size=1)
    pool.start()
    backend = ProcessBackend({"client_resources": {"num_cpus": 1.0}}, pool=pool)

    # Execute
    backend.build(lambda: None)
    backend.build(lambda: None)
    reply, _ = backend.process_message(*job("echo"))
    backend.terminate()
    backend.terminate()

    # Assert
    assert backend.pool is pool and pool.size == 1
    assert reply.content["facts"]["answered"] == 1
    assert pool.running == 0 and not is_running(reply.content["facts"]["pid"])


@pytest.mark.parametrize(("settings", "message"), [
    ({"client_app": "no_colon", "size": 1}, r"^client_app='no_colon': must be 'module:attribute'"),
    ({"client_app": CLIENT_APP, "size": 0}, r"^size=0: a pool needs at least one worker"),
])
def test_a_pool_refuses_settings_it_cannot_run(settings, message):
    # Execute / Assert
    with pytest.raises(ValueError, match=message):
        WorkerPool(**settings)


def test_terminate_stops_every_worker():
    # Prepare
    backend = ProcessBackend(backend_config(), cpus=2)
    backend.build(lambda: None)
    pids = [worker.process.pid for worker in backend.pool._workers.values()]

    # Execute
    backend.terminate()

    # Assert
    assert len(pids) == 2 and not any(is_running(pid) for pid in pids)
    assert backend.num_workers == 0


def test_flowers_backend_name_is_restored_after_the_run_even_when_it_fails(monkeypatch):
    # Prepare: once with Flower's Ray backend module not imported yet, once imported
    from flwr.server.superlink.fleet.vce.backend import raybackend

    name = "flwr.server.superlink.fleet.vce.backend.raybackend"
    original = raybackend.RayBackend
    seen = []

    def make(config):
        return config

    # Execute
    for imported in (False, True):
        if not imported:
            monkeypatch.delitem(sys.modules, name)
        with pytest.raises(RuntimeError, match="inside"):
            with engine_backend(make):
                from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

                seen.append(RayBackend)
                raise RuntimeError("inside")
        if not imported:
            assert name not in sys.modules
            monkeypatch.setitem(sys.modules, name, raybackend)

    # Assert: what Flower's engine would import while inside, and Flower's own after
    assert seen == [make, make]
    assert raybackend.RayBackend is original


def test_the_staged_run_config_is_read_once_per_run_and_flowers_reader_is_restored(tmp_path):
    # Prepare: a staged app, and the name Flower's node registration calls
    from flwr.compat.client import run_info_store

    original = run_info_store.get_fused_config_from_dir
    stage_app({"num-rounds": 3}, tmp_path)

    # Execute: two nodes registered, the file changed, a third node, then the block fails
    with pytest.raises(RuntimeError, match="inside"):
        with app_config_read_once():
            first = run_info_store.get_fused_config_from_dir(tmp_path, {})
            second = run_info_store.get_fused_config_from_dir(tmp_path, {})
            stage_app({"num-rounds": 9}, tmp_path)
            third = run_info_store.get_fused_config_from_dir(tmp_path, {})
            overridden = run_info_store.get_fused_config_from_dir(tmp_path, {"num-rounds": 5})
            first["num-rounds"] = -1
            raise RuntimeError("inside")

    # Assert: one parse per folder and overrides, a fresh copy per node; Flower's own reader after
    assert second == third == {"num-rounds": 3} and second is not third
    assert overridden == {"num-rounds": 5}
    assert run_info_store.get_fused_config_from_dir is original
    assert original(tmp_path, {}) == {"num-rounds": 9}


def test_a_worker_that_cannot_be_started_fails_wait_ready_with_the_reason(monkeypatch):
    # Prepare: starting a process fails, as when the machine is out of processes
    def refuse(self, number):
        raise OSError("Resource temporarily unavailable")

    monkeypatch.setattr(WorkerPool, "_start", refuse)
    pool = WorkerPool(client_app=CLIENT_APP, size=2)

    # Execute / Assert: the starter thread's error reaches the caller
    with pytest.raises(LoadClientAppError, match="could not start its workers: Resource temporarily unavailable"):
        pool.wait_ready()
    pool.terminate()


def test_the_engines_queues_wait_at_most_the_poll_interval_inside_the_block(monkeypatch):
    # Prepare: record the timeout each wait is given
    import queue

    from flwr.server.superlink.fleet.vce import vce_api

    waits = []
    real_get = queue.Queue.get

    def recording_get(self, block=True, timeout=None):
        waits.append(timeout)
        return real_get(self, block, timeout)

    monkeypatch.setattr(queue.Queue, "get", recording_get)

    # Execute: the engine's one-second waits, an item, and a wait that may not block
    with engine_stops_promptly():
        messages = vce_api.Queue()
        with pytest.raises(queue.Empty):
            messages.get(timeout=1.0)
        messages.put("reply")
        received = messages.get(timeout=1.0)
        with pytest.raises(queue.Empty):
            messages.get(block=False)
    after = vce_api.Queue

    # Assert: the same queue, waiting no longer than the interval; Flower's own after
    assert received == "reply"
    assert waits == [ENGINE_POLL_SECONDS, ENGINE_POLL_SECONDS, None]
    assert after is queue.Queue


def test_the_process_backend_is_the_default_and_a_ray_address_needs_ray():
    # Execute / Assert
    assert SimulationMode().backend == "process"
    with pytest.raises(ValueError, match=r"^mode.ray_address='10.0.0.5:6379': needs mode.backend=ray"):
        SimulationMode(ray_address="10.0.0.5:6379")


def test_flowers_engine_runs_on_worker_processes_without_ray_and_a_failing_client_is_an_error_reply(tmp_path):
    # Prepare: three nodes, the second by node id raises; two workers of one core each
    out = tmp_path / "replies.json"
    mode = SimulationMode(server_app="process_apps:server", client_app=CLIENT_APP)

    # Execute
    mode.run(run_config={"out": str(out), "fail": "1", "nodes": 3}, num_supernodes=3)
    document = json.loads(out.read_text())

    # Assert: both rounds reached every node; node 1's error came back as
    # Flower's ClientApp error, the others answered from worker processes and
    # kept their state from one round to the next; Ray never started
    first, second = document["rounds"]
    assert "asked to fail" in first[1]["error"] and "asked to fail" in second[1]["error"]
    answered = [first[0], first[2], second[0], second[2]]
    assert [facts["answered"] for facts in answered] == [1, 1, 2, 2]
    assert len({facts["partition"] for facts in answered}) == 2
    assert {facts["partition"] for facts in answered} <= {0, 1, 2}
    assert document["server_pid"] == os.getpid()
    assert all(facts["pid"] != os.getpid() for facts in answered)
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
