"""The cost-aware autoscaling policy: replicas from held steps x pixels, not from requests.

The policy function is called with contexts built here, as Serve's controller builds them;
one test runs it through Serve's own autoscaling state, which applies the delays, factors and
bounds (Ray 2.60 wraps every deployment-level policy so), and one checks that the module
Serve's controller loads brings no torch with it.
"""

from __future__ import annotations

import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from pydantic import ValidationError
from ray import cloudpickle
from ray.serve._private.autoscaling_state import DeploymentAutoscalingState
from ray.serve._private.common import (
    DeploymentID,
    ReplicaID,
    ReplicaMetricReport,
    TimeStampedValue,
)
from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy
from ray.serve.config import AutoscalingConfig, AutoscalingContext, AutoscalingPolicy

from deployments.autoscaling_policy import (
    JOBS_METRIC,
    POLICY_FUNCTION,
    WORK_METRIC,
    CostAwarePolicy,
    job_work,
)
from deployments.config.model_config import ModelConfig
from serve_app import build_application, parse_args

DEPLOYMENT = DeploymentID(name="ImageGenerator:tiny-sd3", app_name="images")
LARGE = job_work(256, 256, 1, 16, None)  # 1,048,576 step-pixels
SMALL = job_work(32, 32, 1, 2, None)  # 2,048
TARGET = 2 * LARGE  # two large jobs per replica


def replicas(count: int) -> list[ReplicaID]:
    return [ReplicaID(unique_id=f"r{i}", deployment_id=DEPLOYMENT) for i in range(count)]


def context(
    running: list[ReplicaID],
    work: dict[ReplicaID, tuple[float, float]] | None,
    *,
    requests: float = 0.0,
    queued: float = 0.0,
    target: int | None = None,
    config: AutoscalingConfig | None = None,
) -> AutoscalingContext:
    """A context as the controller makes it: `work` maps a replica to the (step-pixels,
    jobs) it reported, averaged over the look-back window."""
    metrics = None
    if work is not None:
        metrics = {
            WORK_METRIC: {replica: held for replica, (held, _) in work.items()},
            JOBS_METRIC: {replica: jobs for replica, (_, jobs) in work.items()},
        }
    return AutoscalingContext(
        deployment_id=DEPLOYMENT,
        deployment_name=DEPLOYMENT.name,
        app_name=DEPLOYMENT.app_name,
        current_num_replicas=len(running),
        target_num_replicas=len(running) if target is None else target,
        running_replicas=running,
        total_num_requests=requests,
        total_queued_requests=queued,
        aggregated_metrics=metrics,
        raw_metrics=None,
        capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=8,
        policy_state={},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=time.time(),
        config=config or AutoscalingConfig(min_replicas=1, max_replicas=8),
    )


def test_six_large_jobs_want_replicas_where_six_small_ones_do_not():
    policy = CostAwarePolicy(target_step_pixels_per_replica=TARGET)
    (replica,) = running = replicas(1)
    large, _ = policy(context(running, {replica: (6 * LARGE, 6)}, requests=6))
    small, _ = policy(context(running, {replica: (6 * SMALL, 6)}, requests=6))
    assert large == pytest.approx(3.0)  # six large jobs at two per replica
    assert small == pytest.approx(6 * SMALL / TARGET)  # far below one replica
    # Serve's default policy sees six requests either way.
    config = AutoscalingConfig(target_ongoing_requests=2)
    default, _ = replica_queue_length_autoscaling_policy(
        context(running, None, requests=6, config=config)
    )
    assert default == 3.0


def test_work_of_every_running_replica_adds_up():
    policy = CostAwarePolicy(target_step_pixels_per_replica=TARGET)
    running = replicas(3)
    work = {running[0]: (3 * LARGE, 3), running[1]: (LARGE, 1), running[2]: (0.0, 0)}
    desired, _ = policy(context(running, work, requests=4))
    assert desired == pytest.approx(2.0)


def test_requests_queued_at_the_handle_count_at_the_mean_work_of_a_held_job():
    policy = CostAwarePolicy(target_step_pixels_per_replica=TARGET)
    (replica,) = running = replicas(1)
    # Four jobs on the replica (mean LARGE) and four more waiting for room on it.
    desired, _ = policy(context(running, {replica: (4 * LARGE, 4)}, requests=8, queued=4))
    assert desired == pytest.approx(4.0)


def test_reports_of_replicas_that_no_longer_run_are_left_out():
    policy = CostAwarePolicy(target_step_pixels_per_replica=TARGET)
    running = replicas(1)
    (stopped,) = [ReplicaID(unique_id="gone", deployment_id=DEPLOYMENT)]
    work = {running[0]: (2 * LARGE, 2), stopped: (40 * LARGE, 40)}
    desired, _ = policy(context(running, work, requests=2))
    assert desired == pytest.approx(1.0)


def test_until_a_replica_reports_serve_default_policy_decides():
    policy = CostAwarePolicy(target_step_pixels_per_replica=TARGET)
    running = replicas(2)
    config = AutoscalingConfig(target_ongoing_requests=2, max_replicas=8)
    ctx = context(running, None, requests=10, config=config)
    expected, _ = replica_queue_length_autoscaling_policy(ctx)
    assert policy(ctx)[0] == pytest.approx(expected) == pytest.approx(5.0)


def test_no_running_replica_leaves_the_target_to_serve():
    policy = CostAwarePolicy(target_step_pixels_per_replica=TARGET)
    assert policy(context([], None, target=1))[0] == 1


def test_an_edit_costs_the_steps_its_strength_runs():
    assert job_work(64, 64, 2, 10, 0.55) == 64 * 64 * 2 * 6
    assert job_work(64, 64, 2, 10, None) == 64 * 64 * 2 * 10
    # steps x strength just above a whole number in floats (25 x 0.28 = 7.000000000000001):
    # diffusers' SD3 and FLUX edits run 7 steps, and so does the work counted.
    assert job_work(64, 64, 1, 25, 0.28) == 64 * 64 * 7


def test_the_target_must_be_positive():
    with pytest.raises(ValueError):
        CostAwarePolicy(target_step_pixels_per_replica=0)


def serve_state(config: AutoscalingConfig) -> DeploymentAutoscalingState:
    """Serve's per-deployment autoscaling state with this config registered, as the
    controller registers a deployed one (the fields `register` reads, nothing more)."""
    state = DeploymentAutoscalingState(DEPLOYMENT)
    info = SimpleNamespace(
        deployment_config=SimpleNamespace(autoscaling_config=config, gang_scheduling_config=None),
        target_capacity=None,
        target_capacity_direction=None,
        config_changed=lambda _: False,
    )
    state.register(info, curr_target_num_replicas=1)
    return state


def report(state: DeploymentAutoscalingState, replica: ReplicaID, held: float, jobs: float):
    now = time.time()
    state.record_request_metrics_for_replica(
        ReplicaMetricReport(
            replica_id=replica,
            timestamp=now,
            metrics={
                WORK_METRIC: [TimeStampedValue(now - 0.5, held)],
                JOBS_METRIC: [TimeStampedValue(now - 0.5, jobs)],
            },
        )
    )


def cost_aware(**fields) -> AutoscalingConfig:
    policy = AutoscalingPolicy(
        policy_function=POLICY_FUNCTION,
        policy_kwargs={"target_step_pixels_per_replica": TARGET},
    )
    return AutoscalingConfig(min_replicas=1, max_replicas=3, policy=policy, **fields)


def test_serve_applies_its_bounds_and_delays_to_the_policy():
    """Pins what the policy leaves to Serve (Ray 2.60's `_apply_autoscaling_config` wrapper
    and `apply_bounds`): a newer Ray that stopped wrapping custom policies fails here."""
    (replica,) = running = replicas(1)

    prompt = serve_state(cost_aware(upscale_delay_s=0))
    prompt.update_running_replica_ids(running)
    report(prompt, replica, held=20 * LARGE, jobs=20)  # ten replicas' worth of work
    assert prompt.get_decision_num_replicas(curr_target_num_replicas=1) == 3  # max_replicas

    patient = serve_state(cost_aware(upscale_delay_s=3600))
    patient.update_running_replica_ids(running)
    report(patient, replica, held=20 * LARGE, jobs=20)
    # The same wish, held back until it has lasted an hour.
    assert patient.get_decision_num_replicas(curr_target_num_replicas=1) == 1

    damped = serve_state(cost_aware(upscale_delay_s=0, upscaling_factor=0.5))
    damped.update_running_replica_ids(running)
    report(damped, replica, held=6 * LARGE, jobs=6)  # three replicas' worth: 1 + 0.5 x 2
    assert damped.get_decision_num_replicas(curr_target_num_replicas=1) == 2


def test_the_policy_serve_ships_to_its_controller_brings_no_torch():
    """Serve cloudpickles the policy by value and the controller unpickles it: neither the
    module nor the unpickled class may import torch (the controller has no model)."""
    pickled = cloudpickle.dumps(AutoscalingPolicy(policy_function=POLICY_FUNCTION).get_policy())
    script = (
        "import sys\n"
        "from ray import cloudpickle\n"
        f"policy = cloudpickle.loads({pickled!r})(target_step_pixels_per_replica=1.0)\n"
        "import deployments.autoscaling_policy\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "print(type(policy).__name__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "CostAwarePolicy"


MODEL = {"id": "tiny-sd3", "device": "cpu"}
AUTOSCALED = {"autoscaling_config": {"min_replicas": 1, "max_replicas": 3}}


def generator_autoscaling(args: dict, generator_options: dict | None = None):
    app = build_application(parse_args(args), generator_options)
    (generator,) = app._bound_deployment.init_args[1].values()
    return generator._bound_deployment._deployment_config.autoscaling_config


def test_a_model_chooses_the_policy_in_its_config():
    args = {
        "models": [
            {**MODEL, "deployment": AUTOSCALED, "autoscaling_policy": {"kind": "cost_aware"}}
        ]
    }
    config = generator_autoscaling(args)
    assert config.policy.policy_function == POLICY_FUNCTION
    assert config.policy.policy_kwargs == {"target_step_pixels_per_replica": 2 * 28 * 1024**2}
    assert (config.min_replicas, config.max_replicas) == (1, 3)
    # Options given in code replace the config's autoscaling_config; the policy follows.
    overridden = generator_autoscaling(
        args, {"autoscaling_config": {"min_replicas": 1, "max_replicas": 5}}
    )
    assert overridden.policy.policy_function == POLICY_FUNCTION
    assert overridden.max_replicas == 5


def test_without_autoscaling_policy_a_model_keeps_serve_default_policy():
    config = generator_autoscaling({"models": [{**MODEL, "deployment": AUTOSCALED}]})
    assert config.policy.is_default_policy_function()


@pytest.mark.parametrize(
    ("deployment", "message"),
    [
        ({}, "needs deployment.autoscaling_config"),
        ({"num_replicas": 2}, "needs deployment.autoscaling_config"),
        (
            {"autoscaling_config": {"policy": {"policy_function": POLICY_FUNCTION}}},
            "set one",
        ),
    ],
)
def test_a_policy_without_autoscaling_or_with_a_second_policy_is_refused(deployment, message):
    with pytest.raises(ValidationError, match=message):
        ModelConfig(deployment=deployment, autoscaling_policy={"kind": "cost_aware"})


def test_the_target_is_checked():
    with pytest.raises(ValidationError):
        ModelConfig(deployment=AUTOSCALED, autoscaling_policy={"target_step_pixels_per_replica": 0})
