"""The builder's args and the Serve configs: what users write in YAML is checked up front."""

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from deployments.config import AppArgs
from deployments.generator import GENERATOR_DEPLOYMENT
from deployments.ingress import INGRESS_DEPLOYMENT
from serve_app import InvalidArgs, build_app, parse_args

CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"
CONFIG_FILES = sorted(CONFIG_DIR.glob("*.yaml"))


def test_there_are_configs_to_check():
    assert {path.name for path in CONFIG_FILES} >= {"local.yaml", "sd3.5-medium.yaml"}


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda path: path.name)
def test_config_file_is_a_valid_serve_config_with_valid_args(path):
    config = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    assert config.http_options.request_timeout_s, "every config sets a request timeout"
    for application in config.applications:
        assert application.import_path == "serve_app:build_app"
        args = parse_args(application.args)
        # The ingress answers a timed-out request in the API's error shape before Ray's
        # proxy cuts it off with a plain-text 408.
        assert args.request_timeout_s < config.http_options.request_timeout_s
        deployments = {deployment.name: deployment for deployment in application.deployments}
        assert set(deployments) == {INGRESS_DEPLOYMENT, GENERATOR_DEPLOYMENT}
        generator = deployments[GENERATOR_DEPLOYMENT].model_dump(exclude_unset=True)
        for option in (
            "max_ongoing_requests",
            "max_queued_requests",
            "graceful_shutdown_timeout_s",
            "autoscaling_config",
        ):
            assert option in generator, f"{path.name} must set {option} explicitly"
        assert "num_gpus" in generator["ray_actor_options"]
        # Batches form inside the replica, so it must hold enough requests to fill them.
        full_batches = args.worker_threads * args.batching.max_batch_images
        assert generator["max_ongoing_requests"] >= full_batches
        autoscaling = generator["autoscaling_config"]
        assert autoscaling["target_ongoing_requests"] <= generator["max_ongoing_requests"]


def test_gpu_config_asks_for_a_gpu_and_the_local_one_does_not():
    def generator_gpus(name: str) -> float:
        config = yaml.safe_load((CONFIG_DIR / name).read_text())
        (generator,) = [
            d for d in config["applications"][0]["deployments"] if d["name"] == GENERATOR_DEPLOYMENT
        ]
        return generator["ray_actor_options"]["num_gpus"]

    assert generator_gpus("sd3.5-medium.yaml") == 1
    assert generator_gpus("local.yaml") == 0


def test_gpu_config_requires_keys_and_the_local_one_does_not():
    def auth(name: str) -> bool:
        config = yaml.safe_load((CONFIG_DIR / name).read_text())
        return parse_args(config["applications"][0]["args"]).auth.enabled

    assert auth("sd3.5-medium.yaml")
    assert not auth("local.yaml")


def test_defaults_serve_the_embedded_model():
    args = parse_args({})
    assert args.model.source == "embedded:tiny-sd3"
    assert args == AppArgs()


def test_unknown_keys_are_rejected_by_name():
    with pytest.raises(InvalidArgs) as caught:
        parse_args({"model": {"id": "m", "sorce": "x"}, "workers": 3})
    message = str(caught.value)
    assert "args.model.sorce: unknown key" in message
    assert "args.workers: unknown key" in message


def test_bad_values_are_rejected_by_name():
    with pytest.raises(InvalidArgs, match=r"args\.worker_threads"):
        parse_args({"worker_threads": 0})
    with pytest.raises(InvalidArgs, match=r"args\.model\.dtype"):
        parse_args({"model": {"dtype": "float8"}})


def test_default_size_must_fit_the_models_rules():
    with pytest.raises(InvalidArgs, match="multiple"):
        parse_args({"model": {"default_size": "100x100"}})
    with pytest.raises(InvalidArgs, match="max_pixels"):
        parse_args({"model": {"default_size": "1024x1024"}, "limits": {"max_pixels": 4096}})


def test_defaults_must_be_within_the_limits():
    with pytest.raises(InvalidArgs, match="max_steps"):
        parse_args({"model": {"default_steps": 30}, "limits": {"max_steps": 20}})
    with pytest.raises(InvalidArgs, match="max_guidance_scale"):
        parse_args({"model": {"default_guidance_scale": 9}, "limits": {"max_guidance_scale": 8}})


def test_every_field_is_described():
    def fields(model):
        for name, field in model.model_fields.items():
            yield f"{model.__name__}.{name}", field
            annotation = field.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                yield from fields(annotation)

    for name, field in fields(AppArgs):
        assert field.description, f"{name} has no description"


def test_build_app_binds_ingress_in_front_of_the_generator():
    app = build_app({"worker_threads": 3})
    assert app._bound_deployment.name == INGRESS_DEPLOYMENT


def test_readme_documents_every_args_key():
    readme = (CONFIG_DIR.parent / "README.md").read_text()
    for section, field in AppArgs.model_fields.items():
        nested = field.annotation
        if isinstance(nested, type) and hasattr(nested, "model_fields"):
            keys = [f"{section}.{name}" for name in nested.model_fields]
        else:
            keys = [section]
        for key in keys:
            assert f"`{key}`" in readme, f"README's configuration table lacks `{key}`"
